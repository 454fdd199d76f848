"""Data-parallel training of θ̂ with Ray Train: `resources.train.workers: W` > 1 runs a configuration's training
as a `TorchTrainer` of W workers (each with the spec's `resources.train` CPUs and GPUs), a torch.distributed
process group between them (gloo on CPUs, NCCL on GPUs) and `influence.data_parallel.train_data_parallel` in
each: every worker takes its share of each global batch and the gradients are summed once per step.

The train task that starts it only waits (on one CPU). The workers open the data where they run (a minibatched
file set streams from the node's copy, each worker decoding only its pieces of the batches with as many loader
processes as it has CPUs beyond the first; any other set is loaded) and hand θ̂ back through the store:
worker 0 saves the run's progress (`jobs.tasks.train_progress`) every `train.checkpoint_every` steps and at the
end. Worker 0 then makes what the rows need of θ̂ on its own device (R, ‖∇R‖ and `jobs.tasks.assess`: passes
over both splits and the spectrum, the work that would take a CPU hours on ImageNet) and adds it to the last
saved state. When a worker dies, Ray Train's failure handling restarts the group (up to TRAIN_FAILURES times),
and the new workers continue from the last saved step (or, when training had ended, only redo what worker 0 had
not yet added). Ray Train restarts the group whatever the error, but a worker that fails in a way a rerun from
the same saved step would meet again (a bad setting, a corrupt file: DETERMINISTIC) records the error in the
store, and the restarted group refuses at once instead of training up to it again; the train task then fails
with that error alone.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from typing import Callable

import torch

from influence.streaming import StreamedSet
from influence.train import TrainResult
from jobs.spec import Configuration
from jobs.tasks import assess, model_for, streams, train_options, train_progress, train_steps
from storage.checkpoints import load_state, progress_path, save_state
from storage.tables import CorruptPart
from storage.uri import Store, delete_file

TRAIN_FAILURES = 3  # worker-group restarts Ray Train makes before the train task fails
# Errors a rerun from the same saved step meets again. A lost peer shows as a RuntimeError of the collectives (and
# a lost worker as no error at all), the store away as a StoreError or OSError: those are restarted.
DETERMINISTIC = (ValueError, TypeError, LookupError, ArithmeticError, CorruptPart)


class DeterministicFailure(RuntimeError):
    """A data-parallel run whose error, met before at the same saved step, would only recur."""


def fit(store: Store, cfg: Configuration, source, data, model, report: Callable[[int, float], None] | None, *,
        workers: int, per_worker: dict) -> tuple[TrainResult, dict]:
    """θ̂ of `cfg` trained by `workers` Ray Train workers with `per_worker` Ray resources each (num_cpus,
    num_gpus, memory), and its assessment (`jobs.tasks.assess`), both made by the workers. `source` is what
    the tasks get (a Dataset or a DataSource), shipped to the workers; `data` the calling task's own (a Dataset
    on its device, or the StreamedSet it streams)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    cpus, gpus = float(per_worker.get("num_cpus", 1.0)), float(per_worker.get("num_gpus", 0.0))
    resources = {"CPU": cpus} | ({"GPU": gpus} if gpus else {}) | (
        {"memory": per_worker["memory"]} if per_worker.get("memory") else {})
    # Ray Train's own run folder (its reports; the checkpoints are ours, in the store): this run's only.
    storage = tempfile.mkdtemp(prefix=f"fragile-train-{cfg.model_key}-")
    progress = train_progress(store, cfg, model.n_params, train_steps(cfg, data.n_train))
    failed = _failure_path(store, cfg)
    delete_file(store, failed)  # an earlier task's record: this attempt may meet other files or settings
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"store": store, "cfg": cfg, "data": source, "cpus": cpus, "report": report,
                           "n_params": model.n_params, "steps": progress.identity["steps"]},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name=f"train-{cfg.config_id}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=TRAIN_FAILURES)),
    )
    try:
        trainer.fit()
    except Exception:
        record = _recorded_failure(store, failed, progress)
        if record is None:
            raise
        raise DeterministicFailure(f"data-parallel training of {cfg.model_key} failed on worker {record['rank']} "
                                   f"(not retried from step {record['step']}: it would fail again): "
                                   f"{record['error']}") from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    delete_file(store, failed)
    state = progress.saved()
    if state is None or state["step"] != progress.identity["steps"] or "assessment" not in state:
        raise RuntimeError(f"data-parallel training of {cfg.model_key} ended without saving θ̂ and its assessment "
                           f"at {progress.path}")
    theta = state["theta"] if isinstance(data, StreamedSet) else state["theta"].to(data.device)
    return TrainResult(theta=theta, seconds=time.perf_counter() - start, **state["summary"]), state["assessment"]


class _RankOrdered:
    """A progress whose load is done by worker 0 first (a file that is not the run's own is set aside once,
    by it alone), then by the others, once worker 0 is past it."""

    def __init__(self, progress, rank: int, barrier: Callable[[], None]) -> None:
        self.progress, self.rank, self.barrier, self.every = progress, rank, barrier, progress.every

    def load(self):
        state = self.progress.load() if self.rank == 0 else None
        self.barrier()
        return state if self.rank == 0 else self.progress.load()

    def save(self, state: dict) -> None:
        self.progress.save(state)


def _attempt(config: dict, rank: int, progress) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from influence.data_parallel import train_data_parallel

    world = ray.train.get_context().get_world_size()
    torch.set_num_threads(max(1, int(config["cpus"])))
    store, cfg, device = config["store"], config["cfg"], ray.train.torch.get_device()
    if streams(cfg, config["data"]):
        data = config["data"].stream(store, max(0, int(config["cpus"]) - 1))
    else:
        data = config["data"].to(device)
    x, y = data.train_inputs()
    model = model_for(cfg, data)
    options = train_options(cfg)
    options.pop("grad_tol", None)  # an L-BFGS setting
    # R and ‖∇R‖ (the summary) on worker 0 alone: the others need not repeat its pass over the data
    result = train_data_parallel(model, x, y, rank=rank, world=world, all_reduce=dist.all_reduce,
                                 weight_decay=cfg.weight_decay, lr=cfg.lr, epochs=cfg.epochs, seed=cfg.seed,
                                 schedule=cfg.schedule, mixed_precision=cfg.mixed_precision,
                                 progress=_RankOrdered(progress, rank, dist.barrier), report=config["report"],
                                 summary=rank == 0, device=device, **options)
    if rank == 0:
        _assess(progress, cfg, model, data, result, device)
    if isinstance(data, StreamedSet):
        data.close()


def _worker(config: dict) -> None:
    """One worker's attempt (`_attempt`), refused at once when an earlier attempt failed deterministically from
    the step it would resume from; a deterministic failure of this attempt is recorded for the next."""
    import ray.train

    store, cfg, rank = config["store"], config["cfg"], ray.train.get_context().get_world_rank()
    failed = _failure_path(store, cfg)
    progress = train_progress(store, cfg, config["n_params"], config["steps"])
    record = _recorded_failure(store, failed, progress)
    if record is not None:
        raise DeterministicFailure(f"worker {record['rank']} failed from step {record['step']}: {record['error']}")
    try:
        _attempt(config, rank, progress)
    except DETERMINISTIC as exc:
        try:
            save_state(store, failed, {"identity": progress.identity, "step": _saved_step(progress), "rank": rank,
                                       "error": f"{type(exc).__name__}: {exc}"}, "a training failure")
        except Exception as record_exc:  # noqa: BLE001 - the run's own error is the one to raise
            print(f"train/{cfg.config_id}: the failure could not be recorded ({record_exc}); it is retried",
                  flush=True)
        raise


def _failure_path(store: Store, cfg: Configuration) -> str:
    return progress_path(store, cfg.experiment, cfg.config_id, "train-failure")


def _recorded_failure(store: Store, path: str, progress) -> dict | None:
    """The recorded deterministic failure of this run when the run would resume from the step it failed
    from, else None (no record, another run's, or the run has saved a later step since)."""
    try:
        record = load_state(store, path)
        if record is None or record.get("identity") != progress.identity:
            return None
        step = _saved_step(progress)  # (this run's own file by now: the failed attempt loaded it first)
    except Exception:  # noqa: BLE001 - unreadable: the attempt goes ahead and meets whatever it meets
        return None
    return record if record.get("step") == step else None


def _assess(progress, cfg: Configuration, model, data, result: TrainResult, device: torch.device) -> None:
    """Add worker 0's summary of θ̂ (R, ‖∇R‖) and its assessment, made here, to the final saved state (unless a
    previous attempt already did)."""
    state = progress.saved()
    if "assessment" in state:
        return
    state["summary"] = {"objective": result.objective, "train_loss": result.train_loss,
                        "grad_norm": result.grad_norm, "epochs": result.epochs}
    state["assessment"] = assess(cfg, model, result.theta.detach(), data, device)
    progress.save(state)


def _saved_step(progress) -> int:
    """The step a run would resume from: its last saved one, or 0."""
    saved = progress.saved()
    return saved["step"] if saved else 0
