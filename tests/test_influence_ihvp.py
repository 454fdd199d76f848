"""Inverse-HVP methods that never form the Hessian, checked against the dense exact solve (known answers).

Models: multinomial logistic regression and tanh MLPs of depth 1 and 2, width 5, on Iris, trained 500 Adam
steps (lr 0.05) with weight decay λ = 0.005, where H is positive definite (minimum eigenvalues 5e-3, 1.2e-3,
5e-4). Everything is float64.

Tolerances (relative errors of s = (C + δI)^{-1} v, worst over the 30 Iris test points, as measured):
cg ~3e-7 (tol 1e-8, so the error is the residual times the condition number), asserted < 1e-4;
arnoldi at full rank ~1e-13, asserted < 1e-8; exact-GGN vs an explicitly built GGN ~1e-15, asserted < 1e-10.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import jacrev

from influence import scores
from influence.curvature import CurvatureOperator, MatrixOperator, gauss_newton, hessian
from influence.ihvp import METHODS, SETTINGS, ExactIHVP, InverseHVP, Solve, make_solver
from influence.ihvp_krylov import ArnoldiIHVP, ConjugateGradientIHVP
from influence.metrics import spearman
from influence.models import build_model
from influence.objective import per_example_loss
from influence.scores import influence_estimates, per_example_grads
from influence.train import train
from iris_models import WEIGHT_DECAY, trained_iris

MODELS = [("logistic", 0), ("mlp", 1), ("mlp", 2)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_GRADS: dict[tuple[str, int], tuple] = {}


def trained(iris, name: str, depth: int):
    """(model, θ̂, test gradients [30, P]) for one of MODELS; trained once per module."""
    if (name, depth) not in _GRADS:
        model, theta = trained_iris(iris, name, depth)
        _GRADS[(name, depth)] = (model, theta, per_example_grads(model, theta, iris.x_test, iris.y_test))
    return _GRADS[(name, depth)]


def solver(iris, method, name, model_depth, **settings):
    model, theta, _ = trained(iris, name, model_depth)
    return make_solver(method, model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY, **settings)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


# ---- interface and registry ------------------------------------------------------------------------------------


def test_settings_registry_is_plain_data_for_every_method():
    assert METHODS == ("exact", "cg", "lissa", "arnoldi", "ekfac")
    assert tuple(SETTINGS) == METHODS
    json.dumps(SETTINGS)  # plain data: a spec layer can validate against it and store it next to results
    for method, settings in SETTINGS.items():
        assert settings["damping"] == 0.0, method  # every method solves the same system by default
    assert SETTINGS["cg"] == {"damping": 0.0, "curvature": "hessian", "tol": 1e-8, "max_iter": 100}
    assert SETTINGS["lissa"]["scale"] == 10.0


def test_unknown_method_and_unknown_setting_messages(iris):
    model, theta, _ = trained(iris, "logistic", 0)
    args = (model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY)
    with pytest.raises(ValueError, match=r"unknown influence method 'newton'; choose one of exact, cg, lissa, "
                                         r"arnoldi, ekfac"):
        make_solver("newton", *args)
    with pytest.raises(ValueError, match=r"unknown setting 'depth' for influence method 'cg'; its settings are: "
                                         r"damping \(default 0\.0\), curvature \(default 'hessian'\), "
                                         r"tol \(default 1e-08\), max_iter \(default 100\)"):
        make_solver("cg", *args, depth=3)
    with pytest.raises(ValueError, match=r"unknown settings 'damping_policy', 'tol' for influence method 'lissa'"):
        make_solver("lissa", *args, damping_policy="always", tol=1e-3)
    with pytest.raises(ValueError, match="unknown curvature 'fisher'; choose one of hessian, ggn"):
        make_solver("arnoldi", *args, curvature="fisher")
    with pytest.raises(ValueError, match="tol"):
        make_solver("cg", *args, tol=0.0)
    with pytest.raises(ValueError, match="iterations >= rank"):
        make_solver("arnoldi", *args, rank=10, iterations=5)
    with pytest.raises(ValueError, match="damping must be a number >= 0"):
        make_solver("cg", *args, damping=-1.0)


def test_solve_and_solve_with_info_shapes(iris):
    s = solver(iris, "exact", "logistic", 0)
    _, _, v = trained(iris, "logistic", 0)
    info = s.solve_with_info(v[:4])
    assert isinstance(s, InverseHVP) and isinstance(info, Solve)
    assert info.x.shape == (4, 15) and info.x.dtype == torch.float64
    assert info.iterations.dtype == torch.int64 and info.diverged.dtype == torch.bool
    assert torch.equal(s.solve(v[:4]), info.x)
    assert torch.allclose(s.solve(v[2]), info.x[2], rtol=1e-12, atol=0)  # [P] in, [P] out
    assert float(info.residual.max()) < 1e-12  # exact: the true residual is round-off
    assert s.solve_with_info(v[:0]).x.shape == (0, 15)
    assert s.amortised and not ConjugateGradientIHVP.amortised
    assert s.diagnostics["seconds_fit"] > 0 and s.diagnostics["curvature"] == "hessian"


# ---- Gauss-Newton ----------------------------------------------------------------------------------------------


def explicit_ggn(model, theta, x, y, weight_decay):
    """G = (1/n) Σ J_iᵀ (diag p_i − p_i p_iᵀ) J_i + λI from per-example Jacobians of the logits (jacrev)."""
    jac = jacrev(lambda t: model.forward(t, x))(theta)  # [n, C, P]
    p = torch.softmax(model.forward(theta, x), dim=1)
    h_out = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # [n, C, C]
    g = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / x.shape[0]
    return g + weight_decay * torch.eye(model.n_params, dtype=torch.float64)


@pytest.mark.parametrize("name,depth", MODELS)
def test_ggn_products_and_matrix_match_an_explicit_ggn(iris, name, depth):
    model, theta, v = trained(iris, name, depth)
    x, y = iris.x_train, iris.y_train
    g = explicit_ggn(model, theta, x, y, WEIGHT_DECAY)
    assert torch.allclose(gauss_newton(model, theta, x, y, WEIGHT_DECAY), g, rtol=0, atol=1e-12)
    op = CurvatureOperator(model, theta, x, y, WEIGHT_DECAY, curvature="ggn")
    assert torch.allclose(op.matvec(v), v @ g, rtol=0, atol=1e-12)
    # GGN is PSD, so G + λI has λ as its floor; and on a minibatch it is the GGN of those points.
    assert float(torch.linalg.eigvalsh(g)[0]) >= WEIGHT_DECAY * (1 - 1e-9)
    idx = torch.tensor([3, 50, 7])
    assert torch.allclose(op.matvec(v, idx), v @ explicit_ggn(model, theta, x[idx], y[idx], WEIGHT_DECAY),
                          rtol=0, atol=1e-12)
    exact_ggn = make_solver("exact", model, theta, x, y, WEIGHT_DECAY, curvature="ggn")
    assert rel_err(exact_ggn.solve(v), torch.linalg.solve(g, v.T).T) < 1e-10
    if depth == 0:  # logistic regression is linear in θ: the GGN is the Hessian
        assert torch.allclose(g, hessian(model, theta, x, y, WEIGHT_DECAY), rtol=0, atol=1e-12)


def test_hessian_products_match_the_dense_hessian(iris):
    model, theta, v = trained(iris, "mlp", 2)
    x, y = iris.x_train, iris.y_train
    op = CurvatureOperator(model, theta, x, y, WEIGHT_DECAY)
    assert torch.allclose(op.matvec(v), v @ hessian(model, theta, x, y, WEIGHT_DECAY), rtol=0, atol=1e-12)
    idx = torch.tensor([0, 9, 119])
    assert torch.allclose(op.matvec(v[0], idx), hessian(model, theta, x[idx], y[idx], WEIGHT_DECAY) @ v[0],
                          rtol=0, atol=1e-12)


# ---- conjugate gradient ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,depth", MODELS)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_cg_agrees_with_exact(iris, name, depth, curvature):
    _, _, v = trained(iris, name, depth)
    exact = solver(iris, "exact", name, depth, curvature=curvature).solve(v)
    cg = solver(iris, "cg", name, depth, curvature=curvature)
    info = cg.solve_with_info(v)
    assert rel_err(info.x, exact) < 1e-4
    assert not info.diverged.any()
    assert float(info.residual.max()) <= 1e-8  # the true residual, recomputed
    assert 0 < int(info.iterations.min()) and int(info.iterations.max()) <= 100
    assert cg.diagnostics["not_converged"] == 0


def test_cg_columns_stop_on_their_own():
    h = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    v = torch.zeros(3, 5, dtype=torch.float64)
    v[0, 0] = 1.0  # an eigenvector: one iteration
    v[1] = 1.0  # five distinct eigenvalues: five iterations
    # v[2] = 0: solved by x = 0 without iterating
    info = ConjugateGradientIHVP(MatrixOperator(h), tol=1e-12).solve_with_info(v)
    assert info.iterations.tolist() == [1, 5, 0]
    assert torch.allclose(info.x, v / torch.diagonal(h), rtol=1e-12, atol=0)
    assert info.residual[2] == 0.0
    few = ConjugateGradientIHVP(MatrixOperator(h), max_iter=2)
    out = few.solve_with_info(v)
    assert out.iterations.tolist() == [1, 2, 0] and float(out.residual[1]) > 1e-3  # ran out, and says so
    assert not out.diverged.any() and few.diagnostics["not_converged"] == 1


def test_cg_reports_an_indefinite_hessian_instead_of_a_wrong_answer(iris):
    """20 Adam steps in, the depth-1 MLP's H has eigenvalues down to -0.05: CG must not return garbage."""
    model = build_model("mlp", in_features=4, num_classes=3, depth=1, width=5)
    x, y = iris.x_train, iris.y_train
    theta = train(model, x, y, weight_decay=WEIGHT_DECAY, lr=0.05, epochs=20, seed=0).theta
    h = hessian(model, theta, x, y, WEIGHT_DECAY)
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    assert float(eigenvalues[0]) < -0.04
    v = torch.cat([eigenvectors[:, :1].T, per_example_grads(model, theta, iris.x_test, iris.y_test)])

    cg = make_solver("cg", model, theta, x, y, WEIGHT_DECAY)
    info = cg.solve_with_info(v)
    # The most negative eigenvector has pᵀHp = μ_min < 0 at the first step: detected for sure.
    assert bool(info.diverged[0]) and int(info.iterations[0]) == 0
    assert cg.diagnostics["negative_curvature"] == pytest.approx(float(eigenvalues[0]), rel=1e-8)
    assert "not positive definite" in cg.diagnostics["message"] and "damping >" in cg.diagnostics["message"]
    assert torch.isnan(info.x[info.diverged]).all()
    # No silent wrong answer: a column either says it diverged, or says it did not converge, or is right.
    exact_never = ExactIHVP(h, damping_policy="never").solve(v)
    for b in range(v.shape[0]):
        if not info.diverged[b] and info.residual[b] <= 1e-8:
            assert rel_err(info.x[b : b + 1], exact_never[b : b + 1]) < 1e-4

    # Damping past the negative curvature makes it a positive definite system, solved like exact.
    damped = make_solver("cg", model, theta, x, y, WEIGHT_DECAY, damping=0.1).solve_with_info(v)
    assert not damped.diverged.any()
    exact = ExactIHVP(h, damping=0.1, damping_policy="always").solve(v)
    assert rel_err(damped.x, exact) < 1e-4


# ---- Arnoldi ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,depth", MODELS)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_full_rank_arnoldi_is_exact(iris, name, depth, curvature):
    model, _, v = trained(iris, name, depth)
    exact = solver(iris, "exact", name, depth, curvature=curvature)
    arnoldi = solver(iris, "arnoldi", name, depth, curvature=curvature, rank=model.n_params)
    info = arnoldi.solve_with_info(v)
    assert rel_err(info.x, exact.solve(v)) < 1e-8
    assert float(info.residual.max()) < 1e-10  # nothing dropped at full rank
    d = arnoldi.diagnostics
    assert d["rank"] == d["iterations"] == model.n_params
    assert d["top_eigenvalue"] == pytest.approx(exact.top_eigenvalue, rel=1e-10)
    assert d["min_kept_eigenvalue"] == pytest.approx(exact.min_eigenvalue, rel=1e-6)


def test_arnoldi_restarts_on_repeated_eigenvalues():
    """A Krylov space from one vector cannot span a repeated eigenvalue's eigenspace; the restart must."""
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    h = q @ torch.diag(torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 2.0, 3.0, 3.0], dtype=torch.float64)) @ q.T
    v = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    arnoldi = ArnoldiIHVP(MatrixOperator(h), rank=8, damping=0.05)
    assert rel_err(arnoldi.solve(v), torch.linalg.solve(h + 0.05 * torch.eye(8, dtype=torch.float64), v.T).T) < 1e-10
    top = ArnoldiIHVP(MatrixOperator(h), rank=3, iterations=8)
    assert torch.allclose(top.eigenvalues, torch.tensor([3.0, 3.0, 2.0], dtype=torch.float64), atol=1e-12)
    # The dropped part is the orthogonal complement, and the reported residual is its relative size.
    info = top.solve_with_info(v)
    kept = top.eigenvectors
    dropped = v - (v @ kept.T) @ kept
    assert torch.allclose(info.residual, dropped.norm(dim=1) / v.norm(dim=1), atol=1e-12)
    assert torch.allclose(info.residual, (info.x @ h - v).norm(dim=1) / v.norm(dim=1), atol=1e-10)


def test_low_rank_arnoldi_ranks_training_points_like_exact(iris):
    """Rank 20 of P = 43 on the depth-1 MLP: Spearman with exact estimates, measured mean 0.973 over the 30 test
    points (minimum 0.913) and >= 0.957 on the 5 highest-loss ones; asserted >= 0.9."""
    model, theta, _ = trained(iris, "mlp", 1)
    test_loss = per_example_loss(model, theta, iris.x_test, iris.y_test)
    exact = influence_estimates(model, theta, iris, range(30), solver(iris, "exact", "mlp", 1))
    arnoldi = influence_estimates(model, theta, iris, range(30), solver(iris, "arnoldi", "mlp", 1, rank=20))
    rho = torch.tensor([spearman(arnoldi.estimate[t], exact.estimate[t]) for t in range(30)])
    assert float(rho.mean()) >= 0.9
    assert float(rho[torch.argsort(test_loss, descending=True)[:5]].min()) >= 0.9
    assert float(arnoldi.residual.max()) > 0.01  # rank 20 really drops something, and says how much
    assert spearman(arnoldi.predicted_dtheta, exact.predicted_dtheta) >= 0.9


# ---- influence_estimates: streaming, sharding, diagnostics ----------------------------------------------------


@pytest.mark.parametrize("method,settings", [("exact", {}), ("cg", {}), ("arnoldi", {"rank": 20}),
                                             ("lissa", {"depth": 30, "batch_size": 30, "damping": 0.01,
                                                        "scale": 3.0})])
def test_sharded_equals_unsharded(iris, monkeypatch, method, settings):
    model, theta, _ = trained(iris, "mlp", 1)
    s = solver(iris, method, "mlp", 1, **settings)
    whole = influence_estimates(model, theta, iris, range(10), s, chunk_size=1024, dtheta=True)

    seen: list[int] = []
    real = scores.per_example_grads

    def spy(model, theta, x, y, chunk_size=1024):
        seen.append(int(x.shape[0]))
        return real(model, theta, x, y, chunk_size)

    monkeypatch.setattr(scores, "per_example_grads", spy)
    chunked = influence_estimates(model, theta, iris, range(10), s, chunk_size=7, dtheta=True)
    assert max(seen) <= 10 and seen.count(7) == 120 // 7  # never all n training gradients at once
    first = influence_estimates(model, theta, iris, range(4), s, chunk_size=7, dtheta=False)
    second = influence_estimates(model, theta, iris, range(4, 10), s, chunk_size=7, dtheta=False)
    split = torch.cat([first.estimate, second.estimate])

    # Same numbers up to round-off. Only CG amplifies round-off (a different vmap batch changes the last bit of
    # a gradient or a product, and ~30 iterations at condition number ~1e3 carry it on): measured 3e-11.
    tol = 1e-9 if method == "cg" else 1e-12
    scale = float(whole.estimate.abs().max())
    assert torch.isfinite(whole.estimate).all()
    assert torch.allclose(chunked.estimate, whole.estimate, rtol=0, atol=tol * scale)
    assert torch.allclose(split, whole.estimate, rtol=0, atol=tol * scale)
    assert torch.allclose(chunked.predicted_dtheta, whole.predicted_dtheta, rtol=100 * tol, atol=0)
    assert torch.isnan(first.predicted_dtheta).all()
    # CG stops where the residual crosses its tolerance, and a residual at the tolerance moves with the last bit
    # of a gradient: a row may take one iteration more or less (seen here: 31 against 32).
    steps = torch.cat([first.iterations, second.iterations]) - whole.iterations
    assert int(steps.abs().max()) <= (1 if method == "cg" else 0)
    residual = torch.cat([first.residual, second.residual])
    if method == "cg":  # a residual at the tolerance is round-off itself
        assert float(residual.max()) <= 1e-8 and float(whole.residual.max()) <= 1e-8
    else:
        assert torch.allclose(residual, whole.residual, rtol=1e-6, atol=1e-15)


def test_estimates_carry_per_test_diagnostics_and_dtheta_defaults(iris):
    model, theta, _ = trained(iris, "mlp", 1)
    exact = influence_estimates(model, theta, iris, [0, 5, 9], solver(iris, "exact", "mlp", 1))
    cg_solver = solver(iris, "cg", "mlp", 1)
    cg = influence_estimates(model, theta, iris, [0, 5, 9], cg_solver)
    assert cg.estimate.shape == (3, 120) and cg.iterations.shape == cg.residual.shape == cg.diverged.shape == (3,)
    assert (cg.iterations > 0).all() and (cg.residual <= 1e-8).all() and not cg.diverged.any()
    assert (exact.iterations == 0).all() and not exact.diverged.any()
    assert torch.allclose(cg.estimate, exact.estimate, rtol=1e-4, atol=1e-6 * float(exact.estimate.abs().max()))
    # ‖Δθ‖ needs n solves: by default only for amortised solvers.
    assert torch.isfinite(exact.predicted_dtheta).all() and torch.isnan(cg.predicted_dtheta).all()
    cg_dtheta = influence_estimates(model, theta, iris, [0], cg_solver, dtheta=True).predicted_dtheta
    assert torch.allclose(cg_dtheta, exact.predicted_dtheta, rtol=1e-4)
    with pytest.raises(ValueError, match="chunk_size"):
        influence_estimates(model, theta, iris, [0], cg_solver, chunk_size=0)


def test_diverged_test_points_get_nan_estimates(iris):
    model, theta, _ = trained(iris, "mlp", 1)
    too_small = solver(iris, "lissa", "mlp", 1, scale=0.1, depth=100, batch_size=30)
    inf = influence_estimates(model, theta, iris, [0, 1], too_small, dtheta=True)
    assert inf.diverged.all() and torch.isnan(inf.estimate).all() and torch.isnan(inf.residual).all()
    assert torch.isnan(inf.predicted_dtheta).all()
    assert torch.isfinite(inf.test_loss).all()
