"""The fragility statistics of one configuration, in plain Python (no Ray, no store): `StatsBook` ingests
`influence` and `retrain` rows in any order and in any chunking and produces `stats` rows that equal a one-shot
computation over the same rows. Part of the science code (jobs/science.py): what a `stats` row means is
decided here; the coordinator (jobs/coordinator.py) only feeds it landed parts and writes its rows.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from influence.metrics import PairAccumulator, spearman
from jobs.science import SCIENCE, stamp_of


@dataclass
class _Config:
    methods: tuple[str, ...]
    test_points: list[tuple[int, str]]
    degenerate_reason: str | None
    pairs: dict[tuple[str, int], PairAccumulator] = field(default_factory=dict)
    predicted_dtheta: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    actual_dtheta: dict[int, float] = field(default_factory=dict)
    controls: dict[int, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    diverged: set[tuple[str, int]] = field(default_factory=set)  # (method, test point) whose solve diverged
    # Group removal: per group its members and mode and, per test point, its actual effect. A group's estimate
    # is the sum of its members' estimates (kept in `pairs`, keyed by training point).
    groups: dict[int, tuple[list[int], str]] = field(default_factory=dict)
    group_actuals: dict[int, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    # table -> the science stamps of the parts ingested (or, for models / test_points, registered) so far
    sources: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    snapshot: int = 0


class StatsBook:
    """Incremental statistics per (configuration, method, test point)."""

    def __init__(self) -> None:
        self._configs: dict[str, _Config] = {}

    def register(self, config_id: str, methods, test_points, degenerate_reason: str | None = None,
                 sources: dict[str, str | None] | None = None) -> None:
        """`sources`: the science stamp of the models and test_points parts the configuration starts from."""
        if config_id in self._configs:
            return
        c = _Config(tuple(methods), [(int(i), str(s)) for i, s in test_points], degenerate_reason)
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
            by_test: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
            n = rows.num_rows
            modes, members = cols.get("mode") or [None] * n, cols.get("members") or [None] * n
            for r, t, a, d, lr, mode, group in zip(cols["removed"], cols["test_idx"], cols["actual"], cols["dtheta"],
                                                   cols["loss_retrained"], modes, members):
                if r < 0:  # control replicate -(k+1)
                    c.controls[t][-r - 1] = lr
                    continue
                if mode in ("group", "random_group"):
                    c.groups[r] = (list(group or []), mode)
                    c.group_actuals[t][r] = a
                    continue
                keys, vals = by_test[t]
                keys.append(r)
                vals.append(a)
                c.actual_dtheta[r] = d
            for t, (keys, vals) in by_test.items():
                for m in c.methods:
                    if (m, t) in c.pairs:
                        c.pairs[(m, t)].add_actuals(keys, vals)
        else:
            raise ValueError(f"the coordinator consumes influence and retrain parts, not {table!r}")

    def rows(self, config_id: str, *, final: bool) -> dict[str, list]:
        """The `stats` rows of one configuration as they stand now."""
        c = self._configs[config_id]
        c.snapshot += 1
        out: dict[str, list] = defaultdict(list)
        for m in c.methods:
            dth = self._dtheta_spearman(c, m)
            # Top group g belongs to the g-th test point in ascending test_idx (the order the trial ranks in).
            order = {t: g for g, t in enumerate(sorted(t for t, _ in c.test_points))}
            for t, selection in c.test_points:
                position = order[t]
                acc = self._group_pairs(c, m, t, position) if c.groups else c.pairs[(m, t)]
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
        # A collapsed network (a constant predictor) or a diverged solve has no meaningful correlation: its rows
        # keep n, the noise floor and the reason, and carry NaN for every correlation, so that no mean can take
        # them in.
        for k, left_out in enumerate(a or b for a, b in zip(out["collapsed"], out["diverged"])):
            if left_out:
                for name in UNDEFINED_WHEN_LEFT_OUT:
                    out[name][k] = math.nan
        return dict(out)

    @staticmethod
    def _group_pairs(c: _Config, method: str, t: int, position: int) -> PairAccumulator:
        """(Σ members' estimates, actual) over the groups retrained so far, for test point t: its own top group
        and the random groups (another test point's top group is not about t, so it is left out)."""
        acc = PairAccumulator()
        single = c.pairs[(method, t)]
        keys, sums, actuals = [], [], []
        for g, a in c.group_actuals.get(t, {}).items():
            members, mode = c.groups[g]
            if mode == "group" and g != position:
                continue
            keys.append(g)
            sums.append(sum(single.estimate(i) for i in members))
            actuals.append(a)
        acc.add_estimates(keys, sums)
        acc.add_actuals(keys, actuals)
        return acc

    @staticmethod
    def _group_summary(c: _Config, t: int, position: int) -> dict[str, float]:
        nan = {"group_actual": math.nan, "random_group_mean": math.nan, "random_group_std": math.nan}
        if not c.groups:
            return nan
        actuals = c.group_actuals.get(t, {})
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


# The columns of a stats row that mean nothing for a collapsed network or a diverged solve.
UNDEFINED_WHEN_LEFT_OUT = ("pearson", "spearman", "pearson_lo", "pearson_hi", "spearman_lo", "spearman_hi",
                           "sign_agreement", "top10_overlap", "dtheta_spearman")


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
