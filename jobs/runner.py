"""Where a task body runs: the seam between the per-configuration pipeline and the machinery that runs it.

The pipeline (`jobs/pipeline.py`) hands every task body (`jobs/tasks.py`) to a runner and only ever asks it
four things: `put` a value the tasks share (θ̂ found in the store), `submit` a body with its arguments,
`wait` for one of several submitted tasks, and `get` what a task returned (or raise what it raised).

- `InlineRunner` (here) runs each body at once, in this process, on the CPU: no Ray, no Tune. For debugging
  (a breakpoint in a task body is hit), for `fragile run --inline`, and for most pipeline tests.
- `cluster.runner.RayRunner` submits each body as a Ray task with the resources the spec gives its kind, the
  retries a cluster needs, and the GPU Ray assigned to it passed in as the body's `device`.

Both hand the body the same arguments; only the `device` keyword differs (the CPU here). Both give torch as
many threads as the spec gives the task kind CPUs, and both run a task again when it failed because the store
stayed unreachable beyond the retry budget (`TransientTaskError`), at most `TASK_RETRIES` times.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Protocol

from jobs.spec_checks import RESOURCE_KINDS as TASK_KINDS

# The node a task body runs on, as the runner that started it says: the Ray runner sets it in the task's
# process before the body runs (cluster/runner.py); inline runs leave it unset. Rows record it.
_TASK_NODE: dict[str, str | None] = {"node_id": None, "node_ip": None}


def set_task_node(node_id: str | None, node_ip: str | None) -> None:
    _TASK_NODE.update(node_id=node_id, node_ip=node_ip)


_TASK_CPUS: list[int] = [1]  # the CPUs the runner gave the task running in this process (1 when run inline)


def set_task_cpus(cpus: int) -> None:
    _TASK_CPUS[0] = max(1, int(cpus))


def loader_workers() -> int:
    """Data-loading processes for the task running here: its CPUs beyond the first (the first computes)."""
    return _TASK_CPUS[0] - 1


def node_columns(n: int) -> dict[str, list]:
    """The node_id and node_ip columns of n rows computed in this process."""
    return {name: [value] * n for name, value in _TASK_NODE.items()}
# A task is run again when its worker dies (Ray does that by itself) or when it failed because the store stayed
# unreachable beyond the retry budget (TransientTaskError); a task's own exceptions (a singular Hessian, a bad
# index) are deterministic and retrying them would only waste time.
TASK_RETRIES = 3


class Runner(Protocol):
    def put(self, value: Any) -> Any: ...

    def submit(self, kind: str, name: str, body: Callable, *args: Any, num_returns: int = 1) -> Any: ...

    def wait(self, handles: list) -> Any: ...

    def get(self, handle: Any) -> Any: ...


class Handle:
    """A finished inline task: its value, or the exception it raised (raised again by `get`)."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error


class InlineRunner:
    """Runs every task body in this process, one after another, the moment it is submitted.

    `threads`: torch's intra-op threads while a body of each kind runs (kind -> count; None: leave torch's
    setting alone), as a Ray task gets as many as its CPUs; tiny models run fastest on one. `on_task_end` is
    called after every body (the CLI refreshes its progress bars there)."""

    def __init__(self, threads: dict[str, int] | None = None, on_task_end: Callable[[], None] | None = None) -> None:
        self.threads, self.on_task_end = threads or {}, on_task_end
        self.ran: list[tuple[str, str]] = []  # (kind, name) of every body run, in order (retries included)

    def put(self, value: Any) -> Handle:
        return Handle(value)

    def submit(self, kind: str, name: str, body: Callable, *args: Any, num_returns: int = 1):
        if kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {kind!r}; the kinds are {', '.join(TASK_KINDS)}")
        from jobs.tasks import CPU, TransientTaskError

        resolved = [a.value if isinstance(a, Handle) else a for a in args]
        for attempt in range(TASK_RETRIES + 1):
            self.ran.append((kind, name))
            try:
                with _threads(self.threads.get(kind)):
                    value = body(*resolved, device=CPU)
            except TransientTaskError as exc:
                if attempt == TASK_RETRIES:
                    handles = (Handle(error=exc),) * num_returns
            except Exception as exc:  # noqa: BLE001 - handed to whoever gets the result, as Ray would
                handles = (Handle(error=exc),) * num_returns
                break
            else:
                handles = tuple(Handle(v) for v in (value if num_returns > 1 else (value,)))
                break
        if self.on_task_end is not None:
            self.on_task_end()
        return handles if num_returns > 1 else handles[0]

    def wait(self, handles: list) -> Handle:
        return handles[0]  # every inline task has finished by the time it is submitted

    def get(self, handle: Handle) -> Any:
        if handle.error is not None:
            raise handle.error
        return handle.value


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op threads set to `n` for the block (None: left alone)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
