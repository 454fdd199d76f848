"""The saved progress of a long run: what a retrain or a data-parallel training run hands to whoever keeps its
state between an interruption and the rerun (the jobs layer backs it with a file of the store), and the checks
both loops make when they resume from it (see :mod:`influence.retrain`'s docstring for why a resumed run equals
the uninterrupted one)."""
from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Where a long run keeps its state between an interruption and its rerun (the jobs layer backs it with a
    file in the store). ``every``: optimiser steps between saves. ``load()``: the state last saved, or None to
    start from the beginning. ``save(state)``: keep ``state`` (a dict of tensors and ints) in place of the last
    one; it must have taken its copy (or written it out) when it returns, since the run goes on mutating its
    buffers."""

    every: int

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


def resumed_state(progress: Progress | None, total: int, **shapes: tuple[int, ...]) -> dict | None:
    """The state ``progress`` holds for a run of ``total`` steps, checked against the run's tensor shapes."""
    if progress is None:
        return None
    if not (isinstance(progress.every, int) and progress.every >= 1):
        raise ValueError(f"progress.every must be an int >= 1 (optimiser steps between saves); got {progress.every!r}")
    state = progress.load()
    if state is None:
        return None
    step = state.get("step")
    if not (isinstance(step, int) and 0 <= step <= total):
        raise ValueError(f"saved progress is at step {step!r}, not one of this run's 0..{total}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"saved progress holds {name} of shape {tuple(state[name].shape)}; this run's is {shape}")
    return state


def save_due(progress: Progress | None, step: int, total: int) -> bool:
    """Whether ``step`` completed steps (of ``total``) call for a save: every ``progress.every``, and the last."""
    return progress is not None and (step % progress.every == 0 or step == total)
