"""The contract every adapter algorithm implements.

An adapter is the set of factors a file stores for ONE target tensor (a layer's weight or bias),
with the math that turns them into a weight change. Factors are named (``roles``), never
positional. All math runs in float32 (or the dtype of the tensor handed in) and the result is
cast once, by the caller, at the boundary.

Subclasses declare:
    name        registry id, also the value shown in node combos ("lora", "loha", ...)
    roles       file suffix -> factor role, e.g. {".lora_up.weight": "up"}
    identify    roles whose presence marks a module as this algorithm
    target      "weight" or "bias": which tensor of the layer the adapter changes
and implement ``from_factors``, ``delta`` (and optionally ``apply_`` for a faster in-place path,
``bypass`` for forward-pass application).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import LoraError

# Roles every algorithm may carry besides its own factors.
COMMON_ROLES = {".alpha": "alpha", ".dora_scale": "dora_scale"}


@dataclass(eq=False)
class Adapter:
    name: ClassVar[str] = ""
    roles: ClassVar[dict[str, str]] = {}
    identify: ClassVar[frozenset[str]] = frozenset()
    target: ClassVar[str] = "weight"
    supports_dora: ClassVar[bool] = False

    file: str | None = field(default=None, kw_only=True)
    prefix: str = field(default="", kw_only=True)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_factors(cls, factors: dict[str, torch.Tensor], *, prefix: str, file: str | None,
                     options: dict) -> "Adapter":
        """Build from the module's named factors; raise LoraError when they are inconsistent."""
        raise NotImplementedError

    def factors(self) -> dict[str, torch.Tensor]:
        """role -> tensor, the inverse of from_factors (alpha as a 0-d tensor)."""
        raise NotImplementedError

    def to_state_dict(self, prefix: str | None = None) -> dict[str, torch.Tensor]:
        """Keys as the producing tool writes them (the first suffix listed for each role)."""
        prefix = self.prefix if prefix is None else prefix
        suffix_of: dict[str, str] = {}
        for suffix, role in {**self.roles, **COMMON_ROLES}.items():
            suffix_of.setdefault(role, suffix)
        return {prefix + suffix_of[role]: t for role, t in self.factors().items() if t is not None}

    # ---- math ---------------------------------------------------------------------------------
    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW at strength 1 (before DoRA), float32, shaped like ``weight``."""
        raise NotImplementedError

    def apply_(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """Return weight + strength·ΔW, computed in ``weight``'s (float) dtype; may write in place.

        ``weight`` is a float32 (or intermediate dtype) working copy owned by the caller.
        """
        return weight.add_(self.delta(weight).to(weight.dtype), alpha=strength)

    def check_target(self, shape: torch.Size, key: str) -> None:
        """Raise LoraError unless this adapter fits a target tensor of ``shape``."""

    def err(self, message: str) -> LoraError:
        return LoraError(message, file=self.file, key=self.prefix)

    def __repr__(self) -> str:
        shapes = {r: tuple(t.shape) for r, t in self.factors().items() if t is not None and t.dim()}
        return f"{type(self).__name__}({self.prefix!r}, {shapes})"


def ensure_same_numel(adapter: Adapter, delta_numel: int, shape: torch.Size, key: str) -> None:
    if delta_numel != shape.numel():
        raise adapter.err(f"{adapter.name} factors give a change of {delta_numel} values but target "
                          f"{key!r} has shape {tuple(shape)} ({shape.numel()} values)")
