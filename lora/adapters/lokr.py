"""LoKr (LyCORIS ``lokr``): ΔW = γ · kron(W1, W2), reshaped to the target.

Each half is stored whole or factorised (r = rank, k = kernel dims):
    W1 = lokr_w1 (a, c)  |  lokr_w1_a (a, r)·lokr_w1_b (r, c)  |  tucker(lokr_t1 (r, r, *k), w1_a (r, a), w1_b (r, c))
    W2 = lokr_w2 (b, d[, *k])  |  lokr_w2_a (b, r)·lokr_w2_b (r, d[·k])  |  tucker(lokr_t2, w2_a (r, b), w2_b (r, d))
    out = a·b, in = c·d; a half without kernel dims is broadcast over the other's (kron of 1×1).
γ = alpha / rank with rank = lokr_w1_b.shape[0] or lokr_w2_b.shape[0] (the factorised half; both
factorised must agree) and 1 for a missing or 0 alpha; γ = 1 when both halves are whole, whatever
alpha says (LyCORIS: "ignored by full dimension LoKr"). ``lokr_t1`` is in LyCORIS' key list but no
LyCORIS version builds it; it is read with the same Tucker rule as ``lokr_t2``.

γ is applied once, as LyCORIS' forward does (lycoris-lora 4.1.3's ``LokrModule.get_diff_weight``
applies it twice).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dora
from .base import Adapter, ensure_same_numel
from .loha import check_rank, lycoris_scale, tucker
from .lora import _alpha
from ..errors import LoraError

_HALVES = {1: ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_t1"), 2: ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}


@dataclass(eq=False, repr=False)
class LoKr(Adapter):
    name = "lokr"
    roles = {f".{r}": r for names in _HALVES.values() for r in names}
    identify = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"})
    supports_dora = True

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    t1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    @classmethod
    def from_factors(cls, factors, *, prefix, file, options):
        fields = {"w1": "lokr_w1", "w1_a": "lokr_w1_a", "w1_b": "lokr_w1_b", "t1": "lokr_t1",
                  "w2": "lokr_w2", "w2_a": "lokr_w2_a", "w2_b": "lokr_w2_b", "t2": "lokr_t2"}
        self = cls(**{f: factors.get(r) for f, r in fields.items()}, alpha=_alpha(factors.get("alpha")),
                   dora_scale=factors.get("dora_scale"), file=file, prefix=prefix)
        ranks = [self._check_half(i, factors) for i in (1, 2)]
        ranks = [r for r in ranks if r is not None]
        if len(ranks) == 2 and ranks[0] != ranks[1]:
            raise self.err(f"ranks disagree between the Kronecker halves: lokr_w1_b {tuple(self.w1_b.shape)} "
                           f"has rank {ranks[0]}, lokr_w2_b {tuple(self.w2_b.shape)} has rank {ranks[1]}")
        return self

    def _check_half(self, i: int, factors) -> int | None:
        """Validate half i; its rank when factorised, None when whole."""
        whole, a, b, t = (getattr(self, f) for f in (f"w{i}", f"w{i}_a", f"w{i}_b", f"t{i}"))
        if whole is not None:
            if a is not None or b is not None or t is not None:
                raise self.err(f"LoKr half {i} is stored both whole and factorised (found: {sorted(factors)})")
            return None
        if a is None or b is None:
            raise LoraError(f"LoKr module lacks half {i}: needs lokr_w{i} or lokr_w{i}_a + lokr_w{i}_b "
                            f"(found: {sorted(factors)})", file=self.file, key=self.prefix)
        return check_rank(self, _HALVES[i][1:], a, b, t)

    def factors(self):
        alpha = None if self.alpha is None else torch.tensor(self.alpha, dtype=torch.float32)
        out = {r: getattr(self, r[len("lokr_"):]) for names in _HALVES.values() for r in names}
        return {**out, "alpha": alpha, "dora_scale": self.dora_scale}

    @property
    def scale(self) -> float:
        if self.w1 is not None and self.w2 is not None:
            return 1.0
        rank = (self.w1_b if self.w1 is None else self.w2_b).shape[0]
        return lycoris_scale(self.alpha, rank)

    def halves(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1, W2), each rebuilt from its factors."""
        return self._half(1, device, dtype), self._half(2, device, dtype)

    def _half(self, i, device, dtype) -> torch.Tensor:
        whole, a, b, t = (getattr(self, f) for f in (f"w{i}", f"w{i}_a", f"w{i}_b", f"t{i}"))
        cast = dict(device=device, dtype=dtype)
        if whole is not None:
            return whole.to(**cast)
        if t is not None:
            return tucker(t.to(**cast), a.to(**cast), b.to(**cast))
        # (b, r)·(r, d, *k) keeps b's kernel dims: W2 (b, d, *k)
        return (a.to(**cast) @ b.to(**cast).flatten(1)).reshape(a.shape[0], *b.shape[1:])

    def delta(self, weight):
        d = kron(*self.halves(weight.device))
        ensure_same_numel(self, d.numel(), weight.shape, self.prefix)
        return d.reshape(weight.shape).mul_(self.scale)

    def apply_(self, weight, strength):
        return dora.finish_(self, weight, self.delta(weight), strength)

    def check_target(self, shape, key):
        s1, s2 = self._half_shape(1), self._half_shape(2)
        n = torch.Size(s1).numel() * torch.Size(s2).numel()
        if s1[0] * s2[0] != shape[0] or n != shape.numel():
            raise self.err(f"kron of halves {s1} and {s2} does not fit target {key!r} of shape {tuple(shape)}")
        dora.check_magnitude(self, shape, key)

    def _half_shape(self, i) -> tuple[int, ...]:
        whole, a, b, t = (getattr(self, f) for f in (f"w{i}", f"w{i}_a", f"w{i}_b", f"t{i}"))
        if whole is not None:
            return tuple(whole.shape)
        if t is not None:
            return (a.shape[1], b.shape[1], *t.shape[2:])
        return (a.shape[0], *b.shape[1:])

    def bypass(self, x, weight, strength, op, base=None):
        """Linear: Δy = s·γ·vec(W1 · X · W2ᵀ) with X = x viewed (…, c, d); ΔW never built."""
        if op.conv_dims or dora.has_magnitude(self):
            return None
        w1, w2 = self.halves(x.device, x.dtype)
        if w1.dim() != 2 or w2.dim() != 2:
            return None
        y = torch.einsum("ij,...jq,pq->...ip", w1, x.unflatten(-1, (w1.shape[1], w2.shape[1])), w2)
        return y.flatten(-2).mul_(strength * self.scale)


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(W1, W2)[i·b + p, j·d + q, …] = W1[i, j, …]·W2[p, q, …]; the half without kernel dims gets
    trailing 1s (LyCORIS' ``make_kron``). Interleaved broadcasting, not torch.kron, which fails on
    some size-1 strides."""
    if w1.dim() < w2.dim():
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
    elif w2.dim() < w1.dim():
        w2 = w2.reshape(*w2.shape, *[1] * (w1.dim() - w2.dim()))
    a = w1.reshape([s for n in w1.shape for s in (n, 1)])
    b = w2.reshape([s for n in w2.shape for s in (1, n)])
    return (a * b).reshape([m * n for m, n in zip(w1.shape, w2.shape)])
