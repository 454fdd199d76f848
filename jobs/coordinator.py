"""The coordinator: consumes landed parts and keeps the fragility statistics up to date.

`StatsBook` is the plain-Python core (testable without Ray): it ingests `influence` and `retrain` parts in
any order and in any chunking, and produces `stats` rows that equal a one-shot computation over the same
rows. `Coordinator` is the thin Ray actor around it that also writes the snapshots and counts progress.

A configuration's statistics live in one part that is replaced as results arrive: `running` while the
configuration is in progress, `final` (with final = true) once every task landed. The `final` part is what
resume looks for, and what `stats` queries see for a finished configuration.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from influence.metrics import PairAccumulator, spearman
from storage import tables
from storage.ledger import Ledger
from storage.uri import Store

RUNNING_PART = "running"
FINAL_PART = "final"
TASK_KINDS = ("train", "influence", "retrain")


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
    snapshot: int = 0


class StatsBook:
    """Incremental statistics per (configuration, method, test point)."""

    def __init__(self) -> None:
        self._configs: dict[str, _Config] = {}

    def register(self, config_id: str, methods, test_points, degenerate_reason: str | None = None) -> None:
        if config_id in self._configs:
            return
        c = _Config(tuple(methods), [(int(i), str(s)) for i, s in test_points], degenerate_reason)
        for m in c.methods:
            for t, _ in c.test_points:
                c.pairs[(m, t)] = PairAccumulator()
        self._configs[config_id] = c

    def knows(self, config_id: str) -> bool:
        return config_id in self._configs

    def ingest(self, table: str, config_id: str, rows: pa.Table) -> None:
        c = self._configs[config_id]
        cols = rows.to_pydict()
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
                out["degenerate_reason"].append(
                    c.degenerate_reason or (f"the {m} solve diverged for this test point" if (m, t) in c.diverged else None))
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


def summarise(rows: dict[str, list]) -> dict[str, float]:
    """A few scalars of one configuration's stats rows, for Tune and the console."""
    out: dict[str, float] = {}
    sp = [v for v in rows.get("spearman", []) if v is not None and not math.isnan(v)]
    pe = [v for v in rows.get("pearson", []) if v is not None and not math.isnan(v)]
    out["spearman_mean"] = float(np.mean(sp)) if sp else math.nan
    out["pearson_mean"] = float(np.mean(pe)) if pe else math.nan
    out["pairs"] = float(sum(rows.get("n", [])))
    for m, sel, s in zip(rows.get("method", []), rows.get("selection", []), rows.get("spearman", [])):
        out[f"spearman/{m}/{sel}"] = s
    return out


class Coordinator:
    """Ray actor (wrapped in cluster/sweep.py): every landed part is announced here.

    It can die and be replaced at any moment (the Ray actor restarts it with the same arguments): nothing
    it holds is only here. The statistics of a configuration it does not know are rebuilt from the parts in
    the store on first contact (`_known`), and every update is idempotent (a part ingested twice, a task
    counted twice under its key), so calls that Ray retries after a restart change nothing.

    `methods` maps config_id -> its methods (what a rebuild needs besides the stored parts); `initial` holds
    the task keys (`config_id/part`) per kind that were in the store when the run began, so that a replacement
    can tell the tasks this run did from the ones it found done.
    """

    def __init__(self, store: Store, experiment: str, methods: dict[str, tuple[str, ...]] | None = None,
                 totals: dict[str, int] | None = None, configs_total: int = 0,
                 initial: dict[str, list[str]] | None = None) -> None:
        self.store, self.experiment = store, experiment
        self.methods = dict(methods or {})
        self.book = StatsBook()
        self.totals = {k: 0 for k in TASK_KINDS} | dict(totals or {})
        self.extra: dict[tuple[str, str], int] = {}  # (kind, config_id) -> tasks learnt late (top-k removals)
        self.initial = {k: set((initial or {}).get(k, ())) for k in TASK_KINDS}
        self.done: dict[str, set[str]] = {k: set() for k in TASK_KINDS}
        self.skipped: dict[str, set[str]] = {k: set() for k in TASK_KINDS}
        self.unkeyed = {k: 0 for k in TASK_KINDS}  # task_done calls without a key (tests, benchmarks)
        self.failed = {k: 0 for k in TASK_KINDS}
        self.retrains_landed = 0  # single-point retrains (controls not counted) ingested by this coordinator
        self.finished: set[str] = set()
        self.configs_total = configs_total
        self.notices: list[str] = []
        self.recovered = 0  # configurations whose statistics were rebuilt from the store
        if initial is not None and self._replacement():
            self._recount()

    @staticmethod
    def _replacement() -> bool:
        """Whether this instance replaces one that died (a restarted Ray actor)."""
        try:
            import ray

            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:  # noqa: BLE001 - not in a Ray actor
            return False

    def _recount(self) -> None:
        """After a restart: the tasks done so far, from the parts in the store (what was there at the start
        counts as skipped, the rest as done by this run), and the finished configurations."""
        from jobs.plan import landed_keys  # jobs.plan imports this module

        ledger = Ledger(self.store, self.experiment)
        for kind, keys in landed_keys(ledger, list(self.methods)).items():
            self.skipped[kind] |= set(keys) & self.initial[kind]
            self.done[kind] |= set(keys) - self.initial[kind]
        self.finished |= {cid for cid in self.methods if ledger.done("stats", cid, FINAL_PART)}
        self.notices.append("the coordinator was restarted; its statistics are rebuilt from the parts in the store")

    # -- progress -------------------------------------------------------------------------------
    def add_total(self, kind: str, n: int, config_id: str | None = None) -> None:
        """Plans that depend on results (top-k removals) learn their task counts late; with a config_id the
        call is idempotent (it sets that configuration's extra count)."""
        if config_id is None:
            self.totals[kind] += n
        else:
            self.extra[(kind, config_id)] = n

    def task_done(self, kind: str, n: int = 1, skipped: bool = False, key: str | None = None) -> int:
        """Count a finished (or, `skipped`, already stored) task; under its `key`, counted once however often
        the call arrives. Returns how many tasks this call added (0 for a repeated call)."""
        if key is None:
            self.unkeyed[kind] += n
            return n
        counted = (self.skipped if skipped else self.done)[kind]
        if key in counted:
            return 0
        counted.add(key)
        return 1

    def task_failed(self, kind: str) -> None:
        self.failed[kind] += 1

    def notice(self, message: str) -> None:
        """A line for the user (a bad file set aside, a lease taken over): shown by the CLI."""
        self.notices.append(message)

    def progress(self) -> dict:
        totals = dict(self.totals)
        for (kind, _), n in self.extra.items():
            totals[kind] += n
        done = {k: len(self.done[k]) + self.unkeyed[k] for k in TASK_KINDS}
        skipped = {k: len(self.skipped[k]) for k in TASK_KINDS}
        for k in TASK_KINDS:  # a plan's upper bound can be passed when a restart lost a late correction
            totals[k] = max(totals[k], done[k] + skipped[k])
        return {"totals": totals, "done": done, "skipped": skipped, "failed": dict(self.failed),
                "configs_done": len(self.finished), "configs_total": self.configs_total,
                "notices": list(self.notices)}

    @property
    def configs_done(self) -> int:
        return len(self.finished)

    # -- statistics -----------------------------------------------------------------------------
    def register(self, config_id: str, methods, test_points, degenerate_reason=None) -> None:
        self.methods.setdefault(config_id, tuple(methods))
        self.book.register(config_id, methods, test_points, degenerate_reason)

    def _known(self, config_id: str) -> None:
        """Make sure the book knows `config_id`: a replacement coordinator rebuilds it from the store (its test
        points and model, then every landed influence and retrain part; a bad part is left for the trial)."""
        if self.book.knows(config_id):
            return
        if config_id not in self.methods:
            raise KeyError(f"configuration {config_id} was never registered with the coordinator")
        tp = tables.read_part(self.store, tables.part_path(self.store, self.experiment, "test_points", config_id,
                                                           "test_points"))
        model = tables.read_part(self.store, tables.part_path(self.store, self.experiment, "models", config_id,
                                                              "model"))
        self.book.register(config_id, self.methods[config_id],
                           list(zip(tp["test_idx"].to_pylist(), tp["selection"].to_pylist())),
                           model["degenerate_reason"][0].as_py())
        ledger = Ledger(self.store, self.experiment)
        for table in ("influence", "retrain"):
            for part in ledger.parts(table, config_id):
                try:
                    rows = tables.read_part(self.store, tables.part_path(self.store, self.experiment, table,
                                                                         config_id, part))
                except tables.CorruptPart:
                    continue  # the trial finds it when it announces the part, and has it recomputed
                self.book.ingest(table, config_id, rows)
        self.recovered += 1

    def ingest(self, table: str, config_id: str, path: str) -> dict[str, float]:
        """Read a landed part from the store, update the statistics, write a running snapshot.

        A part that cannot be read is set aside and reported: the answer is then {"set_aside": message},
        and the caller computes the part again."""
        self._known(config_id)
        try:
            part = tables.read_part(self.store, path)
        except tables.CorruptPart as exc:
            message = tables.set_aside(self.store, self.experiment, path, exc.reason)
            self.notices.append(message)
            return {"set_aside": message}
        self.book.ingest(table, config_id, part)
        if table != "retrain":
            return {}
        self.retrains_landed += len({r for r in part["removed"].to_pylist() if r >= 0})
        rows = self.book.rows(config_id, final=False)
        tables.write_part(self.store, self.experiment, "stats", config_id, RUNNING_PART, rows)
        return summarise(rows)

    def finalize(self, config_id: str) -> dict[str, float]:
        self._known(config_id)
        rows = self.book.rows(config_id, final=True)
        # Running snapshot out first: a crash in between leaves no stats (resume rebuilds them from the
        # landed parts) rather than a stale snapshot beside the final one.
        tables.delete_part(self.store, self.experiment, "stats", config_id, RUNNING_PART)
        tables.write_part(self.store, self.experiment, "stats", config_id, FINAL_PART, rows)
        self.finished.add(config_id)
        return summarise(rows)

    def config_skipped(self, config_id: str, tasks: dict[str, list[str]]) -> dict[str, float] | None:
        """A configuration whose final statistics already exist: count its tasks (keys per kind) as skipped.
        None when its final part cannot be read: it is then set aside, and the caller runs the configuration."""
        path = tables.part_path(self.store, self.experiment, "stats", config_id, FINAL_PART)
        try:
            rows = tables.read_part(self.store, path).to_pydict()
        except tables.CorruptPart as exc:
            self.notices.append(tables.set_aside(self.store, self.experiment, path, exc.reason))
            return None
        for kind, keys in tasks.items():
            self.skipped[kind].update(keys)
        self.finished.add(config_id)
        return summarise(rows)
