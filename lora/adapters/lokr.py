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

Bypass, with x's channels viewed as (c, d): Δy[(i, p)] = γ·Σ_j W1[i, j]·(W2 ∗ x[j])[p] — W2 run on
each of the c channel groups as the layer runs W (a batched conv with its stride, padding and
dilation; low-rank and Tucker W2 as their chains), then the c groups mixed by W1. When the kernel
sits in W1 instead (``lokr_t1``), W2 mixes first and W1 is the batched conv. ΔW is never built,
except when both halves carry kernel dims (a kernel that is itself a Kronecker product, which no
tool writes) or on a grouped conv.
Training init (LyCORIS ``LokrModule``, factor -1): out = a·b, in = c·d split as near √ as possible
(a ≤ b, c ≤ d); w1 (a, c) kaiming-uniform; W2 whole (b, d, *k) = 0 when rank ≥ max(b, d)/2 (then γ = 1),
else w2_a (b, r) kaiming-uniform and w2_b (r, d·k) = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LoraError
from .base import (Adapter, alpha_tensor, alpha_value, ensure_same_numel, factor_rank, factorize, kaiming,
                   lycoris_scale, tucker)

_HALVES = {1: ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_t1"), 2: ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}


@dataclass(eq=False, repr=False)
class LoKr(Adapter):
    name = "lokr"
    label = "LoKr"
    roles = {f".{r}": r for names in _HALVES.values() for r in names}
    identify = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"})
    trainable = True

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
        self = cls(**{f: factors.get(r) for f, r in fields.items()}, alpha=alpha_value(factors.get("alpha")),
                   dora_scale=factors.get("dora_scale"), file=file, prefix=prefix)
        ranks = [self._check_half(i, factors) for i in (1, 2)]
        ranks = [r for r in ranks if r is not None]
        if len(ranks) == 2 and ranks[0] != ranks[1]:
            raise self.err(f"ranks disagree between the Kronecker halves: lokr_w1_b {tuple(self.w1_b.shape)} "
                           f"has rank {ranks[0]}, lokr_w2_b {tuple(self.w2_b.shape)} has rank {ranks[1]}")
        return self

    def _check_half(self, i: int, factors) -> int | None:
        """Validate half i; its rank when factorised, None when whole."""
        whole, a, b, t = self._parts(i)
        if whole is not None:
            if a is not None or b is not None or t is not None:
                raise self.err(f"LoKr half {i} is stored both whole and factorised (found: {sorted(factors)})")
            return None
        if a is None or b is None:
            raise LoraError(f"LoKr module lacks half {i}: needs lokr_w{i} or lokr_w{i}_a + lokr_w{i}_b "
                            f"(found: {sorted(factors)})", file=self.file, key=self.prefix)
        return factor_rank(self, _HALVES[i][1:], a, b, t)

    @classmethod
    def init(cls, op, rank, alpha, generator):
        a, b = factorize(op.out_channels)          # out = a·b; w1 gets the small sides
        c, d = factorize(op.in_channels)           # in  = c·d
        w1 = kaiming((a, c), generator)
        if rank >= max(b, d) / 2:                  # a rank that large is no saving: store w2 whole
            return cls(w1=w1, w2=torch.zeros(b, d, *op.kernel), alpha=float(rank))
        w2_a = kaiming((b, rank), generator)
        w2_b = torch.zeros(rank, d * op.kernel_numel)
        return cls(w1=w1, w2_a=w2_a, w2_b=w2_b, alpha=float(alpha))

    def factors(self):
        out = {r: getattr(self, r[len("lokr_"):]) for names in _HALVES.values() for r in names}
        return {**out, "alpha": alpha_tensor(self.alpha), "dora_scale": self.dora_scale}

    @property
    def rank(self) -> int:
        """The factorised half's rank; 1 when both halves are whole (γ is 1 then)."""
        if self.w1 is not None and self.w2 is not None:
            return 1
        return (self.w1_b if self.w1 is None else self.w2_b).shape[0]

    @property
    def scale(self) -> float:
        if self.w1 is not None and self.w2 is not None:
            return 1.0
        return lycoris_scale(self.alpha, self.rank)

    def _parts(self, i: int):
        return tuple(getattr(self, f) for f in (f"w{i}", f"w{i}_a", f"w{i}_b", f"t{i}"))

    def halves(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1, W2), each rebuilt from its factors."""
        return self._half(1, device, dtype), self._half(2, device, dtype)

    def _half(self, i, device, dtype) -> torch.Tensor:
        whole, a, b, t = self._parts(i)
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
        return d.reshape(weight.shape) * self.scale

    def check_target(self, shape, key):
        s1, s2 = self._half_shape(1), self._half_shape(2)
        n = torch.Size(s1).numel() * torch.Size(s2).numel()
        if s1[0] * s2[0] != shape[0] or n != shape.numel():
            raise self.err(f"kron of halves {s1} and {s2} does not fit target {key!r} of shape {tuple(shape)}")
        super().check_target(shape, key)

    def _half_shape(self, i) -> tuple[int, ...]:
        whole, a, b, t = self._parts(i)
        if whole is not None:
            return tuple(whole.shape)
        if t is not None:
            return (a.shape[1], b.shape[1], *t.shape[2:])
        return (a.shape[0], *b.shape[1:])

    # ---- forward-pass route ---------------------------------------------------------------------
    def _dims(self, weight_shape) -> tuple[int, int, int, int, int, int]:
        """(a, b, c, d, K1, K2): out = a·b, in = c·d, the kernel sizes each half carries (1 when none)."""
        s1, s2 = self._half_shape(1), self._half_shape(2)
        a, b = s1[0], s2[0]
        c = s1[1] if len(s1) > 1 else 1
        d = weight_shape[1] // c
        k1 = torch.Size(s1[2:]).numel()
        return a, b, c, d, k1, torch.Size(weight_shape[2:]).numel() // k1

    def delta_forward(self, x, weight, op, scale, base=None):
        a, b, c, d, k1, k2 = self._dims(weight.shape)
        if op.groups != 1 or (k1 > 1 and k2 > 1):
            return None
        cast = dict(device=x.device, dtype=x.dtype)
        w1 = self._half(1, **cast)
        if not op.conv_dims:
            z = self._run_w2(x.unflatten(-1, (c, d)), op, **cast)             # (…, c, b)
            return torch.einsum("ac,...cb->...ab", w1.flatten(1), z).flatten(-2) * (scale * self.scale)
        n, spatial = x.shape[0], x.shape[2:]
        if k1 == 1:   # the kernel (if any) is W2's: W2 on each of the c groups, then W1 mixes the groups
            z = self._run_w2(x.reshape(n * c, d, *spatial), op, **cast)      # (n·c, b, *out spatial)
            z = z.reshape(n, c, b, *z.shape[2:])
            out = torch.einsum("ac,ncb...->nab...", w1.flatten(1), z)
        else:         # the kernel is W1's: W2 mixes each group's d channels, then W1 runs on the c groups
            z = torch.einsum("pq,ncq...->npc...", self._half(2, **cast).flatten(1), x.reshape(n, c, d, *spatial))
            z = op(z.reshape(n * b, c, *spatial), w1)                        # (n·b, a, *out spatial)
            out = z.reshape(n, b, a, *z.shape[2:]).transpose(1, 2)
        return out.flatten(1, 2) * (scale * self.scale)

    def _run_w2(self, z, op, device, dtype):
        """W2 applied to z's channel axis (d → b) as the layer applies W: whole, w2_a·w2_b, or Tucker."""
        cast = dict(device=device, dtype=dtype)
        ones = [1] * op.conv_dims
        if self.w2 is not None:
            w2 = self.w2.to(**cast)
            if not op.conv_dims:
                return op(z, w2)
            return op(z, w2 if w2.dim() > 2 else w2.reshape(*w2.shape, *ones))
        w2_a, w2_b = self.w2_a.to(**cast), self.w2_b.to(**cast)
        if self.t2 is not None:   # W2[p, q, k] = Σ_ij t2[i, j, k]·w2_a[i, p]·w2_b[j, q]
            h = op(op.pointwise(z, w2_b), self.t2.to(**cast))
            return op.pointwise(h, w2_a.flatten(1).T)
        if not op.conv_dims:
            return op(op(z, w2_b), w2_a)
        h = op(z, w2_b.reshape(w2_b.shape[0], -1, *op.shape[2:]))
        return op.pointwise(h, w2_a)

    def dora_terms(self, weight, axis):
        """⟨W, ΔW⟩ and ‖ΔW‖² per channel from the Kronecker structure (see ``delta_forward``):
            ⟨W_(i,p), ΔW_(i,p)⟩ = γ·Σ_jqk W[(i,p), (j,q), k]·W1[i,j,k1]·W2[p,q,k2]
            ‖ΔW_(i,p)‖² = γ²·‖W1_i‖²·‖W2_p‖²            (the same over columns (j, q) on the input axis)"""
        a, b, c, d, k1, k2 = self._dims(weight.shape)
        if k1 > 1 and k2 > 1:
            return None
        h1, h2 = self.halves(weight.device)
        w1, w2 = h1.reshape(a, c, k1), h2.reshape(b, d, k2)
        w6 = weight.detach().float().reshape(a, b, c, d, k1, k2)
        g = self.scale
        if axis == 0:
            cross = torch.einsum("ipjqxy,ijx,pqy->ip", w6, w1, w2)
            sq = torch.outer(w1.square().sum((1, 2)), w2.square().sum((1, 2)))
        else:
            cross = torch.einsum("ipjqxy,ijx,pqy->jq", w6, w1, w2)
            sq = torch.outer(w1.square().sum((0, 2)), w2.square().sum((0, 2)))
        return cross.flatten() * g, sq.flatten() * (g * g)


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
