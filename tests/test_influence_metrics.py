"""Correlation metrics against scipy, NaN behaviour, and the streaming accumulator against the one-shot functions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from influence.metrics import PairAccumulator, fisher_ci, pearson, sign_agreement, spearman, topk_overlap


def _data(seed: int, n: int = 60, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = 0.6 * x + rng.normal(size=n)
    if ties:  # many exact ties on both sides
        x, y = np.round(x, 0), np.round(y * 2, 0)
    return x, y


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_pearson_and_spearman_equal_scipy(seed, ties):
    x, y = _data(seed, ties=ties)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    # Torch tensors and lists are accepted alike.
    assert pearson(torch.tensor(x), list(y)) == pytest.approx(pearson(x, y), abs=1e-15)


def test_perfect_and_anti_correlation():
    x = np.arange(10.0)
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "x, y",
    [
        ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]),  # constant side: a degenerate network's estimates
        ([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]),
        ([1.0, 2.0], [3.0, 4.0]),  # too few pairs
        ([], []),
        ([1.0, math.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]),
    ],
)
def test_undefined_correlations_are_nan_without_warnings(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(pearson(x, y))
        assert math.isnan(spearman(x, y))


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same length"):
        pearson([1.0, 2.0, 3.0], [1.0, 2.0])


def test_fisher_ci():
    lo, hi = fisher_ci(0.8, 50)
    assert lo < 0.8 < hi
    # Hand value: z = atanh(0.8) = 1.0986, se = 1/sqrt(47), z ± 1.95996 se -> tanh(...)
    half = 1.959963984540054 / math.sqrt(47)
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(0.8) - half), math.tanh(math.atanh(0.8) + half)))
    assert fisher_ci(0.8, 50, level=0.99)[0] < lo
    assert fisher_ci(1.0, 10) == (1.0, 1.0)
    assert all(math.isnan(b) for b in fisher_ci(math.nan, 50))
    assert all(math.isnan(b) for b in fisher_ci(0.5, 3))


def test_sign_agreement_hand_example():
    assert sign_agreement([1.0, -2.0, 3.0, 0.0], [0.5, 1.0, 2.0, 0.0]) == pytest.approx(0.75)
    assert math.isnan(sign_agreement([], []))


def test_topk_overlap_hand_example():
    est = [0.9, -0.8, 0.1, 0.05, 0.7]  # top-2 by |value|: indices 0, 1
    act = [0.2, -1.0, 0.01, 0.0, 0.9]  # top-2 by |value|: indices 1, 4
    assert topk_overlap(est, act, 2) == pytest.approx(0.5)
    assert topk_overlap(est, act, 3) == pytest.approx(1.0)  # {0, 1, 4} both
    assert topk_overlap(est, act, 50) == pytest.approx(1.0)  # k capped at n
    with pytest.raises(ValueError, match="k must be"):
        topk_overlap(est, act, 0)


def _one_shot(est: np.ndarray, act: np.ndarray) -> dict:
    r, rho = pearson(est, act), spearman(est, act)
    return {
        "n": len(est), "pearson": r, "spearman": rho,
        "pearson_lo": fisher_ci(r, len(est))[0], "pearson_hi": fisher_ci(r, len(est))[1],
        "spearman_lo": fisher_ci(rho, len(est))[0], "spearman_hi": fisher_ci(rho, len(est))[1],
        "sign_agreement": sign_agreement(est, act), "top10_overlap": topk_overlap(est, act, 10),
    }


def test_accumulator_in_shuffled_pieces_equals_one_shot():
    est, act = _data(7, n=80)
    keys = np.arange(1000, 1080)  # training indices need not start at 0
    acc = PairAccumulator()
    rng = np.random.default_rng(0)
    order_e, order_a = rng.permutation(80), rng.permutation(80)
    for chunk in np.array_split(order_e, 5):  # estimates in five shuffled pieces
        acc.add_estimates(keys[chunk], torch.tensor(est[chunk]))
    for chunk in np.array_split(order_a[:50], 3):  # only some actuals so far
        acc.add_actuals(keys[chunk].tolist(), act[chunk])
    assert acc.n == 50
    seen = np.sort(order_a[:50])
    partial = acc.stats()
    for name, value in _one_shot(est[seen], act[seen]).items():
        assert partial[name] == pytest.approx(value, abs=1e-12), name

    for chunk in np.array_split(order_a[50:], 4):
        acc.add_actuals(keys[chunk], act[chunk])
    acc.add_actuals(keys[:3], act[:3])  # a task that reruns overwrites, it does not double count
    assert acc.n == 80
    full = acc.stats()
    for name, value in _one_shot(est, act).items():
        assert full[name] == pytest.approx(value, abs=1e-12), name


def test_accumulator_with_too_few_pairs_is_nan():
    acc = PairAccumulator()
    acc.add_estimates([1, 2], [0.1, 0.2])
    acc.add_actuals([2, 3], [0.3, 0.4])
    s = acc.stats()
    assert s["n"] == 1 and math.isnan(s["pearson"]) and math.isnan(s["spearman_lo"])
    with pytest.raises(ValueError, match="2 keys but 1 values"):
        acc.add_actuals([4, 5], [0.1])
    assert PairAccumulator().stats()["n"] == 0
