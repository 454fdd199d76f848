"""One configuration, end to end, written once: train -> influence -> removals -> retrain -> final statistics.

`run_configuration(cfg, store, runner, coordinator, data)` resumes from whatever parts already landed, hands
every missing task body to `runner` (jobs/runner.py: in this process; cluster/runner.py: as Ray tasks) and
announces every part, landed before or now, to the coordinator, which keeps the statistics. The Tune driver
(cluster/sweep.py) calls it once per trial with the Ray runner; `run_inline` calls it for every configuration
of a spec in this process, without Ray.

The coordinator is called synchronously: `jobs.coordinator.Coordinator` itself inline, a facade over the Ray
actor on a cluster (`cluster.runner.ActorCoordinator`, which does not wait for the calls whose answer the
pipeline does not use: counts and notices).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from jobs import plan, protocol, shards, tasks
from jobs.coordinator import Coordinator, read_train_parts
from jobs.records import write_configs
from jobs.runner import InlineRunner
from jobs.science import SCIENCE
from jobs.spec import Configuration, Spec
from storage import tables
from storage.checkpoints import checkpoint_exists
from storage.ledger import Ledger
from storage.uri import Store


@dataclass
class RunResult:
    """What a run of a spec did: progress counts, one line per failed configuration, wall time, and the
    configurations whose parts carry other science stamps (config_id -> table -> stamps)."""

    progress: dict
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stale: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    results: object = None  # the Tune ResultGrid of a Ray run


def run_configuration(cfg: Configuration, store: Store, runner, coord, data: Any, *,
                      on_stats: Callable[[dict], None] | None = None, max_in_flight: int = 8) -> dict:
    """Compute what `cfg` lacks and return its final summary (`jobs.stats.summarise`) with `done` and
    `skipped` (True when its final statistics were already in the store). `data`: the data set, or the
    runner's handle of it. `on_stats` gets every running summary as retrain parts land."""
    cid = cfg.config_id
    ledger = Ledger(store, cfg.experiment)
    if plan.is_finished(ledger, cfg):
        summary = coord.config_skipped(cid, plan.landed_task_keys(ledger, cid), cfg.replicates)
        if summary is not None:
            return {**summary, "done": True, "skipped": True}
        ledger.refresh()  # unreadable final statistics (set aside), or fewer replicates: compute what is missing

    # 1. train (or take θ̂ and the train result from what landed)
    resumed = resume_train(cfg, store, coord) if plan.is_trained(
        ledger, cfg, checkpoint_exists(store, cfg.experiment, cfg.model_key)) else None
    if resumed is not None:
        theta, out = runner.put(resumed[0]), resumed[1]
        coord.task_done("train", skipped=True, key=plan.task_key(cid))
    else:
        theta, out_ref = runner.submit("train", f"train {cid}", tasks.train_task, store, cfg, data, num_returns=2)
        out = _get(runner, coord, "train", out_ref)
        for message in out.notices:
            coord.notice(message)
        coord.task_done("train", key=plan.task_key(cid))
    coord.register(cid, cfg.methods, out.test_points, out.degenerate_reason, out.science, out.stationary)
    test_idx = [i for i, _ in out.test_points]

    # 2. influence estimates per (method, chunk of test points), or per shard of training points from a solve
    #    per (method, chunk) stored once
    sharded = plan.shard_tasks(cfg, test_idx, out.n_train)
    if sharded:
        n_shards = len(protocol.train_shards(cfg, out.n_train))
        _run_parts(runner, coord, store, cfg, ledger, "influence", [
            (t.part, f"influence {cid} {t.part}",
             (shards.shard_task, store, cfg, data, theta, t.method, t.chunk, t.shard, t.start, t.stop, t.test_idx,
              out.damping, n_shards))
            for t in sharded], max_in_flight=max_in_flight,
            prepare=lambda parts: _solve(runner, coord, store, cfg, data, theta, out.damping, sharded, parts, max_in_flight))
    else:
        _run_parts(runner, coord, store, cfg, ledger, "influence", [
            (t.part, f"influence {cid} {t.part}",
             (tasks.influence_task, store, cfg, data, theta, t.method, t.chunk, t.test_idx, out.damping))
            for t in plan.influence_tasks(cfg, test_idx)], max_in_flight=max_in_flight)

    # 3. which training points to retrain without (or, for group removal, which groups)
    inf = (tables.read_table(store, cfg.experiment, "influence", config_ids=[cid])
           if protocol.needs_estimates(cfg) else None)
    removed, groups = protocol.removals(cfg, inf, out.n_train, len(test_idx))
    if cfg.ground_truth == "lds" and not ledger.done("subsets", cid, protocol.SUBSETS_PART):
        write_subsets(store, cfg, out.n_train)
    rt_tasks = plan.retrain_tasks(cfg, removed)
    extra = len(rt_tasks) - plan.task_counts([cfg], lambda c: out.n_train)["retrain"]
    if extra:
        coord.add_total("retrain", extra, cid)

    # 4. retrain chunks: one batched computation each; statistics firm up as they land
    _run_parts(runner, coord, store, cfg, ledger, "retrain", [
        (t.part, f"retrain {cid} {t.part}",
         (tasks.retrain_task, store, cfg, data, theta, t.chunk, t.removed, test_idx,
          None if groups is None else [groups[g] for g in t.removed], t.replicate))
        for t in rt_tasks], on_stats=on_stats, max_in_flight=max_in_flight)

    return {**coord.finalize(cid), "done": True, "skipped": False}


def write_subsets(store: Store, cfg: Configuration, n_train: int) -> str:
    """The `subsets` part of an LDS configuration: the masks its subset models are retrained on, so that its
    score can be recomputed from the stored tables alone."""
    subsets = protocol.lds_subsets(cfg, n_train)
    rows = {"subset": [s["subset"] for s in subsets], "seed": [s["seed"] for s in subsets],
            "fraction": [s["fraction"] for s in subsets], "n_train": [n_train] * len(subsets),
            "mask_hash": [protocol.mask_hash(n_train, s["left_out"]) for s in subsets],
            "left_out": [s["left_out"] for s in subsets], "science": [SCIENCE] * len(subsets)}
    return tables.write_part(store, cfg.experiment, "subsets", cfg.config_id, protocol.SUBSETS_PART, rows)


def resume_train(cfg: Configuration, store: Store, coord):
    """(θ̂, the train result) from the stored checkpoint and the `models` and `test_points` parts, or None when
    any of them is unreadable or not this configuration's (it is set aside, with a notice, and the train task
    runs again: it rewrites the same parts from the same θ̂, or trains θ̂ again)."""
    try:
        models, tp = read_train_parts(store, cfg.experiment, cfg.config_id)
    except tables.CorruptPart as exc:
        coord.notice(tables.set_aside(store, cfg.experiment, exc.where, exc.reason))
        return None
    state, notice = tasks.load_base(store, cfg, models["n_params"][0].as_py())
    if state is None:
        if notice:
            coord.notice(notice)
        return None
    return state["theta"], protocol.train_output(cfg, models.to_pydict(), tp.to_pydict())


def _solve(runner, coord, store: Store, cfg: Configuration, data, theta, damping: float, sharded: list, pending: list[str],
           max_in_flight: int) -> None:
    """Make sure the stored solve of every (method, chunk) whose shards are `pending` is there (each solve
    counted as an influence task; one that a landed shard came from, as skipped)."""
    cid = cfg.config_id
    pending_parts = set(pending)
    needed = {t.solve: t for t in sharded if t.part in pending_parts}
    for solve in sorted({t.solve for t in sharded} - set(needed)):
        coord.task_done("influence", skipped=True, key=plan.task_key(cid, protocol.solve_task_part(solve)))
    work = [(t.solve, f"influence {cid} {protocol.solve_task_part(t.solve)}",
             (shards.solve_task, store, cfg, data, theta, t.method, t.chunk, t.test_idx, damping))
            for t in needed.values()]
    for solve, (_, reused, notice) in _bounded(runner, coord, "influence", work, max_in_flight):
        if notice:
            coord.notice(notice)
        coord.task_done("influence", skipped=reused, key=plan.task_key(cid, protocol.solve_task_part(solve)))


def _bounded(runner, coord, kind: str, work: list[tuple[str, str, tuple]], max_in_flight: int):
    """Submit (key, task name, (body, *args)) of `work`, at most `max_in_flight` at once; yield (key, result)
    of each as it finishes."""
    pending, in_flight = list(work), {}
    while pending or in_flight:
        while pending and len(in_flight) < max_in_flight:
            key, name, call = pending.pop(0)
            in_flight[runner.submit(kind, name, *call)] = key
        ready = runner.wait(list(in_flight))
        key = in_flight.pop(ready)
        yield key, _get(runner, coord, kind, ready)


def _get(runner, coord, kind: str, handle):
    """A task's result; a failed task is also counted by the coordinator (and so on the dashboard)."""
    try:
        return runner.get(handle)
    except Exception:
        coord.task_failed(kind)
        raise


def _run_parts(runner, coord, store: Store, cfg: Configuration, ledger: Ledger, table: str,
               work: list[tuple[str, str, tuple]], on_stats: Callable[[dict], None] | None = None,
               max_in_flight: int = 8, prepare: Callable[[list[str]], None] | None = None) -> None:
    """Submit the parts the ledger lacks (at most `max_in_flight` at once) and announce every part, landed
    before or now, to the coordinator as it becomes available. A landed part that cannot be read is set
    aside by the coordinator and computed again. `work`: (part, task name, (body, *args)) per part;
    `prepare` gets the names of the parts to compute before the first is submitted (what they need first)."""
    cid = cfg.config_id

    def announce(part: str, path: str, skipped: bool) -> str | None:
        """Hand a landed part to the coordinator; the set-aside message when it could not be read."""
        summary = coord.ingest(table, cid, path)
        if "set_aside" in summary:
            return summary["set_aside"]
        coord.task_done(table, skipped=skipped, key=plan.task_key(cid, part))
        if on_stats and summary:
            on_stats(summary)
        return None

    # landed before: announced now, or (unreadable, set aside) computed again
    pending = [(part, name, call) for part, name, call in work
               if not ledger.done(table, cid, part)
               or announce(part, tables.part_path(store, cfg.experiment, table, cid, part), skipped=True)]
    if prepare is not None:
        prepare([part for part, _, _ in pending])
    for part, path in _bounded(runner, coord, table, pending, max_in_flight):
        set_aside = announce(part, path, skipped=False)
        if set_aside:  # written a moment ago and already unreadable: not a file to compute again
            coord.task_failed(table)
            raise tasks.TaskError(f"{table}/{cid}/{part}", path, set_aside)


def start_run(spec: Spec, store: Store, version: str, loaded: dict | None):
    """What every run of a spec does before its first task, inline or on Ray: find the data (a missing or
    unreadable data set stops the run before anything is written; images are decoded by the tasks), write the
    `configs` rows, count the tasks and note which the store already holds. Returns (configs, data sets, task counts, landed task keys)."""
    configs = spec.configurations()
    loaded = loaded if loaded is not None else tasks.datasets_for(configs)
    write_configs(store, spec, configs, version)
    counts = plan.task_counts(configs, lambda c: loaded[tasks.dataset_key(c)].n_train)
    initial = plan.landed_keys(Ledger(store, spec.experiment), [c.config_id for c in configs])
    return configs, loaded, counts, initial


def failure_line(exc: BaseException) -> str:
    """One line for a failed configuration: a task's own message (it names the task and its output), else the
    exception's type and the last line of its message."""
    if isinstance(exc, tasks.TaskError):
        return str(exc)
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__


def run_inline(spec: Spec, store: Store, *, version: str, on_progress=lambda p: None,
               on_config_done=lambda cfg, r: None, loaded: dict | None = None) -> RunResult:
    """Every configuration of `spec`, one after another, every task in this process: no Ray, no Tune. The
    same stored rows and statistics as `cluster.sweep.run_sweep`; a configuration that fails is reported and
    the others go on, as on a cluster."""
    start = time.perf_counter()
    configs, loaded, counts, initial = start_run(spec, store, version, loaded)
    coord = Coordinator(store, spec.experiment, {c.config_id: c.methods for c in configs}, counts, len(configs),
                        initial)
    last = [0.0]

    def progress() -> None:
        now = time.monotonic()
        if now - last[0] > 0.25:
            last[0] = now
            on_progress(coord.progress())

    # torch threads per task kind: the CPUs the spec gives it, as a Ray task gets
    threads = {kind: max(1, int(r.num_cpus)) for kind, r in spec.resources.items()}
    runner = InlineRunner(threads=threads, on_task_end=progress)
    errors = []
    for cfg in configs:
        try:
            result = run_configuration(cfg, store, runner, coord, loaded[tasks.dataset_key(cfg)])
        except Exception as exc:  # noqa: BLE001 - reported per configuration, as a failed trial is
            errors.append(f"{cfg.label()} [{cfg.config_id}]: {failure_line(exc)}")
            continue
        on_config_done(cfg, result)
    on_progress(coord.progress())
    return RunResult(progress=coord.progress(), errors=errors, seconds=time.perf_counter() - start,
                     stale=coord.stale_report())
