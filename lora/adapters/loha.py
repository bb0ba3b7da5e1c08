"""LoHa (LyCORIS ``loha``, FedPara): ΔW = γ · (w1_a·w1_b) ⊙ (w2_a·w2_b),  γ = alpha / rank.

Shapes (r = rank, k = kernel dims; a plain conv half is (out, in·k) and is reshaped to W):
    plain    hada_w1_a (out, r)       hada_w1_b (r, in·k)          (the same for w2)
    Tucker   hada_t1 (r, r, *k)       hada_w1_a (r, out)   hada_w1_b (r, in)
             W1[p, q, *k] = Σ_ij t1[i, j, *k] · w1_a[i, p] · w1_b[j, q]     (``tucker``)
rank = hada_w1_b.shape[0]; γ = 1 when alpha is absent or 0 (the LyCORIS / kohya rule).

γ is applied once, as LyCORIS' forward (bypass and rebuild) does; lycoris-lora 4.1.3's
``LohaModule.get_diff_weight`` (and so its ``merge_to``) applies it twice.

Bypass: a Hadamard product of two rank-r matrices is one rank-r1·r2 product U·V,
    U[p, (i, i')] = w1_a[p, i]·w2_a[p, i'],   V[(i, i'), q] = w1_b[i, q]·w2_b[i', q]
(Tucker: the same on the a/b factors, with the core T[(i,i'), (j,j'), k] = t1[i,j,k]·t2[i',j',k]),
so Δy = U·(V·x) like a LoRA of rank r1·r2. Where that form is larger than ΔW itself
(r1·r2·(out + in·k) ≥ out·in·k) ΔW is built from the factors instead (never from W): it is then the
smaller form, and the faster one.
Training init (LyCORIS ``LohaModule``): w1_a ~ N(0, 0.1), w1_b ~ N(0, 1), w2_a = 0, w2_b ~ N(0, 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (Adapter, alpha_tensor, alpha_value, ensure_same_numel, factor_rank, low_rank_forward,
                   lycoris_scale, pick, tucker)


def half_shape(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> tuple[int, ...]:
    """Shape of a·b (plain: (a rows, b row size)) or tucker(t, a, b)."""
    if t is None:
        return (a.shape[0], b[0].numel())
    return (a.shape[1], b.shape[1], *t.shape[2:])


@dataclass(eq=False, repr=False)
class LoHa(Adapter):
    name = "loha"
    label = "LoHa"
    roles = {".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a",
             ".hada_w2_b": "hada_w2_b", ".hada_t1": "hada_t1", ".hada_t2": "hada_t2"}
    identify = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    trainable = True

    w1_a: torch.Tensor = None
    w1_b: torch.Tensor = None
    w2_a: torch.Tensor = None
    w2_b: torch.Tensor = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    @classmethod
    def from_factors(cls, factors, *, prefix, file, options):
        w1_a, w1_b, w2_a, w2_b = pick(factors, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
                                      algo="LoHa", prefix=prefix, file=file)
        self = cls(w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b, t1=factors.get("hada_t1"),
                   t2=factors.get("hada_t2"), alpha=alpha_value(factors.get("alpha")),
                   dora_scale=factors.get("dora_scale"), file=file, prefix=prefix)
        if (self.t1 is None) != (self.t2 is None):
            raise self.err(f"LoHa Tucker needs both hada_t1 and hada_t2 (found: {sorted(factors)})")
        factor_rank(self, ("hada_w1_a", "hada_w1_b", "hada_t1"), w1_a, w1_b, self.t1)
        factor_rank(self, ("hada_w2_a", "hada_w2_b", "hada_t2"), w2_a, w2_b, self.t2)
        s1, s2 = half_shape(w1_a, w1_b, self.t1), half_shape(w2_a, w2_b, self.t2)
        if s1 != s2:
            raise self.err(f"the two Hadamard halves disagree: w1 gives {s1}, w2 gives {s2}")
        return self

    @classmethod
    def init(cls, op, rank, alpha, generator):
        out, n_in = op.out_channels, op.in_channels * op.kernel_numel
        # One Hadamard side starts at zero so the model starts unchanged; the other is random.
        w1_a = torch.randn(out, rank, generator=generator) * 0.1
        w1_b = torch.randn(rank, n_in, generator=generator)
        w2_a = torch.zeros(out, rank)
        w2_b = torch.randn(rank, n_in, generator=generator)
        return cls(w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b,
                   alpha=float(alpha))

    def factors(self):
        return {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b,
                "hada_t1": self.t1, "hada_t2": self.t2, "alpha": alpha_tensor(self.alpha),
                "dora_scale": self.dora_scale}

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def scale(self) -> float:
        return lycoris_scale(self.alpha, self.rank)

    def delta(self, weight):
        return self._delta(weight.shape, weight.device)

    def _delta(self, shape, device) -> torch.Tensor:
        d = _half(self.w1_a, self.w1_b, self.t1, device) * _half(self.w2_a, self.w2_b, self.t2, device)
        ensure_same_numel(self, d.numel(), shape, self.prefix)
        return d.reshape(shape) * self.scale

    def check_target(self, shape, key):
        s = half_shape(self.w1_a, self.w1_b, self.t1)
        if s[0] != shape[0] or torch.Size(s).numel() != shape.numel():
            raise self.err(f"LoHa halves of shape {s} do not fit target {key!r} of shape {tuple(shape)}")
        super().check_target(shape, key)

    # ---- the rank-r1·r2 form -----------------------------------------------------------------------
    def _product_is_smaller(self, shape) -> bool:
        """r1·r2·(out + in·k) < out·in·k (Tucker: plus the r1·r2 × r1·r2 core per kernel position)."""
        r = self.w1_b.shape[0] * self.w2_b.shape[0]
        out, n = shape[0], shape[1:].numel()
        core = r * r * (self.t1[0, 0].numel() if self.t1 is not None else 0)
        return r * (out + n) + core < out * n

    def _outer(self, device, dtype):
        """(U (out, R), V (R, in)) of the a and b factors; Tucker ones store (r, out) and (r, in)."""
        cast = dict(device=device, dtype=dtype)
        a1, a2, b1, b2 = (t.to(**cast).flatten(1) for t in (self.w1_a, self.w2_a, self.w1_b, self.w2_b))
        if self.t1 is not None:
            a1, a2 = a1.T, a2.T
        u = (a1[:, :, None] * a2[:, None, :]).flatten(1)
        v = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)
        return u, v

    def _core(self, device, dtype):
        """T[(i, i'), (j, j'), *k] = t1[i, j, *k]·t2[i', j', *k]."""
        t1, t2 = (t.to(device=device, dtype=dtype) for t in (self.t1, self.t2))
        r1, r2 = t1.shape[0], t2.shape[0]
        t = t1[:, None, :, None] * t2[None, :, None, :]
        return t.reshape(r1 * r2, r1 * r2, *t1.shape[2:])

    def low_rank(self, device, dtype=torch.float32):
        w_shape = torch.Size(half_shape(self.w1_a, self.w1_b, self.t1))
        if not self._product_is_smaller(w_shape):
            return None
        u, v = self._outer(device, dtype)
        if self.t1 is not None:      # V_eff[(i,i'), (q, k)] = Σ_(j,j') T[(i,i'), (j,j'), k]·V[(j,j'), q]
            v = torch.einsum("mn...,nq->mq...", self._core(device, dtype), v).flatten(1)
        return u * self.scale, v

    def delta_forward(self, x, weight, op, scale, base=None):
        if not self._product_is_smaller(weight.shape):
            # ΔW is the smaller form: built from the factors (W itself is never read)
            return op(x, self._delta(weight.shape, x.device).to(x.dtype)).mul_(scale)
        u, v = self._outer(x.device, x.dtype)
        if self.t1 is None:
            return low_rank_forward(x, u, v, op, scale * self.scale)
        if op.groups != 1:
            return None
        h = op(op.pointwise(x, v), self._core(x.device, x.dtype))
        return op.pointwise(h * (scale * self.scale), u)


def _half(a, b, t, device) -> torch.Tensor:
    a, b = a.to(device=device, dtype=torch.float32), b.to(device=device, dtype=torch.float32)
    if t is None:
        return a.flatten(1) @ b.flatten(1)
    return tucker(t.to(device=device, dtype=torch.float32), a, b)
