"""Whole-tensor changes: ``diff`` / ``diff_b`` (ΔW stored outright), ``w_norm`` / ``b_norm``
(norm layers, stored as a diff) and ``set_weight`` (replace the tensor; strength blends:
W ← W + s·(S − W), so strength 1 replaces and 0 leaves it).

Bypass: Δy = s·op(x, diff); set_weight: s·(op(x, S) − W·x). The stored tensor is the change, so
nothing is built."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Adapter


@dataclass(eq=False, repr=False)
class _Diff(Adapter):
    diff: torch.Tensor = None

    @classmethod
    def from_factors(cls, factors, *, prefix, file, options):
        (role,) = cls.identify
        return cls(diff=factors[role], file=file, prefix=prefix)

    def factors(self):
        (role,) = self.identify
        return {role: self.diff}

    def delta(self, weight):
        self.check_target(weight.shape, self.prefix)
        return self.diff.to(device=weight.device, dtype=torch.float32)

    def check_target(self, shape, key):
        if tuple(self.diff.shape) != tuple(shape):
            raise self.err(f"{self.name} of shape {tuple(self.diff.shape)} does not fit target {key!r} of shape {tuple(shape)}")

    def delta_forward(self, x, weight, op, scale, base=None):
        return op(x, self.diff.to(device=x.device, dtype=x.dtype)).mul_(scale)


class Diff(_Diff):
    name = "diff"
    label = "diff"
    roles = {".diff": "diff"}
    identify = frozenset({"diff"})


class DiffBias(_Diff):
    name = "diff_b"
    label = "diff_b"
    roles = {".diff_b": "diff_b"}
    identify = frozenset({"diff_b"})
    target = "bias"


class NormWeight(_Diff):
    name = "w_norm"
    label = "w_norm"
    roles = {".w_norm": "w_norm"}
    identify = frozenset({"w_norm"})


class NormBias(_Diff):
    name = "b_norm"
    label = "b_norm"
    roles = {".b_norm": "b_norm"}
    identify = frozenset({"b_norm"})
    target = "bias"


class SetWeight(_Diff):
    name = "set_weight"
    label = "set_weight"
    roles = {".set_weight": "set_weight"}
    identify = frozenset({"set_weight"})

    def delta(self, weight):
        self.check_target(weight.shape, self.prefix)
        return self.diff.to(device=weight.device, dtype=torch.float32) - weight.float()

    def uses_base(self):
        return True

    def delta_forward(self, x, weight, op, scale, base=None):
        base = op(x, weight.to(device=x.device, dtype=x.dtype)) if base is None else base
        return (op(x, self.diff.to(device=x.device, dtype=x.dtype)) - base).mul_(scale)
