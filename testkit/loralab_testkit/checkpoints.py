"""Random-weight SD1.5 checkpoints built from ComfyUI's own model classes.

``tiny_sd15_path`` writes a REDUCED SD1.5 checkpoint that ``comfy.sd.load_checkpoint_guess_config``
detects as ``SD15`` (checked on every build):

    UNet   model_channels 320, context_dim 768 (what SD15's unet_config pins), channel_mult [1, 1],
           one res block per level, transformer depth 1 everywhere incl. the middle block:
           ~44M parameters; every module kind of the full UNet is there (conv_in, time_embed,
           res blocks with and without a 1x1 skip conv, spatial transformers with attn1/attn2/ff,
           downsample op, upsample conv, middle block, out)
    CLIP   the full CLIP-L text model (~123M): ComfyUI builds it from a fixed json config, so a
           smaller one would not load
    VAE    TAESD (~2.4M) stored under ``first_stage_model.taesd_*``, which ComfyUI's VAE class
           loads natively (the KL VAE's config is fixed, so a reduced KL VAE would not load)

Weights are seeded per key (a key's values do not depend on which other keys exist) and scaled
1/sqrt(fan_in) so activations stay finite; biases and norm weights are non-zero so bias and norm
adapters change something. The fp16 file holds the fp32 file's values rounded once.

Files are cached on disk under ``<repo>/.cache/tiny-sd15/`` keyed by ``TINY_VERSION``: bump it
whenever the architecture or the initialisation changes.

``full_sd15_state_dict`` builds a FULL-SIZE SD1.5 state dict (benchmarks only, ~2 GB in fp16).

Everything here imports ComfyUI: call it after the ``comfy`` fixture (or ``comfy_env.setup``).
"""
from __future__ import annotations

import math
import os
import zlib

import torch

from .comfy_env import REPO_ROOT

TINY_VERSION = "v1"
CACHE_DIR = os.path.join(REPO_ROOT, ".cache", "tiny-sd15")
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sd15_unet_config(full: bool = False) -> dict:
    """The UNetModel kwargs ComfyUI's detect_unet_config derives for our files (+ SD15's extras)."""
    if full:
        mult, nrb, depth = [1, 2, 4, 4], 2, [1, 1, 1, 0]
    else:
        mult, nrb, depth = [1, 1], 1, [1, 1]
    return dict(
        use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
        adm_in_channels=None, in_channels=4, out_channels=4, model_channels=320,
        num_res_blocks=[nrb] * len(mult), channel_mult=mult,
        transformer_depth=[d for d in depth for _ in range(nrb)],
        transformer_depth_output=[d for d in depth for _ in range(nrb + 1)],
        transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
        use_temporal_resblock=False, use_temporal_attention=False, num_heads=8, num_head_channels=-1,
    )


def _shapes(full: bool, vae: bool = True) -> dict[str, torch.Size]:
    """Checkpoint key -> shape, from ComfyUI's model classes instantiated on the meta device."""
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    import json
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    out: dict[str, torch.Size] = {}
    unet = UNetModel(**sd15_unet_config(full), device="meta", operations=comfy.ops.disable_weight_init)
    out.update({UNET_PREFIX + k: v.shape for k, v in unet.state_dict().items()})
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as fh:
        cfg = json.load(fh)
    clip = comfy.clip_model.CLIPTextModel(cfg, torch.float32, "meta", comfy.ops.disable_weight_init)
    # SD1.5 checkpoints carry no text_projection (ComfyUI's own saver drops it too)
    out.update({CLIP_PREFIX + k: v.shape for k, v in clip.state_dict().items() if not k.startswith("text_projection")})
    if vae:
        import comfy.taesd.taesd
        with torch.device("meta"):
            taesd = comfy.taesd.taesd.TAESD()
        out.update({VAE_PREFIX + k: v.shape for k, v in taesd.state_dict().items()})
    return out


def random_tensor(key: str, shape: torch.Size, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic per-key init: fan-in scaled weights, non-zero biases, norm weights near 1."""
    g = torch.Generator().manual_seed((zlib.crc32(key.encode()) + 7919 * seed) & 0x7FFFFFFF)
    name = key.rsplit(".", 1)[-1]
    if key.endswith("vae_scale"):
        t = torch.ones(shape)
    elif key.endswith("vae_shift"):
        t = torch.zeros(shape)
    elif name == "bias":
        t = torch.randn(shape, generator=g) * 0.02
    elif len(shape) == 1:  # norm weights (GroupNorm / LayerNorm)
        t = 1.0 + torch.randn(shape, generator=g) * 0.02
    elif "embedding" in key:  # token / position embeddings
        t = torch.randn(shape, generator=g) * 0.02
    else:
        fan_in = max(1, math.prod(shape[1:]))
        t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return t.to(dtype)


def build_state_dict(full: bool = False, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                     vae: bool = True) -> dict[str, torch.Tensor]:
    return {k: random_tensor(k, s, seed, dtype) for k, s in _shapes(full, vae).items()}


def full_sd15_state_dict(dtype: torch.dtype = torch.float16, seed: int = 0, vae: bool = True) -> dict[str, torch.Tensor]:
    """FULL-SIZE SD1.5 UNet (860M) + CLIP-L (123M) (+ TAESD) with random weights. Benchmarks only."""
    return build_state_dict(True, dtype=dtype, seed=seed, vae=vae)


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: use one of {sorted(_DTYPES)}")
        return dtype
    for n, d in _DTYPES.items():
        if d == dtype:
            return n
    raise ValueError(f"dtype {dtype}: use one of {sorted(_DTYPES)}")


def cache_path(dtype="fp32", seed: int = 0) -> str:
    """Where ``cached_tiny_sd15`` keeps the file (it may not exist yet). Needs no ComfyUI."""
    return os.path.join(CACHE_DIR, f"tiny-sd15-{TINY_VERSION}-s{seed}-{_dtype_name(dtype)}.safetensors")


def cached_tiny_sd15(dtype="fp32", seed: int = 0) -> str:
    """Path of the on-disk cached tiny checkpoint, built on first use (atomic, safe to race)."""
    from safetensors.torch import save_file

    name = _dtype_name(dtype)
    path = cache_path(name, seed)
    if os.path.isfile(path):
        return path
    os.makedirs(CACHE_DIR, exist_ok=True)
    sd = build_state_dict(False, dtype=torch.float32, seed=seed)
    sd = {k: v.to(_DTYPES[name]) for k, v in sd.items()}
    check_detected_as_sd15(sd)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(sd, tmp, metadata={"loralab_test_checkpoint": f"tiny-sd15 {TINY_VERSION} seed {seed} {name}"})
    os.chmod(tmp, 0o444)  # shared through hard links: nobody may write into it
    os.replace(tmp, path)
    return path


def tiny_sd15_path(folder: str, dtype="fp32", seed: int = 0, name: str | None = None) -> str:
    """Place the cached tiny checkpoint in ``folder`` (hard link, else symlink, else copy)."""
    src = cached_tiny_sd15(dtype, seed)
    dst = os.path.join(folder, name or f"tiny_sd15_{_dtype_name(dtype)}.safetensors")
    if not os.path.exists(dst):
        os.makedirs(folder, exist_ok=True)
        for link in (os.link, os.symlink):
            try:
                link(src, dst)
                break
            except OSError:
                continue
        else:
            import shutil
            shutil.copyfile(src, dst)
    return dst


def check_detected_as_sd15(sd: dict[str, torch.Tensor]) -> None:
    """Raise unless ComfyUI's model detection picks SD15 for this state dict (shapes only)."""
    import comfy.model_detection

    cfg = comfy.model_detection.model_config_from_unet(sd, UNET_PREFIX)
    if type(cfg).__name__ != "SD15":
        raise AssertionError(f"ComfyUI detects {type(cfg).__name__} instead of SD15 for the test checkpoint")


def load_tiny_sd15(path: str | None = None, *, dtype="fp32", model_dtype: torch.dtype | None = None,
                   clip_dtype: torch.dtype | None = None):
    """(MODEL patcher, CLIP, VAE) through ``comfy.sd.load_checkpoint_guess_config``.

    ``path`` defaults to the cached file for ``dtype``. With an fp32 file the UNet and the text
    encoder are kept in fp32 in memory (ComfyUI would otherwise hold the text encoder in fp16 on
    the CPU), so parity tests compare fp32 with fp32; pass ``model_dtype`` / ``clip_dtype`` to
    choose. With an fp16 file ComfyUI's own defaults apply unless given.
    """
    import comfy.sd

    path = path or cached_tiny_sd15(dtype)
    if _dtype_name(dtype) == "fp32":
        model_dtype = model_dtype or torch.float32
        clip_dtype = clip_dtype or torch.float32
    model_options = {"dtype": model_dtype} if model_dtype is not None else {}
    te_model_options = {"dtype": clip_dtype} if clip_dtype is not None else {}
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                model_options=model_options, te_model_options=te_model_options)
    model, clip, vae = out[:3]
    return model, clip, vae
