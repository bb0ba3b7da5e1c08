"""Key names: every naming scheme a LoRA file may use, reduced to one canonical form.

The canonical form is kohya's (``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``):
ComfyUI's key maps know it for every SD-family model, A1111/Forge/kohya read it, and our own
standalone map (``sd_keys``) is built on it. ``canonical`` only renames; it never guesses which
layer a name means - matching against a model's actual keys does that.
"""
from __future__ import annotations

import re
from typing import Iterable

_TE = {"text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}
_UNET_BARE = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "class_embedding.",
              "add_embedding.", "conv_norm_out")


def canonical(prefix: str) -> str:
    """A module prefix from any supported file format -> its kohya-style name.

    >>> canonical("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q'
    >>> canonical("text_encoder.encoder.layers.3.self_attn.q_proj")   # transformers 5 naming
    'lora_te_text_model_encoder_layers_3_self_attn_q_proj'
    """
    p = prefix
    for wrapper in ("base_model.model.", "unet.base_model.model."):
        if p.startswith(wrapper):
            p = "unet." + p[len(wrapper):] if not p[len(wrapper):].startswith(("unet.", "text_encoder")) else p[len(wrapper):]
    if p.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
        return p
    if p.startswith("diffusion_model."):
        return "lora_unet_" + _flat(p[len("diffusion_model."):])
    if p.startswith(_UNET_BARE):
        p = "unet." + p
    if p.startswith("unet."):
        body = p[len("unet."):].replace(".processor.", ".")
        if body.endswith(".to_out"):      # old attention-processor files name to_out.0 "to_out"
            body += ".0"
        return "lora_unet_" + _flat(body)
    for head, kohya in _TE.items():
        if p.startswith(head):
            body = p[len(head):]
            if body.startswith("encoder."):   # transformers >= 5 drops the "text_model." level
                body = "text_model." + body
            return kohya + _flat(body)
    return prefix


def _flat(dotted: str) -> str:
    return dotted.replace(".", "_")


# ---- what a file / a model looks like --------------------------------------------------------------
_CONTEXT_DIM_ARCH = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}


def guess_file_arch(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Best guess of the base model a LoRA file was made for, from its key names and shapes.

    The input width of cross-attention ``to_k``/``to_v`` is the text-context width, which tells
    SD1.x (768), SD2.x (1024) and SDXL (2048) apart; text encoder 2 keys also mean SDXL.
    """
    names = list(shapes)
    for k in names:
        if re.search(r"attn2[._]to_[kv]", k) and re.search(r"(lora_down|lora_A|lora\.down|_lora\.down|down)[._]weight$|lora_A$", k):
            arch = _CONTEXT_DIM_ARCH.get(shapes[k][1] if len(shapes[k]) > 1 else -1)
            if arch:
                return arch
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in names):
        return "SDXL"
    if any(k.startswith(("lora_transformer_", "transformer.")) for k in names):
        return "a transformer (DiT) model"
    if any(k.startswith(("lora_unet_", "unet.", "lora_te", "text_encoder.")) for k in names):
        return "SD1.x/SD2.x/SDXL-family"
    return None


def describe(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit} more)" if len(names) > limit else "")
