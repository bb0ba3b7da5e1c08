"""DoRA (weight-decomposed adaptation) on top of any ΔW, as LyCORIS and PEFT define it.

    W' = W + ΔW                                  (ΔW at strength 1)
    n  = ‖W'‖ along the magnitude axis (+ eps)   (output axis: rows; input axis: columns)
    s  = m / n                                   (m = dora_scale, the learned magnitude)
    s  ← strength·(s − 1) + 1                    (strength blends the rescale, LyCORIS semantics)
    W''= W' · s

The norm is taken of the *patched* weight W', not the original one (ComfyUI core uses the
original W on the output axis, which is why its output differs from the producing library).
"""
from __future__ import annotations

import torch

from ..errors import LoraError


def magnitude_axis(dora_scale: torch.Tensor, shape: torch.Size, *, file=None, key=None) -> int:
    """0 when the magnitude is per output channel, 1 when per input channel.

    LyCORIS stores (out, 1, ...) or (1, in, ...); PEFT stores a flat (out,) vector.
    """
    n = dora_scale.numel()
    if dora_scale.dim() > 1 and dora_scale.shape[0] == 1 and len(shape) > 1 and n == shape[1]:
        return 1
    if n == shape[0]:
        return 0
    if len(shape) > 1 and n == shape[1]:
        return 1
    raise LoraError(f"dora_scale has shape {tuple(dora_scale.shape)} ({n} values), which fits neither "
                    f"the output axis ({shape[0]}) nor the input axis "
                    f"({shape[1] if len(shape) > 1 else 'n/a'}) of the target weight {tuple(shape)}",
                    file=file, key=key)


def apply_dora_(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, strength: float,
                *, file=None, key=None) -> torch.Tensor:
    """In place on ``weight`` (a float working copy): W ← DoRA(W + ΔW) with strength blending."""
    axis = magnitude_axis(dora_scale, weight.shape, file=file, key=key)
    weight.add_(delta.to(weight.dtype))
    eps = torch.finfo(weight.dtype).eps
    if axis == 0:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (weight.dim() - 2))
    scale = dora_scale.to(weight.dtype).reshape(norm.shape) / (norm + eps)
    if strength != 1.0:
        scale = strength * (scale - 1) + 1
    return weight.mul_(scale)
