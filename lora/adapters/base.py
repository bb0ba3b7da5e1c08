"""The contract every adapter algorithm implements, and the helpers the algorithms share.

An adapter is the set of factors a file stores for ONE target tensor (a layer's weight or bias),
with the math that turns them into a weight change. Factors are named (``roles``), never
positional. All math runs in float32 (or the dtype of the tensor handed in) and the result is
cast once, by the caller, at the boundary. The same classes serve the loader (merged and bypass
mode) and training (``init`` builds fresh factors; ``training.adapters.TrainableAdapter`` holds them
as Parameters and runs ``bypass``, through which autograd flows).

Declared by every subclass (class attributes):
    name            registry id, also the ``lora_lab.algorithm`` metadata value ("lora", "loha", …)
    label           display name, the value node combos show ("LoRA", "LoHa", …)
    roles           file suffix -> factor role, e.g. {".lora_up.weight": "up"}; several classes may
                    share a suffix (OFT and BOFT share ``.oft_blocks``) when it has the same role
    identify        roles whose presence makes a module a candidate for this algorithm
    generic_roles   roles whose suffix is generic (IA3's ``.weight``): alone they make no module
    target          "weight" or "bias": which tensor of the layer the adapter changes
    trainable       True when the class has ``init`` and a bypass route without a ΔW fallback

The protocol (every method has a default here unless marked *):
    accepts(factors)            classmethod: does this class own a module with these factors?
    from_factors(…)       *     classmethod: build from named factors; LoraError when inconsistent
    factors()             *     role -> tensor, the inverse of from_factors (alpha a 0-d tensor)
    to_state_dict(prefix)       file keys -> tensors, as the producing tool writes them
    check_target(shape, key)    LoraError unless the adapter fits a target of this shape
    delta(weight)         *     ΔW at strength 1 (before DoRA), float32, shaped like ``weight``
    apply_(weight, s)           weight + s·ΔW, or the DoRA form when the adapter has a magnitude
    bypass(x, W, s, op, base)   Δy with W·x + Δy = merged_s(W)·x, never building ΔW; None: no route
    delta_forward(x, W, op, c)  c·ΔW·x (ΔW before DoRA) without building ΔW; None: no route
    uses_base()                 bypass wants ``base`` = W·x (the layer's output without bias)
    low_rank(device)            (U, V) with ΔW.flatten(1) = U·V when that is cheaper than ΔW
    dora_terms(W, axis)         ⟨W, ΔW⟩ and ‖ΔW‖² per channel of ``axis``, without building ΔW
    init(op, rank, alpha, g)    classmethod (trainable): fresh factors, the producer's init
    max_rank(op)                classmethod (trainable): the largest rank a layer allows
    rank, default_alpha()       (trainable) the rank; the alpha meaning "scale 1" for a file without one
    resume_problem()            (trainable) why these factors cannot be trained further, or None
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import LoraError
from ..ops import Op
from . import dora

# Roles every algorithm may carry besides its own factors.
COMMON_ROLES = {".alpha": "alpha", ".dora_scale": "dora_scale"}


@dataclass(eq=False)
class Adapter:
    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    roles: ClassVar[dict[str, str]] = {}
    identify: ClassVar[frozenset[str]] = frozenset()
    generic_roles: ClassVar[frozenset[str]] = frozenset()
    target: ClassVar[str] = "weight"
    trainable: ClassVar[bool] = False

    # DoRA magnitudes: class-level None here; algorithms that carry them declare them as fields.
    dora_scale = None          # LyCORIS weight_decompose, (out, 1, …) or (1, in, …)
    peft_magnitude = None      # PEFT lora_magnitude_vector, one per output channel

    file: str | None = field(default=None, kw_only=True)
    prefix: str = field(default="", kw_only=True)
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def accepts(cls, factors: dict[str, torch.Tensor]) -> bool:
        """Whether this class owns a module with these factors (some of ``identify`` are present).
        Classes sharing suffixes refine it, so that exactly one of them accepts a module."""
        return bool(cls.identify & factors.keys())

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

    # ---- merged math --------------------------------------------------------------------------
    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW at strength 1 (before DoRA), float32, shaped like ``weight``."""
        raise NotImplementedError

    def apply_(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """Return weight + strength·ΔW (or the DoRA form), computed in ``weight``'s (float) dtype;
        may write in place. ``weight`` is a float32 (or intermediate dtype) working copy owned by
        the caller."""
        return dora.finish_(self, weight, self.delta(weight), strength)

    def check_target(self, shape: torch.Size, key: str) -> None:
        """Raise LoraError unless this adapter fits a target tensor of ``shape``."""
        dora.check_magnitude(self, shape, key)

    # ---- forward-pass (bypass) math ---------------------------------------------------------------
    @property
    def has_magnitude(self) -> bool:
        return self.dora_scale is not None or self.peft_magnitude is not None

    def uses_base(self) -> bool:
        """True when ``bypass`` wants ``base`` = W·x, the layer's output without its bias."""
        return self.has_magnitude

    def bypass(self, x: torch.Tensor, weight: torch.Tensor, strength: float, op: Op,
               base: torch.Tensor | None = None) -> torch.Tensor | None:
        """Δy such that W·x + Δy is the output of the merged weight at ``strength``.

        ``x`` and every result in one dtype (the caller's math dtype); ``weight`` the layer's own
        (any dtype, never written); ``base`` = W·x when ``uses_base()``. None when the algorithm
        has no route for this layer: the caller then uses op(x, merged − W).
        """
        if self.has_magnitude:
            return dora.bypass(self, x, weight, strength, op, base)
        return self.delta_forward(x, weight, op, strength, base)

    def delta_forward(self, x: torch.Tensor, weight: torch.Tensor, op: Op, scale: float,
                      base: torch.Tensor | None = None) -> torch.Tensor | None:
        """scale·ΔW·x for ΔW at strength 1 (before DoRA), without building ΔW; None: no route."""
        return None

    def low_rank(self, device: torch.device, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U, V) with ΔW.flatten(1) = U·V (U (out, R), V (R, in·k)), when R is small; else None."""
        return None

    def dora_terms(self, weight: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(⟨W, ΔW⟩, ‖ΔW‖²) per channel of ``axis`` (summed over every other axis), float32, from
        the factors and W·factors only; None when the algorithm has no such form."""
        lr = self.low_rank(weight.device)
        return None if lr is None else dora.low_rank_terms(weight, *lr, axis)

    # ---- training -----------------------------------------------------------------------------
    @classmethod
    def init(cls, op: Op, rank: int, alpha: float, generator: torch.Generator) -> "Adapter":
        """Fresh float32 factors for a layer, initialised as the producing tool does (``trainable``
        only); every random draw comes from ``generator``."""
        raise NotImplementedError(f"{cls.name} cannot be trained")

    @classmethod
    def max_rank(cls, op: Op) -> int:
        """The largest ``rank`` ``init`` accepts for this layer."""
        return min(op.out_channels, op.in_channels * op.kernel_numel)

    def default_alpha(self) -> float:
        """The alpha that means what a file without one means (scale 1), written when training."""
        return float(self.rank)

    def resume_problem(self) -> str | None:
        """Why training cannot continue these factors (None when it can)."""
        if not self.trainable:
            return f"{self.label} cannot be trained"
        if self.has_magnitude:
            return "DoRA magnitudes (dora_scale / lora_magnitude_vector) cannot be trained further"
        return None

    # ---- errors -------------------------------------------------------------------------------
    def err(self, message: str) -> LoraError:
        return LoraError(message, file=self.file, key=self.prefix)

    def __repr__(self) -> str:
        shapes = {r: tuple(t.shape) for r, t in self.factors().items() if t is not None and t.dim()}
        return f"{type(self).__name__}({self.prefix!r}, {shapes})"


# ---- helpers the algorithms share ---------------------------------------------------------------
def pick(factors: dict, roles: tuple[str, ...], *, algo: str, prefix: str, file) -> list:
    """The named factors, refusing a module that lacks one."""
    missing = [r for r in roles if factors.get(r) is None]
    if missing:
        raise LoraError(f"{algo} module lacks {missing} (found: {sorted(factors)})", file=file, key=prefix)
    return [factors[r] for r in roles]


def alpha_value(t: torch.Tensor | None) -> float | None:
    """A file's ``.alpha`` tensor as a float (None when absent)."""
    return None if t is None else float(t.detach().float().reshape(-1)[0])


def alpha_tensor(alpha: float | None) -> torch.Tensor | None:
    """alpha as the 0-d float32 tensor kohya and LyCORIS write."""
    return None if alpha is None else torch.tensor(alpha, dtype=torch.float32)


def lycoris_scale(alpha: float | None, rank: int) -> float:
    """alpha / rank; 1 when alpha is absent or 0 (LyCORIS, kohya: "alpha 0 or None means rank")."""
    return 1.0 if not alpha else alpha / rank


def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[p, q, …] = Σ_ij core[i, j, …] · wa[i, p] · wb[j, q]   (LyCORIS' CP/Tucker rebuild)."""
    return torch.einsum("ij...,ip,jq->pq...", core, wa.flatten(1), wb.flatten(1))


def factor_rank(adapter: Adapter, names: tuple[str, str, str], a, b, t) -> int:
    """The rank shared by one factor pair a·b (or its Tucker form t, a, b); raise when they disagree."""
    na, nb, nt = names
    if t is None:
        if a.dim() < 2 or a.shape[1] != b.shape[0]:
            raise adapter.err(f"ranks disagree: {na} {tuple(a.shape)} · {nb} {tuple(b.shape)}")
    elif t.dim() < 2 or tuple(t.shape[:2]) != (a.shape[0], b.shape[0]):
        raise adapter.err(f"ranks disagree: {nt} {tuple(t.shape)} with {na} {tuple(a.shape)} and {nb} {tuple(b.shape)}")
    return b.shape[0]


def low_rank_forward(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, op: Op, scale: float) -> torch.Tensor:
    """scale·(U·V)·x without U·V: V (R, in·k) run as the layer runs W (its stride, padding, dilation;
    repeated per group for a grouped conv), the scale on the R channels, then U (out, R) as a 1×1
    mix (per group). ``u``/``v`` already on x's device and dtype."""
    if not op.conv_dims:
        return F.linear(F.linear(x, v.flatten(1)) * scale, u.flatten(1))
    v = v.reshape(v.shape[0], *op.shape[1:])
    if op.groups > 1:
        v = v.repeat(op.groups, *[1] * (v.dim() - 1))
    return op.pointwise(op(x, v) * scale, u, groups=op.groups)


def ensure_same_numel(adapter: Adapter, delta_numel: int, shape: torch.Size, key: str) -> None:
    if delta_numel != shape.numel():
        raise adapter.err(f"{adapter.name} factors give a change of {delta_numel} values but target "
                          f"{key!r} has shape {tuple(shape)} ({shape.numel()} values)")


def factorize(dim: int) -> tuple[int, int]:
    """dim = m · n with m ≤ n as close to √dim as possible (m = 1 for primes): LyCORIS'
    ``factorization(dim, -1)``, how LoKr splits a layer's dimensions."""
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


def kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """torch.nn.init.kaiming_uniform_(a=√5), the default init of nn.Linear / nn.Conv weights, which
    kohya and LyCORIS use for their "down" factors."""
    t = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t
