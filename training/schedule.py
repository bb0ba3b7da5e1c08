"""Learning-rate schedules as kohya sd-scripts gets them from diffusers' ``get_scheduler``: a linear
warm-up from 0, then a decay, as a factor of the base learning rate.

    constant                 1
    constant_with_warmup     s/W during warm-up, then 1
    linear                   s/W, then (T − s) / (T − W)
    cosine                   s/W, then ½·(1 + cos(π·p)),                 p = (s − W) / (T − W)
    cosine_with_restarts     s/W, then ½·(1 + cos(π·((n·p) mod 1))),     n = num_cycles; 0 from p ≥ 1

s = optimizer steps already taken (0 for the first step: with warm-up the first step runs at lr 0,
as kohya's does), W = warm-up steps, T = the step the run ends at. The factor is a pure function
of the global step, so a run resumed at step N gets exactly the learning rates an uninterrupted
run would (no scheduler state to store). The same factor scales every parameter group (the UNet's
and the text encoder's learning rates), as torch's LambdaLR does for kohya.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import TrainingError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


@dataclass(frozen=True)
class Schedule:
    name: str = "constant"
    warmup_steps: int = 0
    num_cycles: int = 1          # cosine_with_restarts only (kohya's lr_scheduler_num_cycles)

    def check(self) -> None:
        if self.name not in SCHEDULERS:
            raise TrainingError(f"lr_scheduler {self.name!r} is not known; choose one of {', '.join(SCHEDULERS)}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise TrainingError(f"lr_warmup_steps = {self.warmup_steps} must be a whole number ≥ 0")
        if self.name == "constant" and self.warmup_steps:
            raise TrainingError(f"lr_scheduler 'constant' takes no warm-up (lr_warmup_steps = {self.warmup_steps}); "
                                "choose constant_with_warmup, or set lr_warmup_steps to 0 (kohya refuses this too)")
        if not isinstance(self.num_cycles, int) or self.num_cycles < 1:
            raise TrainingError(f"lr_scheduler_num_cycles = {self.num_cycles} must be a whole number ≥ 1")

    def factor(self, step: int, total: int) -> float:
        """Multiplier of the base learning rate for the optimizer step taken after ``step`` steps,
        in a run that ends at step ``total``."""
        w = self.warmup_steps
        if self.name == "constant":
            return 1.0
        if step < w:
            return step / max(1, w)
        if self.name == "constant_with_warmup":
            return 1.0
        progress = (step - w) / max(1, total - w)
        if self.name == "linear":
            return max(0.0, (total - step) / max(1, total - w))
        if self.name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((self.num_cycles * progress) % 1.0))))


__all__ = ["SCHEDULERS", "Schedule"]
