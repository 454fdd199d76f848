"""Data-parallel training of θ̂ with Ray Train: `resources.train.workers: W` > 1 runs a configuration's training
as a `TorchTrainer` of W workers (each with the spec's `resources.train` CPUs and GPUs), a torch.distributed
process group between them (gloo on CPUs, NCCL on GPUs) and `influence.data_parallel.train_data_parallel` in
each: every worker takes its share of each global batch and the gradients are summed once per step.

The train task that starts it only waits (on one CPU), then evaluates θ̂ as for a single-worker run. The
workers open the data where they run (a minibatched file set streams from the node's copy, each worker decoding
only its pieces of the batches with as many loader processes as it has CPUs beyond the first; any other set is
loaded) and hand θ̂ back through the store:
worker 0 saves the run's progress (`jobs.tasks.train_progress`) every `train.checkpoint_every` steps and at the
end. When a worker dies, Ray Train's failure handling restarts the group (up to TRAIN_FAILURES times), and the
new workers continue from the last saved step.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from typing import Callable

import torch

from influence.streaming import StreamedSet
from influence.train import TrainResult, summarise
from jobs.spec import Configuration
from jobs.tasks import model_for, streams, train_options, train_progress, train_steps
from storage.uri import Store

TRAIN_FAILURES = 3  # worker-group restarts Ray Train makes before the train task fails


def fit(store: Store, cfg: Configuration, source, data, model, report: Callable[[int, float], None] | None, *,
        workers: int, per_worker: dict) -> TrainResult:
    """θ̂ of `cfg` trained by `workers` Ray Train workers with `per_worker` Ray resources each (num_cpus,
    num_gpus, memory). `source` is what the tasks get (a Dataset or a DataSource), shipped to the workers;
    `data` the calling task's own (a Dataset on its device, or the StreamedSet it streams) for the final R and
    ‖∇R‖."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    cpus, gpus = float(per_worker.get("num_cpus", 1.0)), float(per_worker.get("num_gpus", 0.0))
    resources = {"CPU": cpus} | ({"GPU": gpus} if gpus else {}) | (
        {"memory": per_worker["memory"]} if per_worker.get("memory") else {})
    # Ray Train's own run folder (its reports; the checkpoints are ours, in the store): this run's only.
    storage = tempfile.mkdtemp(prefix=f"fragile-train-{cfg.model_key}-")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"store": store, "cfg": cfg, "data": source, "cpus": cpus, "report": report},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name=f"train-{cfg.config_id}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=TRAIN_FAILURES)),
    )
    try:
        trainer.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    progress = train_progress(store, cfg, model.n_params, train_steps(cfg, data.n_train))
    state = progress.saved()
    if state is None or state["step"] != progress.identity["steps"]:
        raise RuntimeError(f"data-parallel training of {cfg.model_key} ended without saving θ̂ at {progress.path}")
    x, y = data.train_inputs()
    theta = state["theta"] if isinstance(data, StreamedSet) else state["theta"].to(data.device)
    return summarise(model, theta, x, y, cfg.weight_decay, cfg.batch_size, cfg.epochs, time.perf_counter() - start)


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


def _worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from influence.data_parallel import train_data_parallel

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config["cpus"])))
    store, cfg, device = config["store"], config["cfg"], ray.train.torch.get_device()
    if streams(cfg, config["data"]):
        data = config["data"].stream(store, max(0, int(config["cpus"]) - 1))
    else:
        data = config["data"].to(device)
    x, y = data.train_inputs()
    model = model_for(cfg, data)
    progress = train_progress(store, cfg, model.n_params, train_steps(cfg, data.n_train))
    options = train_options(cfg)
    options.pop("grad_tol", None)  # an L-BFGS setting
    train_data_parallel(model, x, y, rank=rank, world=world, all_reduce=dist.all_reduce,
                        weight_decay=cfg.weight_decay, lr=cfg.lr, epochs=cfg.epochs, seed=cfg.seed,
                        schedule=cfg.schedule, mixed_precision=cfg.mixed_precision,
                        progress=_RankOrdered(progress, rank, dist.barrier), report=config["report"], summary=False,
                        device=device, **options)
    if isinstance(data, StreamedSet):
        data.close()
