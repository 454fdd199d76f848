"""The Ray Tune driver: one trial per configuration, each a call of `jobs.pipeline.run_configuration` with the
Ray runner (cluster/runner.py), so that train / influence / retrain chunks are Ray tasks and every landed
part is announced to the coordinator actor. Trials report the statistics to Tune as they firm up.

Trials themselves only wait on tasks, so they hold a token amount of memory instead of a CPU (their tasks
leave the trial's placement group, see cluster/runner.py).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import ray
from ray import tune

from cluster.local import HEAD_RESOURCE
from cluster.runner import ActorCoordinator, CoordinatorActor, RayRunner
from jobs.pipeline import RunResult, run_configuration, start_run
from jobs.spec import Configuration, Spec
from jobs.tasks import dataset_key
from storage.uri import Store

__all__ = ["RunContext", "RunResult", "run_sweep", "run_trial"]

TRIAL_MEMORY_BYTES = 16 * 1024 * 1024
HEAD_SHARE = 1.0  # of the head's HEAD_RESOURCE (cluster/local.py: 10,000 units) per trial and coordinator
# Tune copies these from the driver's environment into every trial actor's runtime environment, which Ray logs
# in plain text (runtime_env_agent.log) and shows on the dashboard. Workers read the store with the
# environment they inherit from their node instead, so the driver hides them while Tune starts trials.
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


@dataclass
class RunContext:
    """What every trial needs, shipped once through tune.with_parameters."""

    store: Store
    configs: dict[str, Configuration]
    resources: dict[str, dict]
    coordinator: object  # actor handle
    datasets: dict[str, object]  # dataset key -> ObjectRef of the Dataset or DataSource
    max_in_flight: int = 8
    train_workers: int = 1  # resources.train.workers: > 1 trains data-parallel (cluster/data_parallel.py)


def run_trial(tune_config: dict, ctx: RunContext) -> None:
    """One configuration, end to end, resuming from whatever parts already landed."""
    cfg = ctx.configs[tune_config["config_id"]]
    summary = run_configuration(cfg, ctx.store, RayRunner(ctx.resources, ctx.train_workers), ActorCoordinator(ctx.coordinator),
                                ctx.datasets[dataset_key(cfg)], max_in_flight=ctx.max_in_flight,
                                on_stats=lambda s: tune.report({**s, "done": False}))
    tune.report(summary)


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
    configs, loaded, counts, initial = start_run(spec, store, version, loaded)
    # On a cluster whose head says so (`fragile cluster up`), the coordinator and the trials live on the head:
    # they only wait and count, and a worker node that is lost then takes only tasks with it, which Ray
    # retries elsewhere.
    resources = ray.cluster_resources()
    head = {HEAD_RESOURCE: HEAD_SHARE} if resources.get(HEAD_RESOURCE) else {}
    coord = CoordinatorActor.options(name=f"fragile-coordinator-{spec.experiment}-{int(time.time())}",
                                     resources=head).remote(
        store, spec.experiment, {c.config_id: c.methods for c in configs}, counts, len(configs), initial)
    datasets = {key: ray.put(data) for key, data in loaded.items()}  # put once, shared by every task
    cpus = int(resources.get("CPU", 1))
    ctx = RunContext(store=store, configs={c.config_id: c for c in configs},
                     resources={k: v.ray_options() for k, v in spec.resources.items()}, coordinator=coord,
                     datasets=datasets, max_in_flight=max(2, 2 * cpus), train_workers=spec.resources["train"].workers)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"memory": TRIAL_MEMORY_BYTES, **head})
    # Tune's own bookkeeping stays on the driver's disk, for this run only: resume reads the ledger, never
    # Tune's state, and Tune would pickle the store's filesystem (and with it the S3 secret) into its files.
    tune_dir = tempfile.mkdtemp(prefix=f"fragile-tune-{spec.experiment}-")
    tuner = tune.Tuner(
        trainable,
        param_space={"config_id": tune.grid_search([c.config_id for c in configs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials or max(2, 2 * cpus), reuse_actors=True,
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
    """The line of a failed trial, as `jobs.pipeline.failure_line` makes it inline: Ray wraps the task's
    exception, and its last line carries our TaskError message after the exception's qualified name."""
    text = str(error).strip().splitlines()
    for line in reversed(text):
        if "task " in line and "failed" in line:
            line = line.strip()
            return line[line.index("task "):] if "TaskError: task " in line else line
    return text[-1].strip() if text else repr(error)

