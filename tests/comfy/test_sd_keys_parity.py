"""lora.sd_keys against ComfyUI's own key maps for SD1.5, SD2.x and SDXL.

ComfyUI's real model classes are built on the meta device (full size, no memory): the UNet config
comes from ``comfy.model_detection`` reading a diffusers UNet, the model and its CLIP from that
config. Every name ``comfy.lora.model_lora_keys_unet/clip`` maps must name the same tensor in our
map, whether the model is named ComfyUI's way, the original checkpoint's way (converted by
ComfyUI's own save functions, q/k/v fused for OpenCLIP) or the diffusers way.
"""
from __future__ import annotations

import logging

import pytest
import torch

from loralab.lora import arch, sd_keys    # tests/conftest.py registers the pack as ``loralab``
from loralab.lora.keys import canonical

pytestmark = pytest.mark.comfy

DIFFUSERS_UNETS = {   # diffusers UNet configs of the real models (defaults are SD1.5's)
    "SD15": dict(cross_attention_dim=768),
    "SD20": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
    "SDXL": dict(cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
# transformers text encoders as diffusers pipelines hold them: (prefix, width, layers, with projection)
PIPELINE_TE = {"SD15": [("text_encoder.", 768, 12, False)],
               "SD20": [("text_encoder.", 1024, 23, False)],
               "SDXL": [("text_encoder.", 768, 12, False), ("text_encoder_2.", 1280, 32, True)]}


@pytest.fixture(scope="module")
def comfy_mods(comfy):
    """ComfyUI's modules, once the shared ``comfy`` fixture has set ComfyUI up (CPU)."""
    del comfy       # only its set-up matters; the name is the package's from here on
    import comfy.lora
    import comfy.model_detection
    import comfy.utils
    return comfy


@pytest.fixture(scope="module", params=list(DIFFUSERS_UNETS))
def case(request, comfy_mods):
    from diffusers import UNet2DConditionModel
    comfy = comfy_mods
    with torch.device("meta"):
        diff = UNet2DConditionModel(**DIFFUSERS_UNETS[request.param]).state_dict()
    config = comfy.model_detection.model_config_from_diffusers_unet(diff)
    assert type(config).__name__ == request.param
    model = config.get_model({}, device="meta")
    clip = config.clip_target().clip(device="meta")
    comfy_map = comfy.lora.model_lora_keys_unet(model, {})
    comfy_map = comfy.lora.model_lora_keys_clip(clip, comfy_map)
    internal = {**model.state_dict(), **clip.state_dict()}
    internal = {k: v for k, v in internal.items() if k.startswith(("diffusion_model.", "clip_"))}
    return request.param, config, diff, internal, comfy_map


def names_to_check(comfy_map, internal):
    """ComfyUI's names for weights, less the two families no SD-family file uses, and less names
    for tensors the model lacks (ComfyUI's table names conv_shortcut for every resnet)."""
    out = {n: t for n, t in comfy_map.items() if isinstance(t, str) and t.endswith(".weight")
           and t in internal and not n.startswith(("lycoris_", "lora_prior_"))}
    assert len(out) > 1000
    return out


def lookup(ours, name):
    return ours.get(name, ours.get(canonical(name)))


def resolve(sd, target):
    if isinstance(target, tuple):
        key, dim, start, length = target
        return sd[key].narrow(dim, start, length)
    return sd[target]


def test_comfy_internal_names(case):
    name, _, _, internal, comfy_map = case
    ours = sd_keys.model_key_map(internal)
    wrong = {n: (t, lookup(ours, n)) for n, t in names_to_check(comfy_map, internal).items() if lookup(ours, n) != t}
    assert not wrong, f"{len(wrong)} names differ, e.g. {list(wrong.items())[:5]}"
    # lora.arch tells the model apart from its own weights, as ComfyUI's detection did
    assert arch.identify(internal).arch is arch.by_comfy_class(name).arch


def test_checkpoint_names(case):
    """Convert ComfyUI's model to checkpoint naming with ComfyUI's own save functions and compare
    tensor VALUES: each tensor is shrunk to (rows, 1) random numbers so that SD2/SDXL's fused
    OpenCLIP q/k/v (concatenated along rows) is really split by our slices."""
    _, config, _, internal, comfy_map = case
    gen = torch.Generator().manual_seed(0)
    small = {k: torch.randn(tuple(v.shape[:1]) + ((1,) if v.dim() > 1 else ()), generator=gen) for k, v in internal.items()}
    unet = {k[len("diffusion_model."):]: v for k, v in small.items() if k.startswith("diffusion_model.")}
    ckpt = config.process_unet_state_dict_for_saving(unet)
    ckpt.update(config.process_clip_state_dict_for_saving({k: v for k, v in small.items() if k.startswith("clip_")}))
    ours = sd_keys.model_key_map(ckpt)
    checked = 0
    for n, t in names_to_check(comfy_map, internal).items():
        if t.endswith("text_projection.weight"):
            continue    # dropped (SD1) or stored transposed (OpenCLIP) in checkpoints: no LoRA name can mean it
        target = lookup(ours, n)
        assert target is not None, n
        assert torch.equal(resolve(ckpt, target), small[t]), (n, target, t)
        checked += 1
    assert checked > 1000


def test_diffusers_names(case, comfy_mods):
    """UNet and text encoders named as a diffusers pipeline holds them (transformers classes)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    logging.getLogger("transformers").setLevel(logging.ERROR)
    name, config, diff, internal, comfy_map = case
    model = dict(diff)
    for prefix, width, layers, proj in PIPELINE_TE[name]:
        cfg = CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                             num_attention_heads=width // 64, projection_dim=width)
        with torch.device("meta"):
            te = (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg)
        model.update({prefix + k: v for k, v in te.state_dict().items()})
    ours = sd_keys.model_key_map(model)
    # ComfyUI's own diffusers -> ldm table tells which diffusers tensor each ldm key is
    ldm_to_diff = {"diffusion_model." + l: d for d, l in
                   comfy_mods.utils.unet_to_diffusers(config.unet_config).items() if d in diff}
    clip_prefix = {"clip_l.": "text_encoder.", "clip_h.": "text_encoder.",
                   "clip_g.": "text_encoder_2." if name == "SDXL" else "text_encoder."}
    checked = 0
    for n, t in names_to_check(comfy_map, internal).items():
        if t.startswith("diffusion_model."):
            expect = ldm_to_diff[t]
        else:
            head, rest = t.split(".transformer.", 1)
            p = clip_prefix[head + "."]
            expect = p + rest if p + rest in model else p + rest.removeprefix("text_model.")
            if expect not in model:
                continue    # diffusers' SD2 encoder stops one layer short of OpenCLIP-H's 24
        assert lookup(ours, n) == expect, (n, lookup(ours, n), expect)
        checked += 1
    assert checked > 1000

