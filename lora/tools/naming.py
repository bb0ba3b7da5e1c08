"""Which name a tool writes for a model's weight: kohya's or ComfyUI's, picked from a key map.

A key map is what ``lora.patch.match`` matches files against: {name a LoRA file may use: the model
key (or slice) it means}. Inside ComfyUI it is ComfyUI's own (``comfy.lora.model_lora_keys_unet`` /
``_clip``, nodes/comfy_model.py ``key_map``), standalone ``lora.sd_keys.model_key_map`` (SD1.x, SD2.x,
SDXL) or ``native_key_map`` (any other diffusion model in its original layout). Every name chosen
here is a name of that map, so the loader that built the map (ComfyUI core inside ComfyUI) finds it.

Styles, for the model key ``diffusion_model.<path>.weight`` of a diffusion model, or a text encoder's:
    comfy   ``diffusion_model.<path>``; text encoders ``text_encoders.<key without .weight>``
            (ComfyUI's own names, what its trainer and LoraSave write)
    kohya   ``lora_unet_<path with _>``, for SD-family UNets with the diffusers path, as kohya's
            sd-scripts write them (``lora_unet_down_blocks_0_attentions_0_…``); text encoders
            ``lora_te_…`` (one CLIP) or ``lora_te1_…`` / ``lora_te2_…`` (SDXL); a text-encoder weight
            kohya has no name for keeps ComfyUI's ``text_encoders.`` name
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping

from .. import arch as arch_table

STYLES = ("kohya", "comfy")
_UNET = ("model.diffusion_model.", "diffusion_model.")


def names_for(key_map: Mapping[str, Any], style: str, the_arch: arch_table.Arch | None = None) -> dict[str, str]:
    """{model key: the name to write} for every whole-tensor key of the map that has a name of the style.

    ``the_arch``: picks kohya's diffusers-path names for SD-family UNets."""
    if style not in STYLES:
        raise ValueError(f"naming style {style!r}: use one of {', '.join(STYLES)}")
    by_key: dict[str, list[str]] = defaultdict(list)
    for name, key in key_map.items():
        if isinstance(key, str):
            by_key[key].append(name)
    two_te = any(n.startswith("lora_te2_") for n in key_map)
    out = {}
    for key, names in by_key.items():
        name = _pick(key, names, style, the_arch, two_te)
        if name is not None:
            out[key] = name
    return out


def _pick(key: str, names: list[str], style: str, the_arch, two_te: bool) -> str | None:
    have = set(names)
    comfy = next((n for n in sorted(names) if n.startswith(("diffusion_model.", "text_encoders."))), None)
    if style == "comfy":
        return comfy
    unet = [n for n in names if n.startswith("lora_unet_")]
    if unet:
        if the_arch is not None and "diffusers" in the_arch.names and len(unet) > 1:
            diffusers = [n for n in unet if the_arch.naming(arch_table.flat_name(n)) == "diffusers"]
            if diffusers:
                return sorted(diffusers)[0]
        native = [n for n in unet if comfy and n == "lora_unet_" + comfy[len("diffusion_model."):].replace(".", "_")]
        return (native or sorted(unet))[0]
    heads = ("lora_te1_", "lora_te2_", "lora_te3_") if two_te else ("lora_te_",)
    te = sorted(n for n in have if n.startswith(heads))
    return te[0] if te else comfy


def native_key_map(keys: Iterable[str]) -> dict[str, str]:
    """A key map for a diffusion model in its original (ComfyUI) layout, without ComfyUI: every
    ``.weight`` of the model answers to ``diffusion_model.<path>`` and ``lora_unet_<path with _>``,
    the two names ComfyUI's map gives every diffusion-model weight. ``keys``: a checkpoint's
    (``model.diffusion_model.…``), a ComfyUI model's (``diffusion_model.…``) or a bare diffusion model
    file's."""
    keys = list(keys)
    prefixed = any(k.startswith(_UNET) for k in keys)     # a checkpoint: only its diffusion model
    out = {}
    for k in keys:
        if not k.endswith(".weight") or (prefixed and not k.startswith(_UNET)):
            continue
        path = next((k[len(p):] for p in _UNET if k.startswith(p)), k)[: -len(".weight")]
        out["diffusion_model." + path] = k
        out["lora_unet_" + path.replace(".", "_")] = k
    return out


def text_encoder_key(name: str) -> bool:
    """A name kohya (or ComfyUI) gives a text-encoder weight."""
    return name.startswith(("lora_te", "text_encoders.", "lora_prior_te"))
