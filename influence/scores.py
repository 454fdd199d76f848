"""Influence estimates for chosen test points, and the choice of test points and of points to retrain without.

Sign convention (the project's contract): removing z_i is up-weighting it by ε = -1/n, which moves the optimum
by Δθ ≈ (1/n) (H + δI)^{-1} ∇L(z_i, θ̂), so the test loss changes by

    estimate(i, t) = (1/n) ∇L(z_t, θ̂)ᵀ (H + δI)^{-1} ∇L(z_i, θ̂),

*positive = the test loss goes up when z_i is removed*, the same sign as actual(i, t) = L(z_t, θ̂₋ᵢ) − L(z_t, θ̂).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad, vmap

from influence.data import Dataset
from influence.ihvp import InverseHVP
from influence.models import MLP
from influence.objective import per_example_loss
from influence.registry import REMOVAL_KINDS as REMOVAL_RULES
from influence.registry import TEST_POINT_KINDS as TEST_SELECTIONS


def per_example_grads(
    model: MLP, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """G ∈ R^{n×P} with G_i = ∇_θ L(z_i, θ): the loss alone, without the L2 term (which is in H, not in ∇L).

    ``vmap(grad)`` over examples, ``chunk_size`` examples at a time so memory stays O(chunk_size · P).
    """
    theta = theta.detach()

    def loss_one(t: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return per_example_loss(model, t, xi.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)

    grad_one = vmap(grad(loss_one), in_dims=(None, 0, 0))
    chunks = [
        grad_one(theta, x[start : start + chunk_size], y[start : start + chunk_size])
        for start in range(0, x.shape[0], chunk_size)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, model.n_params, dtype=theta.dtype, device=theta.device)


# eq=False: the generated __eq__/__hash__ would compare tensors elementwise and fail; identity is right.
@dataclass(frozen=True, eq=False)
class Influence:
    """Influence of every training point on T test points, and how the T solves went.

    estimate:          [T, n], (1/n) ∇L(z_t)ᵀ (H + δI)^{-1} ∇L(z_i); positive = test loss goes UP without z_i;
                       NaN in the rows of test points whose solve diverged
    predicted_dtheta:  [n], ‖(H + δI)^{-1} ∇L(z_i)‖ / n, the predicted ‖θ̂₋ᵢ − θ̂‖; NaN where not computed
                       (see ``dtheta``) or where that solve diverged
    test_loss:         [T], L(z_t, θ̂)
    self_influence:    [T], ∇L(z_t)ᵀ (H + δI)^{-1} ∇L(z_t): how strongly a test point's own gradient is amplified by
                       the inverse curvature (NaN where its solve diverged)
    iterations:        [T] int64, residual: [T] float64, diverged: [T] bool: the solve of s_t (:class:`Solve`)
    """

    estimate: torch.Tensor
    predicted_dtheta: torch.Tensor
    test_loss: torch.Tensor
    self_influence: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    diverged: torch.Tensor


# eq=False, as for Influence.
@dataclass(frozen=True, eq=False)
class TestSolve:
    """The solved half of the estimates of T test points: s_t = (H + δI)^{-1} ∇L(z_t) and how each solve went.

    s_test: [T, P] float64 (NaN rows where diverged); test_loss, self_influence, iterations, residual,
    diverged: [T], as in :class:`Influence`. With it, the estimates of any range of training points are a
    product with their gradients (:func:`shard_estimates`): no solve, no pass over the other points.
    """

    s_test: torch.Tensor
    test_loss: torch.Tensor
    self_influence: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    diverged: torch.Tensor


def solve_test_points(model: MLP, theta: torch.Tensor, data: Dataset, test_idx: Sequence[int], solver: InverseHVP,
                      *, chunk_size: int = 1024) -> TestSolve:
    """One block solve for the test points ``test_idx`` of ``data`` at θ̂ = ``theta`` (Koh & Liang's s_test)."""
    _check_chunk(chunk_size)
    test_idx = _check_indices(test_idx, data.n_test, "test_idx")
    x_test, y_test = data.take("test", test_idx, theta.device)
    test_grads = per_example_grads(model, theta, x_test, y_test, chunk_size)
    solved = solver.solve_with_info(test_grads)  # NaN rows where diverged
    with torch.no_grad():
        test_loss = per_example_loss(model, theta, x_test, y_test)
    return TestSolve(s_test=solved.x, test_loss=test_loss,
                     self_influence=(solved.x * test_grads.to(solved.x.dtype)).sum(dim=1),
                     iterations=solved.iterations, residual=solved.residual, diverged=solved.diverged)


def shard_estimates(model: MLP, theta: torch.Tensor, data: Dataset, s_test: torch.Tensor, start: int, stop: int, *,
                    dtheta_solver: InverseHVP | None = None,
                    chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate [T, stop − start], predicted_dtheta [stop − start]) for the training points start..stop−1:
    estimate[t, j] = s_tᵀ ∇L(z_{start+j}) / n with n the size of the whole training set, the gradients streamed
    ``chunk_size`` at a time. predicted_dtheta solves each training gradient with ``dtheta_solver`` (NaN when
    it is None). Every estimate depends on its own pair only, so shards of any size tile
    :func:`influence_estimates` to round-off. ``data`` may be streamed (:class:`influence.streaming.StreamedSet`):
    only the shard's points are decoded."""
    _check_chunk(chunk_size)
    n = data.n_train
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n):
        raise ValueError(f"a shard of training points must satisfy 0 <= start <= stop <= {n}; got {start}..{stop}")
    estimate = torch.empty(s_test.shape[0], stop - start, dtype=s_test.dtype, device=s_test.device)
    predicted_dtheta = torch.full((stop - start,), math.nan, dtype=s_test.dtype, device=s_test.device)
    chunks = data.chunks("train", chunk_size, theta.device, start=start, stop=stop)
    for first, (xc, yc) in zip(range(start, stop, chunk_size), chunks):
        last = first + xc.shape[0]
        grads = per_example_grads(model, theta, xc, yc, chunk_size)
        grads = grads.to(s_test.dtype)
        estimate[:, first - start:last - start] = (s_test @ grads.T) / n
        if dtheta_solver is not None:
            predicted_dtheta[first - start:last - start] = dtheta_solver.solve(grads).norm(dim=1) / n
    return estimate, predicted_dtheta


def influence_estimates(
    model: MLP,
    theta: torch.Tensor,
    data: Dataset,
    test_idx: Sequence[int],
    solver: InverseHVP,
    *,
    chunk_size: int = 1024,
    dtheta: bool | None = None,
) -> Influence:
    """Estimates for the test points ``test_idx`` of ``data`` over all n training points, at θ̂ = ``theta``.

    One solve for the test points, s_t = (H + δI)^{-1} ∇L(z_t) (Koh & Liang's s_test), then
    estimate[t, i] = s_tᵀ ∇L(z_i) / n with the training gradients streamed ``chunk_size`` at a time, so memory is
    O((T + chunk_size) · P), never n · P. Each estimate depends only on its own test and training point, so any
    chunking, and any split of ``test_idx`` over calls, gives the same numbers. The two halves are
    :func:`solve_test_points` and :func:`shard_estimates` (which a cluster runs as tasks over shards of the
    training set).

    ``dtheta``: the predicted ‖Δθ‖ needs a solve per *training* point. True computes it, False does not (NaN);
    None (default) computes it for solvers whose many-right-hand-side solves are cheap (``solver.amortised``:
    exact, arnoldi, ekfac) and not for cg and lissa, where it would cost n iterative solves.

    Runs on the device of θ̂, ``data`` and the solver (one device for all three); the results stay there.
    """
    _check_chunk(chunk_size)
    solved = solve_test_points(model, theta, data, test_idx, solver, chunk_size=chunk_size)
    want_dtheta = solver.amortised if dtheta is None else bool(dtheta)
    estimate, predicted_dtheta = shard_estimates(model, theta, data, solved.s_test, 0, data.n_train,
                                                 dtheta_solver=solver if want_dtheta else None, chunk_size=chunk_size)
    return Influence(
        estimate=estimate,
        predicted_dtheta=predicted_dtheta,
        test_loss=solved.test_loss,
        self_influence=solved.self_influence,
        iterations=solved.iterations,
        residual=solved.residual,
        diverged=solved.diverged,
    )


def _check_chunk(chunk_size: object) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1; got {chunk_size!r}")


def _check_indices(indices: Sequence[int] | torch.Tensor, size: int, what: str) -> list[int]:
    out = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    bad = [i for i in out if not 0 <= i < size]
    if bad:
        raise ValueError(f"{what} must lie in [0, {size}); got {bad[:5]}")
    return out


def _normalise_rule(rule: tuple[str, Any] | Mapping[str, Any]) -> tuple[str, Any]:
    """("highest", 3), {"rule": "highest", "k": 3}, {"highest": 3} and ("explicit", [4, 7]) all work."""
    if isinstance(rule, Mapping):
        if "rule" in rule:
            name = rule["rule"]
            arg = rule.get("indices", rule.get("k"))
        elif len(rule) == 1:
            ((name, arg),) = rule.items()
        else:
            raise ValueError(f"a test-point rule dict needs 'rule' and 'k' (or 'indices'); got {dict(rule)}")
    else:
        name, arg = rule
    if name not in TEST_SELECTIONS:
        raise ValueError(f"unknown test-point selection {name!r}; choose one of {', '.join(TEST_SELECTIONS)}")
    if name == "percentile":
        if not (isinstance(arg, (tuple, list)) and len(arg) == 2 and 0 <= float(arg[0]) <= 100):
            raise ValueError(f"selection 'percentile' takes (at, k) with 0 <= at <= 100; got {arg!r}")
        at, k = arg
        _check_count(name, k)
        return name, (float(at), int(k))
    if name != "explicit":
        _check_count(name, arg)
    return name, (arg if name == "explicit" else int(arg))


def _check_count(name: str, k: object) -> None:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
        raise ValueError(f"selection {name!r} needs a count k >= 0; got {k!r}")


def _nearest(values: torch.Tensor, target: float, k: int) -> list[int]:
    """The k indices whose values are nearest `target`, ties towards the lower index."""
    return sorted(range(values.shape[0]), key=lambda i: (abs(float(values[i]) - target), i))[:k]


def select_test_points(
    test_loss: torch.Tensor,
    rules: Sequence[tuple[str, Any]] | Sequence[Mapping[str, Any]],
    seed: int,
) -> list[tuple[int, str]]:
    """Test points to study, as ``(test_idx, selection)`` in rule order, each index once (the first rule wins).

    Rules: ``("highest", k)`` the k highest-loss points (the paper's best case); ``("median", k)`` the k closest
    to the median loss (its typical case); ``("percentile", (at, k))`` the k closest to the at-th percentile of
    the loss (linear interpolation, as ``torch.quantile``); ``("random", k)`` k points drawn with ``seed`` from those not chosen
    by an earlier rule; ``("explicit", [idx, ...])``. Ties break towards the lower index, so the choice is
    deterministic.
    """
    losses = test_loss.detach().to(torch.float64).cpu()
    m = losses.shape[0]
    chosen: dict[int, str] = {}
    gen = torch.Generator().manual_seed(seed)
    for rule in rules:
        name, arg = _normalise_rule(rule)
        count = arg[1] if name == "percentile" else arg
        if name == "explicit":
            picks = _check_indices(arg, m, "explicit test index")
        elif count > m:
            raise ValueError(f"selection {name!r} asks for {count} test points but there are only {m}")
        elif name == "highest":
            picks = sorted(range(m), key=lambda i: (-float(losses[i]), i))[:arg]
        elif name == "median":
            picks = _nearest(losses, float(losses.quantile(0.5)), arg)  # median: the mean of the middle two for even m
        elif name == "percentile":
            picks = _nearest(losses, float(losses.quantile(arg[0] / 100.0)), arg[1])
        else:  # random
            pool = [i for i in range(m) if i not in chosen]
            picks = [pool[j] for j in torch.randperm(len(pool), generator=gen, device="cpu")[:arg].tolist()]
        for i in picks:
            chosen.setdefault(i, name)
    return list(chosen.items())


def select_removals(
    estimate: torch.Tensor,
    rule: str,
    k: int = 0,
    seed: int = 0,
    indices: Sequence[int] = (),
    at: float | None = None,
) -> list[int]:
    """Training points to retrain without, sorted ascending and unique.

    ``estimate`` is [T, n]. ``"all"``: every point; ``"top_k"``: the union over test points of the k largest
    |estimate| (the paper's choice for MNIST/CIFAR: where the estimates claim most); ``"percentile"``: the union
    over test points of the k whose estimate is nearest the ``at``-th percentile of that test point's estimates
    (Koh & Liang add such a band to the top ones, so the ground truth also covers ordinary points);
    ``"random"``: k points drawn with ``seed``; ``"explicit"``: ``indices``. (``"group"`` removes points
    together: see :func:`select_groups`.)
    """
    if estimate.ndim != 2:
        raise ValueError(f"estimate must be [T, n]; got shape {tuple(estimate.shape)}")
    n = estimate.shape[1]
    if rule == "all":
        return list(range(n))
    if rule == "explicit":
        return sorted(set(_check_indices(indices, n, "explicit removal index")))
    if rule not in REMOVAL_RULES:
        raise ValueError(f"unknown removal rule {rule!r}; choose one of {', '.join(REMOVAL_RULES)}")
    if not 0 <= k <= n:
        raise ValueError(f"removal rule {rule!r} needs 0 <= k <= n={n}; got k={k}")
    if rule == "random":
        gen = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(n, generator=gen, device="cpu")[:k].tolist())
    if rule == "group":
        raise ValueError("group removals retrain points together: use select_groups")
    if rule == "percentile":
        if at is None or not 0 <= at <= 100:
            raise ValueError(f"removal rule 'percentile' needs 0 <= at <= 100; got at={at!r}")
        values = estimate.detach().to(torch.float64).cpu()
        picks = set()
        for row in values:
            picks.update(_nearest(row, float(row.quantile(at / 100.0)), k))
        return sorted(picks)
    # top_k; a stable sort on -|estimate| breaks ties towards the lower index.
    order = torch.sort(-estimate.detach().abs(), dim=1, stable=True).indices[:, :k]
    return sorted(set(order.flatten().tolist()))


def select_groups(estimate: torch.Tensor, k: int, groups: int, seed: int = 0) -> list[list[int]]:
    """Groups of training points to retrain without together (the protocol for data sets so large that one
    point's effect is below the training noise): first, per test point, its k points of highest estimate (the
    ones whose joint removal the estimates say raises that test loss most); then ``groups`` groups of k points
    drawn at random with ``seed`` (the reference distribution). Each group sorted ascending. ``k = 0`` gives
    empty groups, which retrain like a control.
    """
    if estimate.ndim != 2:
        raise ValueError(f"estimate must be [T, n]; got shape {tuple(estimate.shape)}")
    n = estimate.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"group removal needs 0 <= k <= n={n}; got k={k}")
    if groups < 0:
        raise ValueError(f"random groups must be >= 0; got {groups}")
    order = torch.sort(-estimate.detach().to(torch.float64).cpu(), dim=1, stable=True).indices[:, :k]
    out = [sorted(row.tolist()) for row in order]
    gen = torch.Generator().manual_seed(seed)
    out += [sorted(torch.randperm(n, generator=gen, device="cpu")[:k].tolist()) for _ in range(groups)]
    return out
