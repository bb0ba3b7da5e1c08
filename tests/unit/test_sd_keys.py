"""lora.sd_keys without ComfyUI: every weight of tiny SD-family models is reachable under the names
LoRA files use, in ldm, ComfyUI and diffusers/transformers naming.

The ldm <-> diffusers UNet correspondence is checked against an independent converter (diffusers'
own ``convert_ldm_unet_checkpoint``), the OpenCLIP q/k/v split against diffusers'
``convert_open_clip_checkpoint``; kohya names against ``lora.keys.canonical`` of the diffusers /
PEFT prefixes files carry.
"""
from __future__ import annotations

import logging

import pytest
import torch

from loralab.lora import arch, sd_keys    # tests/conftest.py registers the pack as ``loralab``
from loralab.lora.keys import canonical

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint, convert_open_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)

# Reduced UNets: few channels, but the structures that matter differ (levels, resnets per level,
# attention on/off per level, transformer depth, SDXL's add_embedding).
UNETS = {
    "sd-like": dict(block_out_channels=(8, 16, 16), layers_per_block=2, cross_attention_dim=12,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl-like": dict(block_out_channels=(8, 16, 16), layers_per_block=1, cross_attention_dim=12,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=4 * 6 + 12),
    "two-levels": dict(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=12,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}
COMMON = dict(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=4, attention_head_dim=4)


@pytest.fixture(scope="module", params=list(UNETS))
def unet(request):
    torch.manual_seed(0)
    model = UNet2DConditionModel(**COMMON, **UNETS[request.param])
    return model.config, {k: v.detach() for k, v in model.state_dict().items()}


def to_ldm(diff_sd, prefix="model.diffusion_model."):
    """Our diffusers -> ldm renaming of a whole state dict (biases too)."""
    names = sd_keys.UnetNames(diff_sd)
    out = {}
    for k, v in diff_sd.items():
        module, param = k.rsplit(".", 1)
        ldm = names.to_ldm(module)
        assert ldm is not None, f"no ldm name for {k}"
        out[f"{prefix}{ldm}.{param}"] = v
    return out


def weights(sd):
    return {k for k in sd if k.endswith(".weight")}


def test_ldm_names_agree_with_diffusers_converter(unet):
    config, diff = unet
    ldm = to_ldm(diff)
    assert len(ldm) == len(diff)                      # no two tensors renamed onto one name
    back = convert_ldm_unet_checkpoint(ldm, dict(config))
    assert set(back) == set(diff)
    assert all(back[k] is diff[k] for k in diff)      # the very same tensor came back to each name


def test_every_unet_weight_reachable_in_every_naming(unet):
    _, diff = unet
    for naming in (diff, to_ldm(diff), to_ldm(diff, "diffusion_model."), to_ldm(diff, ""),
                   {"unet." + k: v for k, v in diff.items()}):
        m = sd_keys.model_key_map(naming)
        assert weights(naming) <= set(m.values())
        # raw module path of each weight maps to it
        assert all(m[k[: -len(".weight")]] == k for k in weights(naming))


def test_kohya_and_file_prefixes_resolve_to_the_same_tensor(unet):
    """Names a file may carry (diffusers/PEFT prefixes via canonical, kohya ldm path, ComfyUI form)
    point at the same tensor whether the model is named the diffusers, ldm or ComfyUI way."""
    _, diff = unet
    names = sd_keys.UnetNames(diff)
    models = [diff, to_ldm(diff), to_ldm(diff, "diffusion_model.")]
    maps = [sd_keys.model_key_map(sd) for sd in models]
    for k in weights(diff):
        module = k[: -len(".weight")]
        ldm = names.to_ldm(module)
        file_names = [canonical("unet." + module), canonical(module), canonical("base_model.model." + module),
                      "lora_unet_" + ldm.replace(".", "_"), "diffusion_model." + ldm,
                      canonical("diffusion_model." + ldm)]
        assert file_names[0] == "lora_unet_" + module.replace(".", "_")
        for sd, m in zip(models, maps):
            for n in file_names:
                assert sd[m[n]] is diff[k], (n, m[n], k)


def test_real_sd15_block_names():
    """Known SD1.5 correspondences (full-size layout, built on the meta device: no memory)."""
    with torch.device("meta"):
        sd = UNet2DConditionModel(cross_attention_dim=768).state_dict()
    m = sd_keys.model_key_map(sd)
    expect = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "lora_unet_input_blocks_11_0_out_layers_3": "down_blocks.3.resnets.1.conv2",
        "lora_unet_middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "lora_unet_middle_block_2_in_layers_0": "mid_block.resnets.1.norm1",
        "lora_unet_output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
        "lora_unet_output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
        "lora_unet_output_blocks_11_1_transformer_blocks_0_ff_net_0_proj": "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
        "lora_unet_output_blocks_3_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
        "lora_unet_time_embed_2": "time_embedding.linear_2",
        "lora_unet_out_0": "conv_norm_out",
        "lora_unet_input_blocks_0_0": "conv_in",
    }
    assert {n: m[n] for n in expect} == {n: d + ".weight" for n, d in expect.items()}
    assert arch.identify(sd).name == "SD1.5"       # the table tells the model apart by its weights too


def test_conflicting_names_refused():
    # one model holding the same UNet under two namings: every name would mean two tensors
    with pytest.raises(ValueError, match="would mean both"):
        sd_keys.model_key_map(["model.diffusion_model.out.2.weight", "diffusion_model.out.2.weight"])


# ---- text encoders -------------------------------------------------------------------------------
def clip(width, layers=2, projection=False):
    torch.manual_seed(width)
    cfg = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=2, vocab_size=50, max_position_embeddings=8,
                         projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    # one naming for all transformers versions: 5 drops "text_model." in CLIPTextModel
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}


def hf_to_openclip(hf, prefix):
    """Our own transformers -> OpenCLIP renaming (as SD2 / SDXL checkpoints store it)."""
    out = {prefix + "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": hf["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": hf["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in hf:
        out[prefix + "text_projection"] = hf["text_projection.weight"].T.contiguous()
    n = 1 + max(int(k.split(".")[3]) for k in hf if ".layers." in k)
    ren = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
           "self_attn.out_proj": "attn.out_proj"}
    for i in range(n):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            for a, b in ren.items():
                out[f"{dst}{b}.{p}"] = hf[f"{src}{a}.{p}"]
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([hf[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])
    return out


def resolve(sd, target):
    if isinstance(target, tuple):
        key, dim, start, length = target
        return sd[key].narrow(dim, start, length)
    return sd[target]


def te_names(hf, head):
    """(file module name as kohya writes it, hf key) for every Linear/Embedding/norm weight."""
    return [(head + k[: -len(".weight")].replace(".", "_"), k) for k in hf if k.endswith(".weight")]


def check(model_sd, m, hf, head):
    for name, hf_key in te_names(hf, head):
        if name.endswith("text_projection") and not isinstance(m.get(name), str):
            continue
        assert torch.equal(resolve(model_sd, m[name]), hf[hf_key]), name


def test_openclip_synthesis_agrees_with_diffusers_converter():
    hf = clip(16, projection=True)
    oc = hf_to_openclip(hf, "cond_stage_model.model.")
    model = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, vocab_size=50, max_position_embeddings=8,
                                                       projection_dim=16))
    back = convert_open_clip_checkpoint(model, oc, prefix="cond_stage_model.model.")
    for k, v in back.items():
        k = k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
        assert torch.equal(v, hf[k]), k


def test_sd1_text_encoder_all_namings():
    hf = clip(12)
    for naming in ({k: v for k, v in hf.items()},                                       # transformers 4
                   {k.removeprefix("text_model."): v for k, v in hf.items()},            # transformers 5
                   {"cond_stage_model.transformer." + k: v for k, v in hf.items()},      # SD1 checkpoint
                   {"clip_l.transformer." + k: v for k, v in hf.items()},                # ComfyUI
                   {"text_encoder." + k: v for k, v in hf.items()}):                     # diffusers pipeline
        m = sd_keys.model_key_map(naming)
        assert weights(naming) <= set(m.values())
        for head in ("lora_te_", "lora_te1_"):
            check(naming, m, hf, head)
        # diffusers / PEFT file prefixes, both transformers generations
        q = "encoder.layers.1.self_attn.q_proj"
        for f in ("text_encoder." + q, "text_encoder.text_model." + q):
            assert torch.equal(resolve(naming, m[canonical(f)]), hf[f"text_model.{q}.weight"])


@pytest.mark.parametrize("prefix", ["cond_stage_model.model.", "conditioner.embedders.0.model."])
def test_sd2_openclip_fused_qkv_are_slices(prefix):
    hf = clip(16)
    oc = hf_to_openclip(hf, prefix)
    m = sd_keys.model_key_map(oc)
    check(oc, m, hf, "lora_te_")
    check(oc, m, hf, "lora_te1_")
    key = prefix + "transformer.resblocks.1.attn.in_proj_weight"
    assert m["lora_te_text_model_encoder_layers_1_self_attn_k_proj"] == (key, 0, 16, 16)
    # keys + shapes work as well as tensors; keys alone cannot split a fused tensor
    assert sd_keys.model_key_map(list(oc), {k: v.shape for k, v in oc.items()}) == m
    with pytest.raises(ValueError, match="fuses q, k and v"):
        sd_keys.model_key_map(list(oc))


def test_sdxl_two_encoders():
    l_hf, g_hf = clip(12), clip(20, projection=True)
    ckpt = {"conditioner.embedders.0.transformer." + k: v for k, v in l_hf.items()}
    ckpt.update(hf_to_openclip(g_hf, "conditioner.embedders.1.model."))
    comfy = {"clip_l.transformer." + k: v for k, v in l_hf.items()}
    comfy.update({"clip_g.transformer." + k: v for k, v in g_hf.items()})
    pipe = {"text_encoder." + k: v for k, v in l_hf.items()}
    pipe.update({"text_encoder_2." + k: v for k, v in g_hf.items()})
    for naming in (ckpt, comfy, pipe):
        m = sd_keys.model_key_map(naming)
        check(naming, m, l_hf, "lora_te1_")
        check(naming, m, l_hf, "lora_te_")
        check(naming, m, g_hf, "lora_te2_")
        f = canonical("text_encoder_2.encoder.layers.0.self_attn.v_proj")
        assert torch.equal(resolve(naming, m[f]), g_hf["text_model.encoder.layers.0.self_attn.v_proj.weight"])
    m = sd_keys.model_key_map(comfy)   # ComfyUI's generic form, also from the checkpoint naming
    assert m["text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc2"] == \
        "clip_g.transformer.text_model.encoder.layers.1.mlp.fc2.weight"
    m = sd_keys.model_key_map(ckpt)
    assert m["text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc2"] == \
        "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.weight"
