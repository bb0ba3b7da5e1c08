"""BOFT (LyCORIS ``boft``): a butterfly product of m block-diagonal rotations of the output channels.

Keys as OFT (oft.py), with 4-dim ``oft_blocks`` (m, num, b, b); out = num·b, b even.

    R_i = Cayley(B_i) with ‖Q‖ clipped to c = alpha·out over all stages (oft.cayley)
    stage i (i = 0…m−1), h = 2^i·b/2: rows are regrouped by P_i = arange(out).view(-1, 2, h).mT.flatten(),
        t ← P_iᵀ · blockdiag(R_i(s)) · P_i · t,          R_i(s) = s·R_i + (1 − s)·I
    W' = ρ_s ⊙ t,  ρ_s = 1 + s·(ρ − 1);   merged = W' (not additive in s)

Strength interpolates every stage toward I, as LyCORIS does; LyCORIS leaves ρ un-blended (equal at
s = 1 and without ``rescale``). ComfyUI core interpolates the stages and then scales W' − W by s
again, and uses c = alpha.

Bypass: Δy = butterfly_s(W·x) − W·x on the output channels (not for DoRA or grouped convs, see OFT).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .oft import OFT, _solve_dtype, cayley


def butterfly_perm(out: int, half: int, device) -> torch.Tensor:
    """P with (P·t)[j] = t[P[j]]: rows (c, g, h) regrouped as (c, h, g), g ∈ {0, 1}."""
    return torch.arange(out, device=device).view(-1, 2, half).transpose(1, 2).flatten()


@dataclass(eq=False, repr=False)
class BOFT(OFT):
    name = "boft"
    label = "BOFT"
    trainable = False

    @classmethod
    def accepts(cls, factors):
        blocks = factors.get("oft_blocks")
        return "oft_diag" not in factors and blocks is not None and blocks.dim() == 4

    def _check_blocks(self, factors) -> None:
        t = self.blocks
        m, num, b = t.shape[0], t.shape[1], t.shape[-1]
        if t.shape[2] != b or b % 2 or m < 1:
            raise self.err(f"BOFT blocks must be (m, num, b, b) with b even; found {tuple(t.shape)}")
        if (num * b) % (2 ** (m - 1) * b):
            raise self.err(f"BOFT blocks {tuple(t.shape)}: {m} butterfly stages need the {num * b} channels "
                           f"to be a multiple of {2 ** (m - 1) * b}")

    def rotation(self, device, dtype=torch.float32) -> torch.Tensor:
        return cayley(self.blocks.to(device=device, dtype=_solve_dtype(dtype)), self.constraint).to(dtype)

    def transform(self, t: torch.Tensor, axis: int, strength: float = 1.0) -> torch.Tensor:
        r = self.rotation(t.device, t.dtype)
        m, num, b, _ = r.shape
        if strength != 1.0:
            r = strength * r + (1 - strength) * torch.eye(b, device=t.device, dtype=t.dtype)
        rows = t.movedim(axis, 0)
        for i in range(m):
            perm = butterfly_perm(rows.shape[0], 2 ** i * b // 2, t.device)
            mixed = torch.einsum("kij,kj...->ki...", r[i], rows[perm].unflatten(0, (num, b))).flatten(0, 1)
            rows = torch.empty_like(mixed).index_copy_(0, perm, mixed)
        return self._rescaled(rows.movedim(0, axis), axis, strength)

    def delta(self, weight):
        self.check_target(weight.shape, self.prefix)
        w = weight.float()
        return self.transform(w, 0) - w

    def apply_(self, weight, strength):
        if self.has_magnitude:
            return super().apply_(weight, strength)
        self.check_target(weight.shape, self.prefix)
        return weight.copy_(self.transform(weight, 0, strength))

    def delta_forward(self, x, weight, op, scale, base=None):
        return None          # not additive in the strength: ``bypass`` below

    def bypass(self, x, weight, strength, op, base=None):
        if self.has_magnitude or op.groups != 1:
            return None
        base = op(x, weight.to(device=x.device, dtype=x.dtype)) if base is None else base
        return self.transform(base, op.channel_axis, strength) - base
