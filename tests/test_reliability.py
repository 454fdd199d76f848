"""Reliability of a replicated ground truth, its noise ceiling, chance levels and bootstrap intervals, checked
against the classical model's analytic answers, exact enumerations and the one-shot correlations."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from influence.metrics import pearson, spearman
from influence.reliability import (
    attenuation_corrected,
    bootstrap_ci,
    noise_ceiling,
    permutation_test,
    split_half_reliability,
)

N = 2000


def _replicated(R: int, sigma: float, n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The classical model: effects s_i ~ N(0, 1), actuals[r, i] = s_i + e_ri with e ~ N(0, σ²)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n)
    return s, s + sigma * rng.normal(size=(R, n))


def _step_up(r: float) -> float:
    return 2 * r / (1 + r)


def _se_step_up(rho_half: float, n: int) -> float:
    """Standard error of one split's Spearman-Brown value: a correlation near ρ from n pairs has standard error
    (1 - ρ²)/√n, and d(2r/(1+r))/dr = 2/(1+r)². The mean over splits varies no more than one split does."""
    return 2 * (1 - rho_half**2) / (1 + rho_half) ** 2 / math.sqrt(n)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("R", [2, 4, 6])
def test_pearson_reliability_matches_the_classical_model(R, sigma):
    s, actuals = _replicated(R, sigma, seed=R * 10 + int(sigma * 2))
    rho_R = 1 / (1 + sigma**2 / R)
    rho_half = 1 / (1 + 2 * sigma**2 / R)
    rel = split_half_reliability(actuals, method="pearson")
    assert rel == pytest.approx(rho_R, abs=4 * _se_step_up(rho_half, N))
    # The ceiling is what a perfect estimator (one that knows s) reaches against the replicate mean.
    rho_c = math.sqrt(rho_R)
    observed = pearson(s, actuals.mean(0))
    assert noise_ceiling(rho_R) == pytest.approx(observed, abs=4 * (1 - rho_c**2) / math.sqrt(N))
    # Correcting that observed correlation for the truth's unreliability recovers a perfect 1.
    tol = 4 * ((1 - rho_c**2) / math.sqrt(N) / rho_c + _se_step_up(rho_half, N) / (2 * rho_R))
    assert attenuation_corrected(observed, rel) == pytest.approx(1.0, abs=tol)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("R", [2, 4, 6])
def test_spearman_reliability_matches_the_bivariate_normal_answer(R, sigma):
    _, actuals = _replicated(R, sigma, seed=100 + R * 10 + int(sigma * 2))
    rho_half = 1 / (1 + 2 * sigma**2 / R)
    spearman_half = 6 / math.pi * math.asin(rho_half / 2)  # Spearman's ρ of a bivariate normal pair
    # Spearman's ρ varies a little more than Pearson's r (variance about 1.06 times as large): √1.06 ≈ 1.03.
    tol = 4 * 1.03 * _se_step_up(spearman_half, N)
    assert split_half_reliability(actuals, method="spearman") == pytest.approx(_step_up(spearman_half), abs=tol)


def test_odd_replicates_step_up_unequal_halves():
    # R = 3 splits into means of 1 and 2 replicates, whose correlation is 1/√((1 + σ²)(1 + σ²/2)); the answer is
    # its step-up, a little below ρ_3 = 1/(1 + σ²/3) (the reliability of a mean of about 2.73 replicates).
    sigma = 1.0
    _, actuals = _replicated(3, sigma, seed=7)
    rho = 1 / math.sqrt((1 + sigma**2) * (1 + sigma**2 / 2))
    rel = split_half_reliability(actuals, method="pearson")
    assert rel == pytest.approx(_step_up(rho), abs=4 * _se_step_up(rho, N))
    assert _step_up(rho) < 1 / (1 + sigma**2 / 3)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_small_R_enumerates_every_distinct_split(method):
    corr = {"pearson": pearson, "spearman": spearman}[method]
    rng = np.random.default_rng(3)
    # Rounded values: many ties, so the vectorised ranks must average them as the one-shot Spearman does.
    actuals = np.round(rng.normal(size=(4, 40)) + rng.normal(size=40), 0)
    a = actuals

    def by_hand(pairs):
        return float(np.mean([_step_up(corr(x, y)) for x, y in pairs]))

    two = by_hand([(a[0], a[1])])
    three = by_hand([(a[0], a[1:3].mean(0)), (a[1], a[[0, 2]].mean(0)), (a[2], a[:2].mean(0))])
    four = by_hand([(a[[0, 1]].mean(0), a[[2, 3]].mean(0)), (a[[0, 2]].mean(0), a[[1, 3]].mean(0)),
                    (a[[0, 3]].mean(0), a[[1, 2]].mean(0))])
    for R, expected in [(2, two), (3, three), (4, four)]:
        for seed in (0, 1):  # enumerated, so the seed plays no part
            assert split_half_reliability(a[:R], method=method, seed=seed) == pytest.approx(expected, abs=1e-12)


def test_splits_are_drawn_when_there_are_too_many():
    _, actuals = _replicated(8, 2.0, n=200, seed=5)  # C(8, 4)/2 = 35 distinct splits
    drawn = split_half_reliability(actuals, splits=10, seed=0)
    assert drawn == split_half_reliability(actuals, splits=10, seed=0)  # bit for bit
    assert drawn != split_half_reliability(actuals, splits=10, seed=1)
    # With room for all 35 the seed no longer matters.
    assert split_half_reliability(actuals, splits=35, seed=0) == split_half_reliability(actuals, splits=35, seed=1)


def test_undefined_statistics_are_nan_without_warnings():
    warnings.simplefilter("error")  # pytest restores the filters after the test
    rng = np.random.default_rng(0)
    actuals = rng.normal(size=(4, 20))
    one = actuals[:1]
    assert math.isnan(split_half_reliability(one))  # R = 1 as [1, n]
    assert math.isnan(split_half_reliability(one[0]))  # and as [n]
    assert math.isnan(noise_ceiling(split_half_reliability(one)))
    assert math.isnan(split_half_reliability(actuals[:, :2]))  # n < 3
    constant = actuals[:2].copy()
    constant[1] = 0.25  # a collapsed retraining: every removal has the same effect
    assert math.isnan(split_half_reliability(constant, method="pearson"))
    assert math.isnan(split_half_reliability(constant, method="spearman"))
    assert math.isnan(split_half_reliability(np.full((4, 20), 0.1)))
    broken = actuals.copy()
    broken[2, 5] = math.inf
    assert math.isnan(split_half_reliability(broken))
    for rel in (0.0, -0.2, math.nan):
        assert math.isnan(noise_ceiling(rel))
        assert math.isnan(attenuation_corrected(0.5, rel))
    assert math.isnan(attenuation_corrected(math.nan, 0.5))

    x = rng.normal(size=20)
    assert all(math.isnan(v) for v in permutation_test(x, np.full(20, 3.0)))
    assert all(math.isnan(v) for v in permutation_test(x[:2], x[:2]))
    assert all(math.isnan(v) for v in bootstrap_ci(np.full(20, 3.0), actuals))
    assert all(math.isnan(v) for v in bootstrap_ci(x[:2], actuals[:, :2]))
    assert all(math.isnan(v) for v in bootstrap_ci(x, broken))


def test_ceiling_and_correction_values():
    assert noise_ceiling(0.81) == pytest.approx(0.9)
    assert attenuation_corrected(0.6, 0.36) == pytest.approx(1.0)
    assert attenuation_corrected(0.9, 0.64) == pytest.approx(1.125)  # not clipped to 1
    assert attenuation_corrected(-0.3, 0.25) == pytest.approx(-0.6)


def test_misuse_raises():
    x = np.arange(10.0)
    with pytest.raises(ValueError, match="actuals"):
        bootstrap_ci(x, np.ones((3, 9)))
    with pytest.raises(ValueError, match="actuals"):
        split_half_reliability(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="same length"):
        permutation_test(x, x[:9])
    with pytest.raises(ValueError, match="method"):
        split_half_reliability(np.ones((3, 10)), method="kendall")
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(x, x, level=95)
    with pytest.raises(ValueError, match="permutations"):
        permutation_test(x, x, permutations=0)


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_permutation_p_values_are_uniform_under_the_null(method):
    p = []
    for i in range(400):
        rng = np.random.default_rng(1000 + i)
        x, y = rng.normal(size=(2, 30))
        p.append(permutation_test(x, y, method=method, permutations=999, seed=i)[0])
    assert stats.kstest(p, "uniform").pvalue > 0.01


def test_permutation_p_value_of_a_small_n_matches_every_permutation():
    # n = 4: all 24 orders can be listed; the drawn p-value estimates the share with |ρ| >= |ρ_obs|. Orders one
    # swap away tie |ρ_obs| = 0.8 exactly, and must count despite rounding.
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 4.0, 3.0])
    observed = abs(spearman(x, y))
    share = np.mean([abs(spearman(x, y[list(o)])) >= observed - 1e-12 for o in itertools.permutations(range(4))])
    assert share == pytest.approx(1 / 3)
    p, _ = permutation_test(x, y, permutations=20000, seed=0)
    assert p == pytest.approx(share, abs=4 * math.sqrt(share * (1 - share) / 20000))


def test_a_perfect_ranking_beats_every_permutation():
    x = np.random.default_rng(0).normal(size=30)
    p, q95 = permutation_test(x, x**3, permutations=4000, seed=0)
    assert p == 1 / 4001
    # The tabulated critical |ρ| for n = 30 at α = 0.05, two-sided, is 0.362; from 4000 permutations the
    # quantile has a standard error of about 0.006.
    assert q95 == pytest.approx(0.362, abs=0.03)


@pytest.mark.parametrize("method, rho", [("pearson", 0.6), ("spearman", 6 / math.pi * math.asin(0.3))])
def test_bootstrap_interval_covers_the_true_correlation(method, rho):
    covered = 0
    for i in range(200):
        rng = np.random.default_rng(2000 + i)
        x = rng.normal(size=200)
        y = 0.6 * x + 0.8 * rng.normal(size=200)  # Pearson correlation 0.6
        lo, hi = bootstrap_ci(x, y, method=method, resamples=400, seed=i)
        point = {"pearson": pearson, "spearman": spearman}[method](x, y)
        assert lo <= point <= hi
        covered += lo <= rho <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_over_replicates_widens_the_interval():
    s, actuals = _replicated(3, 1.5, n=200, seed=11)
    estimate = s + 0.5 * np.random.default_rng(12).normal(size=200)
    lo, hi = bootstrap_ci(estimate, actuals, seed=0)
    lo_fixed, hi_fixed = bootstrap_ci(estimate, actuals.mean(0), seed=0)
    assert hi - lo > 1.2 * (hi_fixed - lo_fixed)


def test_bootstrap_draws_replicates_with_replacement():
    # Replicate 1 has every effect reversed and halved: the mean 0.25·x still ranks like x (ρ = 1), as does any
    # draw holding replicate 0; the quarter of the resamples that draw replicate 1 twice give ρ = -1.
    x = np.random.default_rng(8).normal(size=50)
    actuals = np.stack([x, -0.5 * x])
    lo, hi = bootstrap_ci(x, actuals, resamples=4000, level=0.95, seed=0)
    assert (lo, hi) == (pytest.approx(-1.0), pytest.approx(1.0))
    # The 20% quantile falls among the -1s and the 30% among the 1s (4000 draws: the share's standard error is
    # 0.007 around 0.25).
    assert bootstrap_ci(x, actuals, resamples=4000, level=0.6, seed=0)[0] == pytest.approx(-1.0)
    assert bootstrap_ci(x, actuals, resamples=4000, level=0.4, seed=0)[0] == pytest.approx(1.0)


def test_bootstrap_drops_undefined_resamples():
    # One-hot estimate and truth at different points: a resample is defined only if it draws both points, which
    # for n = 20 happens about 40% of the time, so fewer than half survive. One side a ramp instead: about 64%.
    n = 20
    one_hot = np.eye(n)
    assert all(math.isnan(v) for v in bootstrap_ci(one_hot[0], one_hot[1], method="pearson", seed=0))
    lo, hi = bootstrap_ci(one_hot[0], np.arange(n, dtype=float), method="pearson", seed=0)
    assert -1 <= lo <= hi <= 1


def test_same_seed_same_numbers():
    s, actuals = _replicated(6, 1.0, n=300, seed=4)
    estimate = s + np.random.default_rng(5).normal(size=300)
    truth = actuals.mean(0)
    assert permutation_test(estimate, truth, seed=3) == permutation_test(estimate, truth, seed=3)
    assert bootstrap_ci(estimate, actuals, seed=3) == bootstrap_ci(estimate, actuals, seed=3)
    assert permutation_test(estimate, truth, seed=3)[1] != permutation_test(estimate, truth, seed=4)[1]
    assert bootstrap_ci(estimate, actuals, seed=3) != bootstrap_ci(estimate, actuals, seed=4)
