"""kohya's dynamic rank rules by their definitions, found by trying every rank (the independent
reference the tests of lora/tools hold ``svd.keep`` and resize / extract against)."""
from __future__ import annotations


def _share(s: list[float], k: int, power: int) -> float:
    w = [x ** power for x in s]
    return (sum(w[:k]) / sum(w)) ** (1 / power)


def by_definition(s: list[float], method: str, p: float) -> int:
    """sv_ratio: how many S_i ≥ S_0 / p; sv_fro / sv_cumulative: the fewest ranks whose share of the
    Frobenius norm (√Σ S²) / of Σ S is ≥ p. ``s`` descending."""
    if method == "sv_ratio":
        return sum(1 for x in s if x >= s[0] / p)
    power = 2 if method == "sv_fro" else 1
    return next(k for k in range(1, len(s) + 1) if _share(s, k, power) >= p - 1e-12)
