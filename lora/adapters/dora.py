"""DoRA (weight-decomposed adaptation) on top of any ΔW, exactly as each producer defines it.

Two producers, two strength rules (equal at strength 1):

LyCORIS ``dora_scale`` (``lycoris.functional.general.weight_decompose``)::

    W' = W + ΔW                                   ΔW at strength 1
    n  = ‖W'‖ per output row (dora_scale (out, 1, …)) or per input column ((1, in, …)), + eps
    W''= W' · (s·(m/n − 1) + 1)                   strength s blends only the rescale

PEFT ``lora_magnitude_vector`` (``peft.tuners.lora.dora``; s multiplies PEFT's ``scaling``)::

    W''= m · (W + s·ΔW) / ‖W + s·ΔW‖              norm per output row, no eps

Both norms are of the *patched* weight. ComfyUI core normalises the output axis against the
unpatched W and blends W + s·(W'' − W); see the formats table in README.md.
"""
from __future__ import annotations

import torch

from ..errors import LoraError


def magnitude_axis(dora_scale: torch.Tensor, shape: torch.Size, *, file=None, key=None) -> int:
    """0 when the magnitude is per output channel, 1 when per input channel.

    LyCORIS stores (out, 1, …) or (1, in, …); a flat vector is read by its length, output first.
    """
    n, s = dora_scale.numel(), tuple(dora_scale.shape)
    if dora_scale.dim() > 1:
        if len(shape) > 1 and s[0] == 1 and s[1] == shape[1] and n == shape[1]:
            return 1
        if s[0] == shape[0] and n == shape[0]:
            return 0
    elif n == shape[0]:
        return 0
    elif len(shape) > 1 and n == shape[1]:
        return 1
    raise LoraError(f"dora_scale has shape {s} ({n} values), which fits neither the output axis "
                    f"({shape[0]}) nor the input axis ({shape[1] if len(shape) > 1 else 'n/a'}) "
                    f"of the target weight {tuple(shape)}", file=file, key=key)


def check_peft_magnitude(magnitude: torch.Tensor, shape: torch.Size, *, file=None, key=None) -> None:
    """PEFT keeps one magnitude per output channel: (out,) for Linear, (1, out, 1, …) for Conv."""
    if magnitude.numel() != shape[0]:
        raise LoraError(f"lora_magnitude_vector has shape {tuple(magnitude.shape)} ({magnitude.numel()} values) "
                        f"but the target weight {tuple(shape)} has {shape[0]} output channels",
                        file=file, key=key)


def _norm(w: torch.Tensor, axis: int) -> torch.Tensor:
    """‖w‖ over every axis but ``axis``, shaped to broadcast against ``w``."""
    keep = [1] * w.dim()
    keep[axis] = w.shape[axis]
    return w.movedim(axis, 0).reshape(w.shape[axis], -1).norm(dim=1).reshape(keep)


def apply_dora_(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, strength: float,
                *, file=None, key=None) -> torch.Tensor:
    """LyCORIS rule, in place on ``weight`` (a float working copy): W ← (W+ΔW)·(s·(m/‖W+ΔW‖ − 1) + 1)."""
    axis = magnitude_axis(dora_scale, weight.shape, file=file, key=key)
    weight.add_(delta.to(weight.dtype))
    norm = _norm(weight, axis).add_(torch.finfo(weight.dtype).eps)
    scale = dora_scale.to(device=weight.device, dtype=weight.dtype).reshape(norm.shape) / norm
    if strength != 1.0:
        scale = strength * (scale - 1) + 1
    return weight.mul_(scale)


def apply_peft_dora_(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float,
                     *, file=None, key=None) -> torch.Tensor:
    """PEFT rule, in place on ``weight``: W ← m·(W + s·ΔW)/‖W + s·ΔW‖ (per output row)."""
    check_peft_magnitude(magnitude, weight.shape, file=file, key=key)
    weight.add_(delta.to(weight.dtype), alpha=strength)
    norm = _norm(weight, 0)
    return weight.mul_(magnitude.to(device=weight.device, dtype=weight.dtype).reshape(norm.shape) / norm)


def finish_(adapter, weight: torch.Tensor, delta: torch.Tensor, strength: float) -> torch.Tensor:
    """weight + s·ΔW, or the DoRA form when the adapter carries a magnitude (in place)."""
    dora = getattr(adapter, "dora_scale", None)
    peft = getattr(adapter, "peft_magnitude", None)
    if dora is not None:
        return apply_dora_(weight, delta, dora, strength, file=adapter.file, key=adapter.prefix)
    if peft is not None:
        return apply_peft_dora_(weight, delta, peft, strength, file=adapter.file, key=adapter.prefix)
    return weight.add_(delta.to(weight.dtype), alpha=strength)


def check_magnitude(adapter, shape: torch.Size, key) -> None:
    """Raise before any math when the adapter's magnitude fits neither axis of the target."""
    if getattr(adapter, "dora_scale", None) is not None:
        magnitude_axis(adapter.dora_scale, shape, file=adapter.file, key=adapter.prefix)
    if getattr(adapter, "peft_magnitude", None) is not None:
        check_peft_magnitude(adapter.peft_magnitude, shape, file=adapter.file, key=adapter.prefix)


def has_magnitude(adapter) -> bool:
    return getattr(adapter, "dora_scale", None) is not None or getattr(adapter, "peft_magnitude", None) is not None
