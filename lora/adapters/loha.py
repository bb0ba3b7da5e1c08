"""LoHa (LyCORIS ``loha``, FedPara): ΔW = γ · (w1_a·w1_b) ⊙ (w2_a·w2_b),  γ = alpha / rank.

Shapes (r = rank, k = kernel dims; a plain conv half is (out, in·k) and is reshaped to W):
    plain    hada_w1_a (out, r)       hada_w1_b (r, in·k)          (the same for w2)
    Tucker   hada_t1 (r, r, *k)       hada_w1_a (r, out)   hada_w1_b (r, in)
             W1[p, q, *k] = Σ_ij t1[i, j, *k] · w1_a[i, p] · w1_b[j, q]     (``tucker``)
rank = hada_w1_b.shape[0]; γ = 1 when alpha is absent or 0 (the LyCORIS / kohya rule).

γ is applied once, as LyCORIS' forward (bypass and rebuild) does; lycoris-lora 4.1.3's
``LohaModule.get_diff_weight`` (and so its ``merge_to``) applies it twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dora
from .base import Adapter, ensure_same_numel
from .lora import _alpha
from ..errors import LoraError


def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[p, q, …] = Σ_ij core[i, j, …] · wa[i, p] · wb[j, q]   (LyCORIS' CP/Tucker rebuild)."""
    return torch.einsum("ij...,ip,jq->pq...", core, wa.flatten(1), wb.flatten(1))


def lycoris_scale(alpha: float | None, rank: int) -> float:
    """alpha / rank; 1 when alpha is absent or 0 (LyCORIS, kohya: "alpha 0 or None means rank")."""
    return 1.0 if not alpha else alpha / rank


def half_shape(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> tuple[int, ...]:
    """Shape of a·b (plain: (a rows, b row size)) or tucker(t, a, b)."""
    if t is None:
        return (a.shape[0], b[0].numel())
    return (a.shape[1], b.shape[1], *t.shape[2:])


def check_rank(adapter: Adapter, names: tuple[str, str, str], a, b, t) -> int:
    """The rank shared by one factor pair (and its Tucker core); raise when they disagree."""
    na, nb, nt = names
    if t is None:
        if a.dim() < 2 or a.shape[1] != b.shape[0]:
            raise adapter.err(f"ranks disagree: {na} {tuple(a.shape)} · {nb} {tuple(b.shape)}")
    elif t.dim() < 2 or tuple(t.shape[:2]) != (a.shape[0], b.shape[0]):
        raise adapter.err(f"ranks disagree: {nt} {tuple(t.shape)} with {na} {tuple(a.shape)} and {nb} {tuple(b.shape)}")
    return b.shape[0]


def pick(factors: dict, roles: tuple[str, ...], *, algo: str, prefix: str, file) -> list:
    """The named factors, refusing a module that lacks one."""
    missing = [r for r in roles if factors.get(r) is None]
    if missing:
        raise LoraError(f"{algo} module lacks {missing} (found: {sorted(factors)})", file=file, key=prefix)
    return [factors[r] for r in roles]


@dataclass(eq=False, repr=False)
class LoHa(Adapter):
    name = "loha"
    roles = {".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a",
             ".hada_w2_b": "hada_w2_b", ".hada_t1": "hada_t1", ".hada_t2": "hada_t2"}
    identify = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    supports_dora = True

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
                   t2=factors.get("hada_t2"), alpha=_alpha(factors.get("alpha")),
                   dora_scale=factors.get("dora_scale"), file=file, prefix=prefix)
        if (self.t1 is None) != (self.t2 is None):
            raise self.err(f"LoHa Tucker needs both hada_t1 and hada_t2 (found: {sorted(factors)})")
        check_rank(self, ("hada_w1_a", "hada_w1_b", "hada_t1"), w1_a, w1_b, self.t1)
        check_rank(self, ("hada_w2_a", "hada_w2_b", "hada_t2"), w2_a, w2_b, self.t2)
        s1, s2 = half_shape(w1_a, w1_b, self.t1), half_shape(w2_a, w2_b, self.t2)
        if s1 != s2:
            raise self.err(f"the two Hadamard halves disagree: w1 gives {s1}, w2 gives {s2}")
        return self

    def factors(self):
        alpha = None if self.alpha is None else torch.tensor(self.alpha, dtype=torch.float32)
        return {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b,
                "hada_t1": self.t1, "hada_t2": self.t2, "alpha": alpha, "dora_scale": self.dora_scale}

    @property
    def scale(self) -> float:
        return lycoris_scale(self.alpha, self.w1_b.shape[0])

    def delta(self, weight):
        m1 = _half(self.w1_a, self.w1_b, self.t1, weight.device)
        m2 = _half(self.w2_a, self.w2_b, self.t2, weight.device)
        d = m1.mul_(m2)
        ensure_same_numel(self, d.numel(), weight.shape, self.prefix)
        return d.reshape(weight.shape).mul_(self.scale)

    def apply_(self, weight, strength):
        return dora.finish_(self, weight, self.delta(weight), strength)

    def check_target(self, shape, key):
        s = half_shape(self.w1_a, self.w1_b, self.t1)
        if s[0] != shape[0] or torch.Size(s).numel() != shape.numel():
            raise self.err(f"LoHa halves of shape {s} do not fit target {key!r} of shape {tuple(shape)}")
        dora.check_magnitude(self, shape, key)


def _half(a, b, t, device) -> torch.Tensor:
    a, b = a.to(device=device, dtype=torch.float32), b.to(device=device, dtype=torch.float32)
    if t is None:
        return a.flatten(1) @ b.flatten(1)
    return tucker(t.to(device=device, dtype=torch.float32), a, b)
