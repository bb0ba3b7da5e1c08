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


def optimality_gap(got, want, k: int) -> float:
    """How far a rank-k approximation ``got`` of ``want`` is from the best one (Eckart–Young: the
    truncated SVD, error √Σ_{i≥k} σ_i²), relative to that optimal error. Where ``want`` has rank ≤ k
    the optimum is 0 and float rounding (1e-5 of ‖want‖ allowed, the fp32 SVD's bound) is all there is."""
    import torch

    want = want.flatten(1).double()
    err = float(torch.linalg.norm(got.flatten(1).double() - want))
    s = torch.linalg.svdvals(want)
    opt = float(s[k:].square().sum().sqrt())
    floor = 1e-5 * float(s.square().sum().sqrt())
    return max(0.0, abs(err - opt) - floor) / max(opt, floor)
