"""Every adapter format as an invariant matrix: algorithm × Linear/Conv × dtype × strength.

For each case the file's keys go through the registry (``parse``) and the model through
``lora.patch`` / ``lora.bypass``:
  merged = weight + strength·ΔW (additive formats), or the format's rule written out here from its
  definition (DoRA's rescale, BOFT's butterfly as dense matrices; the producing libraries pin the
  same in test_adapters_reference.py); the result differs from the base; restore gives the base
  back bit for bit; bypass output ≈ merged output, through the format's own forward route (the
  ΔW-building fallback is taken only where lora/bypass.py says so); two stacked additive adapters =
  base + both deltas; to_state_dict → parse round-trips exactly.
Factors are random and non-zero (producers zero-initialise one factor; a zero ΔW would pass
everything vacuously).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from loralab.lora import apply, parse
from loralab.lora import bypass as bypass_mode
from loralab.lora.adapters import ADAPTERS
from loralab.lora.adapters import trainable as trainable_classes
from loralab.lora.bypass import attach
from loralab.lora.ops import Op
from tolerances import rel_err, tol_for

OUT, IN, K = 8, 12, 3          # Linear (8, 12); Conv2d (8, 6, 3, 3)
CONV_IN = 6
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STRENGTHS = [0.5, 1.0, -1.0]
FILE = "case.safetensors"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: handing work to a second thread costs more than the math (100× on a
    busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


@dataclass
class Case:
    name: str
    build: Callable            # (shape, rnd) -> {suffix: tensor}
    kinds: tuple = ("linear", "conv")     # the layers files of this format exist for
    merged: Callable | None = None        # (adapter, W fp32, s) -> merged W; None: additive, W + s·ΔW(W)
    options: dict = field(default_factory=dict)
    target: str = "weight"
    linear_math: bool = False  # Tucker-type: no tool writes it for a Linear, but the math holds there

    @property
    def additive(self) -> bool:
        return self.merged is None

    @property
    def math_kinds(self) -> tuple:
        return ("linear", *self.kinds) if self.linear_math and "linear" not in self.kinds else self.kinds


def _pos(t):                   # a positive magnitude near the weight's own norms
    return 1.0 + t.abs()


def lora(shape, rnd, r=3):
    out, inn, *k = shape
    return {".lora_up.weight": rnd(out, r, *[1] * len(k)), ".lora_down.weight": rnd(r, inn, *k),
            ".alpha": torch.tensor(1.5)}


def locon_tucker(shape, rnd, r=3):
    out, inn, *k = shape
    ones = [1] * len(k)
    return {".lora_up.weight": rnd(out, r, *ones), ".lora_down.weight": rnd(r, inn, *ones),
            ".lora_mid.weight": rnd(r, r, *k), ".alpha": torch.tensor(2.0)}


def dora_out(shape, rnd):
    return {".dora_scale": _pos(rnd(shape[0], *[1] * (len(shape) - 1)))}


def dora_in(shape, rnd):
    return {".dora_scale": _pos(rnd(1, shape[1], *[1] * (len(shape) - 2)))}


def peft_dora(shape, rnd, r=3):
    out, inn, *k = shape
    mag = _pos(rnd(out)) if not k else _pos(rnd(1, out, *[1] * len(k)))     # PEFT's own layouts
    return {".lora_B.weight": rnd(out, r, *[1] * len(k)), ".lora_A.weight": rnd(r, inn, *k),
            ".lora_magnitude_vector": mag}


def loha(shape, rnd, r=2):
    out, inn, *k = shape
    n = inn * math.prod(k)                     # LyCORIS stores conv halves flattened
    return {".hada_w1_a": rnd(out, r), ".hada_w1_b": rnd(r, n), ".hada_w2_a": rnd(out, r),
            ".hada_w2_b": rnd(r, n), ".alpha": torch.tensor(1.0)}


def loha_tucker(shape, rnd, r=2):
    out, inn, *k = shape
    return {".hada_t1": rnd(r, r, *k), ".hada_w1_a": rnd(r, out), ".hada_w1_b": rnd(r, inn),
            ".hada_t2": rnd(r, r, *k), ".hada_w2_a": rnd(r, out), ".hada_w2_b": rnd(r, inn),
            ".alpha": torch.tensor(3.0)}


def _kron_dims(shape):         # out = a·b, in = c·d
    out, inn, *k = shape
    return 2, out // 2, 2, inn // 2, k


def lokr_w2_lowrank(shape, rnd, r=2):
    a, b, c, d, k = _kron_dims(shape)
    n = d * math.prod(k)
    return {".lokr_w1": rnd(a, c), ".lokr_w2_a": rnd(b, r), ".lokr_w2_b": rnd(r, n), ".alpha": torch.tensor(1.0)}


def lokr_w1_lowrank(shape, rnd, r=1):
    a, b, c, d, k = _kron_dims(shape)
    return {".lokr_w1_a": rnd(a, r), ".lokr_w1_b": rnd(r, c), ".lokr_w2": rnd(b, d, *k), ".alpha": torch.tensor(3.0)}


def lokr_both_lowrank(shape, rnd, r=2):
    a, b, c, d, k = _kron_dims(shape)
    return {".lokr_w1_a": rnd(a, r), ".lokr_w1_b": rnd(r, c), ".lokr_w2_a": rnd(b, r),
            ".lokr_w2_b": rnd(r, d, *k), ".alpha": torch.tensor(1.0)}


def lokr_full(shape, rnd):
    a, b, c, d, k = _kron_dims(shape)
    # alpha 7 is ignored when both halves are whole (LyCORIS' rule); test_reference pins it
    return {".lokr_w1": rnd(a, c), ".lokr_w2": rnd(b, d, *k), ".alpha": torch.tensor(7.0)}


def lokr_t2(shape, rnd, r=2):
    a, b, c, d, k = _kron_dims(shape)
    return {".lokr_w1": rnd(a, c), ".lokr_t2": rnd(r, r, *k), ".lokr_w2_a": rnd(r, b), ".lokr_w2_b": rnd(r, d),
            ".alpha": torch.tensor(1.0)}


def lokr_t1(shape, rnd, r=2):
    a, b, c, d, k = _kron_dims(shape)
    return {".lokr_t1": rnd(r, r, *k), ".lokr_w1_a": rnd(r, a), ".lokr_w1_b": rnd(r, c), ".lokr_w2": rnd(b, d),
            ".alpha": torch.tensor(1.0)}


def ia3(on_input):
    def build(shape, rnd):
        n = shape[1] if on_input else shape[0]
        w = rnd(n) if len(shape) == 2 else rnd(1, n, *[1] * (len(shape) - 2))
        return {".weight": w, ".on_input": torch.tensor(int(on_input))}
    return build


def glora(shape, rnd, r=2):
    out, inn, *k = shape
    p = [1] * len(k)
    return {".a1.weight": rnd(inn, r, *p), ".a2.weight": rnd(r, inn, *p), ".b1.weight": rnd(out, r, *p),
            ".b2.weight": rnd(r, inn, *k), ".alpha": torch.tensor(1.0)}


def glora_old(shape, rnd, r=2):
    out, inn, *k = shape
    n = inn * math.prod(k)
    return {".a1.weight": rnd(r, n), ".a2.weight": rnd(n, r), ".b1.weight": rnd(r, n), ".b2.weight": rnd(out, r),
            ".alpha": torch.tensor(1.0)}


def glora_bm(shape, rnd, r=2):
    out, inn, *k = shape
    p = [1] * len(k)
    return {".a1.weight": rnd(inn, r, *p), ".a2.weight": rnd(r, inn, *p), ".b1.weight": rnd(out, r, *p),
            ".b2.weight": rnd(r, inn, *p), ".bm.weight": rnd(r, r, *k), ".alpha": torch.tensor(2.0)}


def oft(alpha=0.0, rescale=False):
    def build(shape, rnd):
        sd = {".oft_blocks": rnd(2, 4, 4), ".alpha": torch.tensor(alpha)}
        if rescale:
            sd[".rescale"] = 1 + 0.3 * rnd(shape[0], *[1] * (len(shape) - 1))
        return sd
    return build


def oft_flux(alpha):
    """kohya's Flux OFT: the 8 output rows in two parts (q-like, k-like), 2 blocks of 2 each."""
    def build(shape, rnd):
        return {".oft_blocks.0": rnd(2, 2, 2), ".oft_blocks.1": rnd(2, 2, 2), ".alpha": torch.tensor(alpha)}
    return build


def oft_diag(shape, rnd):
    q = rnd(2, 4, 4)
    q = q - q.mT
    eye = torch.eye(4)
    return {".oft_diag": torch.linalg.solve(eye - q, eye + q, left=False)}     # a stored rotation


def boft(alpha=0.0, rescale=False):
    def build(shape, rnd):
        sd = {".oft_blocks": rnd(3, 4, 2, 2), ".alpha": torch.tensor(alpha)}   # m=3 stages, b=2
        if rescale:
            sd[".rescale"] = 1 + 0.3 * rnd(shape[0], *[1] * (len(shape) - 1))
        return sd
    return build


def trained(algo, rank):
    """What the trainer saves: factors laid out by ``Adapter.init`` (the producer's initialisation,
    as training creates them for this layer), then moved off their zero init (random)."""
    def build(shape, rnd):
        cls = ADAPTERS[algo]
        fresh = cls.init(Op(conv_dims=len(shape) - 2, shape=tuple(shape)), rank, 2.0, torch.Generator().manual_seed(0))
        moved = {r: t if r == "alpha" else rnd(*t.shape) for r, t in fresh.factors().items() if t is not None}
        return cls.from_factors(moved, prefix="", file=None, options={}).to_state_dict("")
    return build


def with_(*parts):
    def build(shape, rnd):
        return {k: v for p in parts for k, v in p(shape, rnd).items()}
    return build


# ---- the non-additive rules, written out from their definitions -----------------------------------
def _norm_on(w, axis):
    return w.movedim(axis, 0).reshape(w.shape[axis], -1).norm(dim=1)


def _per(v, w, axis):
    shape = [1] * w.dim()
    shape[axis] = -1
    return v.reshape(shape)


def lycoris_dora(axis):
    """W' = W + ΔW; W'' = W'·(s·(m/(‖W'‖ + eps) − 1) + 1), ‖·‖ over every axis but ``axis``."""
    def merged(a, w, s):
        wp = w + a.delta(w)
        n = _norm_on(wp, axis) + torch.finfo(torch.float32).eps
        c = s * (a.dora_scale.float().flatten() / n - 1) + 1
        return wp * _per(c, wp, axis)
    return merged


def peft_dora_rule(a, w, s):
    """W'' = m·(W + sΔW)/‖W + sΔW‖ per output row."""
    wp = w + s * a.delta(w)
    return wp * _per(a.peft_magnitude.float().flatten() / _norm_on(wp, 0), wp, 0)


def boft_rule(a, w, s):
    """W' = ρ_s ⊙ M_{m−1}⋯M_0·W, M_i = P_iᵀ·blockdiag(s·R_i + (1−s)·I)·P_i as dense matrices,
    R_i = (I + Q_i)(I − Q_i)⁻¹ (by inverse), ‖Q‖ clipped to alpha·out, P_i regrouping rows
    (c, g, h) as (c, h, g), h = 2^i·b/2."""
    blocks = a.blocks.float()
    m, num, b, _ = blocks.shape
    out = num * b
    q = blocks - blocks.transpose(-1, -2)
    limit = (a.alpha or 0) * out
    norm = q.norm() + 1e-8
    if limit > 0 and norm > limit:
        q = q * limit / norm
    eye = torch.eye(b)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    t = w.flatten(1)
    for i in range(m):
        perm = torch.arange(out).view(-1, 2, 2 ** i * b // 2).transpose(1, 2).flatten()
        p = torch.zeros(out, out)
        p[torch.arange(out), perm] = 1.0
        t = p.T @ torch.block_diag(*(s * r[i] + (1 - s) * eye)) @ p @ t
    rho = 1 + s * (a.rescale.float().flatten() - 1) if a.rescale is not None else torch.ones(out)
    return (t * rho[:, None]).reshape(w.shape)


CASES = [
    Case("lora", lora),
    Case("locon_tucker", locon_tucker, kinds=("conv",), linear_math=True),
    Case("lora_dora_out", with_(lora, dora_out), merged=lycoris_dora(0)),
    Case("lora_dora_in", with_(lora, dora_in), merged=lycoris_dora(1)),
    Case("lora_peft_dora", peft_dora, merged=peft_dora_rule),
    Case("dylora", lambda s, rnd: lora(s, rnd, r=4), options={"dyn_rank": 2}),
    Case("loha", loha),
    Case("loha_tucker", loha_tucker, kinds=("conv",), linear_math=True),
    Case("loha_dora", with_(loha, dora_out), merged=lycoris_dora(0)),
    Case("lokr_w2_lowrank", lokr_w2_lowrank),
    Case("lokr_w1_lowrank", lokr_w1_lowrank),
    Case("lokr_both_lowrank", lokr_both_lowrank),
    Case("lokr_full", lokr_full),
    Case("lokr_t2", lokr_t2, kinds=("conv",), linear_math=True),
    Case("lokr_t1", lokr_t1, kinds=("conv",), linear_math=True),
    Case("lokr_dora_in", with_(lokr_w2_lowrank, dora_in), merged=lycoris_dora(1)),
    Case("ia3_out", ia3(False)),
    Case("ia3_in", ia3(True)),
    Case("glora", glora),
    Case("glora_old", glora_old),
    Case("glora_bm", glora_bm, kinds=("conv",), linear_math=True),
    Case("glora_dora", with_(glora, dora_out), merged=lycoris_dora(0)),
    Case("oft", oft()),
    Case("oft_constrained", oft(alpha=0.05)),
    Case("oft_rescale", oft(rescale=True)),
    Case("oft_diag", oft_diag),
    Case("oft_flux", oft_flux(10.0), kinds=("linear",)),
    Case("oft_flux_constrained", oft_flux(0.05), kinds=("linear",)),
    Case("boft", boft(), merged=boft_rule),
    Case("boft_constrained_rescale", boft(alpha=0.05, rescale=True), merged=boft_rule),
    Case("diff", lambda s, rnd: {".diff": rnd(*s)}),
    Case("diff_b", lambda s, rnd: {".diff_b": rnd(s[0])}, target="bias"),
    Case("set_weight", lambda s, rnd: {".set_weight": rnd(*s)}),
    # every trainable algorithm, as training lays out its factors (test_training_adapters.py adds
    # the training-only invariants: gradients, init = base model, bypass == the loader's merge)
    Case("trained_lora", trained("lora", 3)),
    Case("trained_loha", trained("loha", 2)),
    Case("trained_lokr", trained("lokr", 1)),
    Case("trained_oft", trained("oft", 4)),
]
TRAINABLE_CASES = {c.name.removeprefix("trained_") for c in CASES if c.name.startswith("trained_")}
BY_NAME = {c.name: c for c in CASES}


def layer(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    m = torch.nn.Linear(IN, OUT) if kind == "linear" else torch.nn.Conv2d(CONV_IN, OUT, K, padding=1)
    g = gen(kind)       # not torch.manual_seed: it also seeds CUDA lazily, slow under pytest's deep stacks
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return m.to(dtype)


def shape_of(kind: str) -> tuple:
    return (OUT, IN) if kind == "linear" else (OUT, CONV_IN, K, K)


def state_dict(case: Case, kind: str, prefix: str = "m", shape: tuple | None = None) -> dict[str, torch.Tensor]:
    g = gen(f"{case.name}/{kind}")

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    return {prefix + s: t for s, t in case.build(shape or shape_of(kind), rnd).items()}


def adapter(case: Case, kind: str, prefix: str = "m", shape: tuple | None = None):
    (a,) = parse(state_dict(case, kind, prefix, shape), file=FILE, options=case.options).modules[prefix]
    return a


def inputs(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    shape = (3, IN) if kind == "linear" else (2, CONV_IN, 5, 5)
    return torch.randn(*shape, generator=g).to(dtype)


def matrix(cases=CASES, dtypes=DTYPES, strengths=STRENGTHS):
    return [pytest.param(c, k, d, s, id=f"{c.name}-{k}-{str(d)[6:]}-{s:g}")
            for c in cases for k in c.math_kinds for d in dtypes for s in strengths]


def expected_merged(case: Case, a, base: torch.Tensor, strength: float) -> torch.Tensor:
    w = base.float()
    if case.additive:
        return w + strength * a.delta(w)
    return case.merged(a, w, strength)


@pytest.mark.parametrize("case,kind,dtype,strength", matrix())
def test_merge_is_exact_and_restores_bit_for_bit(case, kind, dtype, strength):
    m = layer(kind, dtype)
    a = adapter(case, kind)
    key = case.target
    base = getattr(m, key).detach().clone()
    handle = apply(m, [(key, a, strength)])
    merged = getattr(m, key).detach().clone()
    want = expected_merged(case, a, base, strength).to(dtype)
    assert rel_err(merged, want) <= tol_for(dtype)
    assert not torch.equal(merged, base), "the adapter changed nothing: the test would pass vacuously"
    handle.restore()
    assert torch.equal(getattr(m, key), base)


@pytest.mark.parametrize("case,kind,dtype,strength", matrix())
def test_bypass_equals_merged(case, kind, dtype, strength):
    m = layer(kind, dtype)
    a = adapter(case, kind)
    x = inputs(kind, dtype)
    with torch.no_grad():
        base_out = m(x)
        handle = apply(m, [(case.target, a, strength)])
        merged_out = m(x)
        handle.restore()
        hooks = attach(m, [(case.target, a, strength)])
        bypass_out = m(x)
        hooks.remove()
        assert torch.equal(m(x), base_out)
    assert rel_err(bypass_out, merged_out) <= tol_for(dtype, "bypass")
    assert not torch.equal(bypass_out, base_out)


# Layer geometries bypass must reproduce: the adapter's own op chain or its ΔW fallback must use the
# layer's stride, padding (and padding mode), dilation, groups and dimensionality.
GEOMETRIES = {
    "strided": (lambda: torch.nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 7, 7)),
    "dilated_reflect": (lambda: torch.nn.Conv2d(6, 8, 3, padding=2, dilation=2, padding_mode="reflect"), (2, 6, 7, 7)),
    "circular": (lambda: torch.nn.Conv2d(6, 8, 3, padding=1, padding_mode="circular"), (2, 6, 5, 5)),
    "grouped": (lambda: torch.nn.Conv2d(12, 8, 3, padding=1, groups=2), (2, 12, 5, 5)),
    "pointwise": (lambda: torch.nn.Conv2d(6, 8, 1), (2, 6, 4, 4)),
    "conv1d": (lambda: torch.nn.Conv1d(6, 8, 3, padding=1, stride=2), (2, 6, 9)),
    "conv3d": (lambda: torch.nn.Conv3d(6, 8, 3, padding=1), (1, 6, 4, 4, 4)),
}


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("case", [c for c in CASES if "conv" in c.kinds], ids=lambda c: c.name)
def test_bypass_follows_the_layer_geometry(case, geometry):
    make, x_shape = GEOMETRIES[geometry]
    m = make()
    g = gen(geometry)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    a = adapter(case, "conv", shape=tuple(m.weight.shape))
    x = torch.randn(*x_shape, generator=g)
    with torch.no_grad():
        handle = apply(m, [(case.target, a, 0.7)])
        merged_out = m(x)
        handle.restore()
        hooks = attach(m, [(case.target, a, 0.7)])
        bypass_out = m(x)
        hooks.remove()
    assert rel_err(bypass_out, merged_out) <= tol_for(torch.float32, "bypass")


# Weight-independent additive formats: stacking on one tensor must add their deltas.
STACKS = [("lora", "loha"), ("lokr_w2_lowrank", "diff"), ("lokr_full", "lora"), ("loha", "dylora")]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("names", STACKS, ids="+".join)
def test_two_stacked_adapters_add_their_deltas(names, kind, dtype):
    m = layer(kind, dtype)
    a1, a2 = (adapter(BY_NAME[n], kind, prefix=f"m{i}") for i, n in enumerate(names))
    base = m.weight.detach().clone()
    handle = apply(m, [("weight", a1, 0.5), ("weight", a2, -1.0)])
    w = base.float()
    want = (w + 0.5 * a1.delta(w) - a2.delta(w)).to(dtype)
    assert rel_err(m.weight.detach(), want) <= tol_for(dtype)
    handle.restore()
    assert torch.equal(m.weight, base)


@pytest.mark.parametrize("case,kind", [pytest.param(c, k, id=f"{c.name}-{k}") for c in CASES for k in c.math_kinds])
def test_save_then_parse_round_trips_exactly(case, kind):
    a = adapter(case, kind)
    sd = a.to_state_dict("saved")
    (b,) = parse(sd, file="saved.safetensors").modules["saved"]       # no options: DyLoRA is already cut
    assert type(b) is type(a)
    fa, fb = a.factors(), b.factors()
    assert fa.keys() == fb.keys()
    for role in fa:
        assert (fa[role] is None) == (fb[role] is None), role
        if fa[role] is not None:
            assert fa[role].dtype == fb[role].dtype and torch.equal(fa[role], fb[role]), role
    w = layer(kind, torch.float32).weight.detach()
    w = w if case.target == "weight" else layer(kind, torch.float32).bias.detach()
    assert torch.equal(a.delta(w), b.delta(w))


# ---- bypass takes each format's own forward route --------------------------------------------------
# The cases where lora/bypass.py says ΔW is still built, each with its reason there.
BUILDS_DELTA = {"glora_old", "glora_dora"}
BUILDS_DELTA_GROUPED = {"locon_tucker", "loha_tucker", "lokr_w2_lowrank", "lokr_w1_lowrank", "lokr_both_lowrank",
                        "lokr_full", "lokr_t2", "lokr_t1", "lokr_dora_in", "glora", "glora_old", "glora_bm",
                        "glora_dora", "oft", "oft_constrained", "oft_rescale", "oft_diag", "boft",
                        "boft_constrained_rescale", "trained_lokr", "trained_oft"}


def _loha_delta_is_smaller(a, shape) -> bool:
    """r1·r2·(out + in·k) (+ the r1·r2 × r1·r2 Tucker core per kernel position) ≥ out·in·k."""
    if a.name != "loha":
        return False
    r = a.w1_b.shape[0] * a.w2_b.shape[0]
    out, n = shape[0], shape[1:].numel()
    core = r * r * a.t1[0, 0].numel() if a.t1 is not None else 0
    return r * (out + n) + core >= out * n


def _route_cases():
    out = []
    for c in CASES:
        if c.target != "weight":
            continue
        out += [pytest.param(c, k, id=f"{c.name}-{k}") for k in c.math_kinds]
        if "conv" in c.kinds:
            out.append(pytest.param(c, "grouped", id=f"{c.name}-grouped"))
    return out


@pytest.mark.parametrize("case,kind", _route_cases())
def test_bypass_never_builds_delta_w_where_a_route_exists(case, kind, monkeypatch):
    # Pins issue 9.4: LoHa (incl. Tucker), conv LoKr and DoRA (LyCORIS on both axes, PEFT) used to
    # fall back to op(x, merged − W) in bypass mode: a weight-sized float32 ΔW (and a float32 copy
    # of W, so fp8 models gained nothing) per layer per forward. Every way of building ΔW from the
    # adapter raises here; only the cases lora/bypass.py lists may (and must) take it.
    if kind == "grouped":
        make, x_shape = GEOMETRIES["grouped"]
        m = make()
        a = adapter(case, "conv", shape=tuple(m.weight.shape))
        x = torch.randn(*x_shape, generator=gen("grouped"))
        builds = case.name in BUILDS_DELTA_GROUPED
    else:
        m, a, x = layer(kind, torch.float32), adapter(case, kind), inputs(kind, torch.float32)
        builds = case.name in BUILDS_DELTA
    with torch.no_grad():
        handle = apply(m, [("weight", a, 0.7)])
        merged_out = m(x)
        handle.restore()

    def refuse(*args, **kwargs):
        raise AssertionError("bypass built ΔW")
    # LoHa builds ΔW from its factors (never reading W) where ΔW is smaller than its rank-r1·r2 form
    refused = ("apply_",) if _loha_delta_is_smaller(a, m.weight.shape) else ("delta", "apply_")
    for cls in type(a).__mro__:
        for name in refused:
            if name in vars(cls):
                monkeypatch.setattr(cls, name, refuse)
    monkeypatch.setattr(bypass_mode, "weight_delta", refuse)
    hooks = attach(m, [("weight", a, 0.7)])
    try:
        with torch.no_grad():
            if builds:
                with pytest.raises(AssertionError, match="built ΔW"):
                    m(x)
                return
            bypass_out = m(x)
    finally:
        hooks.remove()
    assert rel_err(bypass_out, merged_out) <= tol_for(torch.float32, "bypass")


# Formats whose ΔW does not depend on W: their bypass must never read W's values (so an fp8 or
# quantised weight is only ever run by its own layer). LoHa is also taken at a rank where ΔW is
# smaller than its rank-r1·r2 form (ΔW is then built, from the factors alone).
WEIGHT_FREE = ["lora", "locon_tucker", "dylora", "loha", "loha_tucker", "lokr_w2_lowrank", "lokr_w1_lowrank",
               "lokr_both_lowrank", "lokr_full", "lokr_t2", "lokr_t1", "diff"]
LOHA_HIGH_RANK = Case("loha_high_rank", lambda s, rnd: loha(s, rnd, r=8))


@pytest.mark.parametrize("case,kind", [pytest.param(c, k, id=f"{c.name}-{k}")
                                       for c in [BY_NAME[n] for n in WEIGHT_FREE] + [LOHA_HIGH_RANK]
                                       for k in c.math_kinds])
def test_weight_independent_bypass_never_reads_the_weight(case, kind):
    m, a, x = layer(kind, torch.float32), adapter(case, kind), inputs(kind, torch.float32)
    if case is LOHA_HIGH_RANK:
        assert _loha_delta_is_smaller(a, m.weight.shape), "the case must exercise the ΔW-from-factors form"
    with torch.no_grad():
        base_out = m(x)
        handle = apply(m, [("weight", a, 0.7)])
        merged_out = m(x)
        handle.restore()
        poisoned = torch.full_like(m.weight, float("nan"))
        dy = a.bypass(x, poisoned, 0.7, bypass_mode.Op.of(m))
    assert dy is not None and torch.isfinite(dy).all()
    assert rel_err(base_out + dy, merged_out) <= tol_for(torch.float32, "bypass")


def test_every_trainable_algorithm_is_in_the_matrix():
    assert TRAINABLE_CASES == {c.name for c in trainable_classes()}
