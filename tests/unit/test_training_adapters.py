"""Trainable adapters: the bypass forward equals the merged weight, factors have the shapes the
producing tools write, and ΔW agrees with LyCORIS (the library that defines LoHa/LoKr/OFT)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from loralab.training import adapters as ad
from loralab.training.errors import TrainingError
from tolerances import TOL, rel_err

ALGOS = ["lora", "loha", "lokr", "oft"]


def layers():
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(24, 36),
        "linear_nobias": nn.Linear(24, 36, bias=False),
        "conv3x3_s2": nn.Conv2d(12, 18, 3, stride=2, padding=1),
        "conv1x1": nn.Conv2d(12, 18, 1),
        "conv1d": nn.Conv1d(6, 8, 3, padding=1),
    }


def inputs(layer):
    g = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 5, layer.in_features, generator=g)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, layer.in_channels, 9, generator=g)
    return torch.randn(2, layer.in_channels, 9, 9, generator=g)


def perturbed(algo, layer, rank=4):
    """A fresh adapter with every factor random (fresh ones are zero on one side: ΔW = 0 would
    make bypass == merged hold vacuously)."""
    a = ad.TRAINABLE[algo].create(ad.LayerSpec.of(layer), rank, 2.0, torch.Generator().manual_seed(3), torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    a.attach(layer.bias) if isinstance(a, ad.TrainOFT) else None
    return a


def delta_of(a, layer):
    return a.delta_for(layer.weight) if isinstance(a, ad.TrainOFT) else a.delta()


def merged_forward(layer, delta, x):
    w = layer.weight + delta
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, w, layer.bias)
    return layer._conv_forward(x, w, layer.bias)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("kind", list(layers()))
def test_bypass_equals_merged(algo, kind):
    layer = layers()[kind]
    a = perturbed(algo, layer)
    x = inputs(layer)
    with torch.no_grad():
        y = layer(x)
        bypass = a(x, y)
        merged = merged_forward(layer, delta_of(a, layer), x)
    assert not torch.allclose(bypass, y), "the adapter must change the output (non-vacuous test)"
    assert rel_err(bypass, merged) <= TOL["bypass_fp32"]


@pytest.mark.parametrize("algo", ALGOS)
def test_fresh_adapter_leaves_model_unchanged(algo):
    layer = layers()["conv3x3_s2"]
    a = ad.TRAINABLE[algo].create(ad.LayerSpec.of(layer), 4, 1.0, torch.Generator().manual_seed(0), torch.float32)
    if isinstance(a, ad.TrainOFT):
        a.attach(layer.bias)
    x = inputs(layer)
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(a(x, y), y)


def test_loha_factorized_and_full_paths_agree():
    """LoHa runs as a rank-r² LoRA when that is smaller than ΔW, else builds ΔW; both are one formula."""
    layer = nn.Linear(64, 64)
    small = perturbed("loha", layer, rank=2)
    big = perturbed("loha", layer, rank=8)
    assert small.factorized() and not big.factorized()
    x = inputs(layer)
    for a in (small, big):
        with torch.no_grad():
            y = layer(x)
            assert rel_err(a(x, y), merged_forward(layer, a.delta(), x)) <= TOL["bypass_fp32"]


@pytest.mark.parametrize("kind", ["linear", "conv3x3_s2"])
def test_factor_shapes_are_the_producing_tools(kind):
    layer = layers()[kind]
    spec = ad.LayerSpec.of(layer)
    sd = perturbed("lora", layer).state_dict_for("lora_unet_x")
    if spec.is_conv:  # kohya LoCon: 4-D down (r, in, kh, kw) and up (out, r, 1, 1)
        assert sd["lora_unet_x.lora_down.weight"].shape == (4, 12, 3, 3)
        assert sd["lora_unet_x.lora_up.weight"].shape == (18, 4, 1, 1)
    else:
        assert sd["lora_unet_x.lora_down.weight"].shape == (4, 24)
        assert sd["lora_unet_x.lora_up.weight"].shape == (36, 4)
    assert sd["lora_unet_x.alpha"].dtype == torch.float32 and sd["lora_unet_x.alpha"].dim() == 0
    loha = perturbed("loha", layer).state_dict_for("m")
    assert {k.split(".", 1)[1] for k in loha} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert {k.split(".", 1)[1] for k in perturbed("oft", layer).state_dict_for("m")} == {"oft_blocks", "alpha"}


# ---- against the library that defines each format (test-only dependency) ----------------------
def _lycoris():
    return pytest.importorskip("lycoris.functional")


@pytest.mark.parametrize("kind", ["linear", "conv3x3_s2"])
def test_loha_matches_lycoris(kind):
    lf = _lycoris()
    layer = layers()[kind]
    a = perturbed("loha", layer)
    # LyCORIS order: (w1 down, w1 up, w2 down, w2 up, t1, t2) = (hada_w1_b, hada_w1_a, hada_w2_b, hada_w2_a)
    with torch.no_grad():
        ref = lf.loha.diff_weight(a.w1b, a.w1a, a.w2b, a.w2a, None, None, gamma=torch.tensor(a.scale),
                                  backend="torch").reshape(layer.weight.shape)
    assert rel_err(a.delta().detach(), ref.detach()) <= TOL["reference_fp32"]


@pytest.mark.parametrize("kind", ["linear", "conv3x3_s2", "conv1x1"])
@pytest.mark.parametrize("rank", [2, 64])     # factorized w2, and w2 stored whole
def test_lokr_matches_lycoris_make_kron(kind, rank):
    lf = _lycoris()
    layer = layers()[kind]
    a = perturbed("lokr", layer, rank=rank)
    ref = lf.lokr.make_kron(a.w1, a._w2(), a.scale).reshape(layer.weight.shape)
    assert rel_err(a.delta().detach(), ref.detach()) <= TOL["reference_fp32"]
    assert hasattr(a, "w2") == (rank == 64)


@pytest.mark.parametrize("kind", ["linear", "conv3x3_s2"])
def test_oft_matches_lycoris(kind):
    lf = _lycoris()
    layer = layers()[kind]
    a = perturbed("oft", layer)
    with torch.no_grad():
        a.blocks.mul_(0.2)
    ref = lf.diag_oft.diff_weight(layer.weight.detach(), a.blocks.detach(), None, constraint=0, backend="torch")
    assert rel_err(a.delta_for(layer.weight).detach(), ref.detach()) <= TOL["reference_fp32"]


@pytest.mark.parametrize("algo", ALGOS)
def test_saved_factors_parse_in_the_registry_to_the_same_delta(algo):
    """What we save, the core registry (used by our loader) reads back to the same ΔW."""
    from loralab.lora.adapters import ADAPTERS, parse

    if algo not in ADAPTERS:
        pytest.skip(f"{algo} is not in the adapter registry yet")
    layer = layers()["conv3x3_s2"]
    a = perturbed(algo, layer)
    parsed = parse(a.state_dict_for("lora_unet_m"))
    (adapter,) = parsed.modules["lora_unet_m"]
    assert adapter.name == algo
    w = layer.weight.detach().clone()
    got = adapter.apply_(w.clone(), 1.0) - w
    assert rel_err(got, delta_of(a, layer).detach()) <= TOL["reference_fp32"]


# ---- resume from factors ------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGOS)
def test_from_factors_round_trips(algo):
    layer = layers()["conv3x3_s2"]
    a = perturbed(algo, layer)
    sd = a.state_dict_for("m")
    factors = {}
    for k, t in sd.items():
        role = "alpha" if k.endswith(".alpha") else a.suffixes["." + k.split(".", 1)[1]]
        factors[role] = t
    b = ad.TRAINABLE[algo].from_factors(a.spec, factors, torch.float32, "m")
    assert b.alpha == a.alpha
    for role, t in a.factors().items():
        assert torch.equal(b.factors()[role], t)


def test_from_factors_refuses_a_wrong_shape():
    layer = layers()["linear"]
    bad = {"up": torch.zeros(36, 4), "down": torch.zeros(4, 25)}
    with pytest.raises(TrainingError, match="shape"):
        ad.TrainLoRA.from_factors(ad.LayerSpec.of(layer), bad, torch.float32, "lora_unet_x")


def test_rank_larger_than_a_layer_allows_is_an_error():
    targets = {"small": nn.Linear(3, 40), "big": nn.Linear(40, 40)}
    with pytest.raises(TrainingError, match=r"rank 4 .* choose rank ≤ 3"):
        ad.build(targets, "lora", 4, 1.0, 0, torch.float32)
    ad.build(targets, "lora", 3, 1.0, 0, torch.float32)


def test_init_depends_on_seed_and_layer_name_only():
    l1, l2 = nn.Linear(8, 8), nn.Linear(8, 8)
    a = ad.build({"x": l1, "y": l2}, "lora", 2, 1.0, 7, torch.float32)
    b = ad.build({"y": l2}, "lora", 2, 1.0, 7, torch.float32)
    c = ad.build({"y": l2}, "lora", 2, 1.0, 8, torch.float32)
    assert torch.equal(a["y"].down, b["y"].down)
    assert not torch.equal(b["y"].down, c["y"].down)


def test_installed_hooks_are_removed():
    layer = nn.Linear(8, 8)
    a = perturbed("lora", layer)
    x = torch.randn(2, 8)
    before = layer(x)
    with ad.Installed({"m": layer}, {"m": a}):
        assert not torch.allclose(layer(x), before)
    assert torch.equal(layer(x), before)


def test_factorize():
    assert ad.factorize(320) == (16, 20)
    assert ad.factorize(7) == (1, 7)
    assert ad.factorize(64) == (8, 8)
    assert all(m * n == d and m <= n for d in range(1, 200) for m, n in [ad.factorize(d)])
    assert math.isfinite(ad.mix(2**64 - 1, 5))
