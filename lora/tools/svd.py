"""SVDs for the LoRA tools: a weight change as a low-rank product or a dense matrix, its exact thin
SVD, the rank to keep (fixed or one of kohya's dynamic rules) and the LoRA factors of the result.

A weight change ΔW of a layer with weight (out, in, *k) is handled as the matrix (out, in·k)
(``Delta``): either U·V with U (out, R) and V (R, in·k) (a LoRA, a sum of LoRAs, LoHa's rank-r²
form) or dense (a difference of two models, a LoKr, a full ``diff``).

Exact thin SVD (``svd``), never a full (out × out, in·k × in·k) one:
    U·V, R < min(out, in·k):  U = Qu·Ru, Vᵀ = Qv·Rv (QR), Ru·Rvᵀ = X·Σ·Yᵀ (R × R), so
                              ΔW = (Qu·X)·Σ·(Qv·Y)ᵀ, in O((out + in·k)·R²): exact, whatever R is.
    dense M (m × n), m ≤ n:   the eigenvectors of the Gram matrix G = M·Mᵀ (float64, m × m) are M's
                              left singular vectors, σ² its eigenvalues; the kept rows of Σ·Vᵀ are
                              Uₖᵀ·M. One m²·n product and an m × m eigendecomposition instead of a
                              LAPACK SVD of M: several times faster on the wide matrices of a conv
                              layer (1280 × 11520), as exact in float32 (bench/svd.py measures both).
                              Near-square matrices (n < 1.5·m) use LAPACK's thin SVD, as fast there.
    ``method="lowrank"``:     ``torch.svd_lowrank`` (randomised, 4 power iterations): only the top
                              rank + 8, approximate (0.1% above the optimal error on a fine-tune's
                              spectrum, 15× faster than the Gram route on a CPU: bench/svd.py); an
                              option of extract with a fixed rank, never the default.

Rank rules (``keep``), S the singular values in descending order, r the cap (the requested rank):
    fixed          min(r, len(S))
    sv_ratio p     the singular values with S_i ≥ S_0 / p  (largest/smallest kept ≤ p)
    sv_fro p       the fewest ranks whose Frobenius share √(Σ_{i<k} S_i²) / √(Σ S²) is ≥ p
    sv_cumulative p  the fewest ranks whose share of Σ S is ≥ p
each at least 1 and at most r; a zero ΔW keeps 1 (zero) rank, as kohya writes it. kohya's ``resize_lora.py`` (sd-scripts 48d368f) keeps one rank more
than these definitions for all three (its ``index_sv_*`` + 1); we keep what the definition says.

Factors (``factors``): up = Uₖ·Σₖ (out, k), down = Vₖᵀ (k, in·k), kohya's split. ``clamp_quantile`` q
(kohya's ``CLAMP_QUANTILE`` 0.99 in svd_merge_lora / extract_lora_from_models) clamps both to ±h,
h = the q-quantile of the values of up and down together, as kohya does; None (the default) keeps
the optimal rank-k approximation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LoraError

METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
SVD_METHODS = ("exact", "lowrank")
ZERO = 1e-12           # a ΔW whose largest singular value is below this (relative to 1) is zero
GRAM_ASPECT = 1.5      # the Gram route pays off on matrices at least this much wider than tall (or taller)


@dataclass
class Delta:
    """ΔW of one layer as the matrix (out, cols), cols = in·k: ``u @ v`` or ``dense``.

    ``kernel``: (in, *k) when the layer's input channels and kernel are known (cols = in·k); None
    when the factors only give the flattened width (LoHa's plain conv halves)."""
    out: int
    cols: int
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    kernel: tuple[int, ...] | None = None
    parts: int = field(default=1, repr=False)      # how many changes were summed into it

    @property
    def factored(self) -> bool:
        return self.dense is None

    @property
    def rank(self) -> int:
        """An upper bound of ΔW's rank: the inner size R of U·V, or min(out, cols)."""
        bound = min(self.out, self.cols)
        return min(bound, self.u.shape[1]) if self.factored else bound

    @property
    def shape(self) -> tuple[int, ...]:
        """The layer's weight shape when known, else (out, cols)."""
        return (self.out, *self.kernel) if self.kernel else (self.out, self.cols)

    def scaled(self, c: float) -> "Delta":
        if self.factored:
            return Delta(self.out, self.cols, self.u * c, self.v, kernel=self.kernel, parts=self.parts)
        return Delta(self.out, self.cols, dense=self.dense * c, kernel=self.kernel, parts=self.parts)

    def matrix(self) -> torch.Tensor:
        return self.u @ self.v if self.factored else self.dense

    def plus(self, other: "Delta") -> "Delta":
        """ΔW + other: the factors side by side while the sum stays low-rank, else dense."""
        if (self.out, self.cols) != (other.out, other.cols):
            raise ValueError(f"cannot add changes of shape {(self.out, self.cols)} and {(other.out, other.cols)}")
        kernel = self.kernel or other.kernel
        parts = self.parts + other.parts
        if self.factored and other.factored and self.u.shape[1] + other.u.shape[1] < min(self.out, self.cols):
            return Delta(self.out, self.cols, torch.cat([self.u, other.u], 1), torch.cat([self.v, other.v], 0),
                         kernel=kernel, parts=parts)
        dense = self.matrix() + other.matrix()
        return Delta(self.out, self.cols, dense=dense, kernel=kernel, parts=parts)


# ---- the SVD ----------------------------------------------------------------------------------------
def svd(d: Delta, *, method: str = "exact", rank: int | None = None, niter: int = 4
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of ΔW, descending S, at most ``d.rank`` singular triplets (``method="lowrank"``:
    the top ``rank`` + 8, randomised). Math in float32 (float64 inside the Gram / QR steps)."""
    if method not in SVD_METHODS:
        raise ValueError(f"SVD method {method!r}: use one of {', '.join(SVD_METHODS)}")
    if d.factored and d.u.shape[1] < min(d.out, d.cols):
        return _svd_product(d.u, d.v)
    m = d.matrix().float()
    if method == "lowrank" and rank is not None and rank + 8 < min(m.shape):
        u, s, v = torch.svd_lowrank(m, q=rank + 8, niter=niter)
        return u, s, v.T
    if max(m.shape) < GRAM_ASPECT * min(m.shape):     # near-square: LAPACK's thin SVD is as fast
        return torch.linalg.svd(m, full_matrices=False)
    return _svd_gram(m)


def _svd_product(u: torch.Tensor, v: torch.Tensor):
    """Exact SVD of u @ v (u (m, R), v (R, n), R small) through two QRs and an R × R SVD."""
    qu, ru = torch.linalg.qr(u.double())
    qv, rv = torch.linalg.qr(v.double().T)
    x, s, yh = torch.linalg.svd(ru @ rv.T)
    return (qu @ x).float(), s.float(), (yh @ qv.T).float()


def _svd_gram(m: torch.Tensor):
    """Thin SVD of a dense matrix from the eigendecomposition of its smaller Gram matrix (float64).

    Σ·Vᵀ is formed as Uᵀ·M and split into its row norms and directions, so no singular value is
    divided by (a zero σ gives a zero row, never inf/NaN)."""
    wide = m.shape[0] <= m.shape[1]
    a = (m if wide else m.T).double()
    u = torch.linalg.eigh(a @ a.T).eigenvectors.flip(1)
    b = u.T @ a                                              # Σ·Vᵀ
    s = torch.linalg.vector_norm(b, dim=1)
    order = torch.argsort(s, descending=True)                # eigh's order, up to rounding near 0
    u, b, s = u[:, order], b[order], s[order]
    vh = b / s.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    u, s, vh = u.float(), s.float(), vh.float()
    return (u, s, vh) if wide else (vh.T, s, u.T)


# ---- which rank to keep -----------------------------------------------------------------------------
def check_rank(value, what: str = "rank") -> int:
    """A requested rank as an int ≥ 1; LoraError for 0, negatives and non-integers."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoraError(f"{what} must be a whole number ≥ 1 (got {value!r})")
    return value


def check_svd_method(svd_method: str, method: str | None) -> str:
    """The SVD method, refusing the randomised one with a dynamic rule (which needs every singular value)."""
    if svd_method not in SVD_METHODS:
        raise LoraError(f"SVD method {svd_method!r} is not one of {', '.join(SVD_METHODS)}")
    if svd_method == "lowrank" and method is not None:
        raise LoraError(f"{method} chooses ranks from every singular value; the lowrank SVD finds only the top ones: "
                        "use the exact SVD with a dynamic rule")
    return svd_method


def check_method(method: str | None, param: float | None) -> tuple[str | None, float | None]:
    """(method, param) validated: a dynamic method needs its parameter in range."""
    if method in (None, "", "none"):
        return None, None
    if method not in METHODS:
        raise LoraError(f"dynamic method {method!r} is not one of {', '.join(METHODS)}")
    if param is None or not math.isfinite(param):
        raise LoraError(f"{method} needs a parameter")
    if method == "sv_ratio" and param < 1:
        raise LoraError(f"sv_ratio is the largest kept singular value over the smallest: it must be ≥ 1 (got {param})")
    if method in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
        raise LoraError(f"{method} is the share of the layer kept: it must be in (0, 1] (got {param})")
    return method, float(param)


def keep(s: torch.Tensor, cap: int, method: str | None = None, param: float | None = None) -> int:
    """How many singular values to keep (see the module docstring); ``s`` descending."""
    n = min(cap, len(s))
    if n < 1:
        return 1
    s = s.double()
    if float(s[0]) <= ZERO:          # ΔW = 0: one (zero) rank, as kohya writes it
        return 1
    if method is None:
        return n
    if method == "sv_ratio":
        k = int((s >= s[0] / param).sum())
    else:
        w = s.square() if method == "sv_fro" else s
        target = param * param if method == "sv_fro" else param
        share = torch.cumsum(w, 0) / w.sum()
        # the first k whose share reaches the target; a tolerance for the last ulp of the sum
        k = int((share < target - 1e-12).sum()) + 1
    return max(1, min(k, n))


def kept_share(s: torch.Tensor, k: int) -> float:
    """Frobenius share of ΔW a rank-k truncation keeps: √(Σ_{i<k} S_i²) / √(Σ S²) (1 for ΔW = 0)."""
    sq = s.double().square()
    total = float(sq.sum())
    return 1.0 if total <= 0 else math.sqrt(float(sq[:k].sum()) / total)


def factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int,
            clamp_quantile: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, k), down (k, cols)) = (Uₖ·Σₖ, Vₖᵀ), optionally clamped as kohya does."""
    up = u[:, :k] * s[:k]
    down = vh[:k]
    if clamp_quantile is not None:
        values = torch.cat([up.flatten(), down.flatten()])
        hi = _quantile(values, clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return up.contiguous(), down.contiguous()


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile, also for tensors above its 16M-element limit (through a sort)."""
    if values.numel() <= 16_000_000:
        return torch.quantile(values.float(), q)
    ordered = values.float().sort().values
    pos = q * (ordered.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def check_quantile(q: float | None) -> float | None:
    """None (or ≥ 1, or 0) switches clamping off; otherwise a quantile in (0, 1)."""
    if q is None or q == 0 or q >= 1:
        return None
    if not 0 < q < 1 or not math.isfinite(q):
        raise LoraError(f"clamp_quantile must be in (0, 1), or 0/1 for no clamping (got {q})")
    return float(q)
