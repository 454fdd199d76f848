"""The Ray Tune driver: one trial per configuration; inside a trial, train / influence / retrain chunks
are Ray tasks. Every landed part is announced to the coordinator actor, and the trial reports the
statistics to Tune as they firm up.

Trials themselves only wait on tasks, so they hold a token amount of memory instead of a CPU, and the
tasks they launch leave the trial's placement group: otherwise a 2-CPU machine would run two trials that
each wait forever for a CPU of their own.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray import tune
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from jobs import plan, tasks
from jobs.science import SCIENCE
from cluster.metrics import MeteredCoordinator
from jobs.coordinator import part_stamps
from jobs.spec import Configuration, Spec
from storage import tables
from storage.checkpoints import checkpoint_exists
from storage.ledger import Ledger
from storage.uri import Store

# A task is run again when its worker dies (Ray does that by itself) or when it failed because the store stayed
# unreachable beyond the retry budget (TransientTaskError); a task's own exceptions (a singular Hessian, a bad
# index) are deterministic and retrying them would only waste time.
TASK_RETRIES = 3
TRIAL_MEMORY_BYTES = 16 * 1024 * 1024
# The coordinator is restarted whenever its process dies, and calls in flight are delivered to the new one
# (every coordinator call is idempotent, see jobs/coordinator.py).
COORDINATOR_RESTARTS = 20
# Tune copies these from the driver's environment into every trial actor's runtime environment, which Ray logs
# in plain text (runtime_env_agent.log) and shows on the dashboard. Workers read the store with the
# environment they inherit from their node instead, so the driver hides them while Tune starts trials.
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def _outside_trial(options: dict, name: str) -> dict:
    return {**options, "name": name, "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None),
            "max_retries": TASK_RETRIES, "retry_exceptions": [tasks.TransientTaskError]}


def _await(coord, kind: str, ref):
    """ray.get that also tells the coordinator (and so the dashboard) about a failed task."""
    try:
        return ray.get(ref)
    except Exception:
        coord.task_failed.remote(kind)
        raise


def _with_task_resources(fn: Callable) -> Callable:
    """Run a task body on what Ray gave it: as many torch threads as CPUs (small models on a shared node slow
    down several times when every task spreads over all cores), and the GPU, if it got one.

    The GPU ids go to the body through `tasks.TASK_GPUS_ENV` (set for this call only: a worker process runs
    tasks with and without GPUs in turn), and `tasks.device_for_task()` turns them into a device. Ray itself
    points CUDA_VISIBLE_DEVICES at those GPUs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        context = ray.get_runtime_context()
        cpus = context.get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        gpus = context.get_accelerator_ids().get("GPU", [])
        previous = os.environ.get(tasks.TASK_GPUS_ENV)
        os.environ[tasks.TASK_GPUS_ENV] = ",".join(str(g) for g in gpus)
        try:
            return fn(*args, **kwargs)
        finally:
            if previous is None:
                os.environ.pop(tasks.TASK_GPUS_ENV, None)
            else:
                os.environ[tasks.TASK_GPUS_ENV] = previous

    return wrapper


train_remote = ray.remote(num_returns=2)(_with_task_resources(tasks.train_task))
influence_remote = ray.remote(_with_task_resources(tasks.influence_task))
retrain_remote = ray.remote(_with_task_resources(tasks.retrain_task))
CoordinatorActor = ray.remote(num_cpus=0, max_restarts=COORDINATOR_RESTARTS, max_task_retries=-1)(MeteredCoordinator)


@dataclass
class RunContext:
    """What every trial needs, shipped once through tune.with_parameters."""

    store: Store
    experiment: str
    configs: dict[str, Configuration]
    resources: dict[str, dict]
    coordinator: object  # actor handle
    datasets: dict[str, object]  # dataset key -> ObjectRef of the loaded Dataset
    max_in_flight: int = 8


dataset_key = tasks.dataset_key


def run_trial(tune_config: dict, ctx: RunContext) -> None:
    """One configuration, end to end, resuming from whatever parts already landed."""
    cfg = ctx.configs[tune_config["config_id"]]
    cid, store, coord = cfg.config_id, ctx.store, ctx.coordinator
    ledger = Ledger(store, ctx.experiment)

    if plan.is_finished(ledger, cfg):
        summary = ray.get(coord.config_skipped.remote(cid, plan.landed_task_keys(ledger, cid)))
        if summary is not None:
            tune.report({**summary, "done": True, "skipped": True})
            return
        ledger.refresh()  # its final statistics were unreadable and are set aside: compute them again

    data_ref = ctx.datasets[dataset_key(cfg)]
    # 1. train (or reuse what landed)
    resumed = _resume_train(ctx, cfg, ledger) if plan.is_trained(
        ledger, cfg, checkpoint_exists(store, ctx.experiment, cfg.model_key)) else None
    if resumed is not None:
        theta_ref, test_points, degenerate, n_train, damping, sources = resumed
        coord.task_done.remote("train", skipped=True, key=plan.task_key(cid))
    else:
        theta_ref, out_ref = train_remote.options(**_outside_trial(ctx.resources["train"], f"train {cid}")).remote(
            store, cfg, data_ref)
        out = _await(coord, "train", out_ref)
        for message in out.notices:
            coord.notice.remote(message)
        test_points, degenerate, n_train, damping = out.test_points, out.degenerate_reason, out.n_train, out.damping
        sources = out.science
        coord.task_done.remote("train", key=plan.task_key(cid))
    ray.get(coord.register.remote(cid, cfg.methods, test_points, degenerate, sources))
    test_idx = [i for i, _ in test_points]

    # 2. influence estimates per (method, chunk of test points)
    inf_tasks = plan.influence_tasks(cfg, test_idx)
    _run_parts(ctx, cfg, ledger, "influence", [
        (t.part, lambda t=t: influence_remote.options(**_outside_trial(ctx.resources["influence"],
                                                                       f"influence {cid} {t.part}")).remote(
            store, cfg, data_ref, theta_ref, t.method, t.chunk, t.test_idx, damping)) for t in inf_tasks])

    # 3. which training points to retrain without (or, for group removal, which groups)
    removed, groups = plan.removals(store, ctx.experiment, cfg, n_train, len(test_idx))
    rt_tasks = plan.retrain_tasks(cfg, removed)
    extra = len(rt_tasks) - plan.task_counts([cfg], lambda c: n_train)["retrain"]
    if extra:
        coord.add_total.remote("retrain", extra, cid)

    # 4. retrain chunks: one batched computation each; statistics firm up as they land
    def report(summary: dict) -> None:
        tune.report({**summary, "done": False})

    _run_parts(ctx, cfg, ledger, "retrain", [
        (t.part, lambda t=t: retrain_remote.options(**_outside_trial(ctx.resources["retrain"],
                                                                     f"retrain {cid} {t.part}")).remote(
            store, cfg, data_ref, theta_ref, t.chunk, t.removed, test_idx,
            None if groups is None else [groups[g] for g in t.removed])) for t in rt_tasks], on_stats=report)

    summary = ray.get(coord.finalize.remote(cid))
    tune.report({**summary, "done": True, "skipped": False})


def _resume_train(ctx: RunContext, cfg: Configuration, ledger: Ledger):
    """θ̂ and the train task's results from the stored checkpoint and parts, or None when any of them is
    unreadable or not this configuration's (it is set aside, with a notice, and the train task runs again:
    it rewrites the same parts from the same θ̂, or trains θ̂ again)."""
    from jobs.tasks import load_base  # torch: kept out of the driver's import path

    store, cid, coord = ctx.store, cfg.config_id, ctx.coordinator
    try:
        tp = tables.read_part(store, tables.part_path(store, ctx.experiment, "test_points", cid, "test_points"))
        models = tables.read_part(store, tables.part_path(store, ctx.experiment, "models", cid, "model"))
    except tables.CorruptPart as exc:
        coord.notice.remote(tables.set_aside(store, ctx.experiment, exc.where, exc.reason))
        return None
    state, notice = load_base(store, cfg, models["n_params"][0].as_py())
    if state is None:
        if notice:
            coord.notice.remote(notice)
        return None
    test_points = list(zip(tp["test_idx"].to_pylist(), tp["selection"].to_pylist()))
    degenerate, n_train = models["degenerate_reason"][0].as_py(), models["n_train"][0].as_py()
    damping = tasks.effective_damping(cfg, models["min_eigenvalue"][0].as_py(), models["top_eigenvalue"][0].as_py())
    sources = part_stamps(models=models, test_points=tp)
    return ray.put(state["theta"]), test_points, degenerate, n_train, damping, sources


def _run_parts(ctx: RunContext, cfg: Configuration, ledger: Ledger, table: str,
               work: list[tuple[str, Callable[[], object]]], on_stats: Callable[[dict], None] | None = None) -> None:
    """Schedule the parts the ledger lacks (at most max_in_flight at once), announce every part, landed
    before or now, to the coordinator as it becomes available. A landed part that cannot be read is set
    aside by the coordinator and computed again."""
    coord, cid = ctx.coordinator, cfg.config_id
    pending = []
    for part, submit in work:
        if ledger.done(table, cid, part):
            path = tables.part_path(ctx.store, ctx.experiment, table, cid, part)
            summary = ray.get(coord.ingest.remote(table, cid, path))
            if "set_aside" in summary:
                pending.append((part, submit))
                continue
            coord.task_done.remote(table, skipped=True, key=plan.task_key(cid, part))
            if on_stats and summary:
                on_stats(summary)
        else:
            pending.append((part, submit))
    in_flight: dict = {}
    while pending or in_flight:
        while pending and len(in_flight) < ctx.max_in_flight:
            part, submit = pending.pop(0)
            in_flight[submit()] = part
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        part = in_flight.pop(ready[0])
        path = _await(coord, table, ready[0])
        summary = ray.get(coord.ingest.remote(table, cid, path))
        if "set_aside" in summary:  # written a moment ago and already unreadable: not a file to compute again
            coord.task_failed.remote(table)
            raise tasks.TaskError(f"{table}/{cid}/{part}", path, summary["set_aside"])
        coord.task_done.remote(table, key=plan.task_key(cid, part))
        if on_stats and summary:
            on_stats(summary)


@dataclass
class RunResult:
    results: object  # tune.ResultGrid
    progress: dict
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # config_id -> table -> science stamps other than this run's found in its parts (jobs/science.py)
    stale: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def write_configs(store: Store, spec: Spec, configs: list[Configuration], version: str) -> None:
    """One `configs` row per configuration, with the spec hash and project version it was made with."""
    for cfg in configs:
        d = cfg.to_dict()
        tables.write_part(store, spec.experiment, "configs", cfg.config_id, "config", {
            "spec_hash": [spec.spec_hash], "version": [version], "experiment": [spec.experiment],
            "config": [cfg.canonical_json()], "dataset": [cfg.dataset], "model": [cfg.model],
            "depth": [cfg.depth], "width": [cfg.width], "activation": [cfg.activation],
            "weight_decay": [cfg.weight_decay], "lr": [cfg.lr], "epochs": [cfg.epochs], "seed": [cfg.seed],
            "retrain_epochs": [cfg.retrain_epochs], "damping": [cfg.damping], "methods": [",".join(d["methods"])],
            "science": [SCIENCE],
        })


def _ignore(*args, **kwargs) -> None:
    return None


class _ProgressCallback(tune.Callback):
    """Runs in the driver during Tuner.fit: polls the coordinator for the progress bars and hands
    every finished configuration to `on_config_done`."""

    def __init__(self, coordinator, on_progress, on_config_done, configs: dict[str, Configuration]):
        self.coord, self.on_progress, self.on_config_done = coordinator, on_progress, on_config_done
        self.configs = configs
        self._last = 0.0

    def __getstate__(self):
        # Tuner pickles its run config for restoring; the display hooks hold locks and are driver-only.
        return {**self.__dict__, "on_progress": _ignore, "on_config_done": _ignore}

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last > 0.25:
            self._last = now
            self.on_progress(ray.get(self.coord.progress.remote()))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done"):
            self.on_config_done(self.configs[trial.config["config_id"]], result)


@contextlib.contextmanager
def _credentials_hidden():
    """The AWS credentials out of this process's environment for the block (see CREDENTIAL_VARS)."""
    saved = {name: os.environ.pop(name) for name in CREDENTIAL_VARS if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def run_sweep(spec: Spec, store: Store, *, version: str, on_progress=lambda p: None,
              on_config_done=lambda cfg, r: None, max_concurrent_trials: int | None = None,
              loaded: dict[str, object] | None = None) -> RunResult:
    """Run every configuration of `spec` as a Tune trial on the connected Ray cluster (`loaded`: its data
    sets, if the caller loaded them already)."""
    start = time.perf_counter()
    configs = spec.configurations()
    # Data first: a missing or unreadable data set stops the run before anything is written.
    loaded = loaded if loaded is not None else tasks.load_datasets(configs)
    write_configs(store, spec, configs, version)
    counts = plan.task_counts(configs, lambda c: loaded[dataset_key(c)].n_train)
    initial = plan.landed_keys(Ledger(store, spec.experiment), [c.config_id for c in configs])
    coord = CoordinatorActor.options(name=f"fragile-coordinator-{spec.experiment}-{int(time.time())}").remote(
        store, spec.experiment, {c.config_id: c.methods for c in configs}, counts, len(configs), initial)
    datasets = {key: ray.put(data) for key, data in loaded.items()}  # put once, shared by every task
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ctx = RunContext(store=store, experiment=spec.experiment, configs={c.config_id: c for c in configs},
                     resources={k: v.ray_options() for k, v in spec.resources.items()}, coordinator=coord,
                     datasets=datasets, max_in_flight=max(2, 2 * cpus))
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"memory": TRIAL_MEMORY_BYTES})
    # Tune's own bookkeeping stays on the driver's disk, for this run only: resume reads the ledger, never
    # Tune's state, and Tune would pickle the store's filesystem (and with it the S3 secret) into its files.
    tune_dir = tempfile.mkdtemp(prefix=f"fragile-tune-{spec.experiment}-")
    tuner = tune.Tuner(
        trainable,
        param_space={"config_id": tune.grid_search([c.config_id for c in configs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials or max(2, 2 * cpus),
                                    trial_name_creator=lambda trial: _trial_name(ctx, trial),
                                    trial_dirname_creator=lambda trial: _trial_name(ctx, trial).replace(" ", "_")),
        run_config=tune.RunConfig(
            name=spec.experiment, storage_path=tune_dir, verbose=0,
            callbacks=[_ProgressCallback(coord, on_progress, on_config_done, ctx.configs)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    try:
        with _credentials_hidden():
            results = tuner.fit()
    finally:
        shutil.rmtree(tune_dir, ignore_errors=True)
    progress = ray.get(coord.progress.remote())
    stale = ray.get(coord.stale_report.remote())
    on_progress(progress)
    errors = []
    for r in results:
        if r.error is not None:
            cid = r.config.get("config_id", "?") if r.config else "?"
            errors.append(f"{ctx.configs[cid].label() if cid in ctx.configs else cid} [{cid}]: {_root_cause(r.error)}")
    ray.kill(coord)
    return RunResult(results=results, progress=progress, errors=errors, seconds=time.perf_counter() - start,
                     stale=stale)


def _trial_name(ctx: RunContext, trial) -> str:
    """`mlp d3 w5 tanh wd0.005 s1 [0123456789ab]`: readable in the dashboard's actor list and in Tune's output."""
    cid = trial.config["config_id"]
    return f"{ctx.configs[cid].label()} [{cid}]"


def _root_cause(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    # Ray wraps the task's exception; its last line carries our TaskError message.
    for line in reversed(text):
        if "task " in line and "failed" in line:
            return line.strip()
    return text[-1] if text else repr(error)

