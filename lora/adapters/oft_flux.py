"""kohya sd-scripts' Flux OFT (``networks/oft_flux.py``): OFT whose rotation is split along the output rows
of a fused weight, one set of blocks per part.

Keys (module names ``oft_unet_`` + the Flux module path with ``.`` -> ``_``, e.g.
``oft_unet_double_blocks_0_img_attn_qkv``): ``oft_blocks.0`` … ``oft_blocks.{P-1}`` (num, b_i, b_i), one per part
of the output rows, and ``alpha`` (the constraint). sd-scripts splits a double block's ``img_attn.qkv`` /
``txt_attn.qkv`` into q, k, v and a single block's ``linear1`` into q, k, v and the MLP input (the
split of diffusers' separate layers); every other layer has one part. ``num`` (the network's ``dim``)
is the number of blocks of each part, so part i covers num·b_i rows.

    Q_i = B_i − B_iᵀ;  c_i = alpha · rows_i;  Q_i ← Q_i · (min(‖Q_i‖, c_i) + 1e-8) / (‖Q_i‖ + 1e-8)
    R_i = (I + Q_i)(I − Q_i)⁻¹  (per block);   W'_i = blockdiag(R_i)ᵀ · W_i   (W_i: part i's rows)
    ΔW = W' − W,  merged = W + s·ΔW

as ``OFTModule.forward`` computes it (sd-scripts' own ``merge_to`` concatenates the parts along the
wrong axis and is not the reference). Unlike LyCORIS' diag-OFT the norm is always clipped: alpha = 0
keeps R = I, as it trained. The strength rule is our OFT's: kohya's multiplier interpolates each
R_i toward I (R_s = I + s·(R − I)), which is linear in s, so W + s·ΔW is exactly its layer at
multiplier s. The bias is not rotated.

Bypass: Δy = s · blockdiag(R_i − I)ᵀ · (W·x)_i per part, from the layer's own output (not for grouped
convs; Flux has none).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LoraError
from .base import alpha_tensor, alpha_value
from .oft import OutputChange, _solve_dtype, offset_of_skew, rotate

MAX_PARTS = 8     # sd-scripts writes at most 4 (linear1: q, k, v, MLP)
_ROLE = "oft_part_"


def kohya_skew(blocks: torch.Tensor, constraint: float | None) -> torch.Tensor:
    """Q = B − Bᵀ per block, its norm (over all blocks) clipped to ``constraint`` as sd-scripts does
    (``(min(‖Q‖, c) + 1e-8) / (‖Q‖ + 1e-8)``, c = 0 included); None: no clip."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint is None:
        return q
    norm = torch.linalg.vector_norm(q)
    return q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))


@dataclass(eq=False, repr=False)
class FluxOFT(OutputChange):
    name = "oft_flux"
    label = "OFT (kohya Flux)"
    roles = {f".oft_blocks.{i}": f"{_ROLE}{i}" for i in range(MAX_PARTS)}
    identify = frozenset(roles.values())

    parts: tuple[torch.Tensor, ...] = ()
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    @classmethod
    def from_factors(cls, factors, *, prefix, file, options):
        found = sorted(int(r[len(_ROLE):]) for r in factors if r.startswith(_ROLE))
        if found != list(range(len(found))):
            raise LoraError(f"kohya Flux OFT module has blocks {['oft_blocks.%d' % i for i in found]}: a part "
                            f"between them is missing", file=file, key=prefix)
        self = cls(parts=tuple(factors[f"{_ROLE}{i}"] for i in found), alpha=alpha_value(factors.get("alpha")),
                   dora_scale=factors.get("dora_scale"), file=file, prefix=prefix)
        for i, t in enumerate(self.parts):
            if t.dim() != 3 or t.shape[1] != t.shape[2]:
                raise self.err(f"oft_blocks.{i} must be (num, b, b); found {tuple(t.shape)}")
        return self

    def factors(self):
        out = {f"{_ROLE}{i}": t for i, t in enumerate(self.parts)}
        return {**out, "alpha": alpha_tensor(self.alpha), "dora_scale": self.dora_scale}

    @property
    def rows(self) -> tuple[int, ...]:
        """Output rows of each part, in order."""
        return tuple(t.shape[0] * t.shape[1] for t in self.parts)

    @property
    def rank(self) -> int:
        """sd-scripts' network dim: the number of blocks of a part."""
        return self.parts[0].shape[0]

    def offsets(self, device, dtype=torch.float32) -> list[torch.Tensor]:
        """R_i − I per part, solved in float32 (float64 when asked), returned in ``dtype``."""
        work = _solve_dtype(dtype)
        out = []
        for t, rows in zip(self.parts, self.rows):
            constraint = None if self.alpha is None else self.alpha * rows
            out.append(offset_of_skew(kohya_skew(t.to(device=device, dtype=work), constraint)).to(dtype))
        return out

    def change(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """What the merged layer adds to t along ``axis`` at strength 1: blockdiag(R_i − I)ᵀ·t_i per part."""
        pieces = torch.split(t, list(self.rows), dim=axis)
        return torch.cat([rotate(p, axis, r) for p, r in zip(pieces, self.offsets(t.device, t.dtype))], dim=axis)

    def check_target(self, shape, key):
        if sum(self.rows) != shape[0]:
            split = " + ".join(f"{t.shape[0]}×{t.shape[1]}" for t in self.parts)
            raise self.err(f"kohya Flux OFT blocks split the output rows as {split} = {sum(self.rows)}, but target "
                           f"{key!r} of shape {tuple(shape)} has {shape[0]} rows: the split does not fit this layer "
                           "(a file for a Flux model of another width?)")
        super().check_target(shape, key)
