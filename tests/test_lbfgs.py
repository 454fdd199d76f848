"""Full-batch L-BFGS for θ̂ and for retraining: known optima by Newton's method, batched equals one-at-a-time.

The references here share no code with what they check: the multinomial logistic objective is written out by
hand (not :mod:`influence.objective` or :mod:`influence.models`), and its optimum is found by Newton's method with
the exact Hessian, which converges quadratically to round-off on this strictly convex problem.
"""

from __future__ import annotations

import pytest
import torch

from influence.data import load_dataset
from influence.lbfgs import GRAD_TOL
from influence.models import MLP, build_model
from influence.objective import objective
from influence.retrain import objective_grad_norms, removal_weights, retrain_batched, retrain_loop
from influence.train import train

WEIGHT_DECAY = 0.01
NEWTON_GRAD = 1e-13  # where the reference has converged (its own ‖∇R‖₂)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")  # 1437 training images 8×8, 10 classes: P = 650 for logistic regression


@pytest.fixture(scope="module")
def fitted(digits):
    """θ̂ by L-BFGS and the Newton optimum of the same objective."""
    model = build_model("logistic", input_shape=digits.input_shape, num_classes=digits.num_classes)
    fit = train(model, digits.x_train, digits.y_train, weight_decay=WEIGHT_DECAY, lr=1.0, epochs=1000, seed=0,
                optimizer="lbfgs")
    ones = torch.ones(digits.n_train, dtype=torch.float64)
    reference = _newton(torch.zeros(model.n_params, dtype=torch.float64), digits.x_train, digits.y_train, ones,
                        digits.num_classes)
    return model, fit, reference


def _logistic_objective(theta, x, y, w, num_classes):
    """R(θ; w) = (1/n) Σ w_i [logsumexp(z_i) - z_{i,y_i}] + (λ/2)‖θ‖², z_i = W x_i + b, θ = (W row-major, b)."""
    x = x.flatten(1)
    d = x.shape[1]
    weight = theta[: num_classes * d].view(num_classes, d)
    bias = theta[num_classes * d :]
    z = x @ weight.t() + bias
    losses = torch.logsumexp(z, dim=1) - z.gather(1, y[:, None])[:, 0]
    return (w * losses).sum() / x.shape[0] + 0.5 * WEIGHT_DECAY * theta.dot(theta)


def _gradient(theta, x, y, w, num_classes):
    theta = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_logistic_objective(theta, x, y, w, num_classes), theta)
    return grad


def _newton(theta, x, y, w, num_classes, steps=30):
    """θ_{k+1} = θ_k - H(θ_k)⁻¹ ∇R(θ_k) with the exact Hessian, until ‖∇R‖₂ < NEWTON_GRAD."""
    for _ in range(steps):
        grad = _gradient(theta, x, y, w, num_classes)
        if grad.norm() < NEWTON_GRAD:
            return theta
        hessian = torch.autograd.functional.hessian(lambda t: _logistic_objective(t, x, y, w, num_classes), theta,
                                                    vectorize=True)
        theta = theta - torch.linalg.solve(hessian, grad)
    raise AssertionError(f"Newton's method did not converge: ‖∇R‖ = {float(grad.norm()):.2e}")


# ---- training θ̂ -------------------------------------------------------------------------------------------------


def test_lbfgs_trains_logistic_regression_to_the_newton_optimum(digits, fitted):
    _, fit, reference = fitted
    ones = torch.ones(digits.n_train, dtype=torch.float64)
    # The line search alone stops at R's round-off, ‖∇R‖ in 5e-10..1e-8 here; polishing reaches grad_tol.
    assert fit.grad_norm <= GRAD_TOL
    # the reported norm is the true one, by the independent objective
    true_norm = float(_gradient(fit.theta, digits.x_train, digits.y_train, ones, digits.num_classes).norm())
    assert fit.grad_norm == pytest.approx(true_norm, rel=1e-6, abs=1e-14)
    assert (fit.theta - reference).abs().max() < 1e-8  # ‖θ - θ*‖ <= ‖∇R‖/λ = 1e-8
    assert fit.objective == pytest.approx(float(_logistic_objective(reference, digits.x_train, digits.y_train, ones,
                                                                    digits.num_classes)), rel=1e-14)
    assert 0 < fit.epochs < 1000  # stopped by the criterion (or at round-off), not by the cap


def test_the_stop_is_the_first_iterate_with_a_small_2_norm(digits, fitted):
    model = fitted[0]
    kw = dict(weight_decay=WEIGHT_DECAY, lr=1.0, seed=0, optimizer="lbfgs")
    x, y = digits.x_train, digits.y_train
    fit = train(model, x, y, epochs=1000, grad_tol=1e-4, **kw)
    assert fit.grad_norm <= 1e-4 and fit.epochs > 1
    # the iterate before it (same run, capped one iteration earlier) was still above the tolerance
    before = train(model, x, y, epochs=fit.epochs - 1, grad_tol=0.0, **kw)
    assert before.grad_norm > 1e-4 and before.epochs == fit.epochs - 1
    # the stop is on the 2-norm: the largest entry of the gradient went below 1e-4 earlier
    grad = _gradient(before.theta, x, y, torch.ones(len(y), dtype=torch.float64), digits.num_classes)
    assert grad.norm() > 1e-4 and grad.abs().max() < 1e-4
    # zero iterations: θ0 itself
    start = train(model, x, y, epochs=0, **kw)
    assert start.epochs == 0 and torch.equal(start.theta, model.init(0))


# ---- retraining -------------------------------------------------------------------------------------------------


def test_warm_lbfgs_retraining_reaches_the_leave_one_out_optima(digits, fitted):
    model, fit, reference = fitted
    x, y, c = digits.x_train, digits.y_train, digits.num_classes
    weights = removal_weights(digits.n_train, [3, 700], controls=1)  # a control row, then two removals
    thetas = retrain_batched(model, fit.theta, x, y, weights, weight_decay=WEIGHT_DECAY, lr=1.0, epochs=500,
                             optimizer="lbfgs")
    norms = objective_grad_norms(model, thetas, x, y, weights, WEIGHT_DECAY)
    assert norms.shape == (3,) and bool((norms <= GRAD_TOL).all())
    for k in range(3):
        loo = _newton(reference, x, y, weights[k], c)  # the optimum with w_i = 0 (normaliser still n)
        assert (thetas[k] - loo).abs().max() < 1e-8
        direct = _gradient(thetas[k], x, y, weights[k], c).norm()
        assert float(norms[k]) == pytest.approx(float(direct), rel=1e-6, abs=1e-14)
    # the removals moved θ by far more than the tolerance: the test sees a copy that was not retrained
    assert float((thetas[1] - fit.theta).norm()) > 1e-4


def test_batched_lbfgs_equals_loop_and_copies_do_not_see_each_other(iris):
    model = MLP(4, 3, depth=1, width=5)
    x, y = iris.x_train, iris.y_train
    starts = torch.stack([model.init(s) for s in range(3)])
    weights = removal_weights(iris.n_train, [0, 7], controls=1)
    kw = dict(weight_decay=WEIGHT_DECAY, lr=1.0, epochs=40, optimizer="lbfgs")
    batched = retrain_batched(model, starts, x, y, weights, **kw)
    assert torch.equal(batched, retrain_loop(model, starts, x, y, weights, **kw))
    alone = retrain_batched(model, starts[1:2], x, y, weights[1:2], **kw)
    assert torch.equal(alone[0], batched[1])
    assert not torch.equal(batched[1], starts[1])


def test_lbfgs_refuses_minibatches_schedules_and_mixed_precision(iris):
    model = MLP(4, 3, depth=1, width=5)
    x, y = iris.x_train, iris.y_train
    weights = removal_weights(iris.n_train, [0])
    kw = dict(weight_decay=WEIGHT_DECAY, lr=1.0, epochs=5, optimizer="lbfgs")
    with pytest.raises(ValueError, match="lbfgs' is full batch only.*batch_size=16"):
        train(model, x, y, seed=0, batch_size=16, **kw)
    for run in (retrain_batched, retrain_loop):
        with pytest.raises(ValueError, match="lbfgs' is full batch only.*batch_size=16"):
            run(model, model.init(0), x, y, weights, batch_size=16, **kw)
    with pytest.raises(ValueError, match="lbfgs' takes no learning-rate schedule.*cosine"):
        train(model, x, y, seed=0, schedule="cosine", **kw)
    with pytest.raises(ValueError, match="mixed_precision does not apply to optimizer 'lbfgs'"):
        train(model, x, y, seed=0, mixed_precision=True, **kw)
    with pytest.raises(ValueError, match="grad_tol must be >= 0"):
        train(model, x, y, seed=0, grad_tol=-1.0, **kw)


def test_lbfgs_decreases_a_tanh_mlp_objective(iris):
    model = MLP(4, 3, depth=2, width=8, activation="tanh")  # non-convex: a decrease, no claim of the optimum
    x, y = iris.x_train, iris.y_train
    theta0 = model.init(1)
    start = objective(model, theta0, x, y, WEIGHT_DECAY)
    calls = []
    fit = train(model, x, y, weight_decay=WEIGHT_DECAY, lr=1.0, epochs=150, seed=1, optimizer="lbfgs",
                progress=lambda i, value: calls.append((i, value)))
    assert fit.objective < 0.5 * float(start)
    assert calls[-1] == (fit.epochs, pytest.approx(fit.objective, rel=1e-12))
    assert [i for i, _ in calls] == sorted({i for i, _ in calls})
    values = torch.tensor([v for _, v in calls], dtype=torch.float64)
    # every line-search step decreases R; polishing may accept an increase of a few ulps
    assert bool((values[1:] <= values[:-1] * (1 + 1e-13)).all())


# ---- objective_grad_norms -----------------------------------------------------------------------------------------


def test_objective_grad_norms_agree_with_autograd_per_copy(iris):
    model = MLP(4, 3, depth=1, width=5, activation="relu")
    x, y = iris.x_train, iris.y_train
    thetas = torch.stack([model.init(s) for s in range(3)])
    weights = removal_weights(iris.n_train, [2, 9], controls=1)
    direct = torch.stack([torch.autograd.grad(objective(model, t.requires_grad_(True), x, y, WEIGHT_DECAY, w), t)[0]
                          .norm() for t, w in zip(thetas.clone(), weights)])
    torch.testing.assert_close(objective_grad_norms(model, thetas, x, y, weights, WEIGHT_DECAY), direct)
    torch.testing.assert_close(objective_grad_norms(model, thetas, x, y, weights, WEIGHT_DECAY, batch_size=32), direct)
    # an image network, one copy at a time
    net = build_model("small_cnn", input_shape=(1, 8, 8), num_classes=3)
    images = torch.randn(10, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10) % 3
    thetas = torch.stack([net.init(s, dtype=torch.float64) for s in range(2)])
    weights = removal_weights(10, [4], controls=1)
    direct = torch.stack([torch.autograd.grad(objective(net, t.requires_grad_(True), images, labels, WEIGHT_DECAY, w),
                                              t)[0].norm() for t, w in zip(thetas.clone(), weights)])
    torch.testing.assert_close(objective_grad_norms(net, thetas, images, labels, weights, WEIGHT_DECAY), direct)
    torch.testing.assert_close(objective_grad_norms(net, thetas, images, labels, weights, WEIGHT_DECAY, batch_size=3),
                               direct)
    assert not torch.allclose(direct[0], direct[1])  # the two weightings differ
