"""How well estimates agree with actual effects: correlations, their confidence intervals, and a streaming form.

Everything returns NaN rather than raising (or warning) when a statistic is undefined: fewer than 3 pairs, or a
constant side, which is what a degenerate network (a constant predictor, every estimate equal) produces. A sweep
over hundreds of configurations should record "undefined" and move on, and the caller decides what it means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

ArrayLike = Any  # numpy arrays, torch tensors, sequences of numbers


def _vector(values: ArrayLike) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _vector(x), _vector(y)
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length; got {a.size} and {b.size}")
    return a, b


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or not (np.isfinite(a).all() and np.isfinite(b).all()) or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    # Normalise each side first (as scipy does) so tiny or huge values cannot underflow/overflow the product.
    na, nb = np.linalg.norm(da), np.linalg.norm(db)
    return float(np.clip(np.dot(da / na, db / nb), -1.0, 1.0))


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson's r; NaN when n < 3, either side is constant, or a value is not finite."""
    return _pearson(*_pair(x, y))


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's ρ: Pearson's r of the ranks, ties sharing their average rank (as scipy.stats.spearmanr)."""
    a, b = _pair(x, y)
    if a.size < 3 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    return _pearson(rankdata(a), rankdata(b))


def fisher_ci(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval for a correlation via Fisher's z = atanh(r) ~ N(atanh(ρ), 1/(n-3)).

    NaN bounds when r is NaN or n <= 3; (r, r) when |r| = 1 (the transform sends it to infinity).
    Used for Spearman's ρ too, as an approximation (its exact variance is a little larger).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); got {level}")
    if math.isnan(r) or n <= 3:
        return (math.nan, math.nan)
    if abs(r) >= 1.0:
        return (float(r), float(r))
    z = math.atanh(r)
    half = float(norm.ppf(0.5 + level / 2.0)) / math.sqrt(n - 3)
    return (math.tanh(z - half), math.tanh(z + half))


def sign_agreement(x: ArrayLike, y: ArrayLike) -> float:
    """Fraction of pairs whose signs agree (0 agrees only with 0); NaN for no pairs."""
    a, b = _pair(x, y)
    if a.size == 0:
        return math.nan
    return float(np.mean(np.sign(a) == np.sign(b)))


def _top(values: np.ndarray, k: int) -> set[int]:
    # Stable sort on -|v|: ties go to the earlier position, so the answer does not depend on the sort algorithm.
    return set(np.argsort(-np.abs(values), kind="stable")[:k].tolist())


def topk_overlap(x: ArrayLike, y: ArrayLike, k: int) -> float:
    """|top_k(|x|) ∩ top_k(|y|)| / k: do estimate and truth agree on which points matter most?

    k is capped at the number of pairs; NaN when there are none.
    """
    a, b = _pair(x, y)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    k = min(k, a.size)
    if k == 0:
        return math.nan
    return len(_top(a, k) & _top(b, k)) / k


class PairAccumulator:
    """Pairs (estimate, actual) keyed by training index, arriving in any order and in pieces.

    Estimates typically come from one task and actual effects from many retraining tasks; a key seen again
    overwrites its value (so a task that reruns does not double count). :meth:`stats` uses the keys that have
    both values, in ascending key order, and equals the one-shot functions on those pairs.
    """

    def __init__(self) -> None:
        self._estimates: dict[int, float] = {}
        self._actuals: dict[int, float] = {}

    @staticmethod
    def _update(store: dict[int, float], keys: Iterable[int] | ArrayLike, values: ArrayLike) -> None:
        if hasattr(keys, "detach"):
            keys = keys.detach().cpu().numpy()
        ks = [int(k) for k in np.asarray(keys).ravel()]
        vs = _vector(values)
        if len(ks) != vs.size:
            raise ValueError(f"got {len(ks)} keys but {vs.size} values")
        store.update(zip(ks, vs.tolist()))

    def add_estimates(self, keys: Iterable[int] | ArrayLike, values: ArrayLike) -> None:
        self._update(self._estimates, keys, values)

    def add_actuals(self, keys: Iterable[int] | ArrayLike, values: ArrayLike) -> None:
        self._update(self._actuals, keys, values)

    def estimate(self, key: int) -> float:
        """The estimate stored under ``key``; NaN if none arrived yet."""
        return self._estimates.get(key, math.nan)

    def keys(self) -> list[int]:
        """Keys with both an estimate and an actual effect, ascending."""
        return sorted(self._estimates.keys() & self._actuals.keys())

    @property
    def n(self) -> int:
        """Number of complete pairs."""
        return len(self._estimates.keys() & self._actuals.keys())

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        keys = self.keys()
        return (
            np.array([self._estimates[k] for k in keys], dtype=np.float64),
            np.array([self._actuals[k] for k in keys], dtype=np.float64),
        )

    def stats(self) -> dict[str, float]:
        """n, pearson, spearman, their Fisher CIs (``*_lo``/``*_hi``), sign_agreement, top10_overlap."""
        est, act = self.pairs()
        n = est.size
        r, rho = _pearson(est, act), spearman(est, act)
        r_lo, r_hi = fisher_ci(r, n)
        rho_lo, rho_hi = fisher_ci(rho, n)
        return {
            "n": n,
            "pearson": r,
            "spearman": rho,
            "pearson_lo": r_lo,
            "pearson_hi": r_hi,
            "spearman_lo": rho_lo,
            "spearman_hi": rho_hi,
            "sign_agreement": sign_agreement(est, act),
            "top10_overlap": topk_overlap(est, act, 10) if n else math.nan,
        }
