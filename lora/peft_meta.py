"""PEFT / diffusers LoRA scale, read from the safetensors header.

diffusers >= 0.33 writes the PEFT ``LoraConfig`` of each component into the header key
``lora_adapter_metadata`` (JSON; keys prefixed by component, e.g. ``"unet.lora_alpha"``, or
unprefixed for a single model). PEFT scales a module by ``alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``), where ``alpha`` comes from ``alpha_pattern`` when a pattern matches the module
name, else ``lora_alpha``. With no such metadata and no ``.alpha`` keys, PEFT's convention for a
plain state dict is scale 1 (alpha = rank), which is what an adapter without alpha already does.

We express the scale as the kohya-style alpha that gives it: alpha_equiv = scale · rank.
"""
from __future__ import annotations

import json
import math
import re

METADATA_KEY = "lora_adapter_metadata"
_COMPONENTS = ("unet.", "text_encoder_2.", "text_encoder.", "transformer.")


def peft_configs(metadata: dict[str, str]) -> dict[str, dict] | None:
    """{component prefix ('' for unprefixed): LoraConfig dict} or None when absent/unreadable."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        flat = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(flat, dict):
        return None
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp = next((c for c in _COMPONENTS if k.startswith(c)), "")
        out.setdefault(comp, {})[k[len(comp):]] = v
    return out


def alpha_equiv(configs: dict[str, dict], prefix: str, rank: int) -> float | None:
    """Kohya-style alpha that reproduces PEFT's scale for module ``prefix`` of rank ``rank``."""
    comp = next((c for c in _COMPONENTS if prefix.startswith(c)), "")
    cfg = configs.get(comp) or configs.get("")
    if not cfg or "lora_alpha" not in cfg:
        return None
    module = prefix[len(comp):]
    alpha = float(cfg["lora_alpha"])
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return scale * rank
