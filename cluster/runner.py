"""Task bodies as Ray tasks, and the coordinator as a Ray actor: the Ray side of the seam in jobs/runner.py.

`RayRunner` submits every body (jobs/tasks.py) as a Ray task with the resources the spec gives its kind. The
tasks leave the trial's placement group: trials only wait on tasks, so they hold a token amount of memory
instead of a CPU, and a 2-CPU machine would otherwise run two trials that each wait forever for a CPU of
their own. Inside the task, torch gets as many threads as the task has CPUs, and the body gets the GPU Ray
assigned to it as its `device` argument.

`ActorCoordinator` lets the pipeline call the coordinator actor as if it were the object itself: calls that
return something wait for the answer, the others (counts, notices) do not. Calls from one caller reach the
actor in order, so a count never overtakes the part it counts.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster import data_parallel
from cluster.metrics import MeteredCoordinator
from jobs.runner import TASK_RETRIES, set_task_cpus, set_task_node
from jobs.tasks import TransientTaskError, device_for
# The coordinator is restarted whenever its process dies, and calls in flight are delivered to the new one
# (every coordinator call is idempotent, see jobs/coordinator.py).
COORDINATOR_RESTARTS = 20
CoordinatorActor = ray.remote(num_cpus=0, max_restarts=COORDINATOR_RESTARTS, max_task_retries=-1)(MeteredCoordinator)


def task_options(resources: dict, name: str) -> dict:
    """Ray options of one task: the kind's resources, outside the trial's placement group, with retries."""
    return {**resources, "name": name, "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None),
            "max_retries": TASK_RETRIES, "retry_exceptions": [TransientTaskError]}


def with_task_resources(fn: Callable) -> Callable:
    """Run a task body on what Ray gave it: as many torch threads as CPUs (small models on a shared node slow
    down several times when every task spreads over all cores), and the GPU, if it got one, as `device`. Ray
    itself points CUDA_VISIBLE_DEVICES at those GPUs. The rows it writes record the node (id and address); a
    streamed data set is decoded by as many loader processes as the task has CPUs beyond the first.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        context = ray.get_runtime_context()
        cpus = context.get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        set_task_node(context.get_node_id(), ray.util.get_node_ip_address())
        set_task_cpus(int(cpus))
        try:
            return fn(*args, device=device_for(context.get_accelerator_ids().get("GPU", [])), **kwargs)
        finally:
            set_task_node(None, None)  # a worker process runs other tasks later
            set_task_cpus(1)

    return wrapper


@functools.cache
def _remote(body: Callable, num_returns: int):
    return ray.remote(num_returns=num_returns)(with_task_resources(body))


class RayRunner:
    """jobs.runner.Runner on Ray: `resources` maps a task kind to its Ray options (`Resources.ray_options()`)."""

    def __init__(self, resources: dict[str, dict], train_workers: int = 1) -> None:
        self.resources, self.train_workers = resources, train_workers

    def put(self, value: Any):
        return ray.put(value)

    def submit(self, kind: str, name: str, body: Callable, *args: Any, num_returns: int = 1):
        if kind == "train" and self.train_workers > 1:
            # Data-parallel: the Ray Train workers take the spec's resources; the task waits for them on one CPU
            # (never on a head without CPUs) with the memory the spec reserves, and evaluates θ̂ there after.
            per_worker = self.resources[kind]
            fit = functools.partial(data_parallel.fit, workers=self.train_workers, per_worker=per_worker)
            waiting = {"num_cpus": 1} | ({"memory": per_worker["memory"]} if per_worker.get("memory") else {})
            return _remote(body, num_returns).options(**task_options(waiting, name)).remote(*args, fit=fit)
        return _remote(body, num_returns).options(**task_options(self.resources[kind], name)).remote(*args)

    def wait(self, handles: list):
        ready, _ = ray.wait(handles, num_returns=1)
        return ready[0]

    def get(self, handle):
        return ray.get(handle)


class ActorCoordinator:
    """The coordinator actor, called like the object (see the module docstring)."""

    NO_ANSWER = frozenset({"task_done", "task_failed", "notice", "add_total"})

    def __init__(self, actor) -> None:
        self.actor = actor

    def __getattr__(self, name: str):
        method = getattr(self.actor, name)
        if name in self.NO_ANSWER:
            return lambda *args, **kwargs: method.remote(*args, **kwargs) and None
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))
