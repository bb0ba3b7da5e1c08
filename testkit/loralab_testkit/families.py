"""Tiny random models of every diffusion family ComfyUI 0.3.75 runs, and their diffusers twins.

Each family is a ComfyUI ``ModelPatcher`` made from ComfyUI's own classes, loaded the way a user gets
one, in a few M parameters, with weights seeded per key (``checkpoints.random_tensor``: a key's
values do not depend on which other keys exist). ``model.model.model_config``, ``model_sampling``,
``comfy.lora.model_lora_keys_unet(model.model)`` and ``comfy.sample`` all work on them.

How to use (after the ``comfy`` fixture, or ``comfy_env.setup``)::

    from loralab_testkit import families as F

    m = F.build("flux")                      # ModelPatcher; also "flux_schnell", "sd3", "wan21_t2v",
                                             # "wan21_i2v", "wan22_ti2v", "hunyuan_video", "lumina2",
                                             # "z_image", "qwen_image", "hidream"
    inp = F.inputs(m)                        # latent, sigma and the conditioning of one forward
    out = F.forward(m, inp)                  # model.model.apply_model(...) -> denoised latent
    lat = F.sample(m, inp, steps=1)          # one comfy.sample step (euler / simple)
    pos = inp.conditioning()                 # [[cross_attn, {"pooled_output": …}]] for nodes

    twin = F.twin(m)                         # diffusers FluxTransformer2DModel, same weights
    comfy_out, twin_out = F.forward_pair(m, inp, twin)   # equal: the same network
    place = F.twin_map(m)["transformer_blocks.0.attn.to_k"]
    place.key, place.offset                  # "diffusion_model.double_blocks.0.img_attn.qkv.weight",
                                             # (0, 128, 128): rows 128..255 of the fused qkv
    F.coverage(m)                            # per diffusers Linear: what comfy.lora's key map does
    F.coverage_table(m)                      # the same by module pattern ("transformer_blocks.N.attn.to_q")

    path = F.write_diffusion_model("wan21_t2v", folder)   # a file UNETLoader loads (detected families)
    sdxl = F.tiny_sdxl(folder)                # SDXL(model, clip, vae, path) from a real checkpoint

One example per family (the fixtures in ``family_fixtures`` return ``Tiny(model, family, path)``)::

    F.build("sd3")            # MMDiT, SD3.5-medium layout (qk RMSNorm, attn2 in block 0)
    F.build("flux")           # Flux dev (guidance embed);   F.build("flux_schnell") without it
    F.build("wan21_t2v")      # Wan 2.1 T2V;  "wan21_i2v" adds img_emb / k_img / v_img (clip_fea)
    F.build("wan22_ti2v")     # Wan 2.2 TI2V 5B layout (48-channel latent); Wan 2.2 14B = Wan 2.1 layout
    F.build("hunyuan_video")  # HunyuanVideo T2V with guidance embed
    F.build("lumina2")        # Lumina Image 2.0 (NextDiT, GQA)
    F.build("z_image")        # Z-Image (NextDiT with z_image_modulation)
    F.build("qwen_image")     # Qwen-Image
    F.build("hidream")        # HiDream-I1 (MoE feed-forward, Llama-layer conditioning)
    F.tiny_sdxl(folder)       # SDXL checkpoint, real block layout, full-size random CLIP-L + CLIP-G

Loading: families whose ComfyUI detection works on small dims are written as a diffusion-model-only
state dict and loaded through ``comfy.sd.load_diffusion_model_state_dict`` (``Family.loader ==
"detect"``; the build checks the detected config is ours). The others are built from their model
config directly, exactly as that function does after detection (``loader == "config"``); each
family's ``why`` says what in 0.3.75's detection prevents small dims.

Twins: ``twin(m)`` is the diffusers model with the same dimensions and the same weights, converted
from ComfyUI's layout by diffusers' own single-file converters (``diffusers.loaders.
single_file_utils``: independent of ComfyUI; where they split fused weights at hard-coded full-size
dims, the split is done here first, by our dims), or by the inverse of ComfyUI's own
``comfy.utils.flux_to_diffusers`` for Flux (diffusers' converter hard-codes hidden size 3072).
``forward_pair`` runs both networks on one input: they agree to float error for every family.
``twin_map`` says where each twin weight lives in the ComfyUI model, found from the weights' VALUES
(each twin row is looked up among the ComfyUI rows), so it trusts no key map; ``coverage`` checks
ComfyUI's LoRA key map (``comfy.lora.model_lora_keys_unet``) against it, per naming scheme.

What ComfyUI 0.3.75's key map does with diffusers module names ("transformer.<name>" as diffusers /
PEFT save them, "lycoris_<name_>" as LyCORIS on the diffusers model, "lora_transformer_<name_>" as
OneTrainer, "diffusion_model.<name>"), every Linear and Conv of each twin, checked by value:
    sd3, flux, flux_schnell   transformer. / lycoris_ / lora_transformer_: all mapped, fused q/k/v
                              slices and swapped norm_out scale/shift included; diffusion_model.:
                              none (SD3: only context_embedder, whose name is ComfyUI's too)
    qwen_image, hidream       transformer. / lycoris_ / diffusion_model.: all mapped (ComfyUI's
                              names are diffusers'); lora_transformer_: none
    z_image                   lycoris_ / diffusion_model.: all mapped; transformer.: none (what
                              diffusers' save_lora_weights writes is dropped)
    wan21_*, wan22_ti2v,      none in any naming (only where a diffusers name equals ComfyUI's:
    hunyuan_video, lumina2    Wan's patch_embedding, Lumina 2's x_embedder as diffusion_model.*)
    all families              kohya names of ComfyUI's own module paths (lora_unet_<path_>): all
HunyuanVideo's "transformer." entries in ComfyUI are for the ORIGINAL (Tencent / diffusion-pipe)
module names (img_attn_qkv, ...), not diffusers'. tests/comfy/test_families.py pins this table.

Everything here imports ComfyUI lazily: call it after the ``comfy`` fixture (or ``comfy_env.setup``).
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from . import checkpoints
from .comfy_env import REPO_ROOT

UNET = "diffusion_model."


# ---- the families ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One architecture: its ComfyUI model config, its tiny dims, its inputs and its diffusers twin."""
    name: str
    config: str                        # comfy.supported_models class the model must load as
    unet_config: dict                  # the diffusion model's kwargs (what detection would give)
    loader: str                        # "detect" | "config"
    why: str                           # why "config": what 0.3.75's detection fixes at full size
    latent: tuple[int, ...]            # one sample's latent shape (C, [T,] H, W)
    context: tuple[int, int]           # cross_attn (tokens, dim)
    pooled: int | None = None          # pooled_output dim
    guidance: float | None = None      # guidance embed input (Flux dev, HunyuanVideo)
    extra: str | None = None           # extra conditioning: "i2v" (Wan clip_fea + image), "llama3"
    twin: str | None = None            # diffusers class
    twin_config: dict = field(default_factory=dict)
    pipeline: str | None = None        # diffusers LoRA loader mixin whose save_lora_weights writes files
    convert: str | None = None         # diffusers single_file_utils converter (None: ComfyUI's inverse)
    unused: tuple[str, ...] = ()       # ComfyUI weights its forward never reads (the twin has none)

    @property
    def video(self) -> bool:
        return len(self.latent) == 4


_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
             hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
             axes_dim=[16, 24, 24], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
_FLUX_TWIN = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
                  num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                  guidance_embeds=True, axes_dims_rope=(16, 24, 24))
_FLUX_WHY = ("0.3.75's Flux detection fixes num_heads 24 and axes_dim [16, 56, 56] (head dim 128), so any "
             "hidden size but 3072 fails to construct")
_WAN = dict(image_model="wan2.1", model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2,
            in_dim=16, out_dim=16, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
            cross_attn_norm=True, eps=1e-6)
_WAN_TWIN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6)
_NEXTDIT_WHY = ("0.3.75's Lumina2 detection sets heads / rope / ffn only for dim 2304 (Lumina 2) and 3840 "
                "(Z-Image); any other dim falls back to NextDiT's 32 heads x 128")
_NEXTDIT_UNUSED = ("norm_final.weight",)   # NextDiT builds it, its forward never calls it; diffusers drops it

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("sd3", "SD3", dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=64,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
        num_patches=256, pos_embed_max_size=16, qk_norm="rms", pos_embed_scaling_factor=None,
        x_block_self_attn_layers=[0]),
        "detect", "", (16, 8, 8), (8, 64), pooled=64,
        twin="SD3Transformer2DModel", twin_config=dict(
            sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
            out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
        pipeline="SD3LoraLoaderMixin", convert="convert_sd3_transformer_checkpoint_to_diffusers"),
    Family("flux", "Flux", _FLUX, "config", _FLUX_WHY, (16, 8, 8), (8, 64), pooled=32, guidance=3.5,
           twin="FluxTransformer2DModel", twin_config=_FLUX_TWIN, pipeline="FluxLoraLoaderMixin"),
    Family("flux_schnell", "FluxSchnell", {**_FLUX, "guidance_embed": False}, "config", _FLUX_WHY,
           (16, 8, 8), (8, 64), pooled=32,
           twin="FluxTransformer2DModel", twin_config={**_FLUX_TWIN, "guidance_embeds": False},
           pipeline="FluxLoraLoaderMixin"),
    Family("wan21_t2v", "WAN21_T2V", _WAN, "detect", "", (16, 2, 8, 8), (8, 4096),
           twin="WanTransformer3DModel", twin_config=_WAN_TWIN, pipeline="WanLoraLoaderMixin",
           convert="convert_wan_transformer_to_diffusers"),
    Family("wan21_i2v", "WAN21_I2V", {**_WAN, "model_type": "i2v", "in_dim": 36}, "detect", "",
           (16, 2, 8, 8), (8, 4096), extra="i2v",
           twin="WanTransformer3DModel", twin_config={**_WAN_TWIN, "in_channels": 36, "image_dim": 1280,
                                                      "added_kv_proj_dim": 256},
           pipeline="WanLoraLoaderMixin", convert="convert_wan_transformer_to_diffusers"),
    Family("wan22_ti2v", "WAN22_T2V", {**_WAN, "in_dim": 48, "out_dim": 48}, "detect", "",
           (48, 2, 8, 8), (8, 4096),
           twin="WanTransformer3DModel", twin_config={**_WAN_TWIN, "in_channels": 48, "out_channels": 48},
           pipeline="WanLoraLoaderMixin", convert="convert_wan_transformer_to_diffusers"),
    Family("hunyuan_video", "HunyuanVideo", dict(
        image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2], vec_in_dim=768,
        axes_dim=[16, 56, 56], meanflow=False, context_in_dim=64, hidden_size=256, mlp_ratio=4.0, num_heads=2,
        depth=2, depth_single_blocks=2, theta=256, qkv_bias=True, byt5=False, guidance_embed=True,
        use_cond_type_embedding=False, vision_in_dim=None),
        "detect", "", (16, 2, 8, 8), (8, 64), pooled=768, guidance=6.0,
        twin="HunyuanVideoTransformer3DModel", twin_config=dict(
            in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=128, num_layers=2,
            num_single_layers=2, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=64, pooled_projection_dim=768,
            rope_theta=256.0, rope_axes_dim=(16, 56, 56)),
        pipeline="HunyuanVideoLoraLoaderMixin", convert="convert_hunyuan_video_transformer_to_diffusers"),
    Family("lumina2", "Lumina2", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=128, cap_feat_dim=64, n_layers=2,
        n_refiner_layers=2, qk_norm=True, n_heads=2, n_kv_heads=1, multiple_of=16, axes_dims=[16, 24, 24],
        axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0),
        "config", _NEXTDIT_WHY, (16, 8, 8), (8, 64),
        twin="Lumina2Transformer2DModel", twin_config=dict(
            sample_size=16, patch_size=2, in_channels=16, hidden_size=128, num_layers=2, num_refiner_layers=2,
            num_attention_heads=2, num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
            axes_dim_rope=(16, 24, 24), axes_lens=(300, 512, 512), cap_feat_dim=64),
        pipeline="Lumina2LoraLoaderMixin", convert="convert_lumina2_to_diffusers", unused=_NEXTDIT_UNUSED),
    Family("z_image", "ZImage", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=64, n_layers=2,
        n_refiner_layers=2, qk_norm=True, n_heads=2, n_kv_heads=2, multiple_of=2, axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True,
        time_scale=1000.0, pad_tokens_multiple=32),
        "config", _NEXTDIT_WHY, (16, 8, 8), (8, 64),
        twin="ZImageTransformer2DModel", twin_config=dict(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=256, n_layers=2, n_refiner_layers=2,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64, rope_theta=256.0,
            t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
        pipeline="ZImageLoraLoaderMixin", convert="convert_z_image_transformer_checkpoint_to_diffusers",
        unused=_NEXTDIT_UNUSED),
    Family("qwen_image", "QwenImage", dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(16, 24, 24)),
        "config", ("0.3.75's Qwen-Image detection reads only in_channels and num_layers; heads, head dim and "
                   "text dim stay at the full model's 24 x 128 and 3584"),
        (16, 1, 8, 8), (8, 64),
        twin="QwenImageTransformer2DModel", twin_config=dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(16, 24, 24)),
        pipeline="QwenImageLoraLoaderMixin"),
    Family("hidream", "HiDream", dict(
        image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=64, num_attention_heads=2, caption_channels=[64, 64], text_emb_dim=32,
        num_routed_experts=4, num_activated_experts=2, axes_dims_rope=[32, 16, 16], max_resolution=[128, 128],
        llama_layers=[0, 1, 2, 2]),
        "config", "0.3.75's HiDream detection hard-codes every dimension of HiDream-I1 (20 heads x 128, 16+32 blocks)",
        (16, 8, 8), (8, 64), pooled=32, extra="llama3",
        twin="HiDreamImageTransformer2DModel", twin_config=dict(
            patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64,
            num_attention_heads=2, caption_channels=[64, 64], text_emb_dim=32, num_routed_experts=4,
            num_activated_experts=2, axes_dims_rope=(32, 16, 16), max_resolution=(128, 128),
            llama_layers=[0, 1, 2, 2]),
        pipeline="HiDreamImageLoraLoaderMixin", convert="convert_hidream_transformer_to_diffusers"),
]}
LLAMA3_LAYERS = 3   # hidden states HiDream's conditioning_llama3 carries (its llama_layers index them)


def family(name_or_model) -> Family:
    """The Family of a name, a Tiny, or a ModelPatcher / BaseModel built here (matched by config)."""
    if isinstance(name_or_model, Family):
        return name_or_model
    if isinstance(name_or_model, str):
        try:
            return FAMILIES[name_or_model]
        except KeyError:
            raise KeyError(f"unknown family {name_or_model!r}; known: {sorted(FAMILIES)}") from None
    if isinstance(name_or_model, Tiny):
        return name_or_model.family
    base = getattr(name_or_model, "model", name_or_model)
    cfg = base.model_config
    for f in FAMILIES.values():
        if type(cfg).__name__ == f.config and all(_norm(cfg.unet_config.get(k)) == _norm(v) for k, v in f.unet_config.items()):
            return f
    raise KeyError(f"no tiny family matches this {type(cfg).__name__} model (unet_config {cfg.unet_config})")


def _norm(v):
    """Config values compare as detection writes them (lists, not tuples)."""
    if isinstance(v, (tuple, list)):
        return [_norm(x) for x in v]
    return v


class Tiny(NamedTuple):
    """What the family fixtures return: the MODEL, its Family, and its file (None if config-built)."""
    model: Any       # comfy.model_patcher.ModelPatcher
    family: Family
    path: str | None


def _patcher(m):
    return m.model if isinstance(m, Tiny) else m


# ---- building --------------------------------------------------------------------------------------
def _model_config(fam: Family, dtype: torch.dtype):
    import comfy.supported_models as sm

    cfg = getattr(sm, fam.config)(dict(fam.unet_config))
    cfg.set_inference_dtype(dtype, None)
    return cfg


def shapes(name) -> dict[str, torch.Size]:
    """Diffusion-model key (no prefix) -> shape, from ComfyUI's class built on the meta device."""
    fam = family(name)
    model = _model_config(fam, torch.float32).get_model({}, "", device="meta")
    return {k: v.shape for k, v in model.diffusion_model.state_dict().items()}


def state_dict(name, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The family's diffusion-model weights (keys as in a ComfyUI diffusion_models file)."""
    return {k: checkpoints.random_tensor(k, s, seed, dtype) for k, s in shapes(name).items()}


def detected_config(sd: dict[str, torch.Tensor]):
    """ComfyUI's own detection of a diffusion-model state dict: its model config (or None)."""
    import comfy.model_detection

    return comfy.model_detection.model_config_from_unet(sd, "")


def check_detection(name, sd=None) -> None:
    """Raise unless ComfyUI detects ``name``'s state dict as the family's config with its unet_config."""
    fam = family(name)
    sd = state_dict(fam) if sd is None else sd
    cfg = detected_config(sd)
    got = type(cfg).__name__ if cfg is not None else None
    if got != fam.config:
        raise AssertionError(f"ComfyUI detects {got} instead of {fam.config} for the tiny {fam.name}")
    diff = {k: (cfg.unet_config.get(k), v) for k, v in fam.unet_config.items()
            if _norm(cfg.unet_config.get(k)) != _norm(v)}
    if diff:
        raise AssertionError(f"ComfyUI detects {fam.name} with other dims (detected, ours): {diff}")


def build(name, *, seed: int = 0, dtype: torch.dtype = torch.float32, path: str | None = None):
    """A ComfyUI ModelPatcher of the tiny ``name`` (fp32 weights and compute by default).

    Detected families go through ``comfy.sd.load_diffusion_model_state_dict`` (the UNETLoader path;
    with ``path``, a file from ``write_diffusion_model``, through ``comfy.sd.load_diffusion_model``
    itself); the others through their model config, exactly as that function does after detection.
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    fam = family(name)
    sd = state_dict(fam, seed)
    if path is not None:
        if fam.loader != "detect":
            raise ValueError(f"{fam.name} cannot be loaded from a file by ComfyUI 0.3.75: {fam.why}")
        model = comfy.sd.load_diffusion_model(path, model_options={"dtype": dtype})
    elif fam.loader == "detect":
        check_detection(fam, sd)
        model = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dtype})
    else:
        cfg = _model_config(fam, dtype)
        base = cfg.get_model(sd, "")
        base = base.to(mm.unet_offload_device())
        base.load_model_weights(dict(sd), "")   # it pops what it loads
        model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device())
    _check_loaded(fam, model, sd, dtype)
    return model


def _check_loaded(fam: Family, model, sd, dtype) -> None:
    got = {k[len(UNET):]: v for k, v in model.model.state_dict().items() if k.startswith(UNET)}
    missing, extra = sorted(set(sd) - set(got)), sorted(set(got) - set(sd))
    if missing or extra:
        raise AssertionError(f"tiny {fam.name}: the model's keys differ from the state dict "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
    if type(model.model.model_config).__name__ != fam.config:
        raise AssertionError(f"tiny {fam.name} loaded as {type(model.model.model_config).__name__}")
    bad = [k for k, v in got.items() if v.dtype != dtype and v.is_floating_point()]
    if bad:
        raise AssertionError(f"tiny {fam.name}: {bad[:3]} are not {dtype}")


def num_params(name_or_model) -> int:
    if isinstance(name_or_model, (str, Family)):
        return sum(s.numel() for s in shapes(name_or_model).values())
    return sum(p.numel() for p in _patcher(name_or_model).model.diffusion_model.parameters())


def write_diffusion_model(name, folder: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                          filename: str | None = None) -> str:
    """Write the family as a diffusion-model-only file (what UNETLoader / "Load Diffusion Model" lists).

    Only detected families: a config-built family's file would load as the full-size layout.
    Atomic; an existing file is left as it is (same name = same seed and dtype = same content).
    """
    from safetensors.torch import save_file

    fam = family(name)
    if fam.loader != "detect":
        raise ValueError(f"{fam.name} cannot be loaded from a file by ComfyUI 0.3.75: {fam.why}")
    dname = checkpoints._dtype_name(dtype)
    path = os.path.join(folder, filename or f"tiny_{fam.name}_s{seed}_{dname}.safetensors")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.to(dtype) for k, v in state_dict(fam, seed).items()}
    check_detection(fam, sd)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(sd, tmp, metadata={"loralab_test_model": f"tiny {fam.name} seed {seed} {dname}"})
    os.replace(tmp, path)
    return path


# ---- inputs, forward, sampling ---------------------------------------------------------------------
@dataclass
class Inputs:
    """One forward's inputs: the latent ``x``, the noise level ``sigma`` and the conditioning ``cond``
    (the keyword arguments ComfyUI's conditioning carries: cross_attn, pooled_output, guidance,
    clip_vision_output, concat_latent_image, conditioning_llama3, ...)."""
    x: torch.Tensor
    sigma: torch.Tensor
    cond: dict

    def conditioning(self) -> list:
        """As a CONDITIONING value ([[cross_attn, {other keys}]]), for comfy.sample and nodes."""
        rest = {k: v for k, v in self.cond.items() if k != "cross_attn"}
        return [[self.cond["cross_attn"], rest]]


def inputs(m, *, batch: int = 1, seed: int = 0, percent: float = 0.5) -> Inputs:
    """Random valid inputs of one forward for the tiny model ``m`` (a sigma ``percent`` into sampling)."""
    import comfy.clip_vision

    fam = family(m)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    cond: dict = {"cross_attn": rnd(batch, *fam.context)}
    if fam.pooled:
        cond["pooled_output"] = rnd(batch, fam.pooled)
    if fam.guidance is not None:
        cond["guidance"] = fam.guidance
    if fam.extra == "i2v":
        out = comfy.clip_vision.Output()
        out.penultimate_hidden_states = rnd(batch, 257, 1280)
        cond["clip_vision_output"] = out
        cond["concat_latent_image"] = rnd(batch, *fam.latent)
    elif fam.extra == "llama3":
        cond["conditioning_llama3"] = rnd(batch, LLAMA3_LAYERS, fam.context[0], fam.unet_config["caption_channels"][1])
    sigma = _patcher(m).model.model_sampling.percent_to_sigma(percent)
    return Inputs(rnd(batch, *fam.latent), torch.full((batch,), float(sigma)), cond)


def model_kwargs(m, inp: Inputs) -> dict:
    """The keyword arguments ``apply_model`` gets for ``inp``: ComfyUI's own extra_conds, batched."""
    base = _patcher(m).model
    conds = base.extra_conds(noise=inp.x, device=inp.x.device, **inp.cond)
    return {k: c.process_cond(batch_size=inp.x.shape[0], area=None, device=inp.x.device).cond for k, c in conds.items()}


def forward(m, inp: Inputs | None = None) -> torch.Tensor:
    """The denoised prediction of the MODEL (with its patches, as sampling runs it)."""
    inp = inp or inputs(m)
    patcher = _load(m)
    dev = patcher.load_device
    x = inp.x.to(dev)
    kw = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in model_kwargs(patcher, inp).items()}
    with torch.no_grad():
        return patcher.model.apply_model(x, inp.sigma.to(dev), **kw).cpu()


def sample(m, inp: Inputs | None = None, *, steps: int = 1, cfg: float = 1.0, seed: int = 0,
           sampler: str = "euler", scheduler: str = "simple", negative: list | None = None) -> torch.Tensor:
    """``comfy.sample.sample`` from pure noise (latent of zeros) with ``inp``'s conditioning."""
    import comfy.sample

    inp = inp or inputs(m)
    patcher = _patcher(m)
    pos = inp.conditioning()
    if negative is None:
        negative = [[torch.zeros_like(pos[0][0]), dict(pos[0][1])]]
    latent = torch.zeros_like(inp.x)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, pos, negative, latent,
                               disable_pbar=True, seed=seed)


# ---- diffusers twins -------------------------------------------------------------------------------
def _load(m):
    """Load the MODEL as sampling does (its patches applied to the shared weights); the patcher."""
    import comfy.model_management as mm

    patcher = _patcher(m)
    mm.load_models_gpu([patcher])
    return patcher


def comfy_weights(m) -> dict[str, torch.Tensor]:
    """The MODEL's diffusion-model weights as it runs (its patches applied), keys without
    "diffusion_model.", fp32 CPU copies."""
    sd = _load(m).model.diffusion_model.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def _split_rows(sd: dict, key: str, parts: dict[str, int]) -> None:
    """Replace ``sd[key]`` by consecutive row blocks named in ``parts`` (name -> rows)."""
    w = sd.pop(key)
    if sum(parts.values()) != w.shape[0]:
        raise AssertionError(f"{key}: {w.shape[0]} rows, expected {sum(parts.values())}")
    for (name, t) in zip(parts, torch.split(w, list(parts.values()), dim=0)):
        sd[name] = t


# HunyuanVideo: ComfyUI's names -> the original checkpoint's (what diffusers' converter reads). Checked
# to be the exact inverse of ComfyUI's own HunyuanVideo.process_unet_state_dict in _hunyuan_original.
_HUNYUAN_ORIGINAL = [
    ("_attn.norm.query_norm.scale", "_attn_q_norm.weight"), ("_attn.norm.key_norm.scale", "_attn_k_norm.weight"),
    (".norm.query_norm.scale", ".q_norm.weight"), (".norm.key_norm.scale", ".k_norm.weight"),
    ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
    ("_mod.lin.", "_mod.linear."), (".modulation.lin.", ".modulation.linear."),
    ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."),
    ("time_in.in_layer.", "time_in.mlp.0."), ("time_in.out_layer.", "time_in.mlp.2."),
    ("guidance_in.in_layer.", "guidance_in.mlp.0."), ("guidance_in.out_layer.", "guidance_in.mlp.2."),
    ("t_embedder.in_layer.", "t_embedder.mlp.0."), ("t_embedder.out_layer.", "t_embedder.mlp.2."),
    ("c_embedder.in_layer.", "c_embedder.linear_1."), ("c_embedder.out_layer.", "c_embedder.linear_2."),
]


def _hunyuan_original(fam: Family, sd: dict) -> dict:
    import comfy.supported_models

    out = {}
    for k, v in sd.items():
        for a, b in _HUNYUAN_ORIGINAL:
            k = k.replace(a, b)
        out[k] = v
    back = comfy.supported_models.HunyuanVideo.process_unet_state_dict(None, dict(out))
    if set(back) != set(sd):
        raise AssertionError(f"HunyuanVideo original names do not round-trip through ComfyUI: "
                             f"{sorted(set(back) ^ set(sd))[:6]}")
    # diffusers' converter splits single-block linear1 at a hard-coded 3072: split it here, by our dims
    h = fam.unet_config["hidden_size"]
    for k in [k for k in out if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", k)]:
        blk, end = k[: -len(".linear1.weight")] if k.endswith("weight") else k[: -len(".linear1.bias")], k.rsplit(".", 1)[1]
        _split_rows(out, k, {f"{blk}.attn.to_q.{end}": h, f"{blk}.attn.to_k.{end}": h, f"{blk}.attn.to_v.{end}": h,
                             f"{blk}.proj_mlp.{end}": out[k].shape[0] - 3 * h})
    return out


def _lumina2_presplit(fam: Family, sd: dict) -> dict:
    # diffusers' Lumina 2 converter splits qkv at the full model's [2304, 768, 768]: split it here, by our dims
    cfg = fam.unet_config
    hd = cfg["dim"] // cfg["n_heads"]
    out = dict(sd)
    for k in [k for k in out if k.endswith(".attention.qkv.weight")]:
        blk = k[: -len("qkv.weight")]
        _split_rows(out, k, {blk + "to_q.weight": cfg["n_heads"] * hd, blk + "to_k.weight": cfg["n_kv_heads"] * hd,
                             blk + "to_v.weight": cfg["n_kv_heads"] * hd})
    return out


def _from_comfy_key_map(key_map: dict, sd: dict) -> dict:
    """Diffusers weights from ComfyUI's diffusers->comfy key map (values: key, (key, offset), (key, None, fn))."""
    out = {}
    for dk, to in key_map.items():
        key, offset, fn = (to, None, None) if isinstance(to, str) else (tuple(to) + (None,))[:3]
        if key not in sd:
            continue
        w = sd[key] if offset is None else sd[key].narrow(*offset)
        out[dk] = (fn(w) if fn is not None else w).clone()
    return out


_PREPARE: dict[str, Callable] = {"hunyuan_video": _hunyuan_original, "lumina2": _lumina2_presplit}


def diffusers_state_dict(name, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI-layout diffusion-model weights -> the twin's (diffusers) state dict.

    By diffusers' own single-file converter where it handles small dims (after ``_PREPARE`` undoes
    ComfyUI's renames or pre-splits what it splits at hard-coded full-size dims); for Flux, whose
    converter hard-codes hidden size 3072 throughout, by the inverse of ComfyUI's
    ``comfy.utils.flux_to_diffusers``; Qwen-Image's names are diffusers' own.
    """
    import comfy.utils
    from diffusers.loaders import single_file_utils

    fam = family(name)
    sd = {k: v.clone() for k, v in sd.items()}
    if fam.config in ("Flux", "FluxSchnell"):
        return _from_comfy_key_map(comfy.utils.flux_to_diffusers(fam.unet_config), sd)
    if fam.convert is None:
        return sd
    sd = _PREPARE.get(fam.name, lambda f, s: s)(fam, sd)
    return getattr(single_file_utils, fam.convert)(sd)


def twin_class(name):
    import diffusers

    return getattr(diffusers, family(name).twin)


def make_twin(name):
    """The diffusers twin of ``name`` with diffusers' default init (fp32, CPU)."""
    fam = family(name)
    model = twin_class(fam)(**fam.twin_config)
    if fam.name == "z_image":
        # diffusers fixes the timestep MLP's width at 1024 where ComfyUI uses min(dim, 1024): same
        # module class, rebuilt at our width so the twin has exactly ComfyUI's shapes
        from diffusers.models.transformers.transformer_z_image import ADALN_EMBED_DIM, TimestepEmbedder
        dim = fam.unet_config["dim"]
        model.t_embedder = TimestepEmbedder(min(dim, ADALN_EMBED_DIM), mid_size=min(dim, 1024))
    return model


def twin(m):
    """The diffusers twin of the MODEL ``m`` with the weights the MODEL runs with (its patches
    merged, e.g. a LoRA applied by a loader node), fp32, CPU, eval."""
    return _twin_from(family(m), comfy_weights(m))


def _twin_from(fam: Family, sd: dict[str, torch.Tensor]):
    from diffusers.models.modeling_utils import no_init_weights

    with no_init_weights():          # every weight is loaded next (strictly): skip the random init
        model = make_twin(fam)
    dsd = diffusers_state_dict(fam, sd)
    missing, unexpected = model.load_state_dict(dsd, strict=False)
    if missing or unexpected:
        raise AssertionError(f"{fam.twin} for tiny {fam.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


# ---- the twin's forward against ComfyUI's -----------------------------------------------------------
def raw_forward(m, inp: Inputs):
    """The diffusion model's own output for ``inp`` as ``apply_model`` computes it before
    ``calculate_denoised``: (output, (model input xc, timestep t, context, other kwargs))."""
    base = _load(m).model
    kw = model_kwargs(m, inp)
    ms = base.model_sampling
    xc = ms.calculate_input(inp.sigma, inp.x)
    if "c_concat" in kw:
        xc = torch.cat([xc, kw.pop("c_concat")], dim=1)
    t = base.process_timestep(ms.timestep(inp.sigma).float(), x=inp.x, **kw)
    context = kw.pop("c_crossattn", None)
    with torch.no_grad():
        return base.diffusion_model(xc, t, context=context, **kw), (xc, t, context, kw)


def _pack(x):        # (B, C, H, W) -> (B, H/2 * W/2, C * 4): diffusers' Flux / Qwen-Image packing
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(x, h, w):
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def _flux_ids(h, w):
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def _call_flux(fam, tw, xc, t, ctx, kw):
    h, w = xc.shape[-2:]
    out = tw(hidden_states=_pack(xc), encoder_hidden_states=ctx, pooled_projections=kw["y"], timestep=t,
             img_ids=_flux_ids(h, w), txt_ids=torch.zeros(ctx.shape[1], 3),
             guidance=kw["guidance"] if fam.guidance is not None else None).sample   # diffusers scales t, g by 1000
    return _unpack(out, h, w)


def _call_qwen(fam, tw, xc, t, ctx, kw):
    x = xc[:, :, 0]
    h, w = x.shape[-2:]
    out = tw(hidden_states=_pack(x), encoder_hidden_states=ctx, encoder_hidden_states_mask=torch.ones(ctx.shape[:2]),
             timestep=t, img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0]).sample
    return _unpack(out, h, w).unsqueeze(2)


def _call_z_image(fam, tw, xc, t, ctx, kw):
    out = tw(x=[x.unsqueeze(1) for x in xc], t=1 - t, cap_feats=list(ctx))
    return -torch.stack([o.squeeze(1) for o in (out.sample if hasattr(out, "sample") else out[0])])


# per family: the twin's call on ComfyUI's (xc, t, context, kwargs), in ComfyUI's output convention.
# Time: ComfyUI hands the model t = sigma (Flux, Qwen: diffusers scales by 1000 inside) or
# sigma * 1000 (SD3, Wan, HunyuanVideo); NextDiT takes 1 - sigma. Lumina 2, Z-Image and HiDream
# return the negated velocity in ComfyUI (their diffusers pipelines negate it instead).
_TWIN_CALL: dict[str, Callable] = {
    "sd3": lambda f, tw, xc, t, ctx, kw: tw(hidden_states=xc, encoder_hidden_states=ctx, pooled_projections=kw["y"],
                                            timestep=t).sample,
    "flux": _call_flux, "flux_schnell": _call_flux, "qwen_image": _call_qwen, "z_image": _call_z_image,
    "hunyuan_video": lambda f, tw, xc, t, ctx, kw: tw(
        hidden_states=xc, timestep=t, encoder_hidden_states=ctx, encoder_attention_mask=torch.ones(ctx.shape[:2]),
        pooled_projections=kw["y"], guidance=kw["guidance"] * 1000).sample,
    "lumina2": lambda f, tw, xc, t, ctx, kw: -tw(
        hidden_states=xc, timestep=1 - t, encoder_hidden_states=ctx,
        encoder_attention_mask=torch.ones(ctx.shape[:2], dtype=torch.bool)).sample,
    "hidream": lambda f, tw, xc, t, ctx, kw: -tw(
        hidden_states=xc, timesteps=t, encoder_hidden_states_t5=ctx,
        encoder_hidden_states_llama3=kw["encoder_hidden_states_llama3"].movedim(1, 0), pooled_embeds=kw["y"]).sample,
    **{n: (lambda f, tw, xc, t, ctx, kw: tw(hidden_states=xc, timestep=t, encoder_hidden_states=ctx,
                                            encoder_hidden_states_image=kw.get("clip_fea")).sample)
       for n in ("wan21_t2v", "wan21_i2v", "wan22_ti2v")},
}
WAN_TEXT_TOKENS = 512   # diffusers' Wan I2V attention splits image / text context at a fixed 512 text tokens


def forward_pair(m, inp: Inputs | None = None, twin_model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ComfyUI's diffusion-model output, the twin's on the same input) for the MODEL ``m``.

    Equal up to float error when the twin is the same network with the same weights: the twin's
    correspondence checked end to end (conventions of time, packing and sign in ``_TWIN_CALL``).
    For Wan I2V the context is zero-padded to 512 tokens (on both sides)."""
    fam = family(m)
    inp = inp or inputs(m)
    if fam.extra == "i2v" and inp.cond["cross_attn"].shape[1] < WAN_TEXT_TOKENS:
        c = inp.cond["cross_attn"]
        pad = torch.zeros(c.shape[0], WAN_TEXT_TOKENS - c.shape[1], c.shape[2])
        inp = Inputs(inp.x, inp.sigma, {**inp.cond, "cross_attn": torch.cat([c, pad], dim=1)})
    out, (xc, t, ctx, kw) = raw_forward(m, inp)
    tw = twin_model if twin_model is not None else twin(m)
    with torch.no_grad():
        return out.float(), _TWIN_CALL[fam.name](fam, tw, xc.float(), t, ctx.float(),
                                                 {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}).float()


@dataclass(frozen=True)
class Place:
    """Where one twin weight lives in the ComfyUI model: ``key`` (a "diffusion_model." state-dict key),
    ``offset`` = (dim, start, length) when it is a row block of a fused weight (ComfyUI's key-map
    convention), or ``rows`` when its rows are permuted (e.g. scale/shift swapped)."""
    key: str
    shape: tuple[int, ...]                    # the ComfyUI weight's shape
    offset: tuple[int, int, int] | None = None
    rows: tuple[int, ...] | None = None

    @property
    def target(self):
        """The reference-ΔW key: the ComfyUI key, or (key, offset) for a slice of a fused weight."""
        return self.key if self.offset is None else (self.key, self.offset)

    def to_comfy(self, delta: torch.Tensor) -> torch.Tensor:
        """A twin-layout ΔW in the layout of ``target`` (the slice, or the whole permuted weight)."""
        if self.rows is None:
            return delta
        out = torch.zeros(self.shape, dtype=delta.dtype)
        out[list(self.rows)] = delta.reshape(len(self.rows), *self.shape[1:])
        return out

    def full(self, delta: torch.Tensor) -> torch.Tensor:
        """A twin-layout ΔW placed in a zero tensor of the whole ComfyUI weight's shape."""
        d = self.to_comfy(delta)
        if self.offset is None:
            return d.reshape(self.shape)
        out = torch.zeros(self.shape, dtype=d.dtype)
        out.narrow(*self.offset).copy_(d.reshape(out.narrow(*self.offset).shape))
        return out


def twin_modules(twin_model, kinds=(torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)) -> dict[str, torch.nn.Module]:
    """The twin's LoRA-able layers: {module name: module} (Linear and Conv by default)."""
    return {n: mod for n, mod in twin_model.named_modules() if isinstance(mod, kinds)}


_TWIN_LINEARS: dict[str, tuple[str, ...]] = {}


def twin_linears(name) -> tuple[str, ...]:
    """The names of the twin's Linear layers (what the LoRA writers adapt by default)."""
    from diffusers.models.modeling_utils import no_init_weights

    fam = family(name)
    if fam.name not in _TWIN_LINEARS:
        with no_init_weights():
            _TWIN_LINEARS[fam.name] = tuple(twin_modules(make_twin(fam), (torch.nn.Linear,)))
    return _TWIN_LINEARS[fam.name]


_TWIN_MAPS: dict[str, dict[str, Place]] = {}


def twin_map(m, twin_model=None) -> dict[str, Place]:
    """{twin module name: Place} for every Linear / Conv of the twin, found by VALUE.

    Every row of the twin's weight is looked up among the rows of the ComfyUI model's weights (all
    random, so a row identifies its key and index); a module whose rows are not all in one ComfyUI
    weight raises. Independent of every key map.

    The map is a property of the family, not of the seed: without ``twin_model`` it is computed
    once per family (from its seed-0 weights) and cached, so ``m`` may also be a family name; with
    ``twin_model`` it is computed for that twin against ``m``'s current weights.
    """
    if twin_model is not None:
        return _match_rows(comfy_weights(m), twin_model)
    fam = family(m)
    if fam.name not in _TWIN_MAPS:
        sd = state_dict(fam)
        _TWIN_MAPS[fam.name] = _match_rows(sd, _twin_from(fam, sd))
    return _TWIN_MAPS[fam.name]


def _match_rows(sd: dict[str, torch.Tensor], tw) -> dict[str, Place]:
    rows: dict[bytes, tuple[str, int]] = {}
    shapes_: dict[str, tuple[int, ...]] = {}
    for k, w in sd.items():
        if w.ndim < 2:
            continue
        shapes_[k] = tuple(w.shape)
        for i, r in enumerate(w.reshape(w.shape[0], -1)):
            rows[r.numpy().tobytes()] = (k, i)
    out = {}
    for name, mod in twin_modules(tw).items():
        w = mod.weight.detach().float()
        found = [rows.get(r.numpy().tobytes()) for r in w.reshape(w.shape[0], -1)]
        keys = {f[0] for f in found if f is not None}
        if None in found or len(keys) != 1:
            raise AssertionError(f"twin {name}: its rows are not all in one ComfyUI weight (found in {sorted(keys)})")
        key = keys.pop()
        idx = [f[1] for f in found]
        full = UNET + key
        if idx == list(range(idx[0], idx[0] + len(idx))):
            off = None if len(idx) == shapes_[key][0] else (0, idx[0], len(idx))
            out[name] = Place(full, shapes_[key], off)
        else:
            out[name] = Place(full, shapes_[key], rows=tuple(idx))
    return out


# ---- what ComfyUI's LoRA key map does with diffusers names -----------------------------------------
# file-key prefixes of one twin module in each naming scheme that writes diffusers module names
NAMINGS: dict[str, Callable[[str], str]] = {
    "diffusers": lambda n: "transformer." + n,                    # diffusers / PEFT save_lora_weights
    "lycoris": lambda n: "lycoris_" + n.replace(".", "_"),         # LyCORIS on the twin (SimpleTuner)
    "onetrainer": lambda n: "lora_transformer_" + n.replace(".", "_"),
    "diffusion_model": lambda n: "diffusion_model." + n,        # diffusers names under ComfyUI's prefix
}


def place_by_key_map(entry, shape: tuple[int, ...], delta: torch.Tensor) -> torch.Tensor:
    """Where ComfyUI puts a twin-layout ΔW for a key-map value (key | (key, offset[, fn])), as a
    zero tensor of the whole weight's ``shape`` plus the ΔW (what calculate_weight adds)."""
    offset, fn = (None, None) if isinstance(entry, str) else (tuple(entry) + (None,))[1:3]
    out = torch.zeros(shape, dtype=delta.dtype)
    d = fn(delta) if fn is not None else delta
    view = out if offset is None else out.narrow(*offset)
    view.copy_(d.reshape(view.shape))
    return out


def key_of(entry) -> str:
    return entry if isinstance(entry, str) else entry[0]


@dataclass(frozen=True)
class Cover:
    """One twin module under ComfyUI's key map: ``status[naming]`` is "mapped" (onto the module's own
    ComfyUI weight, slice and row order included), "dropped" (no entry: core skips the key) or
    "wrong" (an entry that lands elsewhere)."""
    name: str
    place: Place
    entries: dict[str, Any]
    status: dict[str, str]


def coverage(m, twin_model=None, namings=tuple(NAMINGS)) -> dict[str, Cover]:
    """{twin module: Cover}: does ``comfy.lora.model_lora_keys_unet`` map each diffusers name right?"""
    import comfy.lora

    base = _patcher(m).model
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    places = twin_map(m, twin_model)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, place in places.items():
        n_rows = len(place.rows) if place.rows else place.offset[2] if place.offset else place.shape[0]
        probe = torch.randn(n_rows, *place.shape[1:], generator=g)
        entries, status = {}, {}
        for naming in namings:
            e = key_map.get(NAMINGS[naming](name))
            entries[naming] = e
            if e is None:
                status[naming] = "dropped"
            elif UNET + key_of(e)[len(UNET):] != place.key:
                status[naming] = "wrong"
            else:
                same = torch.equal(place_by_key_map(e, place.shape, probe), place.full(probe))
                status[naming] = "mapped" if same else "wrong"
        out[name] = Cover(name, place, entries, status)
    return out


def pattern(name: str) -> str:
    """A module name with its block indices as N: "transformer_blocks.N.attn.to_q"."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "N", name)


def coverage_table(m, twin_model=None, namings=tuple(NAMINGS)) -> dict[str, dict[str, str]]:
    """{module pattern: {naming: status}}: the coverage with block indices collapsed. A pattern
    whose blocks disagree shows every status seen, e.g. "mapped/dropped"."""
    table: dict[str, dict[str, set]] = {}
    for c in coverage(m, twin_model, namings).values():
        row = table.setdefault(pattern(c.name), {n: set() for n in namings})
        for n in namings:
            row[n].add(c.status[n])
    return {p: {n: "/".join(sorted(s)) for n, s in row.items()} for p, row in table.items()}


# ---- SDXL: a real checkpoint file ------------------------------------------------------------------
SDXL_VERSION = "v1"
SDXL_CACHE = os.path.join(REPO_ROOT, ".cache", "tiny-sdxl")
# ComfyUI 0.3.75 detects SDXL by model_channels 320, linear transformers, transformer depths
# [0, 0, 2, 2, 10, 10], context 2048 and adm 2816: kept; channel_mult [1, 1, 1] instead of [1, 2, 4]
# shrinks it from 2.6B to ~283M parameters
SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 1, 1], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False, use_temporal_resblock=False)


class SDXL(NamedTuple):
    model: Any   # ModelPatcher (SDXL)
    clip: Any    # comfy.sd.CLIP (SDXLClipModel: CLIP-L + OpenCLIP-G, full size, random)
    vae: Any     # comfy.sd.VAE (TAESD layout, random)
    path: str


def _sdxl_internal_shapes() -> dict[str, torch.Size]:
    """ComfyUI-internal key -> shape: model.diffusion_model.*, clip_l.* / clip_g.* (SDXLClipModel),
    first_stage_model.* (TAESD, which ComfyUI's VAE loads natively)."""
    import comfy.sdxl_clip
    import comfy.supported_models as sm
    import comfy.taesd.taesd

    out: dict[str, torch.Size] = {}
    cfg = sm.SDXL(dict(SDXL_UNET))
    cfg.set_inference_dtype(torch.float32, None)
    unet = cfg.get_model({}, "", device="meta").diffusion_model
    out.update({"model." + UNET + k: v.shape for k, v in unet.state_dict().items()})
    clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float32)
    out.update({k: v.shape for k, v in clip.state_dict().items()})
    with torch.device("meta"):
        taesd = comfy.taesd.taesd.TAESD()
    out.update({"first_stage_model." + k: v.shape for k, v in taesd.state_dict().items()})
    return out


def sdxl_cache_path(seed: int = 0) -> str:
    return os.path.join(SDXL_CACHE, f"tiny-sdxl-{SDXL_VERSION}-s{seed}-fp16.safetensors")


def cached_tiny_sdxl(seed: int = 0) -> str:
    """The on-disk SDXL checkpoint (fp16), built on first use: ~1.1B random parameters (283M UNet,
    full-size CLIP-L 123M and OpenCLIP-G 695M), ~2.2 GB. Atomic; safe to race."""
    import comfy.supported_models as sm
    from safetensors.torch import save_file

    path = sdxl_cache_path(seed)
    if os.path.isfile(path):
        return path
    os.makedirs(SDXL_CACHE, exist_ok=True)
    internal = {}
    for k, s in _sdxl_internal_shapes().items():
        if k.endswith("position_ids"):
            continue
        internal[k] = checkpoints.random_tensor(k, s, seed).to(torch.float16)
    clip = {k: v for k, v in internal.items() if k.startswith(("clip_l.", "clip_g."))}
    sd = {k: v for k, v in internal.items() if k not in clip}
    del internal
    # the file layout ComfyUI's own CheckpointSave writes for SDXL (open_clip names for CLIP-G)
    sd.update(sm.SDXL(dict(SDXL_UNET)).process_clip_state_dict_for_saving(clip))
    del clip
    cfg = detected_config({k[len("model." + UNET):]: v for k, v in sd.items() if k.startswith("model." + UNET)})
    if type(cfg).__name__ != "SDXL":
        raise AssertionError(f"ComfyUI detects {type(cfg).__name__} instead of SDXL for the tiny SDXL")
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(sd, tmp, metadata={"loralab_test_checkpoint": f"tiny-sdxl {SDXL_VERSION} seed {seed} fp16"})
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)
    return path


def tiny_sdxl_path(folder: str, seed: int = 0, name: str | None = None) -> str:
    """Place the cached SDXL checkpoint in ``folder`` (hard link, else symlink, else copy)."""
    src = cached_tiny_sdxl(seed)
    dst = os.path.join(folder, name or "tiny_sdxl_fp16.safetensors")
    if not os.path.exists(dst):
        os.makedirs(folder, exist_ok=True)
        for link in (os.link, os.symlink):
            with contextlib.suppress(OSError):
                link(src, dst)
                break
        else:
            import shutil
            shutil.copyfile(src, dst)
    return dst


def load_tiny_sdxl(path: str | None = None, *, model_dtype: torch.dtype | None = torch.float32,
                   clip_dtype: torch.dtype | None = torch.float16) -> SDXL:
    """(MODEL, CLIP, VAE, path) through ``comfy.sd.load_checkpoint_guess_config``, as
    CheckpointLoaderSimple loads it. The UNet in fp32 and the text encoders in fp16 by default
    (1.6 GB instead of ComfyUI's CPU default fp32, 3.3 GB); None = ComfyUI's choice."""
    import comfy.sd

    path = path or cached_tiny_sdxl()
    mo = {"dtype": model_dtype} if model_dtype is not None else {}
    to = {"dtype": clip_dtype} if clip_dtype is not None else {}
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                             model_options=mo, te_model_options=to)[:3]
    return SDXL(model, clip, vae, path)


def tiny_sdxl(folder: str | None = None, seed: int = 0, **kw) -> SDXL:
    """The SDXL checkpoint (placed in ``folder`` when given, e.g. the checkpoints folder), loaded."""
    path = tiny_sdxl_path(folder, seed) if folder else cached_tiny_sdxl(seed)
    return load_tiny_sdxl(path, **kw)


def sdxl_inputs(m, *, batch: int = 1, seed: int = 0, percent: float = 0.5) -> Inputs:
    """Random valid SDXL inputs: a 8x8 latent (64 px), CLIP-L+G context (77, 2048), pooled 1280."""
    g = torch.Generator().manual_seed(seed)
    cond = {"cross_attn": torch.randn(batch, 77, 2048, generator=g),
            "pooled_output": torch.randn(batch, 1280, generator=g), "width": 64, "height": 64}
    sigma = _patcher(m).model.model_sampling.percent_to_sigma(percent)
    return Inputs(torch.randn(batch, 4, 8, 8, generator=g), torch.full((batch,), float(sigma)), cond)
