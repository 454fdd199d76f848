"""Inverse-Hessian-vector products s = (C + δI)^{-1} v: the interface, ``exact``, and ``make_solver``.

Every influence method needs the same thing, s_test = (H + δI)^{-1} ∇L(z_t, θ̂), and differs only in how it
solves for it. So the interface is one method, :meth:`InverseHVP.solve_with_info` (``solve`` is derived), which
returns a :class:`Solve`: the solutions and, per right-hand side, iterations, relative residual and whether the
method diverged. Facts about the solver as a whole (damping used, scale chosen, rank, seconds of one-off
fitting, curvature) are in its ``diagnostics`` dict, to be stored next to the estimates.

C is the Hessian H of the *full* objective R(θ) = (1/n) Σ L(z_i, θ) + (λ/2)‖θ‖² (or its Gauss-Newton matrix G,
``curvature="ggn"``, see :mod:`influence.curvature`), so it already contains λI; the damping δ is on top of that
and exists for non-convex models, where H at θ̂ can be indefinite. δ means the same in every method.

Methods (:data:`METHODS`; settings and defaults in :data:`SETTINGS`, declared with their meaning in
:mod:`influence.registry`):
  ``exact``    dense C, one eigendecomposition                                  this module
  ``cg``       conjugate gradient on a block of right-hand sides, HVPs only     :mod:`influence.ihvp_krylov`
  ``lissa``    stochastic Neumann recursion (Agarwal et al.; Koh & Liang)       :mod:`influence.ihvp_lissa`
  ``arnoldi``  top-k eigenpairs by Arnoldi, then projections (Schioppa et al.)  :mod:`influence.ihvp_krylov`
  ``ekfac``    eigenvalue-corrected Kronecker factors (George et al. 2018)      :mod:`influence.ihvp_ekfac`
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from influence.curvature import CURVATURES, CurvatureOperator, curvature_matrix, hessian  # noqa: F401
from influence.models import MLP
from influence.registry import (  # noqa: F401 (DAMPING_POLICIES is part of this module's interface)
    DAMPING_POLICIES, METHODS, SOLVER_SETTINGS, ZERO_RTOL, check_damping_policy, damping_to_add, solver_defaults,
)

# Per method, the settings make_solver accepts and their defaults, derived from the declarations in
# influence.registry (where each one's allowed values and meaning are). None means "derived", as each class's
# docstring says (LiSSA's depth: ≈ n / repeats, the paper's rule; Arnoldi's iterations: 2·rank).
SETTINGS: dict[str, dict[str, object]] = {method: solver_defaults(method) for method in SOLVER_SETTINGS}

# Eigenvalues of C + δI smaller than this (relative to the largest |eigenvalue|) make the solve meaningless.
_SINGULAR_RTOL = ZERO_RTOL


class SingularHessian(ValueError):
    """C + δI is (numerically) singular, so (C + δI)^{-1} v does not exist; the message suggests a damping."""


# eq=False: the generated __eq__/__hash__ would compare tensors elementwise and fail; identity is right.
@dataclass(frozen=True, eq=False)
class Solve:
    """Solutions of (C + δI) x_b = v_b for B right-hand sides, and what each one cost and how good it is.

    All four live on the device of the right-hand sides.

    x:           [B, P] float64; a row is NaN where ``diverged`` (never a number that only looks like one)
    iterations:  [B] int64, products with C spent on that right-hand side (0 for one-off factorisations)
    residual:    [B] float64, ‖(C + δI) x_b − v_b‖ / ‖v_b‖ where the method defines it (see each class), else NaN
    diverged:    [B] bool, the method detected that its iteration failed for that right-hand side
    """

    x: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    diverged: torch.Tensor

    def __post_init__(self) -> None:
        b = self.x.shape[0]
        if self.x.ndim != 2 or any(t.shape != (b,) for t in (self.iterations, self.residual, self.diverged)):
            raise ValueError(
                f"Solve needs x [B, P] and [B] iterations/residual/diverged; got {tuple(self.x.shape)}, "
                f"{tuple(self.iterations.shape)}, {tuple(self.residual.shape)}, {tuple(self.diverged.shape)}"
            )


def relative_residual(av: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖A x − v‖ / ‖v‖ per row, given A x; 0 for v = 0 solved by x = 0 (the only sensible convention)."""
    num = (av - v).norm(dim=1)
    den = v.norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), num)


class InverseHVP(ABC):
    """Solves (C + δI) x = v. Subclasses set ``name``, ``amortised`` and ``diagnostics`` and supply ``_solve``.

    ``amortised``: solving many right-hand sides costs little beyond the one-off fit (exact, arnoldi, ekfac), so
    per-training-point solves (the predicted ‖Δθ‖) are worth doing by default.
    """

    name: str
    amortised: bool = False
    diagnostics: dict[str, Any]
    # The attributes a fitted amortised solver solves from (tensors and plain values only): what `state()`
    # saves and `restore_solver` sets back, so that a task other than the one that fitted it (a shard of the
    # training set) can solve without fitting again. Empty: the solver cannot be moved (cg, lissa hold the
    # curvature operator over the training data and solve from it).
    _STATE: tuple[str, ...] = ()

    @abstractmethod
    def _solve(self, v: torch.Tensor) -> Solve:
        """The method itself, for v [B, P] float64 with B >= 1."""

    def solve_with_info(self, v: torch.Tensor) -> Solve:
        """x = (C + δI)^{-1} v for v [P] or [B, P] (one row per vector), with per-row diagnostics.

        Rows the method reports as diverged come back as NaN, whatever the method left in them.
        """
        if v.ndim not in (1, 2):
            raise ValueError(f"v must be [P] or [B, P]; got shape {tuple(v.shape)}")
        block = v.detach().to(torch.float64).reshape(-1, v.shape[-1])
        if block.shape[0] == 0:
            device = block.device
            return Solve(block.clone(), torch.empty(0, dtype=torch.int64, device=device),
                         torch.empty(0, dtype=torch.float64, device=device),
                         torch.empty(0, dtype=torch.bool, device=device))
        out = self._solve(block)
        if bool(out.diverged.any()):
            x = out.x.clone()
            x[out.diverged] = math.nan
            out = Solve(x, out.iterations, out.residual, out.diverged)
        return out

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """x = (C + δI)^{-1} v for v of shape [P] or [B, P]; NaN rows where the method diverged."""
        x = self.solve_with_info(v).x
        return x[0] if v.ndim == 1 else x

    def state(self) -> dict[str, Any]:
        """What this fitted solver solves from, as tensors and plain values (it loads with
        ``torch.load(weights_only=True)``); :func:`restore_solver` makes a solver of it that gives the same
        solutions. Only amortised solvers have one."""
        if not self._STATE:
            raise ValueError(f"{self.name} solves from the curvature operator over the training data; it has no "
                             f"state to store")
        return {"method": self.name, **{name: getattr(self, name) for name in self._STATE}}

    def _restored(self, model: Any) -> None:
        """What `restore_solver` rebuilds from the model after setting the stored attributes (nothing here)."""


def check_damping(damping: float) -> float:
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0:
        raise ValueError(f"damping must be a number >= 0; got {damping!r}")
    return float(damping)


def check_spectrum(shifted: torch.Tensor, damping: float, min_eigenvalue: float, policy_hint: bool = False) -> None:
    """Raise :class:`SingularHessian` if the eigenvalues ``shifted`` (of C + δI) include a numerical zero."""
    scale = float(shifted.abs().max())
    smallest = int(shifted.abs().argmin())
    if scale == 0.0 or abs(float(shifted[smallest])) < _SINGULAR_RTOL * scale:
        policy = " with damping_policy='always' (or 'if_indefinite')" if policy_hint else ""
        raise SingularHessian(
            f"H + δI is singular: eigenvalue {float(shifted[smallest]):.3e} (δ = {damping:g}, "
            f"largest |eigenvalue| {scale:.3e}). Pass a damping larger than "
            f"{max(-min_eigenvalue, 0.0) + 1e-3 * max(scale, 1e-12):.1e}{policy}, "
            f"or train with weight decay so that H contains λI."
        )


class ExactIHVP(InverseHVP):
    """Exact solves from one eigendecomposition C = Q diag(μ) Qᵀ: x = Q diag(1/(μ + δ)) Qᵀ v.

    The decomposition costs O(P³) once; each solve is then two [P, P] products, and it hands over the
    curvature facts (top and minimum eigenvalue) the study reports for free. ``residual`` is the true
    ‖(C + δI) x − v‖ / ‖v‖ (round-off, unless C + δI is badly conditioned); ``iterations`` is 0.

    ``damping_policy``: ``"always"`` adds δ = ``damping``; ``"if_indefinite"`` adds it only when the minimum
    eigenvalue is <= 0, zero meaning below 1e-12 of the largest |eigenvalue| (so the convex case stays
    undamped, hence exactly the textbook influence function); ``"never"`` ignores ``damping``. The rule is
    :func:`influence.registry.damping_to_add`, the one that decides every configuration's δ.
    """

    name = "exact"
    amortised = True
    _STATE = ("_matrix", "_eigenvectors", "_inverse_eigenvalues", "min_eigenvalue", "top_eigenvalue",
              "damping_used", "diagnostics")

    def __init__(self, H: torch.Tensor, *, damping: float = 0.0, damping_policy: str = "if_indefinite") -> None:
        check_damping_policy(damping_policy)  # before the O(P³) decomposition
        damping = check_damping(damping)
        if H.ndim != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"H must be a square [P, P] matrix; got shape {tuple(H.shape)}")
        self._matrix = H.to(torch.float64)
        eigenvalues, self._eigenvectors = torch.linalg.eigh(self._matrix)
        self.min_eigenvalue = float(eigenvalues[0])
        self.top_eigenvalue = float(eigenvalues[-1])
        # "<= 0" up to round-off: an eigenvalue of +1e-18 next to a top eigenvalue of 1 is a zero that eigh
        # happened to round up (softmax regression without weight decay has an exact null space). The largest
        # |eigenvalue| is max(|top|, |min|), so this is the rule every configuration's δ is decided by.
        self.damping_used = damping_to_add(damping_policy, damping, self.min_eigenvalue, self.top_eigenvalue)

        shifted = eigenvalues + self.damping_used
        check_spectrum(shifted, self.damping_used, self.min_eigenvalue, policy_hint=True)
        self._inverse_eigenvalues = 1.0 / shifted
        self.diagnostics = {
            "damping_used": self.damping_used,
            "min_eigenvalue": self.min_eigenvalue,
            "top_eigenvalue": self.top_eigenvalue,
            # Still indefinite after damping: the solve exists but the "influence" mixes in ascent directions.
            "positive_definite": bool(shifted[0] > 0),
        }

    def _solve(self, v: torch.Tensor) -> Solve:
        q = self._eigenvectors
        # Row-vector form x = ((v Q) / (μ + δ)) Qᵀ handles a block of right-hand sides at once.
        x = ((v @ q) * self._inverse_eigenvalues) @ q.T
        residual = relative_residual(x @ self._matrix + self.damping_used * x, v)
        iterations, _, diverged = direct_solve_info(v)
        return Solve(x, iterations, residual, diverged)


def direct_solve_info(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(iterations, residual, diverged)`` = (0, NaN, False) per row of v, on v's device: what a one-off
    factorisation reports for its solves (each method overwrites the residual it can compute)."""
    b, device = v.shape[0], v.device
    return (torch.zeros(b, dtype=torch.int64, device=device),
            torch.full((b,), torch.nan, dtype=torch.float64, device=device),
            torch.zeros(b, dtype=torch.bool, device=device))


def restore_solver(state: dict[str, Any], model: Any, device: torch.device | str | None = None) -> InverseHVP:
    """The solver whose :meth:`InverseHVP.state` is ``state``, for the same ``model`` (the architecture: EK-FAC
    maps its factors onto the model's layers), its tensors on ``device`` (default: where they are)."""
    from influence.ihvp_ekfac import EkfacIHVP
    from influence.ihvp_krylov import ArnoldiIHVP

    classes = {c.name: c for c in (ExactIHVP, ArnoldiIHVP, EkfacIHVP)}
    method = state.get("method")
    if method not in classes:
        raise ValueError(f"no stored solver state for method {method!r}; amortised methods: {', '.join(classes)}")
    cls = classes[method]
    missing = [name for name in cls._STATE if name not in state]
    if missing:
        raise ValueError(f"stored {method} solver state lacks {', '.join(missing)}")
    solver = cls.__new__(cls)
    for name in cls._STATE:
        setattr(solver, name, _to_device(state[name], device))
    solver._restored(model)
    return solver


def _to_device(value: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if type(value) in (list, tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def make_solver(
    method: str,
    model: MLP,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weight_decay: float,
    **settings: Any,
) -> InverseHVP:
    """The solver for ``method`` at θ̂ on the training data (x, y), with ``settings`` from :data:`SETTINGS`.

    Settings not given take the defaults in :data:`SETTINGS`; a name not listed there for ``method`` is an
    error (a typo must not silently run the default). ``diagnostics["seconds_fit"]`` is the one-off cost:
    forming and factorising C (exact), the eigenpairs (arnoldi), the factors (ekfac); ~0 for cg and lissa,
    whose cost is in every solve.

    ``x`` may be a streamed set (:class:`influence.streaming.StreamedSet`, ``y`` None): the curvature products
    of cg, lissa, arnoldi and exact, and ekfac's factor passes, then stream its chunks (the dense Hessian of an
    MLP decodes it whole).
    """
    if method not in METHODS:
        raise ValueError(f"unknown influence method {method!r}; choose one of {', '.join(METHODS)}")
    allowed = SETTINGS[method]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        listing = ", ".join(f"{k} (default {v!r})" for k, v in allowed.items())
        raise ValueError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for influence "
            f"method {method!r}; its settings are: {listing}"
        )
    kw = {**allowed, **settings}
    curvature = kw.get("curvature")
    start = time.perf_counter()
    solver = _build(method, model, theta, x, y, weight_decay, kw)
    solver.diagnostics["seconds_fit"] = time.perf_counter() - start
    if curvature is not None:
        solver.diagnostics["curvature"] = curvature
    return solver


def _build(method: str, model: MLP, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float,
           kw: dict[str, Any]) -> InverseHVP:
    # The other methods' modules subclass InverseHVP from this one, so they are imported here, on first use,
    # rather than at the top (which would be a circular import).
    if method == "exact":
        matrix = curvature_matrix(model, theta, x, y, weight_decay, kw.pop("curvature"))
        return ExactIHVP(matrix, **kw)
    if method == "ekfac":
        from influence.ihvp_ekfac import EkfacIHVP

        return EkfacIHVP(model, theta, x, y, weight_decay, **kw)
    if method == "lissa":
        from influence.ihvp_lissa import LissaIHVP

        return LissaIHVP(CurvatureOperator(model, theta, x, y, weight_decay), **kw)
    from influence.ihvp_krylov import ArnoldiIHVP, ConjugateGradientIHVP

    op = CurvatureOperator(model, theta, x, y, weight_decay, curvature=kw.pop("curvature"))
    return ConjugateGradientIHVP(op, **kw) if method == "cg" else ArnoldiIHVP(op, **kw)
