"""LoRA / LoCon: ΔW = (alpha / rank) · up · down, with an optional CP/Tucker ``mid`` for convolutions.

Shapes (r = rank):
    Linear          up (out, r)           down (r, in)
    Conv (LoCon)    up (out, r, 1, 1)     down (r, in, kh, kw)
    Conv (Tucker)   up (out, r, 1, 1)     down (r, in, 1, 1)    mid (r, r, kh, kw)
    ΔW_tucker[i, j, h, w] = Σ_mn mid[m, n, h, w] · up[i, m] · down[n, j]
Linear-shaped factors on a 1×1 conv (and the reverse) are reshaped, as every loader does.

DyLoRA files are plain LoRA files; ``options["dyn_rank"] = r`` keeps the first r ranks, as A1111's
``dyn=`` does: ΔW = (alpha / R) · up[:, :r] · down[:r], R the stored rank (kept by rewriting alpha
to alpha·r/R, so the truncated adapter saves and reloads to the same ΔW).
PEFT DoRA magnitudes (``lora_magnitude_vector``) keep PEFT's strength rule (see dora.py).

Bypass: Δy = s·γ·up(mid(down(x))), each factor run as the layer runs W (``base.low_rank_forward``).
Training init (kohya ``networks/lora.py``, LyCORIS LoCon): down kaiming-uniform(a=√5), up zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LoraError
from .base import Adapter, alpha_tensor, alpha_value, ensure_same_numel, kaiming, low_rank_forward

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
    # XLabs (x-flux LoRALinearLayer: ``….processor.qkv_lora1.down.weight``), after every longer suffix
    ".up.weight": "up", ".down.weight": "down",
    # Mochi / bare PEFT tensors without ".weight"
    ".lora_B": "up", ".lora_A": "down",
    # PEFT DoRA magnitude (one per output channel); PEFT's own strength rule, see dora.py
    ".lora_magnitude_vector": "peft_magnitude", ".lora_magnitude_vector.weight": "peft_magnitude",
    ".lora_magnitude_vector.default.weight": "peft_magnitude",
}


@dataclass(eq=False, repr=False)
class LoRA(Adapter):
    name = "lora"
    label = "LoRA"
    roles = _SUFFIXES
    identify = frozenset({"up", "down"})
    trainable = True

    up: torch.Tensor = None
    down: torch.Tensor = None
    mid: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    peft_magnitude: torch.Tensor | None = None

    @classmethod
    def from_factors(cls, factors, *, prefix, file, options):
        up, down = factors.get("up"), factors.get("down")
        if up is None or down is None:
            missing = "up" if up is None else "down"
            raise LoraError(f"LoRA module has no '{missing}' factor (found: {sorted(factors)})", file=file, key=prefix)
        if factors.get("dora_scale") is not None and factors.get("peft_magnitude") is not None:
            raise LoraError("module carries both a LyCORIS dora_scale and a PEFT lora_magnitude_vector",
                            file=file, key=prefix)
        self = cls(up=up, down=down, mid=factors.get("mid"), alpha=alpha_value(factors.get("alpha")),
                   dora_scale=factors.get("dora_scale"), peft_magnitude=factors.get("peft_magnitude"),
                   file=file, prefix=prefix)
        rank_up = up.shape[1] if up.dim() > 1 else -1
        rank_down = down.shape[0]
        if self.mid is not None:
            if tuple(self.mid.shape[:2]) != (rank_up, rank_down):
                raise self.err(f"ranks disagree: up {tuple(up.shape)}, mid {tuple(self.mid.shape)}, down {tuple(down.shape)}")
        elif rank_up != rank_down:
            raise self.err(f"ranks disagree: up {tuple(up.shape)} has rank {rank_up}, down {tuple(down.shape)} has rank {rank_down}")
        if options.get("dyn_rank"):
            self._truncate(int(options["dyn_rank"]))
        return self

    @classmethod
    def init(cls, op, rank, alpha, generator):
        ones = [1] * len(op.kernel)
        down = kaiming((rank, op.in_channels, *op.kernel), generator)
        up = torch.zeros(op.out_channels, rank, *ones)          # ΔW = 0: training starts at the base model
        return cls(up=up, down=down, alpha=float(alpha))

    def _truncate(self, r: int) -> None:
        """DyLoRA: keep ranks [0, r) with A1111's scale alpha/R (R = stored rank)."""
        stored = self.rank
        if self.mid is not None or not 0 < r <= stored:
            why = "has a Tucker mid factor" if self.mid is not None else f"stores rank {stored}"
            raise self.err(f"DyLoRA rank {r} cannot be selected: the module {why} "
                           f"(up {tuple(self.up.shape)}, down {tuple(self.down.shape)})")
        if r < stored:
            self.up, self.down = self.up[:, :r].contiguous(), self.down[:r].contiguous()
            self.alpha = None if self.alpha is None else self.alpha * r / stored

    def factors(self):
        return {"up": self.up, "down": self.down, "mid": self.mid, "alpha": alpha_tensor(self.alpha),
                "dora_scale": self.dora_scale, "peft_magnitude": self.peft_magnitude}

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        # kohya and LyCORIS (the producers of .alpha keys) read a missing or zero alpha as alpha =
        # rank, i.e. scale 1; ComfyUI core reads 0 as scale 0 and silently applies nothing.
        return 1.0 if not self.alpha else self.alpha / self.rank

    def _mats(self, device, dtype):
        up = self.up.to(device=device, dtype=dtype).flatten(1)
        down = self.down.to(device=device, dtype=dtype).flatten(1)
        return up, down

    def delta(self, weight):
        dt = torch.float32 if weight.dtype not in (torch.float32, torch.float64) else weight.dtype
        up, down = self.low_rank(weight.device, dt, scaled=False)
        d = up @ down
        ensure_same_numel(self, d.numel(), weight.shape, self.prefix)
        return d.reshape(weight.shape).mul_(self.scale)

    def apply_(self, weight, strength):
        if self.has_magnitude or self.mid is not None:
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
        super().check_target(shape, key)

    def low_rank(self, device, dtype=torch.float32, scaled=True):
        """U = γ·up (out, r); V = down (r, in·k), or with a Tucker mid V[m, (j, k)] = Σ_n mid[m,n,k]·down[n,j]."""
        up, down = self._mats(device, dtype)
        if self.mid is not None:   # any kernel rank (Conv1d/2d/3d)
            down = torch.einsum("mn...,nj->mj...", self.mid.to(device=device, dtype=dtype), down).flatten(1)
        return (up * self.scale if scaled else up), down

    def delta_forward(self, x, weight, op, scale, base=None):
        """scale·γ·up(mid(down(x))): the layer's own op on the factors, ΔW never built."""
        if self.mid is None:
            up, down = self._mats(x.device, x.dtype)
            return low_rank_forward(x, up, down, op, scale * self.scale)
        if op.groups != 1:
            return None
        cast = dict(device=x.device, dtype=x.dtype)
        h = op(op.pointwise(x, self.down.to(**cast)), self.mid.to(**cast))
        return op.pointwise(h * (scale * self.scale), self.up.to(**cast))
