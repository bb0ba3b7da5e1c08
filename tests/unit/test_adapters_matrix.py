"""Every adapter format as an invariant matrix: algorithm × Linear/Conv × dtype × strength.

For each case the file's keys go through the registry (``parse``) and the model through
``lora.patch`` / ``lora.bypass``:
  merged = weight + strength·ΔW (additive formats; the others against their own fp32 math here and
  against the producing library in test_adapters_reference.py); the result differs from the base;
  restore gives the base back bit for bit; bypass output ≈ merged output; two stacked additive
  adapters = base + both deltas; to_state_dict → parse round-trips exactly.
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
from loralab.lora.bypass import attach
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
    kinds: tuple = ("linear", "conv")
    additive: bool = True      # merged == W + s·ΔW(W)
    options: dict = field(default_factory=dict)
    target: str = "weight"


def _pos(t):                   # a positive magnitude near the weight's own norms
    return 1.0 + t.abs()


def lora(shape, rnd, r=3):
    out, inn, *k = shape
    return {".lora_up.weight": rnd(out, r, *[1] * len(k)), ".lora_down.weight": rnd(r, inn, *k),
            ".alpha": torch.tensor(1.5)}


def locon_tucker(shape, rnd, r=3):
    out, inn, *k = shape
    return {".lora_up.weight": rnd(out, r, 1, 1), ".lora_down.weight": rnd(r, inn, 1, 1),
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
    return {".a1.weight": rnd(inn, r, 1, 1), ".a2.weight": rnd(r, inn, 1, 1), ".b1.weight": rnd(out, r, 1, 1),
            ".b2.weight": rnd(r, inn, 1, 1), ".bm.weight": rnd(r, r, *k), ".alpha": torch.tensor(2.0)}


def oft(alpha=0.0, rescale=False):
    def build(shape, rnd):
        sd = {".oft_blocks": rnd(2, 4, 4), ".alpha": torch.tensor(alpha)}
        if rescale:
            sd[".rescale"] = 1 + 0.3 * rnd(shape[0], *[1] * (len(shape) - 1))
        return sd
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


def with_(*parts):
    def build(shape, rnd):
        return {k: v for p in parts for k, v in p(shape, rnd).items()}
    return build


CASES = [
    Case("lora", lora),
    Case("locon_tucker", locon_tucker, kinds=("conv",)),
    Case("lora_dora_out", with_(lora, dora_out), additive=False),
    Case("lora_dora_in", with_(lora, dora_in), additive=False),
    Case("lora_peft_dora", peft_dora, additive=False),
    Case("dylora", lambda s, rnd: lora(s, rnd, r=4), options={"dyn_rank": 2}),
    Case("loha", loha),
    Case("loha_tucker", loha_tucker, kinds=("conv",)),
    Case("loha_dora", with_(loha, dora_out), additive=False),
    Case("lokr_w2_lowrank", lokr_w2_lowrank),
    Case("lokr_w1_lowrank", lokr_w1_lowrank),
    Case("lokr_both_lowrank", lokr_both_lowrank),
    Case("lokr_full", lokr_full),
    Case("lokr_t2", lokr_t2, kinds=("conv",)),
    Case("lokr_t1", lokr_t1, kinds=("conv",)),
    Case("lokr_dora_in", with_(lokr_w2_lowrank, dora_in), additive=False),
    Case("ia3_out", ia3(False)),
    Case("ia3_in", ia3(True)),
    Case("glora", glora),
    Case("glora_old", glora_old),
    Case("glora_bm", glora_bm, kinds=("conv",)),
    Case("glora_dora", with_(glora, dora_out), additive=False),
    Case("oft", oft()),
    Case("oft_constrained", oft(alpha=0.05)),
    Case("oft_rescale", oft(rescale=True)),
    Case("oft_diag", oft_diag),
    Case("boft", boft(), additive=False),
    Case("boft_constrained_rescale", boft(alpha=0.05, rescale=True), additive=False),
    Case("diff", lambda s, rnd: {".diff": rnd(*s)}),
    Case("diff_b", lambda s, rnd: {".diff_b": rnd(s[0])}, target="bias"),
    Case("set_weight", lambda s, rnd: {".set_weight": rnd(*s)}),
]
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
            for c in cases for k in c.kinds for d in dtypes for s in strengths]


def expected_merged(a, base: torch.Tensor, strength: float, additive: bool) -> torch.Tensor:
    w = base.float()
    if additive:
        return w + strength * a.delta(w)
    return a.apply_(w.clone(), strength)


@pytest.mark.parametrize("case,kind,dtype,strength", matrix())
def test_merge_is_exact_and_restores_bit_for_bit(case, kind, dtype, strength):
    m = layer(kind, dtype)
    a = adapter(case, kind)
    key = case.target
    base = getattr(m, key).detach().clone()
    handle = apply(m, [(key, a, strength)])
    merged = getattr(m, key).detach().clone()
    want = expected_merged(a, base, strength, case.additive).to(dtype)
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


@pytest.mark.parametrize("case,kind", [pytest.param(c, k, id=f"{c.name}-{k}") for c in CASES for k in c.kinds])
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
