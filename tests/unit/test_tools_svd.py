"""lora/tools/svd.py: the exact thin SVDs the tools use, and the rank rules by their definitions."""
from __future__ import annotations

import math

import pytest
import torch

from loralab.lora.errors import LoraError
from loralab.lora.tools import svd as S
from support.rank_rules import by_definition
from tolerances import TOL, rel_err


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference(m: torch.Tensor):
    return torch.linalg.svd(m.double(), full_matrices=False)


@pytest.mark.parametrize("shape", [(40, 300), (300, 40), (64, 64), (64, 90)])
def test_svd_of_a_dense_matrix_is_the_svd(shape):
    """The Gram route (wide / tall) and LAPACK's thin SVD (near-square) both give the SVD."""
    m = rnd(*shape)
    u, s, vh = S.svd(S.Delta(*shape, dense=m))
    _, s_ref, _ = reference(m)
    assert rel_err(s, s_ref) < TOL["svd_fp32"]
    assert rel_err((u * s) @ vh, m) < TOL["svd_fp32"]
    eye = torch.eye(min(shape), dtype=torch.float64)
    assert rel_err(u.double().T @ u.double(), eye) < TOL["svd_fp32"]
    assert rel_err(vh.double() @ vh.double().T, eye) < TOL["svd_fp32"]


def test_svd_of_a_product_uses_only_its_factors_and_is_exact():
    u0, v0 = rnd(200, 6), rnd(6, 900, seed=1)
    d = S.Delta(200, 900, u0, v0)
    u, s, vh = S.svd(d)
    assert u.shape == (200, 6) and vh.shape == (6, 900)        # never an out × in SVD
    _, s_ref, _ = reference(u0 @ v0)
    assert rel_err(s, s_ref[:6]) < TOL["svd_fp32"]
    assert rel_err((u * s) @ vh, u0 @ v0) < TOL["svd_fp32"]


def test_a_zero_change_gives_zero_factors_not_nan():
    u, s, vh = S.svd(S.Delta(8, 20, dense=torch.zeros(8, 20)))
    up, down = S.factors(u, s, vh, S.keep(s, 4))
    assert torch.isfinite(up).all() and torch.isfinite(down).all() and float((up @ down).abs().max()) == 0


def test_truncation_is_the_eckart_young_optimum():
    m = rnd(50, 120)
    u, s, vh = S.svd(S.Delta(50, 120, dense=m))
    _, s_ref, _ = reference(m)
    for k in (1, 5, 20):
        up, down = S.factors(u, s, vh, k)
        err = torch.linalg.norm(m.double() - up.double() @ down.double())
        assert abs(float(err) / float(s_ref[k:].square().sum().sqrt()) - 1) < TOL["eckart_young"]


SPECTRUM = [10.0, 5.0, 2.0, 1.0, 0.5]


@pytest.mark.parametrize("method,param,want", [
    ("sv_ratio", 4, 2), ("sv_ratio", 5, 3), ("sv_ratio", 1, 1), ("sv_ratio", 100, 5),
    ("sv_fro", 0.9, 2), ("sv_fro", math.sqrt(100 / 130.25), 1), ("sv_fro", 0.98, 3), ("sv_fro", 1.0, 5),
    ("sv_cumulative", 0.8, 2), ("sv_cumulative", 0.95, 4), ("sv_cumulative", 0.5, 1),
])
def test_dynamic_rules_keep_what_their_definitions_say(method, param, want):
    # kohya's resize_lora.py keeps one more rank for every row here but the capped ones
    s = torch.tensor(SPECTRUM)
    assert S.keep(s, 99, method, param) == want == by_definition(SPECTRUM, method, param)


@pytest.mark.parametrize("method,param", [("sv_ratio", 3.0), ("sv_fro", 0.75), ("sv_cumulative", 0.6),
                                          ("sv_fro", 0.999), ("sv_ratio", 40.0)])
def test_dynamic_rules_on_random_spectra(method, param):
    for seed in range(20):
        s = sorted((float(x) for x in rnd(30, seed=seed).abs() * torch.logspace(0, -3, 30)), reverse=True)
        assert S.keep(torch.tensor(s), 99, method, param) == by_definition(s, method, param), (seed, s)


def test_the_cap_and_a_zero_spectrum():
    s = torch.tensor(SPECTRUM)
    assert S.keep(s, 2, "sv_fro", 1.0) == 2 and S.keep(s, 3) == 3 and S.keep(s, 99) == 5
    assert S.keep(torch.zeros(5), 4, "sv_fro", 0.5) == 1


def test_kept_share_is_the_frobenius_share():
    s = torch.tensor(SPECTRUM)
    assert S.kept_share(s, 2) == pytest.approx(math.sqrt(125 / 130.25))
    assert S.kept_share(s, 5) == 1.0 and S.kept_share(torch.zeros(3), 1) == 1.0


def test_clamp_quantile_is_kohyas():
    """kohya: h = quantile(cat(U·S, Vh), q); both clamped to [-h, h]."""
    m = rnd(30, 80)
    u, s, vh = S.svd(S.Delta(30, 80, dense=m))
    up, down = S.factors(u, s, vh, 6, 0.9)
    ref_up, ref_down = u[:, :6] * s[:6], vh[:6]
    h = torch.quantile(torch.cat([ref_up.flatten(), ref_down.flatten()]), 0.9)
    assert torch.equal(up, ref_up.clamp(-h, h)) and torch.equal(down, ref_down.clamp(-h, h))
    assert not torch.equal(up, ref_up)     # the clamp did something


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4"])
def test_rank_must_be_a_whole_number_of_at_least_one(value):
    with pytest.raises(LoraError, match="rank must be a whole number"):
        S.check_rank(value)


@pytest.mark.parametrize("method,param,msg", [("sv_bogus", 1.0, "not one of"), ("sv_ratio", 0.5, "≥ 1"),
                                              ("sv_fro", 1.5, r"\(0, 1\]"), ("sv_cumulative", 0.0, r"\(0, 1\]"),
                                              ("sv_fro", None, "needs a parameter")])
def test_bad_dynamic_rules(method, param, msg):
    with pytest.raises(LoraError, match=msg):
        S.check_method(method, param)


def test_clamp_quantile_values():
    assert S.check_quantile(None) is None and S.check_quantile(0) is None and S.check_quantile(1.0) is None
    assert S.check_quantile(0.99) == 0.99
    with pytest.raises(LoraError, match="clamp_quantile"):
        S.check_quantile(-0.5)
