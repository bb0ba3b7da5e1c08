"""Key normalisation of every plain-LoRA format, PEFT alpha semantics, and LoRA math against
closed forms (no ComfyUI)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from loralab.lora import canonical, parse
from loralab.lora.adapters.lora import LoRA
from loralab.lora.patch import apply
from tolerances import TOL, rel_err

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KQ = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE = "lora_te_text_model_encoder_layers_3_self_attn_q_proj"


@pytest.mark.parametrize("prefix, want", [
    (KQ, KQ),                                                            # kohya
    ("unet." + Q, KQ),                                                   # PEFT / current diffusers
    (Q, KQ),                                                             # bare diffusers
    ("unet." + Q.replace(".to_q", ".processor.to_q"), KQ),               # old attention processors
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out",
     "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"),
    ("base_model.model." + Q, KQ),                                       # PEFT-wrapped UNet
    ("text_encoder.text_model.encoder.layers.3.self_attn.q_proj", TE),  # transformers 4
    ("text_encoder.encoder.layers.3.self_attn.q_proj", TE),             # transformers 5 (no text_model.)
    ("text_encoder_2.encoder.layers.3.self_attn.q_proj", TE.replace("lora_te_", "lora_te2_")),
    ("diffusion_model.input_blocks.1.1.proj_in", "lora_unet_input_blocks_1_1_proj_in"),  # ComfyUI trained
    ("transformer.single_blocks.0.linear1", "transformer.single_blocks.0.linear1"),      # left to core's map
])
def test_canonical_names(prefix, want):
    assert canonical(prefix) == want


SUFFIXES = [(".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
            (".lora_B.default.weight", ".lora_A.default.weight"), (".lora.up.weight", ".lora.down.weight"),
            ("_lora.up.weight", "_lora.down.weight"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
            (".lora_B", ".lora_A")]


@pytest.mark.parametrize("up_s, down_s", SUFFIXES)
def test_every_lora_suffix_parses_to_one_lora(up_s, down_s):
    up, down = torch.randn(6, 2), torch.randn(2, 5)
    p = parse({"m" + up_s: up, "m" + down_s: down})
    (a,) = p.modules["m"]
    assert isinstance(a, LoRA) and a.up is up and a.down is down and p.unknown == []


def _peft_file(config: dict, component="unet."):
    meta = {"lora_adapter_metadata": json.dumps({component + k: v for k, v in config.items()})}
    sd = {f"{component}a.to_q.lora_A.weight": torch.randn(4, 3), f"{component}a.to_q.lora_B.weight": torch.randn(3, 4),
          f"{component}b.to_k.lora_A.weight": torch.randn(4, 3), f"{component}b.to_k.lora_B.weight": torch.randn(3, 4)}
    return parse(sd, options={"metadata": meta}), component


def test_peft_alpha_from_header():
    p, c = _peft_file({"r": 4, "lora_alpha": 8, "alpha_pattern": {"b.to_k": 2}})
    assert p.modules[c + "a.to_q"][0].scale == 2.0       # lora_alpha / r
    assert p.modules[c + "b.to_k"][0].scale == 0.5       # alpha_pattern wins for its module


def test_peft_rslora_scale():
    p, c = _peft_file({"r": 4, "lora_alpha": 8, "use_rslora": True}, component="text_encoder.")
    assert math.isclose(p.modules[c + "a.to_q"][0].scale, 8 / math.sqrt(4))


def test_peft_without_alpha_anywhere_is_scale_one():
    p = parse({"unet.a.lora_A.weight": torch.randn(4, 3), "unet.a.lora_B.weight": torch.randn(3, 4)})
    assert p.modules["unet.a"][0].scale == 1.0


def test_alpha_key_beats_header():
    meta = {"lora_adapter_metadata": json.dumps({"lora_alpha": 8, "r": 4})}
    sd = {"a.lora_A.weight": torch.randn(4, 3), "a.lora_B.weight": torch.randn(3, 4), "a.alpha": torch.tensor(1.0)}
    assert parse(sd, options={"metadata": meta}).modules["a"][0].scale == 0.25


# ---- LoRA math against closed forms --------------------------------------------------------------
def _one(sd, weight, strength):
    (a,) = parse(sd).modules["m"]
    w = {"w": weight.clone()}
    apply(w, [("w", a, strength)])
    return w["w"] - weight


def test_linear_closed_form():
    up, down, w = torch.randn(7, 3), torch.randn(3, 5), torch.randn(7, 5)
    d = _one({"m.lora_up.weight": up, "m.lora_down.weight": down, "m.alpha": torch.tensor(1.5)}, w, 0.6)
    assert rel_err(d, 0.6 * 1.5 / 3 * up @ down) <= TOL["fp32"]


def test_locon_conv_closed_form():
    up, down, w = torch.randn(6, 2, 1, 1), torch.randn(2, 4, 3, 3), torch.randn(6, 4, 3, 3)
    d = _one({"m.lora_up.weight": up, "m.lora_down.weight": down}, w, 1.0)
    ref = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
    assert rel_err(d, ref) <= TOL["fp32"]


def test_tucker_mid_closed_form():
    up, mid, down, w = torch.randn(6, 2, 1, 1), torch.randn(2, 2, 3, 3), torch.randn(2, 4, 1, 1), torch.randn(6, 4, 3, 3)
    d = _one({"m.lora_up.weight": up, "m.lora_mid.weight": mid, "m.lora_down.weight": down,
              "m.alpha": torch.tensor(1.0)}, w, -2.0)
    ref = torch.zeros(6, 4, 3, 3)
    for i in range(6):
        for j in range(4):
            ref[i, j] = sum(mid[m, n] * up[i, m, 0, 0] * down[n, j, 0, 0] for m in range(2) for n in range(2))
    assert rel_err(d, -2.0 * 0.5 * ref) <= TOL["fp32"]


def test_linear_factors_on_1x1_conv_are_reshaped():
    up, down, w = torch.randn(6, 2), torch.randn(2, 4), torch.randn(6, 4, 1, 1)
    d = _one({"m.lora_up.weight": up, "m.lora_down.weight": down}, w, 1.0)
    assert rel_err(d, (up @ down)[:, :, None, None]) <= TOL["fp32"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weight_math_in_fp32_rounded_once(dtype):
    up, down = torch.randn(64, 4), torch.randn(4, 64)
    w = torch.randn(64, 64).to(dtype)
    d = {"w": w.clone()}
    (a,) = parse({"m.lora_up.weight": up.to(dtype), "m.lora_down.weight": down.to(dtype)}).modules["m"]
    apply(d, [("w", a, 0.3)])
    exact = w.float() + 0.3 * up.to(dtype).float() @ down.to(dtype).float()
    # one rounding of the fp32 result: within half an ulp of it (plus fp32 summation-order noise)
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert bool(((d["w"].float() - exact).abs() <= 0.5 * ulp + 1e-5).all())
    assert d["w"].dtype == dtype


def test_alpha_zero_means_scale_one_as_kohya_trains_it():
    """Pins kohya/LyCORIS semantics (`alpha = lora_dim if alpha is None or alpha == 0`): a file
    written with alpha 0 was trained at scale 1. ComfyUI core applies it at scale 0 (no change)."""
    up, down, w = torch.randn(7, 3), torch.randn(3, 5), torch.randn(7, 5)
    d = _one({"m.lora_up.weight": up, "m.lora_down.weight": down, "m.alpha": torch.tensor(0.0)}, w, 1.0)
    assert rel_err(d, up @ down) <= TOL["fp32"]
