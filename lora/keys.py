"""Key names: every naming scheme a LoRA file may use, reduced to one canonical form.

The canonical form is kohya's (``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``):
ComfyUI's key maps know it for every SD-family model, A1111/Forge/kohya read it, and our own
standalone map (``sd_keys``) is built on it. ``canonical`` only renames; it never guesses which
layer a name means - matching against a model's actual keys does that.
"""
from __future__ import annotations

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


def describe(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit} more)" if len(names) > limit else "")
