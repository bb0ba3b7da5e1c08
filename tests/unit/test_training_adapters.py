"""Trainable adapters through the same invariants as the loader (test_adapters_matrix.py), because
they are the loader's adapters: a trainable adapter's bypass output equals the output of the
weight the loader merges from its saved file; save → parse gives the same ΔW; gradients reach every
factor; a fresh adapter changes nothing (ΔW = 0 exactly, as kohya / LyCORIS initialise) and a
perturbed one does. Then the producing library's math (LyCORIS), file shapes, seeding, hooks."""
from __future__ import annotations

import copy

import pytest
import torch
from lycoris.functional import diag_oft as ly_oft
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr
from torch import nn

from loralab.lora import apply, parse
from loralab.lora.adapters import ADAPTERS
from loralab.lora.adapters.base import factorize
from loralab.training import adapters as ad
from loralab.training.errors import TrainingError
from tolerances import TOL, rel_err

ALGOS = ad.algorithms()
# (algorithm, rank): LoKr at a rank that factorises w2 and at one that stores it whole; LoHa at a
# rank whose rank-r² form is smaller than ΔW and at one where ΔW is (built from the factors then)
VARIANTS = [("LoRA", 4), ("LoHa", 2), ("LoHa", 8), ("LoKr", 1), ("LoKr", 64), ("OFT", 4)]


def test_every_trainable_algorithm_is_a_registered_adapter_and_in_this_matrix():
    assert ALGOS == ["LoRA", "LoHa", "LoKr", "OFT"]          # core's TrainLoraNode names, in its order
    assert {a for a, _ in VARIANTS} == set(ALGOS)
    for label in ALGOS:
        cls = ad.trainable(label)
        assert ADAPTERS[cls.name] is cls and cls.label == label
        assert ad.trainable(cls.name) is cls                 # the lowercase names of saved workflows


def layers():
    g = torch.Generator().manual_seed(0)
    out = {
        "linear": nn.Linear(24, 36),
        "linear_nobias": nn.Linear(24, 36, bias=False),
        "conv3x3_s2": nn.Conv2d(12, 18, 3, stride=2, padding=1),
        "conv1x1": nn.Conv2d(12, 18, 1),
        "conv1d": nn.Conv1d(6, 8, 3, padding=1),
    }
    with torch.no_grad():
        for m in out.values():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return out


def inputs(layer):
    g = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 5, layer.in_features, generator=g)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, layer.in_channels, 9, generator=g)
    return torch.randn(2, layer.in_channels, 9, 9, generator=g)


def fresh(algo, layer, rank=4, alpha=2.0, seed=3):
    return ad.create_adapters({"m": layer}, algo, rank, alpha, seed, torch.float32)["m"]


def perturbed(algo, layer, rank=4):
    """A fresh adapter with every factor random (fresh ones are zero on one side: ΔW = 0 would
    make bypass == merged hold vacuously)."""
    a = fresh(algo, layer, min(rank, ad.trainable(algo).max_rank(ad.layer_op(layer))))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return a


def hooked_output(layer, a, x):
    with ad.Installed({"m": layer}, {"m": a}):
        return layer(x)


def loader_merged_output(layer, sd, x):
    """What LoRA Lab's loader computes for the saved file: its adapter merged into a copy of the layer."""
    (loaded,) = parse(sd, file="trained.safetensors").modules["m"]
    merged = copy.deepcopy(layer)
    apply(merged, [("weight", loaded, 1.0)])
    return merged(x), loaded


MATRIX = [pytest.param(algo, rank, kind, id=f"{algo}-r{rank}-{kind}") for algo, rank in VARIANTS for kind in layers()]


@pytest.mark.parametrize("algo,rank,kind", MATRIX)
def test_bypass_output_equals_the_loaders_merged_weight(algo, rank, kind):
    layer = layers()[kind]
    a = perturbed(algo, layer, rank)
    x = inputs(layer)
    with torch.no_grad():
        y = layer(x)
        ours = hooked_output(layer, a, x)
        want, _ = loader_merged_output(layer, a.state_dict_for("m"), x)
    assert not torch.allclose(ours, y), "the adapter must change the output (non-vacuous test)"
    assert rel_err(ours, want) <= TOL["bypass_fp32"]


@pytest.mark.parametrize("algo,rank,kind", MATRIX)
def test_save_then_parse_gives_the_same_delta(algo, rank, kind):
    layer = layers()[kind]
    a = perturbed(algo, layer, rank)
    w = layer.weight.detach()
    _, loaded = loader_merged_output(layer, a.state_dict_for("m"), inputs(layer))
    with torch.no_grad():
        assert torch.equal(loaded.delta(w), a.delta(w))          # one formula: bit for bit
        assert rel_err(loaded.apply_(w.clone(), 1.0) - w, a.delta(w)) <= TOL["fp32"]


@pytest.mark.parametrize("algo,rank,kind", MATRIX)
def test_gradients_reach_every_factor(algo, rank, kind):
    layer = layers()[kind].requires_grad_(False)
    a = perturbed(algo, layer, rank)
    hooked_output(layer, a, inputs(layer)).square().sum().backward()
    assert dict(a.named_parameters()).keys() == {f"factors.{r}" for r in a.factors}
    for role, p in a.factors.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, role


@pytest.mark.parametrize("algo,rank,kind", MATRIX)
def test_a_fresh_adapter_is_the_base_model_and_a_trained_one_is_not(algo, rank, kind):
    layer = layers()[kind]
    rank = min(rank, ad.trainable(algo).max_rank(ad.layer_op(layer)))
    a = fresh(algo, layer, rank)
    x = inputs(layer)
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(a.delta(layer.weight), torch.zeros_like(layer.weight))    # the producer's init
        assert torch.equal(hooked_output(layer, a, x), y)
        assert not torch.allclose(hooked_output(layer, perturbed(algo, layer, rank), x), y)


# ---- the factors as the producing tools write them -------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv3x3_s2"])
def test_factor_shapes_are_the_producing_tools(kind):
    layer = layers()[kind]
    conv = isinstance(layer, nn.Conv2d)
    sd = perturbed("LoRA", layer).state_dict_for("lora_unet_x")
    if conv:  # kohya LoCon: 4-D down (r, in, kh, kw) and up (out, r, 1, 1)
        assert sd["lora_unet_x.lora_down.weight"].shape == (4, 12, 3, 3)
        assert sd["lora_unet_x.lora_up.weight"].shape == (18, 4, 1, 1)
    else:
        assert sd["lora_unet_x.lora_down.weight"].shape == (4, 24)
        assert sd["lora_unet_x.lora_up.weight"].shape == (36, 4)
    assert sd["lora_unet_x.alpha"].dtype == torch.float32 and sd["lora_unet_x.alpha"].dim() == 0
    n_in = 12 * 9 if conv else 24
    loha = perturbed("LoHa", layer).state_dict_for("m")           # LyCORIS: conv halves flattened
    assert {k: tuple(v.shape) for k, v in loha.items()} == {
        "m.hada_w1_a": (loha["m.hada_w1_a"].shape[0], 4), "m.hada_w1_b": (4, n_in),
        "m.hada_w2_a": (loha["m.hada_w2_a"].shape[0], 4), "m.hada_w2_b": (4, n_in), "m.alpha": ()}
    assert set(perturbed("LoKr", layer, rank=1).state_dict_for("m")) == {"m.lokr_w1", "m.lokr_w2_a", "m.lokr_w2_b",
                                                                         "m.alpha"}
    assert set(perturbed("LoKr", layer, rank=64).state_dict_for("m")) == {"m.lokr_w1", "m.lokr_w2", "m.alpha"}
    assert set(perturbed("OFT", layer).state_dict_for("m")) == {"m.oft_blocks", "m.alpha"}


# ---- against the library that defines each format --------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv3x3_s2"])
def test_loha_matches_lycoris(kind):
    layer = layers()[kind]
    a = perturbed("LoHa", layer)
    f, s = a.factors, a.adapter.scale
    # LyCORIS order: (w1 down, w1 up, w2 down, w2 up, t1, t2) = (hada_w1_b, hada_w1_a, hada_w2_b, hada_w2_a)
    with torch.no_grad():
        ref = ly_loha.diff_weight(f["hada_w1_b"], f["hada_w1_a"], f["hada_w2_b"], f["hada_w2_a"], None, None,
                                  gamma=torch.tensor(s), backend="torch").reshape(layer.weight.shape)
        assert rel_err(a.delta(layer.weight), ref) <= TOL["reference_fp32"]


@pytest.mark.parametrize("kind", ["linear", "conv3x3_s2", "conv1x1"])
@pytest.mark.parametrize("rank", [2, 64])     # factorized w2, and w2 stored whole
def test_lokr_matches_lycoris_make_kron(kind, rank):
    layer = layers()[kind]
    a = perturbed("LoKr", layer, rank=rank)
    with torch.no_grad():
        _, w2 = a.adapter.halves(layer.weight.device)
        ref = ly_lokr.make_kron(a.factors["lokr_w1"], w2, a.adapter.scale).reshape(layer.weight.shape)
        assert rel_err(a.delta(layer.weight), ref) <= TOL["reference_fp32"]
    assert ("lokr_w2" in a.factors) == (rank == 64)


@pytest.mark.parametrize("kind", ["linear", "conv3x3_s2"])
def test_oft_matches_lycoris(kind):
    layer = layers()[kind]
    a = perturbed("OFT", layer)
    with torch.no_grad():
        a.factors["oft_blocks"].mul_(0.2)
        ref = ly_oft.diff_weight(layer.weight, a.factors["oft_blocks"], None, constraint=0, backend="torch")
        assert rel_err(a.delta(layer.weight), ref) <= TOL["reference_fp32"]


# ---- continuing from a file ------------------------------------------------------------------------
@pytest.mark.parametrize("algo,rank", VARIANTS)
def test_resuming_the_saved_factors_gives_the_same_adapter(algo, rank):
    layer = layers()["conv3x3_s2"]
    a = perturbed(algo, layer, rank)
    (loaded,) = parse(a.state_dict_for("m")).modules["m"]
    b = ad.create_adapters({"m": layer}, algo, 0, 0.0, 0, torch.float32, resume={"m": loaded})["m"]
    assert b.alpha == a.alpha and b.factors.keys() == a.factors.keys()
    for role, t in a.factors.items():
        assert torch.equal(b.factors[role], t)


def test_a_file_without_alpha_continues_at_scale_1():
    layer = layers()["linear"]
    a = perturbed("LoRA", layer)
    sd = {k: v for k, v in a.state_dict_for("m").items() if not k.endswith(".alpha")}
    (loaded,) = parse(sd).modules["m"]
    b = ad.create_adapters({"m": layer}, "LoRA", 0, 0.0, 0, torch.float32, resume={"m": loaded})["m"]
    assert b.alpha == 4.0 and b.adapter.scale == 1.0 and b.state_dict_for("m")["m.alpha"] == 4.0


def test_rank_larger_than_a_layer_allows_is_an_error():
    targets = {"small": nn.Linear(3, 40), "big": nn.Linear(40, 40)}
    with pytest.raises(TrainingError, match=r"rank 4 .* choose rank ≤ 3"):
        ad.create_adapters(targets, "LoRA", 4, 1.0, 0, torch.float32)
    ad.create_adapters(targets, "LoRA", 3, 1.0, 0, torch.float32)
    with pytest.raises(TrainingError, match=r"rank 41 .* choose rank ≤ 40"):     # OFT: the block size
        ad.check_rank(targets, 41, "OFT")


def test_an_algorithm_that_cannot_be_trained_is_refused_naming_those_that_can():
    with pytest.raises(TrainingError, match="'glora' cannot be trained; choose one of LoRA, LoHa, LoKr, OFT"):
        ad.trainable("glora")


def test_init_depends_on_seed_and_layer_name_only():
    l1, l2 = nn.Linear(8, 8), nn.Linear(8, 8)
    a = ad.create_adapters({"x": l1, "y": l2}, "LoRA", 2, 1.0, 7, torch.float32)
    b = ad.create_adapters({"y": l2}, "LoRA", 2, 1.0, 7, torch.float32)
    c = ad.create_adapters({"y": l2}, "LoRA", 2, 1.0, 8, torch.float32)
    assert torch.equal(a["y"].factors["down"], b["y"].factors["down"])
    assert not torch.equal(b["y"].factors["down"], c["y"].factors["down"])


def test_installed_hooks_are_removed():
    layer = nn.Linear(8, 8)
    a = perturbed("LoRA", layer)
    x = torch.randn(2, 8)
    before = layer(x)
    with ad.Installed({"m": layer}, {"m": a}):
        assert not torch.allclose(layer(x), before)
    assert torch.equal(layer(x), before)


def test_moving_the_module_keeps_the_math_on_its_parameters():
    layer = nn.Linear(8, 8)
    a = perturbed("LoRA", layer).to(torch.float64)
    assert a.adapter.up is a.factors["up"] and a.adapter.up.dtype == torch.float64


def test_factorize():
    assert factorize(320) == (16, 20)
    assert factorize(7) == (1, 7)
    assert factorize(64) == (8, 8)
    assert all(m * n == d and m <= n for d in range(1, 200) for m, n in [factorize(d)])
    assert 0 <= ad.mix(2**64 - 1, 5) < 2**63
