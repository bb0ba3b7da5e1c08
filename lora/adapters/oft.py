"""OFT: an orthogonal, block-diagonal rotation of the weight's output channels.

Keys: ``oft_blocks`` (num, b, b) — kohya ``networks.oft`` and LyCORIS ``diag-oft`` alike — or legacy
LyCORIS ``oft_diag`` (num, b, b, the rotation itself, as A1111 reads it); optional ``rescale``
(out, 1, …) and ``alpha`` (the constraint). 4-dim ``oft_blocks`` are BOFT (boft.py).

    Q_k = B_k − B_kᵀ;  c = alpha·out;  when ‖Q‖ + 1e-8 > c > 0:  Q ← Q·c / (‖Q‖ + 1e-8)
    R_k = (I + Q_k)(I − Q_k)⁻¹                              (Cayley; R_k = oft_diag_k when stored)
    W'[k·b + m] = ρ ⊙ Σ_n R_k[n, m] · W[k·b + n]            (W' = ρ ⊙ blockdiag(R)ᵀ·W)
    ΔW = W' − W,  merged = W + s·ΔW

Without ``rescale`` this equals LyCORIS and kohya at every strength (both interpolate R toward I,
which is linear in s); with it, it equals them at s = 1 (LyCORIS keeps ρ un-blended at other s).
ComfyUI core uses c = alpha (not alpha·out), applies s twice (s²·(R − I)ᵀW), ignores ``rescale``
and drops ``oft_diag``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dora
from .base import Adapter
from .lora import _alpha
from ..bypass import on_channels
from ..errors import LoraError


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ per block, Q = B − Bᵀ with ‖Q‖ (over all blocks) clipped to ``constraint``."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return torch.linalg.solve(eye - q, eye + q, left=False)


def rotate(t: torch.Tensor, axis: int, r: torch.Tensor) -> torch.Tensor:
    """t' with t'[k·b + m] = Σ_n r[k, n, m] · t[k·b + n] along ``axis`` (blockdiag(r)ᵀ·t)."""
    moved = t.movedim(axis, -1)
    out = torch.einsum("knm,...kn->...km", r, moved.unflatten(-1, r.shape[:2]))
    return out.flatten(-2).movedim(-1, axis)


@dataclass(eq=False, repr=False)
class OFT(Adapter):
    name = "oft"
    roles = {".oft_blocks": "oft_blocks", ".oft_diag": "oft_diag", ".rescale": "oft_rescale"}
    identify = frozenset({"oft_blocks", "oft_diag"})
    supports_dora = True
    bypass_uses_base = True

    blocks: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    rescale: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    @classmethod
    def from_factors(cls, factors, *, prefix, file, options):
        blocks, diag = factors.get("oft_blocks"), factors.get("oft_diag")
        if blocks is not None and blocks.dim() == 4 and diag is None:
            from .boft import BOFT
            cls = BOFT
        self = cls(blocks=blocks, diag=diag, rescale=factors.get("oft_rescale"), alpha=_alpha(factors.get("alpha")),
                   dora_scale=factors.get("dora_scale"), file=file, prefix=prefix)
        self._check_blocks(factors)
        return self

    def _check_blocks(self, factors) -> None:
        if (self.blocks is None) == (self.diag is None):
            raise LoraError(f"OFT module needs exactly one of oft_blocks / oft_diag (found: {sorted(factors)})",
                            file=self.file, key=self.prefix)
        t = self.stored
        if t.dim() != 3 or t.shape[1] != t.shape[2]:
            raise self.err(f"OFT blocks must be (num, b, b); found {tuple(t.shape)}")

    @property
    def stored(self) -> torch.Tensor:
        return self.blocks if self.blocks is not None else self.diag

    @property
    def out_dim(self) -> int:
        return self.stored.shape[-3] * self.stored.shape[-1]

    def factors(self):
        alpha = None if self.alpha is None else torch.tensor(self.alpha, dtype=torch.float32)
        return {"oft_blocks": self.blocks, "oft_diag": self.diag, "oft_rescale": self.rescale,
                "alpha": alpha, "dora_scale": self.dora_scale}

    def rotation(self, device, dtype=torch.float32) -> torch.Tensor:
        if self.diag is not None:
            return self.diag.to(device=device, dtype=dtype)
        constraint = self.alpha * self.out_dim if self.alpha and self.alpha > 0 else 0.0
        return cayley(self.blocks.to(device=device, dtype=dtype), constraint)

    def _rescaled(self, t: torch.Tensor, axis: int, strength: float = 1.0) -> torch.Tensor:
        """t ⊙ ρ_s along ``axis``, ρ_s = 1 + s·(ρ − 1)."""
        if self.rescale is None:
            return t
        rho = self.rescale.to(device=t.device, dtype=t.dtype).flatten()
        return t * on_channels(strength * (rho - 1) + 1, t.dim(), axis)

    def transform(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """The merged layer's map on the channels at ``axis`` at strength 1: ρ ⊙ blockdiag(R)ᵀ·t."""
        return self._rescaled(rotate(t, axis, self.rotation(t.device, t.dtype)), axis)

    def delta(self, weight):
        self.check_target(weight.shape, self.prefix)
        w = weight.float()
        return self.transform(w, 0) - w

    def apply_(self, weight, strength):
        return dora.finish_(self, weight, self.delta(weight), strength)

    def bypass(self, x, weight, strength, op, base=None):
        """Δy = s·(ρ ⊙ blockdiag(R)ᵀ·(W·x) − W·x) on the output channels, from the layer's own output.

        None (use ΔW) for DoRA, and for grouped convs: mixing rows of W across groups is not a mix
        of the layer's outputs."""
        if dora.has_magnitude(self) or op.groups != 1:
            return None
        base = op(x, weight.to(x.dtype)) if base is None else base
        return (self.transform(base, op.channel_axis) - base).mul_(strength)

    def check_target(self, shape, key):
        t = self.stored
        if self.out_dim != shape[0]:
            raise self.err(f"OFT blocks {tuple(t.shape)} cover {self.out_dim} output channels but target {key!r} "
                           f"of shape {tuple(shape)} has {shape[0]}: the blocks must tile its output axis")
        if self.rescale is not None and self.rescale.numel() != shape[0]:
            raise self.err(f"OFT rescale of shape {tuple(self.rescale.shape)} does not fit target {key!r} "
                           f"of shape {tuple(shape)}")
        dora.check_magnitude(self, shape, key)
