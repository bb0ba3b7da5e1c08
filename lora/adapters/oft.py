"""OFT: an orthogonal, block-diagonal rotation of the weight's output channels.

Keys: ``oft_blocks`` (num, b, b) — kohya ``networks.oft`` and LyCORIS ``diag-oft`` alike — or legacy
LyCORIS ``oft_diag`` (num, b, b, the rotation itself, as A1111 reads it); optional ``rescale``
(out, 1, …) and ``alpha`` (the constraint). 4-dim ``oft_blocks`` are BOFT (boft.py).

    Q_k = B_k − B_kᵀ;  c = alpha·out;  when ‖Q‖ + 1e-8 > c > 0:  Q ← Q·c / (‖Q‖ + 1e-8)
    R_k = (I + Q_k)(I − Q_k)⁻¹                              (Cayley; R_k = oft_diag_k when stored)
    W'[k·b + m] = ρ ⊙ Σ_n R_k[n, m] · W[k·b + n]            (W' = ρ ⊙ blockdiag(R)ᵀ·W)
    ΔW = W' − W = ρ ⊙ blockdiag(R − I)ᵀ·W + (ρ − 1) ⊙ W,  merged = W + s·ΔW

R − I = 2Q(I − Q)⁻¹ is computed as such, not as R minus I, so a rotation near I (a freshly
trained adapter, bf16 training) keeps its precision. Without ``rescale`` this equals LyCORIS and
kohya at every strength (both interpolate R toward I, which is linear in s); with it, it equals
them at s = 1 (LyCORIS keeps ρ un-blended at other s). ComfyUI core uses c = alpha (not alpha·out),
applies s twice (s²·(R − I)ᵀW), ignores ``rescale`` and drops ``oft_diag``.

Bypass: Δy = s·(ρ ⊙ blockdiag(R − I)ᵀ·(W·x) + (ρ − 1) ⊙ W·x) on the output channels, from the
layer's own output (not for grouped convs: there mixing rows of W across groups is not a mix of
the layer's outputs; nor with DoRA).
Training init (kohya, LyCORIS): oft_blocks = 0 (R = I); ``rank`` is the block size (the largest
divisor of out up to rank), alpha 0 (no constraint).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LoraError
from ..ops import on_channels
from .base import Adapter, alpha_tensor, alpha_value


def skew(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Q = B − Bᵀ per block, with ‖Q‖ (over all blocks) clipped to ``constraint`` when that is > 0."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        q = q * torch.where(norm > constraint, constraint / norm, torch.ones_like(norm))   # no host sync
    return q


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ per block (``skew`` for Q)."""
    q = skew(blocks, constraint)
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return torch.linalg.solve(eye - q, eye + q, left=False)


def cayley_offset(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R − I = 2Q(I − Q)⁻¹ per block, without the cancellation of R − I."""
    return offset_of_skew(skew(blocks, constraint))


def offset_of_skew(q: torch.Tensor) -> torch.Tensor:
    """R − I = 2Q(I − Q)⁻¹ per block for a skew-symmetric Q (the Cayley transform minus I)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return torch.linalg.solve(eye - q, 2 * q, left=False)


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision solves are unsupported or imprecise: solve in float32 (float64 stays)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate(t: torch.Tensor, axis: int, r: torch.Tensor) -> torch.Tensor:
    """t' with t'[k·b + m] = Σ_n r[k, n, m] · t[k·b + n] along ``axis`` (blockdiag(r)ᵀ·t)."""
    moved = t.movedim(axis, -1)
    out = torch.einsum("knm,...kn->...km", r, moved.unflatten(-1, r.shape[:2]))
    return out.flatten(-2).movedim(-1, axis)


class OutputChange(Adapter):
    """An adapter whose ΔW is a change ``change(W, 0)`` of W's output rows that acts on the layer's output
    the same way (a rotation of output channels): bypass applies it to W·x, never building ΔW."""

    def change(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """What the merged layer adds to t along its channel ``axis`` at strength 1."""
        raise NotImplementedError

    def delta(self, weight):
        self.check_target(weight.shape, self.prefix)
        return self.change(weight.float(), 0)

    def uses_base(self):
        return True

    def delta_forward(self, x, weight, op, scale, base=None):
        if op.groups != 1:
            return None
        base = op(x, weight.to(device=x.device, dtype=x.dtype)) if base is None else base
        return self.change(base, op.channel_axis) * scale


@dataclass(eq=False, repr=False)
class OFT(OutputChange):
    name = "oft"
    label = "OFT"
    roles = {".oft_blocks": "oft_blocks", ".oft_diag": "oft_diag", ".rescale": "oft_rescale"}
    identify = frozenset({"oft_blocks", "oft_diag"})
    trainable = True

    blocks: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    rescale: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    @classmethod
    def accepts(cls, factors):
        """Diagonal OFT: 3-dim oft_blocks or a stored oft_diag (4-dim oft_blocks alone are BOFT's)."""
        blocks = factors.get("oft_blocks")
        return "oft_diag" in factors or (blocks is not None and blocks.dim() != 4)

    @classmethod
    def from_factors(cls, factors, *, prefix, file, options):
        self = cls(blocks=factors.get("oft_blocks"), diag=factors.get("oft_diag"), rescale=factors.get("oft_rescale"),
                   alpha=alpha_value(factors.get("alpha")), dora_scale=factors.get("dora_scale"),
                   file=file, prefix=prefix)
        self._check_blocks(factors)
        return self

    @classmethod
    def init(cls, op, rank, alpha, generator):
        out = op.out_channels
        size = max(d for d in range(1, min(rank, out) + 1) if out % d == 0)
        return cls(blocks=torch.zeros(out // size, size, size), alpha=0.0)    # R = I

    @classmethod
    def max_rank(cls, op):
        return op.out_channels

    def default_alpha(self):
        return 0.0          # no constraint

    def resume_problem(self):
        if self.diag is not None:
            return "a legacy oft_diag stores the rotation itself, which cannot be trained further"
        return super().resume_problem()

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

    @property
    def rank(self) -> int:
        """The block size."""
        return self.stored.shape[-1]

    @property
    def constraint(self) -> float:
        return self.alpha * self.out_dim if self.alpha and self.alpha > 0 else 0.0

    def factors(self):
        return {"oft_blocks": self.blocks, "oft_diag": self.diag, "oft_rescale": self.rescale,
                "alpha": alpha_tensor(self.alpha), "dora_scale": self.dora_scale}

    def rotation(self, device, dtype=torch.float32) -> torch.Tensor:
        """R per block, solved in float32 (float64 when asked), returned in ``dtype``."""
        if self.diag is not None:
            return self.diag.to(device=device, dtype=dtype)
        return cayley(self.blocks.to(device=device, dtype=_solve_dtype(dtype)), self.constraint).to(dtype)

    def offset(self, device, dtype=torch.float32) -> torch.Tensor:
        """R − I per block, solved in float32 (float64 when asked), returned in ``dtype``."""
        work = _solve_dtype(dtype)
        if self.diag is not None:
            d = self.diag.to(device=device, dtype=work)
            return (d - torch.eye(d.shape[-1], device=device, dtype=work)).to(dtype)
        return cayley_offset(self.blocks.to(device=device, dtype=work), self.constraint).to(dtype)

    def _rescaled(self, t: torch.Tensor, axis: int, strength: float = 1.0) -> torch.Tensor:
        """t ⊙ ρ_s along ``axis``, ρ_s = 1 + s·(ρ − 1)."""
        if self.rescale is None:
            return t
        rho = self.rescale.to(device=t.device, dtype=t.dtype).flatten()
        return t * on_channels(strength * (rho - 1) + 1, t.dim(), axis)

    def change(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """What the merged layer adds to t along ``axis`` at strength 1: ρ ⊙ blockdiag(R − I)ᵀ·t + (ρ − 1) ⊙ t."""
        d = rotate(t, axis, self.offset(t.device, t.dtype))
        if self.rescale is None:
            return d
        rho = on_channels(self.rescale.to(device=t.device, dtype=t.dtype).flatten(), t.dim(), axis)
        return d * rho + t * (rho - 1)

    def check_target(self, shape, key):
        t = self.stored
        if self.out_dim != shape[0]:
            raise self.err(f"OFT blocks {tuple(t.shape)} cover {self.out_dim} output channels but target {key!r} "
                           f"of shape {tuple(shape)} has {shape[0]}: the blocks must tile its output axis")
        if self.rescale is not None and self.rescale.numel() != shape[0]:
            raise self.err(f"OFT rescale of shape {tuple(self.rescale.shape)} does not fit target {key!r} "
                           f"of shape {tuple(shape)}")
        super().check_target(shape, key)
