"""The paper's four findings, tested on the stored cells: one ``Finding`` per question and method, each an
effect with a 95% bootstrap interval and a verdict on the paper's claim.

A cell is one final ``stats`` row (a configuration, a method, a test point). Cells whose network collapsed,
whose solve diverged or whose Spearman is undefined are left out of every statistic and counted
(``left_out``). The questions (Basu, Pope & Feizi 2021; /work/shared/PAPER.md, "What is measured"):

(i)   ``depth``, ``width``: the OLS slope of Spearman ρ against the axis over MLP cells, within groups that
      hold every other swept axis and the test-point selection fixed (fixed effects: ρ and the axis are centred
      per group, so a width sweep at depth 1 does not pose as a depth effect), pooled over those groups; and
      where weight decay is swept, the same slope within each weight decay (``within``). The paper: ρ falls
      with depth and with width (Iris, width 8→50: ≈0.82→0.56). Holds if the CI lies below 0.
(ii)  ``weight_decay``: mean ρ with weight decay > 0 minus mean ρ without, paired by every other swept axis,
      the seed and the selection where such pairs exist, else pooled. The paper: weight decay helps (Iris ≈0.97
      vs ≈0.5). Holds if the CI lies above 0.
(iii) ``spread``: the interquartile range of ρ across the test points of a configuration (configurations with
      at least 4 defined cells), its median over configurations, against the IQR that sampling noise alone
      would give (1.349·σ, σ from each cell's own 95% interval): holds if the CI lies above it.
      ``covariate_<c>``: the Spearman correlation between a cell's ρ and its test point's covariate c (loss,
      margin, grad_norm, self_influence, misclassified), both ranked within their configuration and the
      centred ranks pooled; ``spread_driver`` names the covariate with the largest |correlation|.
      ``highest_vs_median``: mean ρ of the highest-loss test points minus that of the median-loss ones, per
      configuration; the paper: highest-loss points fare better.
(iv)  ``group``: the test-loss change of removing a test point's top-k group by estimate minus the mean change
      of random groups of k, and the share of cells whose top group beats every random group.

Intervals: percentile bootstrap, ``RESAMPLES`` resamples from a seed fixed per (finding, method), so a report
is reproducible. Slopes resample seeds (clusters: every cell of a drawn seed) when there are >= 2 seeds, else
cells within each axis value; differences resample pairs (or cells within each arm); configuration-level
statistics resample configurations. Every finding carries the mean noise ceiling and chance level |ρ| of its
cells, and how many of them are unreliable or at chance, so an effect can be read against both.
How findings read (a sentence each, the table, the Markdown file) is in ``jobs/findings_text.py``.
"""
from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["COVARIATES", "QUESTIONS", "RESAMPLES", "Finding", "cells", "findings"]

RESAMPLES = 2000
_SEED = 20210503  # the base seed of every bootstrap; each finding adds crc32(name/method)
COVARIATES = ("loss", "margin", "grad_norm", "self_influence", "misclassified")
# Every question, by finding name, and what a store needs to answer it (said where a finding is omitted).
QUESTIONS = {
    "depth": "MLP configurations at two or more depths with everything else equal",
    "width": "MLP configurations at two or more widths with everything else equal",
    "weight_decay": "configurations with and without weight decay",
    "spread": "a configuration with at least 4 defined cells (test points)",
    "covariate": "configurations with at least 3 defined cells whose test points carry covariates",
    "highest_vs_median": "configurations with both a highest-loss and a median-loss test point",
    "group": "group removals (stats rows with group_actual)",
}
MIN_CELLS = 4  # fewer informative cells than this: the verdict is "cannot tell"
SPREAD_MIN_CELLS = 4  # a configuration's IQR needs this many defined cells
_IQR_PER_SD = 1.349  # the IQR of a normal distribution in units of its standard deviation
_Z95 = 2 * 1.959964  # width of a 95% normal interval in standard deviations


@dataclass(frozen=True)
class Finding:
    """One question for one method: ``effect`` with its 95% interval [``lo``, ``hi``] over ``n_cells`` cells
    (``left_out`` cells of its domain were collapsed, diverged or undefined). ``holds``: whether ``statement``
    (the paper's claim) holds by the interval; None when the interval includes the no-effect value or there
    are too few cells. ``ceiling``: the mean noise ceiling √reliability of the cells (NaN: one replicate);
    ``null95``: their mean 95% chance level of |ρ|; ``chance_share``: the share of cells at chance, of those
    tested; ``unreliable``/``at_chance``: how many cells."""

    name: str
    statement: str
    method: str
    effect: float
    lo: float
    hi: float
    n_cells: int
    left_out: int
    ceiling: float
    null95: float
    chance_share: float
    holds: bool | None
    detail: str
    unreliable: int = 0
    at_chance: int = 0
    unit: str = ""  # what one unit of effect is ("per layer"), for the sentence
    within: str = ""  # the subset of cells when not all of them ("weight decay 0.005"), else empty


# ---- the cells -----------------------------------------------------------------------------------------------

_CELL_COLUMNS = ("spearman", "spearman_lo", "spearman_hi", "spearman_boot_lo", "spearman_boot_hi", "ceiling",
                 "spearman_null95", "chance", "unreliable", "spearman_corrected", "group_actual",
                 "random_group_mean", "random_group_std", "replicates")


# The test points' covariates (tp) and each method's self-influence per test point (inf), as SQL `with` tables.
COVARIATE_TABLES = """with tp as (select config_id, test_idx, any_value(loss) as loss, any_value(margin) as margin,
                           any_value(grad_norm) as grad_norm, any_value(misclassified::int) as misclassified
                    from test_points group by all),
             inf as (select config_id, method, test_idx, max(self_influence) as self_influence
                     from influence where self_influence is not null and not isnan(self_influence) group by all)"""


def cells(con) -> tuple[list[dict], list[str]]:
    """(every final stats row as a dict, the swept axes of the store). A cell holds its stats columns, its
    configuration's columns (model, dataset, depth, width, weight_decay, seed and every swept axis, under
    ``axes``), its test point's covariates and this method's self-influence, and ``left_out``: None, or
    "collapsed" / "diverged" / "undefined" (a NaN or null Spearman)."""
    from jobs.report import (  # jobs.report may import this module
        COLLAPSED,
        DIVERGED,
        varying_axes,
    )

    axes = [a for a in varying_axes(con) if a != "seed"]
    base = ("model", "dataset", "depth", "width", "weight_decay", "seed", "methods")
    config_cols = list(dict.fromkeys(base + tuple(axes)))
    select = ", ".join([f"s.{c}" for c in _CELL_COLUMNS]
                       + [f'c."{c}" as "cfg_{c}"' for c in config_cols]
                       + [f"tp.{c}" for c in ("loss", "margin", "grad_norm", "misclassified")])
    rows = con.sql(f"""
        {COVARIATE_TABLES}
        select s.config_id, s.method, s.test_idx, s.selection, {select}, inf.self_influence,
               {COLLAPSED} as is_collapsed, {DIVERGED} as is_diverged
        from stats s join configs c on c.config_id = s.config_id
             left join tp on tp.config_id = s.config_id and tp.test_idx = s.test_idx
             left join inf on inf.config_id = s.config_id and inf.method = s.method and inf.test_idx = s.test_idx
        where s.final
        order by s.config_id, s.method, s.test_idx""")
    names = rows.columns
    out = []
    for values in rows.fetchall():
        r = dict(zip(names, values))
        for c in config_cols:
            r[c] = r.pop(f"cfg_{c}")
        r["axes"] = {a: r[a] for a in axes}
        r["left_out"] = ("collapsed" if r.pop("is_collapsed") else "diverged" if r.pop("is_diverged", False)
                         else "undefined" if not _finite(r["spearman"]) else None)
        r.pop("is_diverged", None)
        out.append(r)
    return out, axes


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def method_order(rows: list[dict]) -> list[str]:
    """The methods as the configurations list them (the first one ranks removals), then any others."""
    listed = [m for r in rows for m in (r.get("methods") or "").split(",") if m]
    seen = {r["method"] for r in rows}
    return [m for m in dict.fromkeys(listed) if m in seen] + sorted(seen - set(listed))


# ---- bootstrap helpers ---------------------------------------------------------------------------------------

def _rng(name: str, method: str) -> np.random.Generator:
    return np.random.default_rng(_SEED + zlib.crc32(f"{name}/{method}".encode()))


def _percentile_ci(samples: list[float]) -> tuple[float, float]:
    finite = np.asarray([s for s in samples if _finite(s)], dtype=float)
    if len(finite) < max(20, len(samples) // 2):  # most resamples undefined: no interval worth the name
        return math.nan, math.nan
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def _cluster_boot(stat: Callable[[np.ndarray], float], clusters: Sequence, rng) -> tuple[float, float]:
    """Resample whole clusters (lists of row indices) with replacement; ``stat`` takes the concatenated rows."""
    clusters = [np.asarray(c, dtype=int) for c in clusters]
    k = len(clusters)
    if k < 2:
        return math.nan, math.nan
    samples = []
    for _ in range(RESAMPLES):
        pick = rng.integers(0, k, size=k)
        samples.append(stat(np.concatenate([clusters[i] for i in pick])))
    return _percentile_ci(samples)


def _strata_boot(stat: Callable[[np.ndarray], float], strata: Sequence, rng) -> tuple[float, float]:
    """Resample rows with replacement within each stratum (a list of row indices), keeping its size."""
    strata = [np.asarray(s, dtype=int) for s in strata if len(s)]
    if sum(len(s) for s in strata) < 2:
        return math.nan, math.nan
    samples = []
    for _ in range(RESAMPLES):
        samples.append(stat(np.concatenate([s[rng.integers(0, len(s), size=len(s))] for s in strata])))
    return _percentile_ci(samples)


def _fe_slope(x: np.ndarray, y: np.ndarray, group: np.ndarray) -> float:
    """OLS slope of y on x with one intercept per group: Σ dx·dy / Σ dx², d = deviation from the group mean."""
    if len(x) < 2:
        return math.nan
    count = np.bincount(group)
    safe = np.maximum(count, 1)
    dx = x - (np.bincount(group, x) / safe)[group]
    dy = y - (np.bincount(group, y) / safe)[group]
    sxx = float(dx @ dx)
    return float(dx @ dy) / sxx if sxx > 1e-12 * max(1.0, float(x @ x)) else math.nan


def _codes(keys: Sequence) -> np.ndarray:
    index: dict = {}
    return np.asarray([index.setdefault(k, len(index)) for k in keys], dtype=int)


def _verdict(lo: float, hi: float, n: int, *, claim_positive: bool) -> bool | None:
    """The claim "effect > 0" (or "< 0"): holds when the interval excludes 0 on its side, fails on the other."""
    if n < MIN_CELLS or not (_finite(lo) and _finite(hi)):
        return None
    if (lo > 0) if claim_positive else (hi < 0):
        return True
    if (hi < 0) if claim_positive else (lo > 0):
        return False
    return None


def _trust(used: list[dict]) -> dict:
    """Mean ceiling and chance level of the cells, the share and count at chance, the count unreliable."""
    def mean(key):
        v = [r[key] for r in used if _finite(r.get(key))]
        return float(np.mean(v)) if v else math.nan

    tested = [r["chance"] for r in used if r.get("chance") is not None]
    return {"ceiling": mean("ceiling"), "null95": mean("spearman_null95"),
            "chance_share": float(np.mean(tested)) if tested else math.nan,
            "at_chance": int(sum(tested)), "unreliable": int(sum(bool(r.get("unreliable")) for r in used))}


def _left(domain: list[dict]) -> tuple[int, str]:
    reasons = defaultdict(int)
    for r in domain:
        if r["left_out"]:
            reasons[r["left_out"]] += 1
    text = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
    return sum(reasons.values()), (f"left out: {text}" if text else "none left out")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2g}"
    return str(v)


def _axes_text(axes: Sequence[str]) -> str:
    return ", ".join(a.replace("_", " ") for a in axes) or "nothing else"


# ---- (i) depth and width ---------------------------------------------------------------------------------------

def _slope_finding(rows: list[dict], axes: list[str], method: str, axis: str,
                   weight_decay: float | None = None) -> Finding | None:
    """The slope over every MLP cell, or (``weight_decay`` given) over the cells of that weight decay only."""
    domain = [r for r in rows if r["method"] == method and r.get("model") == "mlp" and r.get(axis) is not None
              and (weight_decay is None or r.get("weight_decay") == weight_decay)]
    used = [r for r in domain if not r["left_out"]]
    if len({r[axis] for r in used}) < 2:
        return None
    held = [a for a in axes if a not in (axis, "model")] + ["selection"]
    group = _codes([tuple(r["axes"].get(a) if a != "selection" else r["selection"] for a in held) for r in used])
    x = np.asarray([float(r[axis]) for r in used])
    y = np.asarray([float(r["spearman"]) for r in used])
    # Only groups in which the axis varies inform the slope; the others are reported, not counted.
    values_in = defaultdict(set)
    for g, v in zip(group.tolist(), x.tolist()):
        values_in[g].add(v)
    informative = np.asarray([len(values_in[g]) > 1 for g in group.tolist()])
    if not informative.any():
        return None
    x, y, group = x[informative], y[informative], _codes(group[informative].tolist())
    used = [r for r, keep in zip(used, informative) if keep]
    slope = _fe_slope(x, y, group)
    seeds = [r.get("seed") for r in used]
    rng = _rng(axis if weight_decay is None else f"{axis}/wd={weight_decay!r}", method)
    stat = lambda idx: _fe_slope(x[idx], y[idx], group[idx])
    if len(set(seeds)) >= 2:
        by_seed = defaultdict(list)
        for j, s in enumerate(seeds):
            by_seed[s].append(j)
        lo, hi = _cluster_boot(stat, list(by_seed.values()), rng)
        how = f"cluster bootstrap over {len(by_seed)} seeds" + (
            " (few clusters: the interval is rough)" if len(by_seed) < 5 else "")
    else:
        strata = defaultdict(list)
        for j, key in enumerate(zip(group.tolist(), x.tolist())):
            strata[key].append(j)
        lo, hi = _strata_boot(stat, list(strata.values()), rng)
        how = f"bootstrap over test points within each {axis} (one seed)"
    n_left, left_text = _left(domain)
    unit = "per layer" if axis == "depth" else "per unit of width"
    values = sorted({int(v) if float(v).is_integer() else float(v) for v in x})
    detail = (f"OLS slope of Spearman on {axis} ({_fmt(values[0])}..{_fmt(values[-1])}) over MLP cells, within "
              f"{len(set(group.tolist()))} group(s) of equal {_axes_text(held)} (fixed effects), pooled over "
              f"them; {how}; {left_text}; "
              f"{len([r for r in domain if not r['left_out']]) - len(used)} cell(s) in groups without {axis} "
              f"variation not counted")
    claim = {"depth": "Spearman falls with depth (the paper's finding (i))",
             "width": "Spearman falls with width (the paper: Iris width 8→50, ≈0.82→0.56)"}[axis]
    within = "" if weight_decay is None else f"weight decay {float(weight_decay):g}"
    return Finding(axis, claim, method, slope, lo, hi, len(used), n_left, holds=_verdict(
        lo, hi, len(used), claim_positive=False), detail=detail, unit=unit, within=within, **_trust(used))


# ---- (ii) weight decay ---------------------------------------------------------------------------------------

def _weight_decay_finding(rows: list[dict], axes: list[str], method: str) -> Finding | None:
    domain = [r for r in rows if r["method"] == method and r.get("weight_decay") is not None]
    used = [r for r in domain if not r["left_out"]]
    on = [r for r in used if r["weight_decay"] > 0]
    off = [r for r in used if r["weight_decay"] == 0]
    if not on or not off:
        return None
    held = [a for a in axes if a != "weight_decay"]
    key = lambda r: (tuple(r["axes"].get(a) for a in held), r.get("seed"), r["selection"])
    arms: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in used:
        arms[key(r)][0 if r["weight_decay"] > 0 else 1].append(float(r["spearman"]))
    pairs = [np.mean(a) - np.mean(b) for a, b in arms.values() if a and b]
    rng = _rng("weight_decay", method)
    if len(pairs) >= 2:
        d = np.asarray(pairs)
        effect = float(d.mean())
        lo, hi = _strata_boot(lambda idx: float(d[idx].mean()), [range(len(d))], rng)
        paired = {k for k, (a, b) in arms.items() if a and b}
        used = [r for r in used if key(r) in paired]
        how = (f"mean of {len(d)} paired differences (pairs of equal {_axes_text(held + ['seed', 'selection'])}); "
               f"bootstrap over pairs")
    else:
        y_on, y_off = np.asarray([r["spearman"] for r in on]), np.asarray([r["spearman"] for r in off])
        y = np.concatenate([y_on, y_off])
        flag = np.r_[np.ones(len(y_on), bool), np.zeros(len(y_off), bool)]
        effect = float(y_on.mean() - y_off.mean())
        lo, hi = _strata_boot(lambda idx: float(y[idx][flag[idx]].mean() - y[idx][~flag[idx]].mean()),
                              [np.flatnonzero(flag), np.flatnonzero(~flag)], rng)
        how = "no cells pair up: pooled means, bootstrap within each arm"
    n_left, left_text = _left(domain)
    values = sorted({r["weight_decay"] for r in used if r["weight_decay"] > 0})
    detail = (f"mean Spearman with weight decay {', '.join(_fmt(float(v)) for v in values)} minus without "
              f"({len(on)} vs {len(off)} cells); {how}; {left_text}")
    return Finding("weight_decay", "weight decay raises Spearman (the paper: Iris ≈0.97 with, ≈0.5 without)",
                   method, effect, lo, hi, len(used), n_left, holds=_verdict(lo, hi, len(used), claim_positive=True),
                   detail=detail, **_trust(used))


# ---- (iii) spread across test points, its covariates, highest vs median loss ---------------------------------

def _cell_sd(r: dict) -> float:
    """A cell's sampling standard deviation of ρ, from its bootstrap interval or else its Fisher interval."""
    for lo, hi in (("spearman_boot_lo", "spearman_boot_hi"), ("spearman_lo", "spearman_hi")):
        if _finite(r.get(lo)) and _finite(r.get(hi)):
            return (r[hi] - r[lo]) / _Z95
    return math.nan


def _by_config(used: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in used:
        out[r["config_id"]].append(r)
    return out


def _spread_finding(rows: list[dict], method: str) -> Finding | None:
    domain = [r for r in rows if r["method"] == method]
    groups = {c: rs for c, rs in _by_config([r for r in domain if not r["left_out"]]).items()
              if len(rs) >= SPREAD_MIN_CELLS}
    if not groups:
        return None
    iqr = np.asarray([np.subtract(*np.percentile([r["spearman"] for r in rs], [75, 25])) for rs in groups.values()])
    noise = [math.sqrt(np.mean([_cell_sd(r) ** 2 for r in rs])) * _IQR_PER_SD for rs in groups.values()]
    noise = [v for v in noise if _finite(v)]
    noise_iqr = float(np.median(noise)) if noise else math.nan
    effect = float(np.median(iqr))
    lo, hi = _strata_boot(lambda idx: float(np.median(iqr[idx])), [range(len(iqr))], _rng("spread", method))
    used = [r for rs in groups.values() for r in rs]
    holds = None
    if len(groups) >= 2 and _finite(noise_iqr) and _finite(lo):
        holds = True if lo > noise_iqr else (False if hi < noise_iqr else None)
    n_left, left_text = _left(domain)
    detail = (f"median over {len(groups)} configuration(s) of the IQR of Spearman across their test points "
              f"(>= {SPREAD_MIN_CELLS} defined cells each; IQRs range {_fmt(float(iqr.min()))}.."
              f"{_fmt(float(iqr.max()))}); sampling noise alone: IQR {_fmt(noise_iqr)} (1.349 σ, σ from each "
              f"cell's 95% interval); bootstrap over configurations; {left_text}")
    return Finding("spread", "Spearman varies between test points by more than its sampling noise "
                   "(the paper's finding (iii))", method, effect, lo, hi, len(used), n_left, holds=holds,
                   detail=detail, unit=f"against {_fmt(noise_iqr)} from sampling noise alone", **_trust(used))


def _centred_ranks(values: Sequence[float]) -> np.ndarray:
    from scipy.stats import rankdata

    ranks = rankdata(np.asarray(values, dtype=float))
    return ranks - ranks.mean()


def _pooled_corr(a: np.ndarray, b: np.ndarray) -> float:
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else math.nan


def _covariate_findings(rows: list[dict], method: str) -> list[Finding]:
    domain = [r for r in rows if r["method"] == method]
    n_left, left_text = _left(domain)
    out = []
    for cov in COVARIATES:
        groups = []
        for rs in _by_config([r for r in domain if not r["left_out"] and _finite(r.get(cov))]).values():
            y = [float(r["spearman"]) for r in rs]
            x = [float(r[cov]) for r in rs]
            if len(rs) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
                groups.append((rs, _centred_ranks(y), _centred_ranks(x)))
        if not groups:
            continue
        ry = [g[1] for g in groups]
        rx = [g[2] for g in groups]
        effect = _pooled_corr(np.concatenate(ry), np.concatenate(rx))
        lo, hi = _cluster_boot(lambda idx, ry=ry, rx=rx: _pooled_corr(np.concatenate([ry[i] for i in idx]),
                                                                      np.concatenate([rx[i] for i in idx])),
                               [[i] for i in range(len(groups))], _rng(f"covariate_{cov}", method))
        used = [r for g in groups for r in g[0]]
        holds = None if len(used) < MIN_CELLS or not _finite(lo) else (True if lo > 0 or hi < 0 else None)
        detail = (f"Spearman of the cell's Spearman with its test point's {cov}, both ranked within their "
                  f"configuration and pooled over {len(groups)} configuration(s) (>= 3 cells, {cov} not "
                  f"constant); bootstrap over configurations; {left_text}")
        out.append(Finding(f"covariate_{cov}", f"Spearman varies with the test point's {cov} within a configuration",
                           method, effect, lo, hi, len(used), n_left, holds=holds, detail=detail, **_trust(used)))
    ranked = [f for f in out if _finite(f.effect)]
    if ranked:
        top = max(ranked, key=lambda f: abs(f.effect))
        others = "; ".join(f"{f.name.removeprefix('covariate_')} {_fmt(f.effect)}" for f in ranked)
        cov = top.name.removeprefix("covariate_")
        out.append(Finding("spread_driver", f"the covariate that goes with most of the spread is {cov}", method,
                           top.effect, top.lo, top.hi, top.n_cells, top.left_out, top.ceiling, top.null95,
                           top.chance_share, top.holds, f"within-configuration correlations: {others}",
                           top.unreliable, top.at_chance))
    return out


def _highest_vs_median(rows: list[dict], method: str) -> Finding | None:
    domain = [r for r in rows if r["method"] == method and r["selection"] in ("highest", "median")]
    diffs, used = [], []
    for rs in _by_config([r for r in domain if not r["left_out"]]).values():
        high = [r["spearman"] for r in rs if r["selection"] == "highest"]
        mid = [r["spearman"] for r in rs if r["selection"] == "median"]
        if high and mid:
            diffs.append(float(np.mean(high) - np.mean(mid)))
            used += rs
    if not diffs:
        return None
    d = np.asarray(diffs)
    lo, hi = _strata_boot(lambda idx: float(d[idx].mean()), [range(len(d))], _rng("highest_vs_median", method))
    n_left, left_text = _left(domain)
    detail = (f"per configuration, mean Spearman of its highest-loss test points minus its median-loss ones; mean "
              f"over {len(d)} configuration(s), bootstrap over configurations; {left_text}")
    return Finding("highest_vs_median", "highest-loss test points have higher Spearman than median-loss ones "
                   "(the paper's finding (iii))", method, float(d.mean()), lo, hi, len(used), n_left,
                   holds=_verdict(lo, hi, len(used), claim_positive=True) if len(d) >= 2 else None,
                   detail=detail, **_trust(used))


# ---- (iv) group removal ----------------------------------------------------------------------------------------

def _random_group_max(con) -> dict[tuple[str, int], float]:
    """(config_id, test_idx) -> the largest replicate-mean test-loss change of any random group."""
    rows = con.sql("""
        select config_id, test_idx, max(actual) from (
            select config_id, test_idx, removed, avg(actual) as actual from retrain
            where mode = 'random_group' and removed >= 0 and actual is not null and not isnan(actual)
            group by all)
        group by all""").fetchall()
    return {(c, t): m for c, t, m in rows}


def _group_finding(rows: list[dict], method: str, beats: dict) -> Finding | None:
    domain = [r for r in rows if r["method"] == method and _finite(r.get("group_actual"))]
    used = [r for r in domain if r["left_out"] not in ("collapsed", "diverged") and _finite(r["random_group_mean"])]
    if not used:
        return None
    d = np.asarray([r["group_actual"] - r["random_group_mean"] for r in used])
    lo, hi = _strata_boot(lambda idx: float(d[idx].mean()), [range(len(d))], _rng("group", method))
    z = [(r["group_actual"] - r["random_group_mean"]) / r["random_group_std"] for r in used
         if _finite(r.get("random_group_std")) and r["random_group_std"] > 0]
    compared = [r["group_actual"] > beats[(r["config_id"], r["test_idx"])] for r in used
                if (r["config_id"], r["test_idx"]) in beats]
    share = f"{sum(compared)} of {len(compared)}" if compared else "n/a (no random-group retrain rows)"
    left = [r for r in domain if r["left_out"] in ("collapsed", "diverged")]
    n_left, left_text = _left(left)
    detail = (f"mean over {len(d)} cell(s) of the top group's test-loss change minus the random groups' mean; "
              f"mean z (in random-group standard deviations) {_fmt(float(np.mean(z))) if z else 'n/a'}; the top "
              f"group beats every random group in {share} cell(s); bootstrap over cells; {left_text}. The paper's "
              f"(iv): at ImageNet scale estimates are nearly uncorrelated, i.e. expect this not to hold there")
    return Finding("group", "removing the top-k points by estimate raises the test loss more than k random points",
                   method, float(d.mean()), lo, hi, len(used), n_left, holds=_verdict(lo, hi, len(used),
                   claim_positive=True), detail=detail, unit=f"(top group beats all random groups: {share})",
                   **_trust(used))


# ---- all of them -------------------------------------------------------------------------------------------------

def findings(con) -> list[Finding]:
    """Every finding that the store can answer, per method (in the configurations' order): depth, width,
    weight_decay, spread, covariate_<c> and spread_driver, highest_vs_median, group. A question the store cannot
    answer (no depth variation, no weight decay contrast, no groups) is omitted."""
    rows, axes = cells(con)
    if not rows:
        return []
    beats = _random_group_max(con) if any(_finite(r.get("group_actual")) for r in rows) else {}
    out: list[Finding] = []
    # With and without weight decay the networks differ in kind (the paper's finding ii); a slope pooled over
    # both can cancel out, so each weight decay also gets its own.
    decays = sorted({r["weight_decay"] for r in rows if r.get("weight_decay") is not None}, reverse=True)
    per_decay = decays if "weight_decay" in axes and len(decays) > 1 else []
    for method in method_order(rows):
        slopes = [_slope_finding(rows, axes, method, axis, wd) for axis in ("depth", "width")
                  for wd in [None, *per_decay]]
        for f in (*slopes, _weight_decay_finding(rows, axes, method), _spread_finding(rows, method)):
            if f is not None:
                out.append(f)
        out += _covariate_findings(rows, method)
        for f in (_highest_vs_median(rows, method), _group_finding(rows, method, beats)):
            if f is not None:
                out.append(f)
    return out
