"""training/layers.py: which layers each family trains (no ComfyUI; the per-family selection on the
real tiny models is checked in tests/comfy/test_train_families.py), and the loop's guards for blocks
that add residuals in place."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from loralab.lora import arch
from loralab.training import layers, loop
from loralab.training.errors import TrainingError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mod = nn.Linear(8, 16)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.norm = nn.LayerNorm(8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.res = nn.ModuleList([Block()])
        self.embed = nn.Linear(8, 8)


def names(found):
    return sorted(found)


def test_blocks_train_linear_and_1x1_at_the_rank_kxk_convs_only_with_conv_dim():
    rule = layers.Layers((r"blocks_\d+_",), conv_blocks=(r"res_\d+_",))
    plain = layers.find_layers(Net(), rule)
    assert names(plain) == ["lora_unet_blocks_0_attn", "lora_unet_blocks_0_conv1", "lora_unet_blocks_0_mod",
                            "lora_unet_blocks_1_attn", "lora_unet_blocks_1_conv1", "lora_unet_blocks_1_mod"]
    assert {k for _, k in plain.values()} == {"rank"}
    locon = layers.find_layers(Net(), rule, conv=True)
    kinds = {n: k for n, (_, k) in locon.items()}
    assert kinds["lora_unet_blocks_0_conv3"] == "conv" and kinds["lora_unet_res_0_conv3"] == "conv"
    assert kinds["lora_unet_res_0_attn"] == "rank" and kinds["lora_unet_res_0_conv1"] == "rank"
    assert "lora_unet_embed" not in kinds


def test_exclude_patterns_search_anywhere_in_the_name():
    rule = layers.Layers((r"blocks_\d+_",), exclude=(r"_mod",))
    assert names(layers.find_layers(Net(), rule)) == ["lora_unet_blocks_0_attn", "lora_unet_blocks_0_conv1",
                                                        "lora_unet_blocks_1_attn", "lora_unet_blocks_1_conv1"]


def test_without_a_rule_the_repeated_blocks_linears_train():
    got = layers.find_layers(Net(), None)
    assert "lora_unet_embed" not in got and "lora_unet_res_0_attn" in got and "lora_unet_blocks_1_mod" in got
    assert not any(n.endswith("conv3") for n in got)


def test_rename_names_layers_by_another_path_and_skips_the_unknown():
    net = Net()
    got = layers.find_layers(net, layers.Layers((r"down_",),), rename={"blocks.0.attn": "down.attn"})
    assert list(got) == ["lora_unet_down_attn"] and got["lora_unet_down_attn"][0] is net.blocks[0].attn
    with pytest.raises(TrainingError, match="same file name"):
        layers.find_layers(net, layers.Layers((r"x",),), rename=lambda p: "x" if p.endswith("attn") else None)


def test_every_rule_names_a_known_family_and_a_source():
    known = {a.id for a in arch.ARCHS} | {v.id for a in arch.ARCHS for v in a.variants}
    assert set(layers.RULES) <= known
    assert all(r.source for r in layers.RULES.values())
    assert layers.rule_for("z-image", "lumina2") is layers.RULES["z-image"]         # the variant's own first
    assert layers.rule_for("lumina2", "lumina2") is layers.RULES["lumina2"]
    assert layers.rule_for("flux-schnell", "flux") is layers.RULES["flux"]
    assert layers.rule_for(None, "ltxv") is None


class InPlace(nn.Module):
    """A Flux-style block: a LayerNorm saves x, then the residual is added to x in place."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        x += self.lin(self.norm(x))
        return x


@pytest.mark.parametrize("norm_copies,checkpointing", [(True, False), (False, True), (True, True)])
def test_blocks_adding_residuals_in_place_train(norm_copies, checkpointing):
    """Regression: a bare run raises "modified by an inplace operation" in backward (the LayerNorm's
    saved input); copied LayerNorm inputs, or checkpointing (the block works on its own copy of the
    inputs it is recomputed from), give the gradient of the same block written without in-place adds."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([InPlace(), InPlace()])
    w = nn.Parameter(torch.ones(8))

    def loss(norms: bool, ckpt: bool, in_place: bool = True):
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1)) * w
        with contextlib.ExitStack() as stack:
            if norms:
                stack.enter_context(loop.copied_norm_inputs(blocks))
            if ckpt:
                stack.enter_context(loop.checkpointed(blocks))
            for b in blocks:
                x = b(x) if in_place else x + b.lin(b.norm(x))
        return x.square().sum()

    with pytest.raises(RuntimeError, match="inplace"):
        loss(False, False).backward()
    w.grad = None
    loss(norm_copies, checkpointing).backward()
    got, w.grad = w.grad.clone(), None
    loss(False, False, in_place=False).backward()
    assert torch.allclose(got, w.grad, rtol=1e-5, atol=1e-6)
