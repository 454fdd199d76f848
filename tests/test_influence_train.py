"""Models, objective, training and retraining: batched equals one-at-a-time, hand-derived equals autograd."""

from __future__ import annotations

import math

import pytest
import torch

from influence.models import ACTIVATIONS, MLP, build_model
from influence.objective import objective, per_example_loss
from influence.scores import per_example_grads
from influence.stacked import StackedMLP
from influence.retrain import removal_weights, retrain_batched, retrain_loop
from influence.train import train

WEIGHT_DECAY = 0.005


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- models --------------------------------------------------------------------------------------------------


def test_parameter_count_and_layout():
    model = MLP(4, 3, depth=2, width=5)
    assert model.n_params == (4 * 5 + 5) + (5 * 5 + 5) + (5 * 3 + 3)
    theta = torch.arange(model.n_params, dtype=torch.float64)
    (w1, b1), (w2, b2), (w3, b3) = model.unflatten(theta)
    assert w1.shape == (5, 4) and b3.shape == (3,)
    assert w1[0, 1] == 1 and b1[0] == 20 and w2[0, 0] == 25  # W row-major, then b, layer by layer
    w1.zero_()  # views, not copies
    assert theta[:20].abs().sum() == 0


def test_init_is_seeded_and_bounded_like_nn_linear():
    model = MLP(4, 3, depth=1, width=50)
    a, b = model.init(7), model.init(7)
    assert torch.equal(a, b) and not torch.equal(a, model.init(8))
    assert a.dtype == torch.float64 and model.init(7, dtype=torch.float32).dtype == torch.float32
    (w1, b1), (w2, _) = model.unflatten(a)
    assert w1.abs().max() <= 1 / math.sqrt(4) and w2.abs().max() <= 1 / math.sqrt(50)
    assert w1.abs().max() > 0.9 / math.sqrt(4)  # uniform over the whole interval, not a narrower one
    assert abs(float(w2.mean())) < 0.02


def test_build_model():
    assert build_model("logistic", in_features=4, num_classes=3, depth=5, width=9).depth == 0
    assert build_model("mlp", in_features=4, num_classes=3, depth=2, width=9).n_params == MLP(4, 3, 2, 9).n_params
    with pytest.raises(ValueError, match="cnn.*mlp, logistic"):
        build_model("cnn", in_features=4, num_classes=3)
    with pytest.raises(ValueError, match="swish"):
        MLP(4, 3, depth=1, width=5, activation="swish")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_stacked_forward_equals_separate_forwards(iris, activation):
    model = MLP(4, 3, depth=3, width=5, activation=activation)
    thetas = torch.stack([model.init(s) for s in range(4)])
    stacked = model.forward(thetas, iris.x_train)
    assert stacked.shape == (4, iris.n_train, 3)
    for k in range(4):
        assert torch.allclose(stacked[k], model.forward(thetas[k], iris.x_train), rtol=0, atol=1e-13)
    losses = per_example_loss(model, thetas, iris.x_train, iris.y_train)
    assert torch.allclose(losses[2], per_example_loss(model, thetas[2], iris.x_train, iris.y_train), atol=1e-13)


def test_logistic_is_a_single_linear_map(iris):
    model = build_model("logistic", in_features=4, num_classes=3)
    theta = model.init(0)
    ((w, b),) = model.unflatten(theta)
    assert torch.allclose(model.forward(theta, iris.x_train), iris.x_train @ w.T + b)


# ---- objective -----------------------------------------------------------------------------------------------


def test_objective_keeps_n_when_a_weight_is_zero(iris):
    model = MLP(4, 3, depth=1, width=5)
    theta = model.init(0)
    x, y = iris.x_train, iris.y_train
    n = x.shape[0]
    losses = per_example_loss(model, theta, x, y)
    reg = 0.5 * WEIGHT_DECAY * float(theta @ theta)
    weights = torch.ones(n, dtype=torch.float64)
    weights[17] = 0.0
    removed = objective(model, theta, x, y, WEIGHT_DECAY, weights)
    assert float(removed) == pytest.approx((float(losses.sum()) - float(losses[17])) / n + reg, rel=1e-14)
    assert float(objective(model, theta, x, y, WEIGHT_DECAY)) == pytest.approx(float(losses.mean()) + reg)
    # Stacked: one value per row of weights.
    rows = removal_weights(n, [17, 3])
    values = objective(model, theta.expand(3, -1), x, y, WEIGHT_DECAY, rows)
    assert values.shape == (3,) and float(values[1]) == pytest.approx(float(removed), rel=1e-14)


def test_per_example_grads_equal_autograd_one_by_one(iris):
    model = MLP(4, 3, depth=2, width=5, activation="gelu")
    theta = model.init(1)
    grads = per_example_grads(model, theta, iris.x_train, iris.y_train, chunk_size=7)  # chunks of uneven size
    assert grads.shape == (iris.n_train, model.n_params)
    for i in (0, 6, 7, 119):
        t = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(per_example_loss(model, t, iris.x_train[i : i + 1], iris.y_train[i : i + 1])[0], t)
        assert torch.allclose(grads[i], g, atol=1e-14)


# ---- training and retraining ---------------------------------------------------------------------------------


def test_removal_weights():
    w = removal_weights(5, [3, 0], controls=2)
    assert w.shape == (4, 5) and w.dtype == torch.float64
    assert torch.equal(w[:2], torch.ones(2, 5))
    assert torch.equal(w[2], torch.tensor([1.0, 1, 1, 0, 1], dtype=torch.float64))
    assert torch.equal(w[3], torch.tensor([0.0, 1, 1, 1, 1], dtype=torch.float64))
    assert removal_weights(5, [], controls=1).shape == (1, 5)
    with pytest.raises(ValueError, match=r"\[0, 5\).*\[5\]"):
        removal_weights(5, [5])


def test_train_reaches_a_stationary_point(iris):
    model = MLP(4, 3, depth=1, width=5)
    result = train(model, iris.x_train, iris.y_train, weight_decay=WEIGHT_DECAY, lr=0.05, epochs=1000, seed=0)
    assert result.grad_norm < 1e-4
    assert result.epochs == 1000 and result.seconds > 0
    assert result.objective == pytest.approx(
        float(objective(model, result.theta, iris.x_train, iris.y_train, WEIGHT_DECAY))
    )
    assert result.train_loss < result.objective
    again = train(model, iris.x_train, iris.y_train, weight_decay=WEIGHT_DECAY, lr=0.05, epochs=10, seed=0)
    assert torch.equal(again.theta, train(model, iris.x_train, iris.y_train, weight_decay=WEIGHT_DECAY,
                                          lr=0.05, epochs=10, seed=0, theta0=model.init(0)).theta)


def _torch_loop(model, theta0, x, y, *, weight_decay, lr, epochs, optimizer="adam", schedule="constant",
                losses=None):
    """Plain full-batch training: autograd on the objective and torch.optim's single-tensor step."""
    theta = theta0.clone().requires_grad_(True)
    opt = (torch.optim.Adam([theta], lr=lr, foreach=False) if optimizer == "adam"
           else torch.optim.SGD([theta], lr=lr, momentum=0.9, foreach=False))
    for step in range(epochs):
        if schedule == "cosine":
            opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / epochs))
        opt.zero_grad()
        value = objective(model, theta, x, y, weight_decay)
        value.backward()
        opt.step()
        if losses is not None:
            losses.append(float(value.detach()))
    return theta.detach()


def test_hand_written_adam_equals_torch_optim_adam(iris):
    """retrain_loop's update against torch.optim.Adam on the same objective."""
    model = MLP(4, 3, depth=1, width=5)
    theta0 = model.init(2)
    mine = retrain_loop(model, theta0, iris.x_train, iris.y_train, torch.ones(1, iris.n_train),
                        weight_decay=WEIGHT_DECAY, lr=0.01, epochs=50)
    reference = _torch_loop(model, theta0, iris.x_train, iris.y_train, weight_decay=WEIGHT_DECAY, lr=0.01, epochs=50)
    assert torch.allclose(mine[0], reference, rtol=0, atol=1e-13)


@pytest.mark.parametrize("depth", [1, 4, 8])
@pytest.mark.parametrize("weight_decay", [WEIGHT_DECAY, 0.0])
def test_lean_training_equals_autograd_training(iris, depth, weight_decay):
    """Full-batch MLP training runs the stacked hand-derived step; it must be autograd + torch.optim.Adam up to
    round-off. 300 epochs at lr 0.01: long enough to move θ far from θ0, short of where deep tanh networks
    start to amplify round-off (about 1,000 epochs at depth 8, where a 1e-15 change of θ0 does the same)."""
    model = MLP(4, 3, depth=depth, width=5)
    seen = []
    result = train(model, iris.x_train, iris.y_train, weight_decay=weight_decay, lr=0.01, epochs=300, seed=depth,
                   progress=lambda epoch, loss: seen.append((epoch, loss)))
    losses = []
    reference = _torch_loop(model, model.init(depth), iris.x_train, iris.y_train, weight_decay=weight_decay,
                            lr=0.01, epochs=300, losses=losses)
    assert torch.allclose(result.theta, reference, rtol=0, atol=1e-12)
    assert (result.theta - model.init(depth)).abs().max() > 0.05  # it trained
    # Progress: every 1% of the epochs (here 3), R before that epoch's step, as the autograd loop reports it.
    assert [e for e, _ in seen] == list(range(3, 301, 3))
    assert [v for _, v in seen] == pytest.approx([losses[e - 1] for e, _ in seen], rel=1e-12)


def test_lean_training_with_sgd_and_a_schedule(iris):
    model = MLP(4, 3, depth=2, width=5)
    result = train(model, iris.x_train, iris.y_train, weight_decay=WEIGHT_DECAY, lr=0.05, epochs=200, seed=3,
                   optimizer="sgd", schedule="cosine")
    reference = _torch_loop(model, model.init(3), iris.x_train, iris.y_train, weight_decay=WEIGHT_DECAY, lr=0.05,
                            epochs=200, optimizer="sgd", schedule="cosine")
    assert torch.allclose(result.theta, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_stacked_gradient_equals_autograd(iris, activation, depth):
    model = MLP(4, 3, depth=depth, width=5, activation=activation)
    thetas = torch.stack([model.init(s) for s in range(3)])
    weights = removal_weights(iris.n_train, [4, 90], controls=1)
    stack = StackedMLP(model, iris.x_train, iris.y_train, weights)
    stack.load(thetas)
    assert torch.equal(stack.theta(), thetas)
    # Read the gradient back through the same layout map: put it in params and ask for theta().
    stack.params.copy_(stack.grad())
    theta = thetas.clone().requires_grad_(True)
    objective(model, theta, iris.x_train, iris.y_train, 0.0, weights).sum().backward()
    assert torch.allclose(stack.theta(), theta.grad, rtol=0, atol=1e-15)


def test_retrain_batched_equals_retrain_loop(iris):
    """Depth-3 MLP on Iris, 200 epochs: one stacked computation equals K separate plain autograd runs."""
    model = MLP(4, 3, depth=3, width=5)
    x, y = iris.x_train, iris.y_train
    theta_hat = train(model, x, y, weight_decay=WEIGHT_DECAY, lr=0.02, epochs=100, seed=0).theta
    weights = removal_weights(iris.n_train, [0, 5, 41, 77, 119])
    kwargs = dict(weight_decay=WEIGHT_DECAY, lr=0.01, epochs=200)
    batched = retrain_batched(model, theta_hat, x, y, weights, **kwargs)
    looped = retrain_loop(model, theta_hat, x, y, weights, **kwargs)
    assert batched.shape == (6, model.n_params)
    assert torch.allclose(batched, looped, rtol=0, atol=1e-6)
    assert not torch.allclose(batched[1], batched[0], atol=1e-6)  # the removal did something
    # Per-row starting points ([K, P]) too.
    starts = theta_hat + 0.01 * torch.randn(6, model.n_params, generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64)
    short = dict(weight_decay=WEIGHT_DECAY, lr=0.01, epochs=20)
    assert torch.allclose(retrain_batched(model, starts, x, y, weights, **short),
                          retrain_loop(model, starts, x, y, weights, **short), rtol=0, atol=1e-6)


def test_retrain_rejects_mismatched_shapes(iris):
    model = MLP(4, 3, depth=1, width=5)
    with pytest.raises(ValueError, match="weights must be"):
        retrain_batched(model, model.init(0), iris.x_train, iris.y_train, torch.ones(3, 7),
                        weight_decay=0.0, lr=0.01, epochs=1)
    with pytest.raises(ValueError, match="theta0 must be"):
        retrain_batched(model, torch.zeros(2, model.n_params), iris.x_train, iris.y_train,
                        torch.ones(3, iris.n_train), weight_decay=0.0, lr=0.01, epochs=1)
