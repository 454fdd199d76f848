"""The fragility statistics of one configuration, in plain Python (no Ray, no store): `StatsBook` ingests
`influence` and `retrain` rows in any order and in any chunking and produces `stats` rows that equal a one-shot
computation over the same rows. Part of the science code (jobs/science.py): what a `stats` row means is
decided here; the coordinator (jobs/coordinator.py) only feeds it landed parts and writes its rows.
"""
from __future__ import annotations

import math
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from influence import reliability
from influence.metrics import PairAccumulator, spearman
from jobs.science import SCIENCE, stamp_of


@dataclass
class _Config:
    methods: tuple[str, ...]
    test_points: list[tuple[int, str]]
    degenerate_reason: str | None
    stationary: bool | None = None  # θ̂ within the configuration's grad_tol (None: no tolerance set)
    # (method, test point) -> the estimates, keyed by training point (the actual effects are set from
    # `actuals` when rows are computed)
    pairs: dict[tuple[str, int], PairAccumulator] = field(default_factory=dict)
    # test point -> replicate -> training point -> actual effect in that replicate
    actuals: dict[int, dict[int, dict[int, float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict)))
    predicted_dtheta: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    actual_dtheta: dict[int, float] = field(default_factory=dict)  # replicate 0's
    # test point -> (replicate, control) -> the control's retrained test loss
    controls: dict[int, dict[tuple[int, int], float]] = field(default_factory=lambda: defaultdict(dict))
    diverged: set[tuple[str, int]] = field(default_factory=set)  # (method, test point) whose solve diverged
    # Group removal: per group its members and mode and, per test point and replicate, its actual effect. A
    # group's estimate is the sum of its members' estimates (kept in `pairs`, keyed by training point).
    groups: dict[int, tuple[list[int], str]] = field(default_factory=dict)
    group_actuals: dict[int, dict[int, dict[int, float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict)))
    retrain_grad_norm: float = math.nan  # the largest ‖∇R‖₂ of any retrained model ingested
    truth: str | None = None  # the ground truth of the retrain rows ingested (None: rows from before it was recorded)
    # table -> the science stamps of the parts ingested (or, for models / test_points, registered) so far
    sources: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    snapshot: int = 0


class StatsBook:
    """Incremental statistics per (configuration, method, test point)."""

    def __init__(self) -> None:
        self._configs: dict[str, _Config] = {}

    def register(self, config_id: str, methods, test_points, degenerate_reason: str | None = None,
                 sources: dict[str, str | None] | None = None, stationary: bool | None = None) -> None:
        """`sources`: the science stamp of the models and test_points parts the configuration starts from;
        `stationary`: whether θ̂ met the configuration's gradient tolerance (None: none set)."""
        if config_id in self._configs:
            return
        c = _Config(tuple(methods), [(int(i), str(s)) for i, s in test_points], degenerate_reason, stationary)
        for table, stamp in (sources or {}).items():
            c.sources[table].add(stamp_of(stamp))
        for m in c.methods:
            for t, _ in c.test_points:
                c.pairs[(m, t)] = PairAccumulator()
        self._configs[config_id] = c

    def knows(self, config_id: str) -> bool:
        return config_id in self._configs

    def sources(self, config_id: str) -> dict[str, set[str]]:
        """table -> science stamps of what this configuration's statistics are computed from."""
        return {t: set(v) for t, v in self._configs[config_id].sources.items()}

    def ingest(self, table: str, config_id: str, rows: pa.Table) -> None:
        c = self._configs[config_id]
        cols = rows.to_pydict()
        c.sources[table].update(stamp_of(v) for v in set(cols["science"] if "science" in cols else [None]))
        if table == "influence":
            by_key: dict[tuple[str, int], tuple[list, list]] = defaultdict(lambda: ([], []))
            for m, t, i, e, p in zip(cols["method"], cols["test_idx"], cols["train_idx"], cols["estimate"],
                                     cols["predicted_dtheta"]):
                keys, vals = by_key[(m, t)]
                keys.append(i)
                vals.append(e)
                c.predicted_dtheta[m][i] = p
            for key, (keys, vals) in by_key.items():
                if key in c.pairs:
                    c.pairs[key].add_estimates(keys, vals)
            for m, t, d in zip(cols["method"], cols["test_idx"], cols.get("diverged") or [False] * rows.num_rows):
                if d:
                    c.diverged.add((m, t))
        elif table == "retrain":
            n = rows.num_rows
            modes, members = cols.get("mode") or [None] * n, cols.get("members") or [None] * n
            replicates = [0 if v is None else int(v) for v in cols.get("replicate") or [None] * n]
            c.truth = next((v for v in cols.get("ground_truth") or [] if v is not None), c.truth)
            norms = [v for v in cols.get("grad_norm") or [] if v is not None and not math.isnan(v)]
            if norms:
                c.retrain_grad_norm = max(norms) if math.isnan(c.retrain_grad_norm) else max(c.retrain_grad_norm,
                                                                                            *norms)
            for r, t, a, d, lr, mode, group, rep in zip(cols["removed"], cols["test_idx"], cols["actual"],
                                                        cols["dtheta"], cols["loss_retrained"], modes, members,
                                                        replicates):
                if r < 0:  # control -(k+1) of replicate rep
                    c.controls[t][(rep, -r - 1)] = lr
                    continue
                if mode in ("group", "random_group", "lds"):  # an LDS subset is a group: the points it leaves out
                    c.groups[r] = (list(group or []), mode)
                    c.group_actuals[t][rep][r] = a
                    continue
                c.actuals[t][rep][r] = a
                if rep == 0:
                    c.actual_dtheta[r] = d
        else:
            raise ValueError(f"the coordinator consumes influence and retrain parts, not {table!r}")

    def rows(self, config_id: str, *, final: bool) -> dict[str, list]:
        """The `stats` rows of one configuration as they stand now. The ground truth of a removal is the mean
        of its actual effect over the replicates landed; final rows also carry the permutation p-values,
        the null quantiles and the bootstrap intervals (running snapshots leave them NaN: they cost a
        thousand resamples per cell)."""
        c = self._configs[config_id]
        c.snapshot += 1
        out: dict[str, list] = defaultdict(list)
        for m in c.methods:
            dth = self._dtheta_spearman(c, m)
            # Top group g belongs to the g-th test point in ascending test_idx (the order the trial ranks in).
            order = {t: g for g, t in enumerate(sorted(t for t, _ in c.test_points))}
            for t, selection in c.test_points:
                position = order[t]
                if c.groups:
                    acc, matrix = self._group_pairs(c, m, t, position)
                else:
                    acc, matrix = self._pairs(c, m, t)
                s = acc.stats()
                controls = list(c.controls.get(t, {}).values())
                noise = float(np.std(controls, ddof=1)) if len(controls) >= 2 else math.nan
                actual_std = float(np.std(acc.pairs()[1], ddof=1)) if acc.n >= 2 else math.nan
                snr = actual_std / noise if noise > 0 else (math.inf if noise == 0 and actual_std > 0 else math.nan)
                out["snr"].append(snr)
                out["below_noise_floor"].append(bool(snr <= 1.0) if not math.isnan(snr) else None)
                group = self._group_summary(c, t, position)
                for k in ("group_actual", "random_group_mean", "random_group_std"):
                    out[k].append(group[k])
                out["method"].append(m)
                out["test_idx"].append(t)
                out["snapshot"].append(c.snapshot)
                out["n"].append(s["n"])
                for k in ("pearson", "spearman", "pearson_lo", "pearson_hi", "spearman_lo", "spearman_hi",
                          "sign_agreement", "top10_overlap"):
                    out[k].append(s[k])
                out["dtheta_spearman"].append(dth)
                out["noise_floor"].append(noise)
                out["actual_std"].append(actual_std)
                out["selection"].append(selection)
                out["final"].append(final)
                diverged = (m, t) in c.diverged
                out["collapsed"].append(c.degenerate_reason is not None)
                out["diverged"].append(diverged)
                out["degenerate_reason"].append(
                    c.degenerate_reason or (f"the {m} solve diverged for this test point" if diverged else None))
                out["science"].append(SCIENCE)
                out["science_inputs"].append(format_sources(c.sources))
                for k, v in trust(s, *matrix, final=final, seed=_seed(config_id, m, t)).items():
                    out[k].append(v)
                out["stationary"].append(c.stationary)
                out["retrain_grad_norm"].append(c.retrain_grad_norm)
                out["ground_truth"].append(c.truth)
        # A collapsed network (a constant predictor) or a diverged solve has no meaningful correlation: its rows
        # keep n, the noise floor and the reason, and carry NaN for every correlation, so that no mean can take
        # them in.
        for k, left_out in enumerate(a or b for a, b in zip(out["collapsed"], out["diverged"])):
            if left_out:
                for name in UNDEFINED_WHEN_LEFT_OUT:
                    out[name][k] = math.nan
                out["unreliable"][k] = out["chance"][k] = None
        return dict(out)

    @staticmethod
    def _pairs(c: _Config, method: str, t: int) -> tuple[PairAccumulator, tuple[np.ndarray, np.ndarray]]:
        """The (estimate, replicate-mean actual) pairs of one test point, and (estimates [n], actuals [R, n])
        over the points every landed replicate holds (what the reliability and the resamples use)."""
        acc = c.pairs[(method, t)]
        per_rep = c.actuals.get(t, {})
        return _with_means(acc, {i: [reps[i] for reps in per_rep.values() if i in reps]
                                 for i in set().union(*per_rep.values())} if per_rep else {}, per_rep)

    @staticmethod
    def _group_pairs(c: _Config, method: str, t: int, position: int):
        """(Σ members' estimates, actual) over the groups retrained so far, for test point t: its own top group
        and the random groups (another test point's top group is not about t, so it is left out)."""
        single = c.pairs[(method, t)]
        per_rep = {rep: {g: a for g, a in groups.items() if c.groups[g][1] != "group" or g == position}
                   for rep, groups in c.group_actuals.get(t, {}).items()}
        keys = sorted(set().union(*per_rep.values())) if per_rep else []
        acc = PairAccumulator()
        acc.add_estimates(keys, [sum(single.estimate(i) for i in c.groups[g][0]) for g in keys])
        return _with_means(acc, {g: [reps[g] for reps in per_rep.values() if g in reps] for g in keys}, per_rep)

    @staticmethod
    def _group_summary(c: _Config, t: int, position: int) -> dict[str, float]:
        nan = {"group_actual": math.nan, "random_group_mean": math.nan, "random_group_std": math.nan}
        if not c.groups or c.truth == "lds":
            return nan
        per_rep = c.group_actuals.get(t, {})
        actuals = {g: _mean([reps[g] for reps in per_rep.values() if g in reps])
                   for g in set().union(*per_rep.values())} if per_rep else {}
        rand = [a for g, a in actuals.items() if c.groups[g][1] == "random_group"]
        return {"group_actual": actuals.get(position, math.nan),
                "random_group_mean": float(np.mean(rand)) if rand else math.nan,
                "random_group_std": float(np.std(rand, ddof=1)) if len(rand) >= 2 else math.nan}

    @staticmethod
    def _dtheta_spearman(c: _Config, method: str) -> float:
        pred = c.predicted_dtheta.get(method, {})
        keys = sorted(set(pred) & set(c.actual_dtheta))
        if len(keys) < 3:
            return math.nan
        return spearman([pred[k] for k in keys], [c.actual_dtheta[k] for k in keys])


# The columns of a stats row that mean nothing for a collapsed network or a diverged solve (the reliability of
# the ground truth does not depend on the estimator, and stays).
UNDEFINED_WHEN_LEFT_OUT = ("pearson", "spearman", "pearson_lo", "pearson_hi", "spearman_lo", "spearman_hi",
                           "sign_agreement", "top10_overlap", "dtheta_spearman", "spearman_corrected",
                           "pearson_corrected", "spearman_p", "pearson_p", "spearman_null95", "pearson_null95",
                           "spearman_boot_lo", "spearman_boot_hi", "pearson_boot_lo", "pearson_boot_hi")

# Resamples behind the chance levels and the bootstrap intervals of a final row, and random splits behind
# a reliability.
PERMUTATIONS, RESAMPLES, SPLITS = 1000, 1000, 50


def _mean(values: list[float]) -> float:
    """The mean of a removal's replicates; one replicate is its own value, bit for bit."""
    return sum(values) / len(values)


def _with_means(acc: PairAccumulator, values: dict[int, list[float]], per_rep: dict[int, dict[int, float]]):
    """Set `acc`'s actual effects to the replicate means of `values` (key -> its replicates' effects); return
    it with (estimates [n], actuals [R, n]) over the keys every replicate holds."""
    keys = sorted(values)
    acc.add_actuals(keys, [_mean(values[k]) for k in keys])
    reps = sorted(per_rep)
    full = [k for k in acc.keys() if all(k in per_rep[r] for r in reps)]
    estimates = np.array([acc.estimate(k) for k in full], dtype=np.float64)
    actuals = np.array([[per_rep[r][k] for k in full] for r in reps], dtype=np.float64).reshape(len(reps), len(full))
    return acc, (estimates, actuals)


def _seed(config_id: str, method: str, test_idx: int) -> int:
    """The seed of a cell's resamples: the same cell gets the same numbers in every run."""
    return zlib.crc32(f"{config_id}/{method}/{test_idx}".encode())


def trust(s: dict, estimates: np.ndarray, actuals: np.ndarray, *, final: bool, seed: int) -> dict:
    """How far a cell's correlations can be trusted: the reliability of its ground truth (replicates >= 2),
    the ceiling and the corrected correlations; in final rows the chance levels and bootstrap intervals.
    `s`: the cell's correlations; `estimates` [n] and `actuals` [R, n]: the points every replicate holds."""
    R, n = actuals.shape
    nan = math.nan
    out = {"replicates": R, "reliability": nan, "reliability_pearson": nan, "ceiling": nan,
           "spearman_corrected": nan, "pearson_corrected": nan, "unreliable": None,
           "spearman_p": nan, "pearson_p": nan, "spearman_null95": nan, "pearson_null95": nan, "chance": None,
           "spearman_boot_lo": nan, "spearman_boot_hi": nan, "pearson_boot_lo": nan, "pearson_boot_hi": nan}
    if R >= 2:
        rel = reliability.split_half_reliability(actuals, method="spearman", splits=SPLITS, seed=seed)
        rel_p = reliability.split_half_reliability(actuals, method="pearson", splits=SPLITS, seed=seed)
        out |= {"reliability": rel, "reliability_pearson": rel_p, "ceiling": reliability.noise_ceiling(rel),
                "spearman_corrected": reliability.attenuation_corrected(s["spearman"], rel),
                "pearson_corrected": reliability.attenuation_corrected(s["pearson"], rel_p),
                "unreliable": None if math.isnan(rel) else bool(rel < reliability.UNRELIABLE_BELOW)}
    if final and n >= 3:
        truth = actuals.mean(axis=0)
        for method in ("spearman", "pearson"):
            p, q95 = reliability.permutation_test(estimates, truth, method=method, permutations=PERMUTATIONS,
                                                  seed=seed)
            lo, hi = reliability.bootstrap_ci(estimates, actuals, method=method, resamples=RESAMPLES, seed=seed)
            out |= {f"{method}_p": p, f"{method}_null95": q95, f"{method}_boot_lo": lo, f"{method}_boot_hi": hi}
        out["chance"] = None if math.isnan(out["spearman_p"]) else bool(out["spearman_p"] >= reliability.CHANCE_ALPHA)
    return out


def format_sources(sources: dict[str, set[str]]) -> str:
    """`models=abc;retrain=abc,def`: the stamps per table, in a fixed order."""
    return ";".join(f"{t}={','.join(sorted(v))}" for t, v in sorted(sources.items()) if v)


def parse_sources(text: str | None) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for item in (text or "").split(";"):
        if "=" in item:
            table, stamps = item.split("=", 1)
            out[table] = set(stamps.split(","))
    return out


def summarise(rows: dict[str, list]) -> dict[str, float]:
    """A few scalars of one configuration's stats rows, for Tune and the console."""
    out: dict[str, float] = {}
    sp = [v for v in rows.get("spearman", []) if v is not None and not math.isnan(v)]
    pe = [v for v in rows.get("pearson", []) if v is not None and not math.isnan(v)]
    out["spearman_mean"] = float(np.mean(sp)) if sp else math.nan
    out["pearson_mean"] = float(np.mean(pe)) if pe else math.nan
    out["pairs"] = float(sum(rows.get("n", [])))
    out["collapsed"] = float(any(rows.get("collapsed", [])))
    out["diverged"] = float(sum(bool(d) for d in rows.get("diverged", [])))
    for m, sel, s in zip(rows.get("method", []), rows.get("selection", []), rows.get("spearman", [])):
        out[f"spearman/{m}/{sel}"] = s
    return out
