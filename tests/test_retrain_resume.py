"""A retrain interrupted after a saved state and run again from it equals the uninterrupted retrain, bit for bit.

Each of the three paths (StackedMLP full batch, the generic stacked path with minibatches, one model at a time)
is interrupted at a save that falls inside an epoch where it can, then rerun with the same progress; the rerun's
first save proves it started where the state left off rather than from the beginning. All in float64, compared
with torch.equal: the order of every epoch and the learning rate of every step are functions of the step alone,
so nothing may differ, not even round-off.
"""

from __future__ import annotations

import pytest
import torch

from influence.models import MLP, build_model
from influence.retrain import group_weights, removal_weights, retrain_batched, retrain_loop
from tests.test_influence_train_minibatch import ContractOnly

WD = 0.005
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Preempted(Exception):
    pass


class MemoryProgress:
    """Keeps the last saved state (deep-copied); raises Preempted right after save number ``stop_after``."""

    def __init__(self, every: int, stop_after: int | None = None) -> None:
        self.every = every
        self.stop_after = stop_after
        self.state: dict | None = None
        self.saved_steps: list[int] = []

    def load(self) -> dict | None:
        return self.state

    def save(self, state: dict) -> None:
        self.state = _copy(state)
        self.saved_steps.append(state["step"])
        if self.stop_after is not None and len(self.saved_steps) == self.stop_after:
            raise Preempted


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _interrupted_then_resumed(run, *args, every: int, stop_after: int, **kw) -> tuple[torch.Tensor, MemoryProgress]:
    progress = MemoryProgress(every, stop_after)
    with pytest.raises(Preempted):
        run(*args, progress=progress, **kw)
    progress.stop_after, progress.saved_steps = None, []
    return run(*args, progress=progress, **kw), progress


def _cases(iris):
    mlp = MLP(4, 3, depth=2, width=5)
    x, y = iris.x_train, iris.y_train
    theta = mlp.init(0) + 0.1  # any start: the point is the steps, not where they lead
    weights = removal_weights(len(x), [3, 70], controls=2)
    cnn = build_model("small_cnn", input_shape=(1, 8, 8), num_classes=10)
    gen = torch.Generator().manual_seed(0)
    xc = torch.randn(40, 1, 8, 8, generator=gen, dtype=torch.float64)
    yc = torch.randint(0, 10, (40,), generator=gen)
    return {
        # 60 full-batch steps on StackedMLP: saves at 7, 14, 21, ..., stopped after the third (step 21)
        "stacked": (retrain_batched, (mlp, theta, x, y, weights), dict(epochs=60, schedule="cosine"), 7, 3),
        # 8 epochs of 5 batches on the generic path (an MLP seen only through the contract): saves at 7, 14,
        # stopped at 14, in the middle of the third epoch
        "generic": (retrain_batched, (ContractOnly(mlp), theta, x, y, weights),
                    dict(epochs=8, batch_size=25, seed=3, schedule="step"), 7, 2),
        # one model at a time, 3 rows of 3 epochs of 3 batches: 27 steps counted over the rows; saves at
        # 4, 8, 12, stopped at 12 (row 1, its third step)
        "loop": (retrain_loop, (cnn, cnn.init(0, dtype=torch.float64), xc, yc, group_weights(40, [[0], [3, 4]])),
                 dict(epochs=3, batch_size=16, seed=1), 4, 3),
    }


@pytest.mark.parametrize("path", ["stacked", "generic", "loop"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_resumed_retrain_equals_the_uninterrupted_one(iris, path, optimizer):
    run, args, kw, every, stop_after = _cases(iris)[path]
    kw = dict(kw, weight_decay=WD, lr=0.01, optimizer=optimizer)
    whole = run(*args, **kw)
    resumed, progress = _interrupted_then_resumed(run, *args, every=every, stop_after=stop_after, **kw)
    assert torch.equal(resumed, whole)
    # The rerun went on from the saved step: its first save is the next one after it, and its last the end.
    assert progress.saved_steps[0] == (stop_after + 1) * every
    assert progress.state["step"] == progress.saved_steps[-1]
    assert not torch.equal(whole, args[1].expand_as(whole))  # the steps did move the parameters


def test_a_run_given_its_final_state_returns_it_without_stepping(iris):
    run, args, kw, every, _ = _cases(iris)["stacked"]
    kw = dict(kw, weight_decay=WD, lr=0.01)
    progress = MemoryProgress(every)
    whole = run(*args, progress=progress, **kw)
    assert progress.saved_steps[-1] == 60  # the end is always saved, also when `every` does not divide it
    progress.saved_steps = []
    assert torch.equal(run(*args, progress=progress, **kw), whole)
    assert progress.saved_steps == []


def test_a_progress_that_does_not_fit_the_run_is_refused(iris):
    run, args, kw, every, _ = _cases(iris)["generic"]
    kw = dict(kw, weight_decay=WD, lr=0.01)
    progress = MemoryProgress(every)
    run(*args, progress=progress, **kw)
    state = progress.state
    progress.state = dict(state, step=10_000)
    with pytest.raises(ValueError, match="step 10000, not one of this run's 0..40"):
        run(*args, progress=progress, **kw)
    progress.state = dict(state, params=state["params"][:1])
    with pytest.raises(ValueError, match=r"params of shape \(1, 73\); this run's is \(4, 73\)"):
        run(*args, progress=progress, **kw)
    progress.every = 0
    with pytest.raises(ValueError, match="progress.every must be an int >= 1"):
        run(*args, progress=progress, **kw)


def test_lbfgs_refuses_a_progress(iris):
    model = MLP(4, 3, depth=1, width=5)
    with pytest.raises(ValueError, match="'lbfgs' cannot resume"):
        retrain_batched(model, model.init(0), iris.x_train, iris.y_train, removal_weights(len(iris.x_train), [0]),
                        weight_decay=WD, lr=1.0, epochs=5, optimizer="lbfgs", progress=MemoryProgress(2))
