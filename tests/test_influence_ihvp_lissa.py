"""LiSSA: the recursion itself (a known partial sum), its accuracy with sane settings, and divergence reporting.

Sane settings, as used below: damping δ = 0.01 (Koh & Liang's default), scale of the order of the top eigenvalue
of H + δI (1, 2, 4 for logistic / depth 1 / depth 2, whose top eigenvalues are 0.31, 1.40, 4.24), minibatches of
80 of the 120 Iris points, depth 600 (800 at depth 2), one repeat. Measured worst relative error of
s = (H + δI)^{-1} v over 8 test points and 4 seeds: 3.7e-2, 2.7e-2, 3.4e-2; asserted < 5e-2. The error is
minibatch noise, not truncation: with the full batch every step the same depths give 3e-5 and 2e-3.
"""

from __future__ import annotations

import math

import pytest
import torch

from influence.curvature import MatrixOperator, hessian
from influence.ihvp import ExactIHVP, make_solver
from influence.ihvp_lissa import AUTO_SCALES, LissaIHVP
from influence.scores import per_example_grads
from iris_models import WEIGHT_DECAY, trained_iris

DAMPING = 0.01

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_GRADS: dict[tuple[str, int], tuple] = {}


def trained(iris, name: str, depth: int):
    """(model, θ̂, gradients of the first 8 test points) for Iris, trained once per module."""
    if (name, depth) not in _GRADS:
        model, theta = trained_iris(iris, name, depth)
        _GRADS[(name, depth)] = (model, theta, per_example_grads(model, theta, iris.x_test[:8], iris.y_test[:8]))
    return _GRADS[(name, depth)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def test_full_batch_recursion_is_the_partial_neumann_sum(iris):
    """batch_size >= n: every step uses the full H, and h_depth / scale = Σ_{k<=depth} (I − A/scale)^k v / scale."""
    model, theta, v = trained(iris, "logistic", 0)
    a = hessian(model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY) + DAMPING * torch.eye(model.n_params,
                                                                                             dtype=torch.float64)
    scale, depth = 1.0, 100
    step = torch.eye(model.n_params, dtype=torch.float64) - a / scale
    term, total = v.clone(), v.clone()
    for _ in range(depth):
        term = term @ step
        total += term
    lissa = make_solver("lissa", model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY, damping=DAMPING,
                        scale=scale, depth=depth, batch_size=iris.n_train)
    info = lissa.solve_with_info(v)
    assert rel_err(info.x, total / scale) < 1e-10
    assert info.iterations.tolist() == [depth] * 8 and not info.diverged.any()
    # The residual is the true one on the full data.
    assert torch.allclose(info.residual, (info.x @ a - v).norm(dim=1) / v.norm(dim=1), rtol=1e-8)


@pytest.mark.parametrize("name,depth,scale,recursion_depth",
                         [("logistic", 0, 1.0, 600), ("mlp", 1, 2.0, 600), ("mlp", 2, 4.0, 800)])
def test_lissa_agrees_with_exact_with_sane_settings(iris, name, depth, scale, recursion_depth):
    model, theta, v = trained(iris, name, depth)
    args = (model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY)
    exact = make_solver("exact", *args, damping=DAMPING, damping_policy="always")
    assert exact.top_eigenvalue + DAMPING < 2 * scale  # the recursion contracts on the full H
    lissa = make_solver("lissa", *args, damping=DAMPING, scale=scale, depth=recursion_depth, repeats=1,
                        batch_size=80, seed=0)
    info = lissa.solve_with_info(v)
    assert not info.diverged.any()
    assert rel_err(info.x, exact.solve(v)) < 5e-2
    assert lissa.diagnostics["scale_used"] == scale
    assert info.iterations.tolist() == [recursion_depth] * 8


def test_too_small_scale_is_reported_as_diverged_and_auto_recovers(iris):
    model, theta, v = trained(iris, "mlp", 1)
    args = (model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY)
    # Top eigenvalue 1.4 against scale 0.1: the series multiplies by ~ -13 per step.
    small = make_solver("lissa", *args, scale=0.1, depth=200, batch_size=30)
    info = small.solve_with_info(v)
    assert info.diverged.all() and torch.isnan(info.x).all() and torch.isnan(info.residual).all()
    assert (info.iterations < 50).all()  # stopped early, not run to depth on garbage
    assert "diverged for 8 of 8" in small.diagnostics["message"]
    assert torch.isnan(small.solve(v[0])).all()

    auto = make_solver("lissa", *args, damping=DAMPING, scale="auto", depth=200, batch_size=30)
    info = auto.solve_with_info(v)
    assert not info.diverged.any() and torch.isfinite(info.x).all()
    assert auto.diagnostics["scale_used"] == 10.0 and auto.diagnostics["scale"] == "auto"


def test_auto_scale_retries_with_larger_scales_until_it_converges():
    """Eigenvalues up to 50: scale 10 diverges (1 − 50/10 = −4), 100 converges; the answer is the exact one."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    h = q @ torch.diag(torch.tensor([0.5, 1.0, 3.0, 10.0, 30.0, 50.0], dtype=torch.float64)) @ q.T
    v = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lissa = LissaIHVP(MatrixOperator(h), scale="auto", depth=4000, damping=0.1)
    info = lissa.solve_with_info(v)
    assert lissa.diagnostics["scale_used"] == 100.0 and AUTO_SCALES[:2] == (10.0, 100.0)
    assert not info.diverged.any()
    expected = torch.linalg.solve(h + 0.1 * torch.eye(6, dtype=torch.float64), v.T).T
    assert rel_err(info.x, expected) < 1e-6
    assert ((info.iterations > 4000) & (info.iterations < 4100)).all()  # the failed attempt's steps count too
    # A fixed scale below the bound only reports; the cap of 'auto' is the last of AUTO_SCALES.
    fixed = LissaIHVP(MatrixOperator(h), scale=10.0, depth=100).solve_with_info(v)
    assert fixed.diverged.all() and torch.isnan(fixed.x).all()


def test_right_hand_sides_do_not_depend_on_each_other(iris):
    model, theta, v = trained(iris, "mlp", 1)
    lissa = make_solver("lissa", model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY, damping=DAMPING,
                        scale=2.0, depth=100, batch_size=10, seed=3)
    together = lissa.solve(v[:3])
    assert torch.allclose(lissa.solve(v[1]), together[1], rtol=0, atol=1e-12 * float(together.abs().max()))
    other_seed = make_solver("lissa", model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY, damping=DAMPING,
                             scale=2.0, depth=100, batch_size=10, seed=4).solve(v[:3])
    assert not torch.allclose(other_seed, together)  # the seed does choose the minibatches


def test_defaults_follow_the_paper_and_settings_are_checked(iris):
    model, theta, _ = trained(iris, "logistic", 0)
    args = (model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY)
    default = make_solver("lissa", *args)
    assert default.diagnostics["depth"] == 120 and default.diagnostics["scale"] == 10.0  # depth × repeats ≈ n
    assert make_solver("lissa", *args, repeats=4).diagnostics["depth"] == 30
    for bad in [{"scale": 0.0}, {"scale": "big"}, {"depth": 0}, {"repeats": 1.5}, {"batch_size": 0}]:
        with pytest.raises(ValueError, match="lissa|scale"):
            make_solver("lissa", *args, **bad)


def test_damping_means_the_same_as_in_exact():
    """Koh & Liang's (1 − δ)h would solve (H + scale·δ I); ours solves (H + δI) at any scale."""
    h = torch.diag(torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64))
    v = torch.ones(1, 3, dtype=torch.float64)
    expected = ExactIHVP(h, damping=0.3, damping_policy="always").solve(v)
    for scale in (1.0, 5.0):
        x = LissaIHVP(MatrixOperator(h), damping=0.3, scale=scale, depth=3000).solve(v)
        assert rel_err(x, expected) < 1e-10
    assert not math.isnan(float(expected.sum()))
