"""Exponential moving average of the trained factors.

After every optimizer step t (1, 2, …; counted over the whole life of the LoRA, so a resumed run
continues the same average):

    d_t = 0 for t = 1, else min(decay, t / (9 + t))     diffusers' EMAModel warm-up (its default:
                                                        (1 + s)/(10 + s) with s = t − 1)
    ema ← ema + (1 − d_t)·(θ − ema)                     = d_t·ema + (1 − d_t)·θ

The average is kept in float32 whatever the factors' dtype (a bf16 average with d = 0.999 would
round every update away). With EMA on, the saved LoRA is the average; the live factors needed to
continue training travel in the file's header (see metadata.py).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .errors import TrainingError


def decay_at(decay: float, step: int) -> float:
    """The decay used for the update after optimizer step ``step`` (1-based)."""
    s = step - 1
    return 0.0 if s <= 0 else min(decay, (1.0 + s) / (10.0 + s))


class EMA:
    def __init__(self, params: Mapping[str, torch.Tensor], decay: float,
                 start: Mapping[str, torch.Tensor] | None = None):
        if not 0.0 < decay < 1.0:
            raise TrainingError(f"ema_decay = {decay} must be between 0 and 1 (e.g. 0.999), or 0 for off")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {}
        for name, p in params.items():
            src = start.get(name) if start is not None else None
            if src is not None and tuple(src.shape) != tuple(p.shape):
                raise TrainingError(f"the EMA weights for {name} have shape {tuple(src.shape)}, the factor has "
                                    f"{tuple(p.shape)}")
            self.shadow[name] = (p if src is None else src).detach().to(device=p.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor], step: int) -> None:
        """Fold the factors in after optimizer step ``step`` (1-based, global)."""
        w = 1.0 - decay_at(self.decay, step)
        for name, s in self.shadow.items():
            s.lerp_(params[name].detach().float(), w)

    def state(self) -> dict[str, torch.Tensor]:
        return self.shadow


__all__ = ["EMA", "decay_at"]
