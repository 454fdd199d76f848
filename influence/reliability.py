"""How far a correlation against a noisy, replicated ground truth can be trusted.

For one (configuration, method, test point) the estimates are ``estimate`` [n], one per removed training point,
and the ground truth is ``actuals`` [R, n]: the test-loss change of retraining without each point, measured under
R independent draws of the training noise (minibatch order, start perturbation). The truth a correlation is taken
against is the replicate mean ``actuals.mean(0)``. Four questions, one function each:

- how reproducible is that truth?  :func:`split_half_reliability` (ρ_R, the reliability of the R-replicate mean);
- how high could any estimator score against it?  :func:`noise_ceiling` (√ρ_R);
- what would the score be against a noise-free truth?  :func:`attenuation_corrected` (r / √ρ_R);
- could the score be chance, and how uncertain is it?  :func:`permutation_test`, :func:`bootstrap_ci`.

Correlations are Pearson's r or Spearman's ρ (Pearson's r of average ranks), as in :mod:`influence.metrics`,
whose functions give every single evaluation; the many evaluations behind splits and resamples are vectorised
here and agree with them. As there, nothing raises or warns where a statistic is undefined (n < 3, a constant
side, a value that is not finite, R < 2 for a reliability): the answer is NaN. Misuse (mismatched shapes, an
unknown method) raises ValueError. Every random function takes ``seed`` and draws from
``np.random.default_rng(seed)``, so the same call gives the same numbers bit for bit. Pure numpy/scipy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

from influence.metrics import ArrayLike, _pair, _vector, pearson, spearman

# A cell whose permutation p-value is >= CHANCE_ALPHA has a correlation indistinguishable from chance.
CHANCE_ALPHA = 0.05
# A cell whose reliability is below UNRELIABLE_BELOW has a ground truth too noisy to judge an estimator by: its
# noise ceiling is under √0.5 ≈ 0.71, so even an estimator that knows the noise-free effect scores that low.
UNRELIABLE_BELOW = 0.5

_CORRELATIONS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {"pearson": pearson, "spearman": spearman}

# Resampled rows are processed in blocks of about this many values, so memory stays bounded for large n.
_BLOCK_VALUES = 1 << 21


def _correlation(method: str) -> Callable[[ArrayLike, ArrayLike], float]:
    try:
        return _CORRELATIONS[method]
    except KeyError:
        raise ValueError(f"method must be one of {sorted(_CORRELATIONS)}; got {method!r}") from None


def _positive(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _replicates(actuals: ArrayLike, n: int | None = None) -> np.ndarray:
    """``actuals`` as float64 [R, n]; a 1-D array is one replicate."""
    if hasattr(actuals, "detach"):  # torch.Tensor, without importing torch here
        actuals = actuals.detach().cpu().numpy()
    a = np.asarray(actuals, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"actuals must be [R, n] (replicates x points) or [n]; got shape {a.shape}")
    if n is not None and a.shape[1] != n:
        raise ValueError(f"actuals must hold one value per estimate in each replicate: {n} estimates, "
                         f"but actuals has shape {a.shape}")
    return a


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson's r of each row of ``a`` [k, n] with the same row of ``b`` [k, n]; NaN for a constant row.

    Rows must be finite. Each row is scaled by its range first (r does not change), so huge or tiny values
    cannot overflow or underflow the sums of squares.
    """
    ok = (np.ptp(a, axis=1) > 0) & (np.ptp(b, axis=1) > 0)

    def unit(x: np.ndarray) -> np.ndarray:
        span = np.where(ok, np.ptp(x, axis=1), 1.0)[:, None]
        d = (x - x.min(axis=1, keepdims=True)) / span
        d -= d.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(d, axis=1, keepdims=True)
        return d / np.where(norm > 0, norm, 1.0)

    r = np.einsum("ij,ij->i", unit(a), unit(b))
    return np.where(ok, np.clip(r, -1.0, 1.0), np.nan)


def _rowwise(method: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson or Spearman (average ranks along each row) of finite [k, n] arrays."""
    if method == "spearman":
        a, b = rankdata(a, axis=1), rankdata(b, axis=1)
    return _rowwise_pearson(a, b)


def _half_masks(R: int, splits: int, rng: np.random.Generator) -> np.ndarray:
    """[S, R] booleans, True for the replicates of the first half (R // 2 of them) in each split.

    Every distinct split when there are at most ``splits`` of them (for even R, a half and its complement are
    the same split and are listed once), else ``splits`` random ones.
    """
    h = R // 2
    distinct = math.comb(R, h) // (2 if 2 * h == R else 1)
    if distinct <= splits:
        halves = [c for c in itertools.combinations(range(R), h) if 2 * h != R or c[0] == 0]
        masks = np.zeros((len(halves), R), dtype=bool)
        for row, half in enumerate(halves):
            masks[row, list(half)] = True
        return masks
    order = rng.permuted(np.tile(np.arange(R), (splits, 1)), axis=1)
    masks = np.zeros((splits, R), dtype=bool)
    np.put_along_axis(masks, order[:, :h], True, axis=1)
    return masks


def split_half_reliability(actuals: ArrayLike, *, method: str = "spearman", splits: int = 50,
                           seed: int = 0) -> float:
    """ρ_R: the split-half reliability of the replicate mean across points, Spearman-Brown corrected.

    Each split divides the R replicates into halves of R // 2 and R - R // 2; r is the correlation (``method``)
    across the n points of the two half means, and r_SB = 2r / (1 + r) steps it up to the length of the whole.
    The answer is the mean r_SB over the splits: every distinct split where there are at most ``splits`` of
    them (R = 2 has one, R = 3 three, R = 4 three), else ``splits`` drawn at random.

    It estimates the reliability of ``actuals.mean(0)``: the correlation that a second, independent mean of R
    replicates would have with it. Under the classical model (actuals = effect + independent noise of variance
    σ², effects of variance 1) ρ_R = 1 / (1 + σ²/R) for Pearson, and the step-up is exact for equal halves
    (even R). For odd R the halves are unequal and the step-up gives the reliability of a mean of slightly fewer
    than R replicates: between R - 1/R (little noise) and √(R² - 1) (much noise), e.g. 2.67 to 2.83 for R = 3,
    so ρ_R is a little underestimated.

    A value <= 0 means the ground truth has no reproducible ranking; it is kept as it is, not clipped (a split
    whose halves correlate at exactly -1 steps up to -inf). NaN when R < 2, n < 3, a value is not finite, or
    every split's correlation is undefined (a constant half mean, e.g. a constant replicate when R = 2).
    """
    _correlation(method)
    splits = _positive("splits", splits)
    a = _replicates(actuals)
    R, n = a.shape
    if R < 2 or n < 3 or not np.isfinite(a).all():
        return math.nan
    first = _half_masks(R, splits, np.random.default_rng(seed))
    h = R // 2
    mean_first = (first / h) @ a  # [S, n]: the half means, one row per split
    mean_second = (~first / (R - h)) @ a
    r = _rowwise(method, mean_first, mean_second)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return math.nan
    with np.errstate(divide="ignore"):  # r = -1 steps up to -inf, deliberately
        return float(np.mean(2.0 * r / (1.0 + r)))


def noise_ceiling(reliability: float) -> float:
    """√ρ_R: the correlation a perfect estimator reaches against this ground truth; NaN unless ρ_R > 0.

    A perfect estimator knows the noise-free effect s; under the classical model corr(s, mean of R replicates)
    = √ρ_R exactly for Pearson (and approximately for Spearman). No estimator is expected to score above it.
    """
    reliability = float(reliability)
    return math.sqrt(reliability) if reliability > 0 else math.nan  # NaN > 0 is False


def attenuation_corrected(r: float, reliability: float) -> float:
    """r / √ρ_R: Spearman's (1904) correction of a correlation for the unreliability of the ground truth.

    What r would be against the noise-free effect (the estimates are taken as they are: their own noise is part
    of what is judged). NaN when ρ_R <= 0 or either is NaN. Not clipped to [-1, 1]: with sampling error in r and
    in ρ_R the ratio can exceed 1, and clipping would hide that.
    """
    r, reliability = float(r), float(reliability)
    if math.isnan(r) or not reliability > 0:
        return math.nan
    return r / math.sqrt(reliability)


def permutation_test(x: ArrayLike, y: ArrayLike, *, method: str = "spearman", permutations: int = 1000,
                     seed: int = 0) -> tuple[float, float]:
    """(p, q95): how likely chance alone reaches the observed correlation of x with y.

    r_perm is the correlation of x with a random permutation of y (``permutations`` of them); the two-sided
    p-value is p = (1 + #{|r_perm| >= |r_obs|}) / (1 + permutations), the +1 counting the observed order itself
    (permutations that tie |r_obs| up to rounding, 1e-12 relative, count too), so p >= 1 / (1 + permutations).
    q95 is the 95% quantile of |r_perm|: the |correlation| chance alone exceeds 5% of the time for this n and
    these values. (NaN, NaN) when the observed correlation is undefined.
    """
    corr = _correlation(method)
    permutations = _positive("permutations", permutations)
    a, b = _pair(x, y)
    r_obs = corr(a, b)
    if math.isnan(r_obs):
        return (math.nan, math.nan)
    if method == "spearman":
        a, b = rankdata(a), rankdata(b)
    # Standardise once: a permutation keeps b's mean and norm, so each r_perm is one dot product.
    ua, ub = (a - a.mean()), (b - b.mean())
    ua, ub = ua / np.linalg.norm(ua), ub / np.linalg.norm(ub)
    rng = np.random.default_rng(seed)
    n = a.size
    block = max(1, _BLOCK_VALUES // n)
    null = np.empty(permutations)
    for start in range(0, permutations, block):
        stop = min(start + block, permutations)
        order = rng.permuted(np.tile(np.arange(n), (stop - start, 1)), axis=1)
        null[start:stop] = np.abs(ub[order] @ ua)
    hits = int(np.count_nonzero(null >= abs(r_obs) * (1.0 - 1e-12)))
    return ((1 + hits) / (1 + permutations), float(np.quantile(null, 0.95)))


def bootstrap_ci(estimate: ArrayLike, actuals: ArrayLike, *, method: str = "spearman", resamples: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of corr(estimate, actuals.mean(0)).

    Each resample draws n points with replacement and, when R > 1, R replicates with replacement; its ground
    truth is the mean over the drawn replicates, on the drawn points. So the interval holds both sources of
    uncertainty: which points were removed, and which noise the retraining happened to see. ``actuals`` [R, n],
    or [n] for one replicate (points only). Drawing replicates with replacement repeats some, which makes a
    resample's truth noisier than the mean of R distinct ones; for small R and a noisy truth the interval
    therefore leans low of the point estimate.

    Resamples whose correlation is undefined (a side made constant by the draw) are dropped; (NaN, NaN) when
    fewer than half survive, or when the correlation itself is undefined.
    """
    corr = _correlation(method)
    resamples = _positive("resamples", resamples)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); got {level}")
    est = _vector(estimate)
    act = _replicates(actuals, est.size)
    R, n = act.shape
    if math.isnan(corr(est, act.mean(axis=0))) or not np.isfinite(act).all():
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_VALUES // max(n, R))
    r = np.empty(resamples)
    for start in range(0, resamples, block):
        k = min(start + block, resamples) - start
        points = rng.integers(0, n, size=(k, n))
        if R > 1:
            drawn = rng.integers(0, R, size=(k, R))
            # weights[b, j]: the share of resample b's drawn replicates that are replicate j.
            weights = np.zeros((k, R))
            np.add.at(weights, (np.repeat(np.arange(k), R), drawn.ravel()), 1.0 / R)
            truth = np.take_along_axis(weights @ act, points, axis=1)
        else:
            truth = act[0][points]
        r[start:start + k] = _rowwise(method, est[points], truth)
    r = r[~np.isnan(r)]
    if 2 * r.size < resamples:
        return (math.nan, math.nan)
    lo, hi = np.quantile(r, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return (float(lo), float(hi))
