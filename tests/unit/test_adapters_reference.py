"""Each format against the library that produces it, on random non-zero factors.

The producer writes the file (its modules' own ``state_dict``, so keys and shapes are exactly what
users download); we parse it and merge it into a copy of the layer; the producer's forward pass at
the same multiplier (LyCORIS' rebuild forward, PEFT's forward) must give the same output, and where
the producer exposes its ΔW math as a function, the same weight. fp32, tolerance
``reference_fp32``. LyCORIS' training forward is the reference, not its ``get_diff_weight``: in
lycoris-lora 4.1.3 that applies alpha/rank twice for LoHa and LoKr (so its ``merge_to`` differs
from the model it trained); we follow the forward.
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch
# The producing libraries are test requirements (requirements-test.txt): without them this module
# fails to import, which fails the run, rather than skipping every reference check.
from lycoris.functional import boft as ly_boft
from lycoris.functional import diag_oft as ly_oft
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr
from lycoris.functional.general import rebuild_tucker
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from lycoris.modules.glora import GLoRAModule, _glora_weight
from lycoris.modules.ia3 import IA3Module, _ia3_weight
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

from loralab.lora import apply, parse
from tolerances import TOL, rel_err

TOL_REF = TOL["reference_fp32"]
STRENGTHS = [1.0, 0.5, -1.0]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second thread costs more than the math on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_layer(kind: str, seed: int = 0) -> torch.nn.Module:
    g = seeded(seed)
    m = {"linear": lambda: torch.nn.Linear(24, 16), "conv": lambda: torch.nn.Conv2d(24, 16, 3, padding=1),
         "conv16": lambda: torch.nn.Conv2d(16, 16, 3, padding=1)}[kind]()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def inputs(layer: torch.nn.Module) -> torch.Tensor:
    g = seeded(99)
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(4, layer.in_features, generator=g)
    return torch.randn(2, layer.in_channels, 6, 6, generator=g)


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 1, std: float = 0.3, only: str = "") -> torch.nn.Module:
    """Producers zero-initialise one factor; give every (adapter) parameter a random non-zero value."""
    g = seeded(seed)
    for name, p in module.named_parameters():
        if only not in name:
            continue
        t = torch.randn(p.shape, generator=g) * std
        p.copy_(1 + t.abs() if any(n in name for n in ("dora_scale", "rescale", "magnitude")) else t)
    return module


def file_of(module: torch.nn.Module, prefix: str = "m") -> dict[str, torch.Tensor]:
    """The keys and tensors the producer saves for this module."""
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def merged_layer(layer, sd, strength, *, options=None, prefix="m"):
    (a,) = parse(sd, file="ref.safetensors", options=options).modules[prefix]
    ours = copy.deepcopy(layer)
    apply(ours, [("weight", a, strength)])
    return ours, a


@torch.no_grad()
def check_against_module(layer, module, strength, *, sd=None):
    """Our merged layer's output equals the LyCORIS module's forward at multiplier ``strength``."""
    module.multiplier = strength
    x = inputs(layer)
    ours, _ = merged_layer(layer, file_of(module) if sd is None else sd, strength)
    want = module(x)
    assert rel_err(ours(x), want) <= TOL_REF
    assert rel_err(want, layer(x)) > 1e-3, "the reference changed nothing"


def lyco(cls, layer, **kw):
    return randomise(cls("m", layer, 1.0, bypass_mode=False, **kw))


# ---- LoRA / LoCon + DoRA --------------------------------------------------------------------------
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out_axis", "in_axis"])
@pytest.mark.parametrize("kind,tucker", [("linear", False), ("conv", False), ("conv", True)])
def test_locon_dora_matches_lycoris(kind, tucker, wd_on_out, strength):
    # Pins DoRA: norm of the *patched* weight on either axis, strength blending the rescale only.
    # ComfyUI core normalises the output axis against the unpatched weight instead.
    layer = make_layer(kind)
    check_against_module(layer, lyco(LoConModule, layer, lora_dim=3, alpha=1.5, use_tucker=tucker,
                                     weight_decompose=True, wd_on_out=wd_on_out), strength)


# ---- PEFT DoRA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("kind", ["linear", "conv", "conv16"])
def test_peft_dora_matches_peft(kind, strength):
    # Pins PEFT's rule: strength scales ΔW inside the norm, W'' = m·(W+sΔW)/‖W+sΔW‖. Regression:
    # PEFT's conv magnitude (1, out, 1, 1) has the layout of a LyCORIS input-axis dora_scale, so on a
    # square conv (conv16) reading it as dora_scale normalised the wrong axis; it has its own role.
    layer = make_layer(kind)
    model = torch.nn.Sequential(copy.deepcopy(layer))
    cfg = peft.LoraConfig(r=3, lora_alpha=3, target_modules=["0"], use_dora=True)
    pm = randomise(peft.get_peft_model(model, cfg), seed=3, only="lora_")
    sd = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(pm).items()}
    prefix = "base_model.model.0"
    assert any(k.endswith("lora_magnitude_vector") for k in sd)
    pm.base_model.model[0].set_scale("default", strength)
    x = inputs(layer)
    with torch.no_grad():
        want = pm(x)
    ours, _ = merged_layer(layer, sd, strength, prefix=prefix)
    with torch.no_grad():
        assert rel_err(ours(x), want) <= TOL_REF


# ---- LoHa -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("kind,tucker,dora", [("linear", False, False), ("conv", False, False),
                                              ("conv", True, False), ("linear", False, True), ("conv", True, True)])
def test_loha_matches_lycoris(kind, tucker, dora, strength):
    layer = make_layer(kind)
    check_against_module(layer, lyco(LohaModule, layer, lora_dim=3, alpha=1.0, use_tucker=tucker,
                                     weight_decompose=dora), strength)


def test_loha_delta_matches_lycoris_functional():
    # ΔW = γ·(w1a·w1b ⊙ w2a·w2b) with γ applied once; LyCORIS' diff_weight takes (w1d, w1u, w2d, w2u, t1, t2)
    layer = make_layer("conv")
    m = lyco(LohaModule, layer, lora_dim=3, alpha=2.0, use_tucker=True)
    _, a = merged_layer(layer, file_of(m), 1.0)
    want = ly_loha.diff_weight(m.hada_w1_b, m.hada_w1_a, m.hada_w2_b, m.hada_w2_a, m.hada_t1, m.hada_t2,
                               gamma=torch.tensor(2.0 / 3)).detach()
    assert rel_err(a.delta(layer.weight.detach()), want) <= TOL_REF


# ---- LoKr -----------------------------------------------------------------------------------------
LOKR = {
    "w2_lowrank": dict(kind="linear", lora_dim=2, alpha=1.0),
    "both_lowrank": dict(kind="linear", lora_dim=1, alpha=0.5, decompose_both=True),
    # both halves whole: LyCORIS scales by 1 whatever alpha the file stores (we write 7 below)
    "full": dict(kind="linear", lora_dim=2, alpha=1.0, full_matrix=True),
    "conv_lowrank": dict(kind="conv", lora_dim=2, alpha=1.0),
    "conv_tucker": dict(kind="conv", lora_dim=2, alpha=1.0, use_tucker=True),
    "conv_dora_in": dict(kind="conv", lora_dim=2, alpha=1.0, weight_decompose=True, wd_on_out=False),
    "linear_dora_out": dict(kind="linear", lora_dim=2, alpha=1.5, weight_decompose=True),
}


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("name", LOKR)
def test_lokr_matches_lycoris(name, strength):
    kw = dict(LOKR[name])
    layer = make_layer(kw.pop("kind"))
    m = lyco(LokrModule, layer, **kw)
    sd = file_of(m)
    if name == "full":
        sd["m.alpha"] = torch.tensor(7.0)     # ignored when both halves are whole (LyCORIS' rule)
    if name == "conv_tucker":
        assert "m.lokr_t2" in sd
    check_against_module(layer, m, strength, sd=sd)


def test_lokr_t1_follows_the_lokr_t2_tucker_rule():
    # lokr_t1 is in LyCORIS' key list but no LyCORIS module builds it (ComfyUI drops it): W1 is
    # rebuilt with the same CP/Tucker rule LyCORIS uses for lokr_t2 (rebuild_tucker), then kron.
    g = seeded(5)
    t1, w1a, w1b, w2 = (torch.randn(*s, generator=g) * 0.3 for s in [(2, 2, 3, 3), (2, 4), (2, 4), (4, 6)])
    sd = {"m.lokr_t1": t1, "m.lokr_w1_a": w1a, "m.lokr_w1_b": w1b, "m.lokr_w2": w2, "m.alpha": torch.tensor(1.0)}
    (a,) = parse(sd, file="t1.safetensors").modules["m"]
    weight = make_layer("conv").weight.detach()
    w1 = rebuild_tucker(t1, w1a, w1b).contiguous()           # (4, 4, 3, 3); w2 kron'd as a 1×1 kernel
    want = ly_lokr.kron_weight(w1, None, None, w2[..., None, None], None, None, None, scale=0.5)
    assert rel_err(a.delta(weight), want.reshape(weight.shape)) <= TOL_REF


# ---- IA3 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("on_input", [False, True], ids=["out", "in"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_ia3_matches_lycoris(kind, on_input, strength):
    layer = make_layer(kind)
    m = lyco(IA3Module, layer, train_on_input=on_input)
    check_against_module(layer, m, strength)
    _, a = merged_layer(layer, file_of(m), strength)
    w = layer.weight.detach()
    assert rel_err(strength * a.delta(w), _ia3_weight(w, m.weight.detach(), on_input, strength, True)) <= TOL_REF


# ---- GLoRA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_glora_matches_lycoris(kind, strength):
    layer = make_layer(kind)
    check_against_module(layer, lyco(GLoRAModule, layer, lora_dim=3, alpha=1.5), strength)


def test_glora_bm_matches_lycoris_functional():
    # ComfyUI core drops bm. lycoris-lora 4.1.3's GLoRAModule never builds bm (its use_tucker test
    # contradicts itself), so the reference is its weight function with bm.
    g = seeded(6)
    a1, a2, b1, b2, bm = (torch.randn(*s, generator=g) * 0.3 for s in
                          [(24, 3, 1, 1), (3, 24, 1, 1), (16, 3, 1, 1), (3, 24, 1, 1), (3, 3, 3, 3)])
    sd = {"m.a1.weight": a1, "m.a2.weight": a2, "m.b1.weight": b1, "m.b2.weight": b2, "m.bm.weight": bm,
          "m.alpha": torch.tensor(2.0)}
    (a,) = parse(sd, file="bm.safetensors").modules["m"]
    w = make_layer("conv").weight.detach()
    assert rel_err(a.delta(w), _glora_weight(w, a1, a2, b1, b2, bm, 2.0 / 3)) <= TOL_REF


def test_glora_old_layout_is_the_current_one_with_factors_renamed():
    # Regression: the first LyCORIS GLoRA stored a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r) and
    # computed W·a2·a1 + b2·b1; a square layer fits both layouts and must not be misread.
    layer = torch.nn.Linear(16, 16)
    m = lyco(GLoRAModule, layer, lora_dim=3, alpha=1.5)
    new = file_of(m)
    old = {"m.a1.weight": new["m.a2.weight"], "m.a2.weight": new["m.a1.weight"],
           "m.b1.weight": new["m.b2.weight"], "m.b2.weight": new["m.b1.weight"], "m.alpha": new["m.alpha"]}
    (a_new,) = parse(new, file="new.safetensors").modules["m"]
    (a_old,) = parse(old, file="old.safetensors").modules["m"]
    assert (a_new.old_layout, a_old.old_layout) == (False, True)
    w = layer.weight.detach()
    assert rel_err(a_old.delta(w), a_new.delta(w)) <= TOL["fp32"]


# ---- OFT / BOFT -----------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("constraint", [0.0, 0.01], ids=["free", "constrained"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_diag_oft_matches_lycoris(kind, constraint, strength):
    # Pins alpha as the constraint scaled by out_dim (ComfyUI core uses alpha alone) and strength
    # applied once (ComfyUI core: s²).
    layer = make_layer(kind)
    m = lyco(DiagOFTModule, layer, lora_dim=4, constraint=constraint)
    if constraint:
        q = m.oft_blocks - m.oft_blocks.transpose(1, 2)
        assert q.norm() > m.constraint, "the constraint must be active for this case"
    check_against_module(layer, m, strength)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_diag_oft_rescale_matches_lycoris_at_strength_1(kind):
    layer = make_layer(kind)
    m = lyco(DiagOFTModule, layer, lora_dim=4, constraint=0.01, rescaled=True)
    check_against_module(layer, m, 1.0)
    _, a = merged_layer(layer, file_of(m), 1.0)
    w = layer.weight.detach()
    want = ly_oft.diff_weight(w, m.oft_blocks.detach(), m.rescale.detach(), constraint=m.constraint)
    assert rel_err(a.delta(w), want) <= TOL_REF


def test_legacy_oft_diag_is_the_stored_rotation():
    # Old LyCORIS saved the rotation R itself as oft_diag (A1111 reads it so; ComfyUI drops it).
    layer = make_layer("linear")
    m = lyco(DiagOFTModule, layer, lora_dim=4, constraint=0.0)
    r = ly_oft.get_r(m.oft_blocks.detach(), constraint=0)
    (a,) = parse({"m.oft_diag": r}, file="diag.safetensors").modules["m"]
    w = layer.weight.detach()
    assert rel_err(a.delta(w), ly_oft.diff_weight(w, m.oft_blocks.detach(), None)) <= TOL_REF


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("constraint", [0.0, 0.01], ids=["free", "constrained"])
@pytest.mark.parametrize("kind", ["linear", "conv16"])
def test_boft_matches_lycoris(kind, constraint, strength):
    # Pins BOFT's strength: every butterfly stage interpolated toward I, once (ComfyUI core scales
    # the result by s again).
    layer = make_layer(kind)
    m = lyco(ButterflyOFTModule, layer, lora_dim=2, constraint=constraint)
    assert m.oft_blocks.dim() == 4 and m.oft_blocks.shape[0] > 1
    check_against_module(layer, m, strength)
    _, a = merged_layer(layer, file_of(m), strength)
    w = layer.weight.detach()
    want = ly_boft.diff_weight(w, m.oft_blocks.detach(), None, constraint=m.constraint, scale=strength)
    assert rel_err(a.apply_(w.clone(), strength) - w, want) <= TOL_REF


def test_boft_rescale_matches_lycoris_at_strength_1():
    layer = make_layer("linear")
    check_against_module(layer, lyco(ButterflyOFTModule, layer, lora_dim=2, constraint=0.01, rescaled=True), 1.0)


# ---- DyLoRA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_dylora_rank_selection_is_a1111s(rank):
    # A1111's dyn=r: ΔW = (alpha / R)·up[:, :r]·down[:r], R the stored rank (ComfyUI ignores DyLoRA).
    g = seeded(8)
    up, down = torch.randn(16, 8, generator=g), torch.randn(8, 24, generator=g)
    sd = {"m.lora_up.weight": up, "m.lora_down.weight": down, "m.alpha": torch.tensor(4.0)}
    (a,) = parse(sd, file="dy.safetensors", options={"dyn_rank": rank}).modules["m"]
    want = 4.0 / 8 * up[:, :rank] @ down[:rank]
    assert a.rank == rank
    assert rel_err(a.delta(make_layer("linear").weight.detach()), want) <= TOL["fp32"]
