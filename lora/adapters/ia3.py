"""(IA)³ (LyCORIS ``ia3``): learned per-channel rescaling of the weight.

    ΔW = W ⊙ w          w broadcast along the output axis (rows), or the input axis when on_input
    W' = W + s·ΔW = W ⊙ (1 + s·w)

Keys: ``<module>.weight`` — (dim,) for Linear, (1, dim, 1, …) for Conv — and ``<module>.on_input``
(0-d flag, always written by LyCORIS); an ``alpha`` is ignored, as A1111 ignores it. ``.weight`` is a generic suffix, so a module is IA3 only when
it has ``on_input``: a bare ``.weight`` is reported as an unknown key, and one next to another
algorithm's keys is left to that algorithm (``generic_roles``).

Bypass: on the output axis Δy = s·w ⊙ (W·x) — without the bias, which LyCORIS' own bypass forward
rescales too but its merged weight does not; on the input axis Δy = s·W·(w ⊙ x).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import on_channels
from .base import Adapter, pick


@dataclass(eq=False, repr=False)
class IA3(Adapter):
    name = "ia3"
    label = "IA3"
    roles = {".weight": "ia3_weight", ".on_input": "ia3_on_input"}
    identify = frozenset({"ia3_on_input"})
    generic_roles = frozenset({"ia3_weight"})

    vector: torch.Tensor = None          # w
    on_input: bool = False

    @classmethod
    def from_factors(cls, factors, *, prefix, file, options):
        w, flag = pick(factors, ("ia3_weight", "ia3_on_input"), algo="IA3", prefix=prefix, file=file)
        self = cls(vector=w, on_input=bool(flag.reshape(-1)[0]), file=file, prefix=prefix)
        if factors.get("dora_scale") is not None:
            raise self.err(f"IA3 cannot carry a dora_scale (found one of shape {tuple(factors['dora_scale'].shape)})")
        return self

    def factors(self):
        return {"ia3_weight": self.vector, "ia3_on_input": torch.tensor(int(self.on_input))}

    @property
    def axis(self) -> int:
        return 1 if self.on_input else 0

    def delta(self, weight):
        self.check_target(weight.shape, self.prefix)
        return weight.float() * on_channels(self.vector.to(weight.device, torch.float32), weight.dim(), self.axis)

    def check_target(self, shape, key):
        n = shape[self.axis] if len(shape) > self.axis else None
        if self.vector.numel() != n:
            raise self.err(f"IA3 weight of shape {tuple(self.vector.shape)} ({self.vector.numel()} values) does not "
                           f"fit the {'input' if self.on_input else 'output'} axis of target {key!r} of shape {tuple(shape)}")

    def uses_base(self):
        return not self.on_input

    def delta_forward(self, x, weight, op, scale, base=None):
        w = self.vector.to(device=x.device, dtype=x.dtype).flatten()
        if self.on_input:
            xs = x * on_channels(w.repeat(op.groups), x.dim(), op.channel_axis)
            return op(xs, weight.to(device=x.device, dtype=x.dtype)).mul_(scale)
        base = op(x, weight.to(device=x.device, dtype=x.dtype)) if base is None else base
        return base * on_channels(w * scale, base.dim(), op.channel_axis)
