"""The coordinator: consumes landed parts and keeps the fragility statistics up to date.

`jobs.stats.StatsBook` is the plain-Python core (testable without Ray): it ingests `influence` and `retrain`
parts in any order and in any chunking, and produces `stats` rows that equal a one-shot computation over the
same rows. `Coordinator` wraps it: it also writes the snapshots and counts progress, in this process or as a
Ray actor.

A configuration's statistics live in one part that is replaced as results arrive: `running` while the
configuration is in progress, `final` (with final = true) once every task landed. The `final` part is what
resume looks for, and what `stats` queries see for a finished configuration.
"""
from __future__ import annotations

from collections import defaultdict

from jobs.protocol import FINAL_PART, MODEL_PART, RUNNING_PART, TEST_POINTS_PART
from jobs.science import SCIENCE, UNSTAMPED, stamp_of
from jobs.spec_checks import RESOURCE_KINDS
from jobs.stats import StatsBook, parse_sources, summarise
from storage import tables
from storage.ledger import Ledger
from storage.uri import Store

TASK_KINDS = RESOURCE_KINDS  # a task kind is what the spec gives resources to


def part_stamps(**parts) -> dict[str, str | None]:
    """table -> the science stamp of its (one-stamp) part, for the parts that have rows."""
    return {table: rows["science"][0].as_py() for table, rows in parts.items() if rows.num_rows}


def read_train_parts(store: Store, experiment: str, config_id: str):
    """The `models` and `test_points` parts of a trained configuration (raises CorruptPart for a bad one)."""
    def read(table: str, part: str):
        return tables.read_part(store, tables.part_path(store, experiment, table, config_id, part))

    return read("models", MODEL_PART), read("test_points", TEST_POINTS_PART)


def final_sources(rows: dict[str, list]) -> dict[str, set[str]]:
    """table -> stamps of what a final stats part was computed from, and of the part itself (nothing for an
    empty part). A part written before stamps existed has no inputs recorded: its tables read as unstamped."""
    if not rows.get("method"):
        return {}
    inputs = (rows.get("science_inputs") or [None])[0]
    sources = parse_sources(inputs) if inputs else {t: {UNSTAMPED} for t in ("models", "test_points", "influence",
                                                                            "retrain")}
    sources["stats"] = {stamp_of(v) for v in set(rows.get("science") or [None])}
    return sources


def final_replicates(rows: dict[str, list]) -> int:
    """How many replicates a final stats part's ground truth holds (parts written before replicates existed
    hold one)."""
    return max((1 if v is None else int(v)) for v in rows.get("replicates") or [None])


class Coordinator:
    """Every landed part is announced here: in this process for an inline run (jobs/runner.py), as a Ray actor
    (cluster/runner.py) on a cluster.

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
        # config_id -> table -> science stamps other than this run's found among its parts (see jobs/science.py)
        self.stale: dict[str, dict[str, set[str]]] = {}
        if initial is not None and self._replacement():
            self._recount()

    @staticmethod
    def _replacement() -> bool:
        """Whether this instance replaces one that died (a restarted Ray actor)."""
        import sys

        ray = sys.modules.get("ray")  # an inline run never imports Ray, and must not start or join one here
        if ray is None or not ray.is_initialized():
            return False
        try:
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
        for cid in sorted(self.finished):  # which code wrote them: what the one that died had seen
            try:
                rows = tables.read_part(self.store, tables.part_path(self.store, self.experiment, "stats", cid,
                                                                     FINAL_PART)).to_pydict()
            except tables.CorruptPart:
                continue
            self._note_stale(cid, final_sources(rows))
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
                "notices": list(self.notices), "stale": self._stale_counts()}

    # -- which code wrote the parts -------------------------------------------------------------
    def _note_stale(self, config_id: str, sources: dict[str, set[str]]) -> None:
        """Remember the stamps of `sources` (table -> stamps) that are not this run's; the first time a table
        shows one, tell the user."""
        for table, stamps in sources.items():
            others = set(stamps) - {SCIENCE}
            if not others:
                continue
            if not any(table in seen for seen in self.stale.values()):
                self.notices.append(
                    f"parts of the {table} table were written by another version of the science code "
                    f"({', '.join(sorted(others))}; this run is {SCIENCE}): results mix versions until "
                    f"`fragile run --recompute-stale` computes them again")
            self.stale.setdefault(config_id, {}).setdefault(table, set()).update(others)

    def _stale_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for per_table in self.stale.values():
            for table in per_table:
                counts[table] += 1
        return dict(sorted(counts.items()))

    def stale_report(self) -> dict[str, dict[str, list[str]]]:
        """config_id -> table -> the other science stamps found in its parts (empty: nothing stale seen)."""
        return {cid: {t: sorted(v) for t, v in sorted(per.items())} for cid, per in sorted(self.stale.items())}

    @property
    def configs_done(self) -> int:
        return len(self.finished)

    # -- statistics -----------------------------------------------------------------------------
    def register(self, config_id: str, methods, test_points, degenerate_reason=None, sources=None,
                 stationary=None) -> None:
        self.methods.setdefault(config_id, tuple(methods))
        self.book.register(config_id, methods, test_points, degenerate_reason, sources, stationary)
        self._note_stale(config_id, self.book.sources(config_id))

    def _known(self, config_id: str) -> None:
        """Make sure the book knows `config_id`: a replacement coordinator rebuilds it from the store (its test
        points and model, then every landed influence and retrain part; a bad part is left for the trial)."""
        if self.book.knows(config_id):
            return
        if config_id not in self.methods:
            raise KeyError(f"configuration {config_id} was never registered with the coordinator")
        model, tp = read_train_parts(self.store, self.experiment, config_id)
        self.book.register(config_id, self.methods[config_id],
                           list(zip(tp["test_idx"].to_pylist(), tp["selection"].to_pylist())),
                           model["degenerate_reason"][0].as_py(), part_stamps(models=model, test_points=tp),
                           model["stationary"][0].as_py())
        ledger = Ledger(self.store, self.experiment)
        for table in ("influence", "retrain"):
            for part in ledger.parts(table, config_id):
                try:
                    rows = tables.read_part(self.store, tables.part_path(self.store, self.experiment, table,
                                                                         config_id, part))
                except tables.CorruptPart:
                    continue  # the trial finds it when it announces the part, and has it recomputed
                self.book.ingest(table, config_id, rows)
        self._note_stale(config_id, self.book.sources(config_id))
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
        self._note_stale(config_id, self.book.sources(config_id))  # the book read the part's stamps
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

    def config_skipped(self, config_id: str, tasks: dict[str, list[str]], replicates: int = 1) -> dict[str, float] | None:
        """A configuration whose final statistics already exist: count its tasks (keys per kind) as skipped.
        None when its final part cannot be read (it is then set aside) or holds fewer than `replicates`
        replicates (a rerun asked for more): the caller then runs the configuration, which computes only
        what is missing."""
        path = tables.part_path(self.store, self.experiment, "stats", config_id, FINAL_PART)
        try:
            rows = tables.read_part(self.store, path).to_pydict()
        except tables.CorruptPart as exc:
            self.notices.append(tables.set_aside(self.store, self.experiment, path, exc.reason))
            return None
        if rows.get("method") and final_replicates(rows) < replicates:
            return None
        for kind, keys in tasks.items():
            self.skipped[kind].update(keys)
        self.finished.add(config_id)
        self._note_stale(config_id, final_sources(rows))
        return summarise(rows)
