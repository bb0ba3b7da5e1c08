"""kohya sd-scripts' Flux OFT (``networks/oft_flux.py``) against its own forward, written out from that
file in ``loralab_testkit.family_loras.kohya_oft_weight`` (per part of the output rows, Q = B − Bᵀ clipped as
``(min(‖Q‖, alpha·rows) + 1e-8) / (‖Q‖ + 1e-8)``, R = (I + Q)(I − Q)⁻¹ by inverse, R_s = s·(R − I) + I
its multiplier, the weight ``einsum("k n m, k n p -> k m p", R_s, W as (k, n, in))``); the bias untouched.

The invariant matrix (test_adapters_matrix.py, cases ``oft_flux*``) adds dtypes, restore and round trips;
the loader on a tiny Flux model is in tests/comfy/test_dit_formats.py.
"""
from __future__ import annotations

import pytest
import torch

from loralab.lora import LoraError, apply, parse
from loralab.lora.adapters.oft_flux import FluxOFT
from loralab.lora.bypass import attach
from loralab_testkit.family_loras import kohya_oft_weight
from tolerances import TOL, rel_err

PREFIX = "oft_unet_single_blocks_0_linear1"


def file(parts: list[torch.Tensor], alpha: float, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The keys OFTNetwork.save_weights writes: a ParameterList ``oft_blocks`` and the ``alpha`` buffer."""
    sd = {f"{prefix}.oft_blocks.{i}": t for i, t in enumerate(parts)}
    sd[f"{prefix}.alpha"] = torch.tensor(alpha)
    return sd


def linear1_parts(g: torch.Generator, num: int = 2, d: int = 8, mlp: int = 12) -> list[torch.Tensor]:
    """A single block's linear1 split like sd-scripts' [3072] * 3 + [12288], at width d: q, k, v, MLP."""
    return [torch.randn(num, d // num, d // num, generator=g) * 0.3 for _ in range(3)] + \
        [torch.randn(num, mlp // num, mlp // num, generator=g) * 0.3]


@pytest.mark.parametrize("alpha", [1e-3, 0.05, 10.0], ids=["kohya_default", "clipped", "free"])
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_matches_oft_flux_forward(alpha, strength):
    g = torch.Generator().manual_seed(0)
    parts = linear1_parts(g)
    lin = torch.nn.Linear(8, 36)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(36, 8, generator=g))
        lin.bias.copy_(torch.randn(36, generator=g))
    (a,) = parse(file(parts, alpha), file="oft.safetensors").modules[PREFIX]
    assert isinstance(a, FluxOFT) and a.rows == (8, 8, 8, 12) and a.rank == 2
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    want = kohya_oft_weight(parts, alpha, w0, strength)
    assert rel_err(want, w0) > 1e-4                                      # the rotation does something
    x = torch.randn(5, 8, generator=g)
    with torch.no_grad():
        handle = apply(lin, [("weight", a, strength)])
        assert rel_err(lin.weight, want) <= TOL["reference_fp32"]
        assert torch.equal(lin.bias, b0)                                  # the bias is not rotated
        merged_out = lin(x)
        handle.restore()
        hooks = attach(lin, [("weight", a, strength)])
        bypass_out = lin(x)
        hooks.remove()
    assert rel_err(merged_out, x @ want.T + b0) <= TOL["reference_fp32"]
    assert rel_err(bypass_out, merged_out) <= TOL["bypass_fp32"]


def test_alpha_zero_keeps_the_layer_as_it_trained():
    """sd-scripts clips ‖Q‖ to alpha·rows even for alpha = 0 (LyCORIS' diag-OFT reads 0 as no limit):
    such a file rotates by ~1e-8 of its blocks, and we load it so."""
    g = torch.Generator().manual_seed(1)
    parts = linear1_parts(g)
    (a,) = parse(file(parts, 0.0), file="oft.safetensors").modules[PREFIX]
    w = torch.randn(36, 8, generator=g)
    assert a.delta(w).abs().max() < 1e-6 * w.abs().max()
    assert rel_err(w + a.delta(w), kohya_oft_weight(parts, 0.0, w, 1.0)) <= TOL["fp32"]


def test_split_that_does_not_fit_is_a_clear_error_and_changes_nothing():
    """A Flux OFT file whose parts cover other rows than the layer has (a file for another width)."""
    g = torch.Generator().manual_seed(2)
    (a,) = parse(file(linear1_parts(g), 1e-3), file="oft.safetensors").modules[PREFIX]
    lin = torch.nn.Linear(8, 40)
    before = lin.weight.detach().clone()
    with pytest.raises(LoraError, match=r"file 'oft.safetensors', key 'oft_unet_single_blocks_0_linear1': "
                                        r"kohya Flux OFT blocks split the output rows as "
                                        r"2×4 \+ 2×4 \+ 2×4 \+ 2×6 = 36, but target 'weight' of shape "
                                        r"\(40, 8\) has 40 rows"):
        apply(lin, [("weight", a, 1.0)])
    assert torch.equal(lin.weight, before)


def test_malformed_modules_are_refused_with_their_key():
    g = torch.Generator().manual_seed(3)
    parts = linear1_parts(g)
    gap = {k: v for k, v in file(parts, 1e-3).items() if not k.endswith(".oft_blocks.1")}
    with pytest.raises(LoraError, match=r"key 'oft_unet_single_blocks_0_linear1': kohya Flux OFT module has "
                                        r"blocks \['oft_blocks.0', 'oft_blocks.2', 'oft_blocks.3'\]: a part "
                                        r"between them is missing"):
        parse(gap, file="oft.safetensors")
    flat = file([torch.randn(2, 4, 3, generator=g)], 1e-3)
    with pytest.raises(LoraError, match=r"oft_blocks.0 must be \(num, b, b\); found \(2, 4, 3\)"):
        parse(flat, file="oft.safetensors")


def test_round_trip_writes_sd_scripts_keys():
    g = torch.Generator().manual_seed(4)
    sd = file(linear1_parts(g), 1e-3)
    (a,) = parse(sd, file="oft.safetensors").modules[PREFIX]
    out = a.to_state_dict()
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k].float()) for k in sd)
