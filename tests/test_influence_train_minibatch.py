"""Minibatch training and retraining for any model: each path against the plain one it must equal.

train() against a hand-written torch.optim loop over the documented order; the generic stacked retraining
against retrain_loop (MLP and a small conv net); the generic full batch against StackedMLP; a control row of a
retraining against train() itself. All in float64, where agreement to 1e-10 leaves no room for a wrong batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from influence.models import MLP, build_model
from influence.objective import objective, per_example_loss
from influence.retrain import (
    epoch_order,
    epoch_seed,
    group_weights,
    removal_weights,
    retrain_batched,
    retrain_loop,
    scheduled_lr,
)
from influence.train import train

WD = 0.005
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fitted(iris):
    model = MLP(4, 3, depth=2, width=5)
    return model, train(model, iris.x_train, iris.y_train, weight_decay=WD, lr=0.02, epochs=100, seed=0).theta


class ContractOnly:
    """An MLP seen only through the model contract (n_params, init, forward): not an ``MLP`` instance, so
    retrain_batched must take its generic path even for the full batch."""

    def __init__(self, model: MLP) -> None:
        self._model = model
        self.n_params = model.n_params

    def init(self, seed, dtype=torch.float64, device="cpu"):
        return self._model.init(seed, dtype=dtype, device=device)

    def forward(self, theta, x):
        return self._model.forward(theta, x)


class TinyConv:
    """x [n, 1, H, W] → 3×3 conv (2 channels, padding 1, tanh) → global mean pool → linear to C, over a flat θ.

    Θ [K, P] goes through ``torch.func.vmap``, as the project's CNNs do."""

    def __init__(self, num_classes: int = 3, channels: int = 2) -> None:
        self.shapes = [(channels, 1, 3, 3), (channels,), (num_classes, channels), (num_classes,)]
        self.n_params = sum(math.prod(s) for s in self.shapes)

    def init(self, seed, dtype=torch.float64, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        return (0.5 * torch.randn(self.n_params, generator=gen, dtype=dtype, device="cpu")).to(device)

    def _one(self, theta, x):
        parts, offset = [], 0
        for shape in self.shapes:
            parts.append(theta[offset : offset + math.prod(shape)].view(shape))
            offset += math.prod(shape)
        conv_w, conv_b, lin_w, lin_b = parts
        h = torch.tanh(F.conv2d(x, conv_w, conv_b, padding=1)).mean(dim=(2, 3))
        return h @ lin_w.t() + lin_b

    def forward(self, theta, x):
        if theta.ndim == 1:
            return self._one(theta, x)
        return torch.func.vmap(self._one, in_dims=(0, None))(theta, x)


def _images(n=40, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


# ---- order and schedule ----------------------------------------------------------------------------------------


def test_epoch_order_is_seeded_per_seed_and_epoch():
    a = epoch_order(50, seed=3, epoch=7)
    assert torch.equal(a, epoch_order(50, seed=3, epoch=7))
    assert torch.equal(a.sort().values, torch.arange(50))  # a permutation: every point once
    assert not torch.equal(a, epoch_order(50, seed=4, epoch=7))
    assert not torch.equal(a, epoch_order(50, seed=3, epoch=8))
    # Neighbouring seeds (the control replicates' orders) are not each other's orders shifted by one epoch,
    # as seed + epoch would make them.
    assert not torch.equal(epoch_order(50, seed=4, epoch=0), epoch_order(50, seed=3, epoch=1))
    # The documented derivation, so another implementation (or a resumed run) can reproduce it.
    assert torch.equal(a, torch.randperm(50, generator=torch.Generator().manual_seed(epoch_seed(3, 7))))
    # 32-bit seeds (torch's CPU generator ignores the rest), distinct over the seeds and epochs a sweep uses.
    seeds = [epoch_seed(s * 1000 + 500 + r, e) for s in range(10) for r in range(4) for e in range(200)]
    assert all(0 <= v < 2**32 for v in seeds) and len(set(seeds)) == len(seeds)


def test_schedules_give_the_documented_learning_rates():
    total = 8
    assert [scheduled_lr("constant", 0.1, t, total) for t in range(total)] == [0.1] * total
    assert [scheduled_lr("step", 1.0, t, total) for t in range(total)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01], rel=1e-15)
    cosine = [scheduled_lr("cosine", 2.0, t, total) for t in range(total)]
    assert cosine == pytest.approx([1 + math.cos(math.pi * t / 8) for t in range(total)], rel=1e-15)
    assert cosine[0] == 2.0 and cosine[4] == pytest.approx(1.0) and all(a > b for a, b in zip(cosine, cosine[1:]))
    # step: the cuts sit at 50% and 75% of the steps also when total is not a multiple of 4
    assert [scheduled_lr("step", 1.0, t, 5) for t in range(5)] == pytest.approx([1, 1, 1, 0.1, 0.01])


def test_options_are_checked_with_the_argument_named(iris):
    model = MLP(4, 3, depth=1, width=5)
    x, y = iris.x_train, iris.y_train
    kw = dict(weight_decay=WD, lr=0.01, epochs=1, seed=0)
    with pytest.raises(ValueError, match="optimizer 'rmsprop'.*adam, sgd"):
        train(model, x, y, optimizer="rmsprop", **kw)
    with pytest.raises(ValueError, match="schedule 'linear'.*constant, cosine, step"):
        retrain_batched(model, model.init(0), x, y, removal_weights(len(x), [0]), schedule="linear", **kw)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        retrain_loop(model, model.init(0), x, y, removal_weights(len(x), [0]), batch_size=0, **kw)


def test_mixed_precision_on_cpu_is_refused(iris):
    model = MLP(4, 3, depth=1, width=5)
    with pytest.raises(ValueError, match="mixed_precision needs a CUDA device"):
        train(model, iris.x_train.float(), iris.y_train, weight_decay=WD, lr=0.01, epochs=1, seed=0,
              mixed_precision=True)


# ---- train -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer,schedule", [("adam", "cosine"), ("sgd", "step"), ("sgd", "constant")])
def test_minibatch_training_equals_a_plain_torch_loop(iris, optimizer, schedule):
    model = MLP(4, 3, depth=1, width=5)
    x, y = iris.x_train, iris.y_train
    epochs, batch, seed, lr = 6, 32, 11, 0.05  # 120 points: batches of 32, 32, 32 and the partial 24
    result = train(model, x, y, weight_decay=WD, lr=lr, epochs=epochs, seed=seed, optimizer=optimizer,
                   batch_size=batch, schedule=schedule)

    theta = model.init(seed).requires_grad_(True)
    opt = (torch.optim.Adam([theta], lr=lr) if optimizer == "adam"
           else torch.optim.SGD([theta], lr=lr, momentum=0.9))
    steps = epochs * 4
    for epoch in range(epochs):
        order = torch.randperm(120, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        for b, idx in enumerate(order.split(batch)):
            t = epoch * 4 + b
            if schedule == "cosine":
                opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
            elif schedule == "step":
                opt.param_groups[0]["lr"] = lr * (1 if t < 12 else 0.1 if t < 18 else 0.01)
            opt.zero_grad()
            objective(model, theta, x[idx], y[idx], WD).backward()
            opt.step()
    assert torch.allclose(result.theta, theta.detach(), rtol=0, atol=1e-12)
    assert not torch.allclose(result.theta, model.init(seed), atol=1e-3)  # it trained

    # The final facts are over the FULL training set (computed in chunks of 32), not over one batch.
    value = objective(model, theta, x, y, WD)
    (grad,) = torch.autograd.grad(value, theta)
    assert result.objective == pytest.approx(float(value.detach()), rel=1e-12)
    assert result.grad_norm == pytest.approx(float(grad.norm()), rel=1e-10)
    assert result.train_loss == pytest.approx(float(per_example_loss(model, theta.detach(), x, y).mean()), rel=1e-12)


def test_a_batch_covering_all_points_is_the_full_batch(iris, fitted):
    model, theta = fitted
    x, y = iris.x_train, iris.y_train
    kw = dict(weight_decay=WD, lr=0.01, epochs=5, seed=0)
    assert torch.equal(train(model, x, y, batch_size=500, **kw).theta, train(model, x, y, **kw).theta)
    w = removal_weights(len(x), [3])
    assert torch.equal(retrain_batched(model, theta, x, y, w, batch_size=120, **kw),
                       retrain_batched(model, theta, x, y, w, **kw))


def test_progress_is_reported_about_every_percent(iris):
    model = MLP(4, 3, depth=1, width=5)
    x, y = iris.x_train, iris.y_train
    calls = []
    train(model, x, y, weight_decay=WD, lr=0.01, epochs=250, seed=0, progress=lambda e, loss: calls.append(e))
    assert calls[-1] == 250 and 100 <= len(calls) <= 130 and calls == sorted(set(calls))
    short = []
    train(model, x, y, weight_decay=WD, lr=0.01, epochs=3, seed=0, progress=lambda e, loss: short.append((e, loss)))
    assert [e for e, _ in short] == [1, 2, 3]
    assert short[0][1] == pytest.approx(float(objective(model, model.init(0), x, y, WD)), rel=1e-14)  # R(θ0)
    minibatched = []
    train(model, x, y, weight_decay=WD, lr=0.01, epochs=2, seed=0, batch_size=50,
          progress=lambda e, loss: minibatched.append(loss))
    assert len(minibatched) == 2 and all(0 < loss < 3 for loss in minibatched)


# ---- retraining --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer,batch_size,schedule", [
    ("adam", 32, "constant"), ("sgd", 32, "cosine"), ("adam", 50, "step"), ("sgd", None, "constant"),
])
def test_generic_batched_retraining_equals_retrain_loop_for_an_mlp(iris, fitted, optimizer, batch_size, schedule):
    model, theta = fitted
    x, y = iris.x_train, iris.y_train
    weights = removal_weights(len(x), [0, 7, 64, 119])
    kw = dict(weight_decay=WD, lr=0.01, epochs=6, optimizer=optimizer, batch_size=batch_size, schedule=schedule,
              seed=5)  # ≤ 24 steps
    batched = retrain_batched(ContractOnly(model), theta, x, y, weights, **kw)
    looped = retrain_loop(model, theta, x, y, weights, **kw)
    assert batched.shape == (5, model.n_params)
    assert torch.allclose(batched, looped, rtol=0, atol=1e-10)
    assert not torch.allclose(batched[1], batched[0], atol=1e-7)  # the removal did something
    if batch_size is not None:  # the MLP itself takes the generic path too once minibatched
        assert torch.allclose(retrain_batched(model, theta, x, y, weights, **kw), looped, rtol=0, atol=1e-10)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_generic_batched_retraining_equals_retrain_loop_for_a_conv_net(optimizer):
    model = TinyConv()
    x, y = _images()
    theta0 = model.init(0)
    starts = theta0 + 0.01 * torch.randn(4, model.n_params, generator=torch.Generator().manual_seed(1),
                                         dtype=torch.float64)  # per-row starting points, [K, P]
    weights = group_weights(len(x), [[0], [5, 6, 7], []])
    kw = dict(weight_decay=WD, lr=0.05, epochs=5, optimizer=optimizer, batch_size=16, seed=2)  # 15 steps
    batched = retrain_batched(model, starts, x, y, weights, **kw)
    looped = retrain_loop(model, starts, x, y, weights, **kw)
    assert torch.allclose(batched, looped, rtol=0, atol=1e-10)
    assert not torch.allclose(batched, starts, atol=1e-4)


@pytest.mark.parametrize("optimizer,schedule", [("adam", "constant"), ("sgd", "cosine")])
def test_full_batch_generic_path_equals_the_stacked_mlp_path(iris, fitted, optimizer, schedule):
    model, theta = fitted
    x, y = iris.x_train, iris.y_train
    weights = removal_weights(len(x), [2, 90], controls=2)
    kw = dict(weight_decay=WD, lr=0.01, epochs=30, optimizer=optimizer, schedule=schedule)
    stacked = retrain_batched(model, theta, x, y, weights, **kw)
    generic = retrain_batched(ContractOnly(model), theta, x, y, weights, **kw)
    assert torch.allclose(stacked, generic, rtol=0, atol=1e-10)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_control_row_retraced_from_theta0_is_the_training_run(iris, optimizer):
    """Retraining from scratch with the training seed: the control row IS θ̂ (same order, same optimiser
    arithmetic), so actual effects are measured against the model the estimates were made for."""
    model = MLP(4, 3, depth=1, width=5)
    x, y = iris.x_train, iris.y_train
    kw = dict(weight_decay=WD, lr=0.02, epochs=5, optimizer=optimizer, batch_size=25, schedule="cosine")
    theta_hat = train(model, x, y, seed=9, **kw).theta
    rows = retrain_batched(model, model.init(9), x, y, removal_weights(len(x), [4]), seed=9, **kw)
    assert torch.allclose(rows[0], theta_hat, rtol=0, atol=1e-12)
    assert not torch.allclose(rows[1], theta_hat, atol=1e-6)


def test_zero_epochs_return_theta0(iris, fitted):
    model, theta = fitted
    x, y = iris.x_train, iris.y_train
    weights = removal_weights(len(x), [1, 2])
    kw = dict(weight_decay=WD, lr=0.01, epochs=0)
    starts = theta + torch.linspace(0, 1, 3, dtype=torch.float64).unsqueeze(1)
    for start in (theta, starts):
        expected = start.expand(3, -1)
        assert torch.equal(retrain_batched(model, start, x, y, weights, **kw), expected)  # StackedMLP
        assert torch.equal(retrain_batched(model, start, x, y, weights, batch_size=16, **kw), expected)  # generic
        assert torch.equal(retrain_loop(model, start, x, y, weights, batch_size=16, **kw), expected)
    for batch_size in (None, 16):
        assert torch.equal(train(model, x, y, theta0=theta, seed=0, batch_size=batch_size, **kw).theta, theta)


def test_group_weights():
    w = group_weights(6, [[1, 4], [], [5]], controls=2)
    assert w.shape == (5, 6) and w.dtype == torch.float64
    assert torch.equal(w[:2], torch.ones(2, 6))
    assert torch.equal(w[2], torch.tensor([1.0, 0, 1, 1, 0, 1], dtype=torch.float64))
    assert torch.equal(w[3], w[0])  # an empty group removes nothing: a control row
    assert torch.equal(w[4], torch.tensor([1.0, 1, 1, 1, 1, 0], dtype=torch.float64))
    assert torch.equal(group_weights(6, [[3], [0]], controls=1), removal_weights(6, [3, 0]))
    assert group_weights(6, [], controls=0, dtype=torch.float32).shape == (0, 6)
    with pytest.raises(ValueError, match=r"\[0, 6\).*\[6\]"):
        group_weights(6, [[1], [6]])


# ---- the project's CNN, once models.py has it ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cnn():
    try:
        return build_model("small_cnn", input_shape=(1, 8, 8), num_classes=10)
    except (TypeError, ValueError) as exc:
        pytest.skip(f"build_model('small_cnn', ...) is not available yet: {exc}")


def test_small_cnn_batched_retraining_equals_retrain_loop(small_cnn):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (40,), generator=gen)
    theta0 = small_cnn.init(0, dtype=torch.float64)
    weights = group_weights(40, [[0], [3, 4]])
    kw = dict(weight_decay=WD, lr=0.01, epochs=3, batch_size=16, seed=1)  # 9 steps
    for optimizer in ("adam", "sgd"):
        batched = retrain_batched(small_cnn, theta0, x, y, weights, optimizer=optimizer, **kw)
        looped = retrain_loop(small_cnn, theta0, x, y, weights, optimizer=optimizer, **kw)
        assert torch.allclose(batched, looped, rtol=0, atol=1e-10), optimizer
    fit = train(small_cnn, x, y, weight_decay=WD, lr=0.01, epochs=2, seed=0, batch_size=16, optimizer="sgd")
    assert fit.theta.shape == (small_cnn.n_params,) and math.isfinite(fit.grad_norm)


def test_minibatch_paths_compute_on_their_inputs_device(iris, fitted):
    """As tests/test_influence_device.py checks the full-batch paths: with torch's default device set to the
    meta stand-in, every buffer, order and workspace must still land on the inputs' device (the CPU). train is
    checked with SGD: some torch versions put Adam's step counter on the default device themselves."""
    model, theta = fitted
    x, y = iris.x_train, iris.y_train
    weights = group_weights(len(x), [[0], [1, 2]])
    kw = dict(weight_decay=WD, lr=0.01, epochs=2, batch_size=32, schedule="cosine")
    conv, (xc, yc) = TinyConv(), _images()
    with torch.device("meta"):
        for optimizer in ("adam", "sgd"):
            for run in (retrain_batched, retrain_loop):
                assert run(model, theta, x, y, weights, optimizer=optimizer, **kw).device.type == "cpu"
            assert retrain_batched(conv, conv.init(0), xc, yc, group_weights(40, [[3]]), optimizer=optimizer,
                                   **kw).device.type == "cpu"
        fit = train(model, x, y, seed=0, optimizer="sgd", progress=lambda epoch, loss: None, **kw)
        assert fit.theta.device.type == "cpu" and math.isfinite(fit.grad_norm)
