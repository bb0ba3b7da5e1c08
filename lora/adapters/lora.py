"""LoRA / LoCon: ΔW = (alpha / rank) · up · down, with an optional CP/Tucker ``mid`` for convolutions.

Shapes (r = rank):
    Linear          up (out, r)           down (r, in)
    Conv (LoCon)    up (out, r, 1, 1)     down (r, in, kh, kw)
    Conv (Tucker)   up (out, r, 1, 1)     down (r, in, 1, 1)    mid (r, r, kh, kw)
    ΔW_tucker[i, j, h, w] = Σ_mn mid[m, n, h, w] · up[i, m] · down[n, j]
Linear-shaped factors on a 1×1 conv (and the reverse) are reshaped, as every loader does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Adapter, ensure_same_numel
from .dora import apply_dora_
from ..errors import LoraError

_SUFFIXES = {
    # kohya, LyCORIS LoCon, ComfyUI's own trained files
    ".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_mid.weight": "mid",
    # PEFT (diffusers >= 0.22, transformers), with or without the adapter name "default"
    ".lora_B.weight": "up", ".lora_A.weight": "down",
    ".lora_B.default.weight": "up", ".lora_A.default.weight": "down",
    # diffusers attention processors (old) and text-encoder patches
    ".lora.up.weight": "up", ".lora.down.weight": "down",
    "_lora.up.weight": "up", "_lora.down.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    # Mochi / bare PEFT tensors without ".weight"
    ".lora_B": "up", ".lora_A": "down",
}


@dataclass(eq=False, repr=False)
class LoRA(Adapter):
    name = "lora"
    roles = _SUFFIXES
    identify = frozenset({"up", "down"})
    supports_dora = True

    up: torch.Tensor = None
    down: torch.Tensor = None
    mid: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    @classmethod
    def from_factors(cls, factors, *, prefix, file, options):
        up, down = factors.get("up"), factors.get("down")
        if up is None or down is None:
            missing = "up" if up is None else "down"
            raise LoraError(f"LoRA module has no '{missing}' factor (found: {sorted(factors)})", file=file, key=prefix)
        self = cls(up=up, down=down, mid=factors.get("mid"), alpha=_alpha(factors.get("alpha")),
                   dora_scale=factors.get("dora_scale"), file=file, prefix=prefix)
        rank_up = up.shape[1] if up.dim() > 1 else -1
        rank_down = down.shape[0]
        if self.mid is not None:
            if tuple(self.mid.shape[:2]) != (rank_up, rank_down):
                raise self.err(f"ranks disagree: up {tuple(up.shape)}, mid {tuple(self.mid.shape)}, down {tuple(down.shape)}")
        elif rank_up != rank_down:
            raise self.err(f"ranks disagree: up {tuple(up.shape)} has rank {rank_up}, down {tuple(down.shape)} has rank {rank_down}")
        return self

    def factors(self):
        alpha = None if self.alpha is None else torch.tensor(self.alpha, dtype=torch.float32)
        return {"up": self.up, "down": self.down, "mid": self.mid, "alpha": alpha, "dora_scale": self.dora_scale}

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def _mats(self, device, dtype):
        up = self.up.to(device=device, dtype=dtype).flatten(1)
        down = self.down.to(device=device, dtype=dtype).flatten(1)
        return up, down

    def delta(self, weight):
        dt = torch.float32 if weight.dtype not in (torch.float32, torch.float64) else weight.dtype
        up, down = self._mats(weight.device, dt)
        if self.mid is not None:
            mid = self.mid.to(device=weight.device, dtype=dt)
            d = torch.einsum("mnhw,im,nj->ijhw", mid, up, down)
        else:
            d = up @ down
        ensure_same_numel(self, d.numel(), weight.shape, self.prefix)
        return d.reshape(weight.shape).mul_(self.scale)

    def apply_(self, weight, strength):
        if self.dora_scale is not None:
            return apply_dora_(weight, self.delta(weight), self.dora_scale, strength, file=self.file, key=self.prefix)
        if self.mid is not None:
            return super().apply_(weight, strength)
        # Fast path: accumulate up·down straight into the working copy (no ΔW-sized temporary).
        up, down = self._mats(weight.device, weight.dtype)
        ensure_same_numel(self, up.shape[0] * down.shape[1], weight.shape, self.prefix)
        weight.view(up.shape[0], down.shape[1]).addmm_(up, down, alpha=strength * self.scale)
        return weight

    def check_target(self, shape, key):
        out = self.up.shape[0]
        if self.mid is not None:
            n = out * self.down.shape[1] * self.mid[0, 0].numel()
        else:
            n = out * self.down[0].numel()
        if n != shape.numel() or out != shape[0]:
            raise self.err(f"up {tuple(self.up.shape)} · down {tuple(self.down.shape)} does not fit target "
                           f"{key!r} of shape {tuple(shape)}")


def _alpha(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.float().reshape(-1)[0])
