"""Inverse-Hessian-vector products s = (H + δI)^{-1} v, one class per method.

Every influence method needs the same thing, s_test = (H + δI)^{-1} ∇L(z_t, θ̂), and differs only in how it
solves for it. So the interface is one method, :meth:`InverseHVP.solve`, plus a ``diagnostics`` dict of facts
about the solve worth storing next to the estimates (damping used, curvature, later: iterations, residuals).
A new method (CG, LiSSA, Arnoldi, EK-FAC) is a new subclass and a new entry in :func:`make_solver`.

H is the Hessian of the *full* objective R(θ) = (1/n) Σ L(z_i, θ) + (λ/2)‖θ‖², so it already contains λI; the
damping δ is on top of that and exists for non-convex models, where H at θ̂ can be indefinite.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch.func import jacrev

from influence.models import MLP
from influence.objective import objective

DAMPING_POLICIES: tuple[str, ...] = ("always", "if_indefinite", "never")

# Eigenvalues of H + δI smaller than this (relative to the largest |eigenvalue|) make the solve meaningless.
_SINGULAR_RTOL = 1e-12


class SingularHessian(ValueError):
    """H + δI is (numerically) singular, so (H + δI)^{-1} v does not exist; the message suggests a damping."""


def hessian(
    model: MLP, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float
) -> torch.Tensor:
    """H = ∇²_θ R(θ) ∈ R^{P×P} of the full objective (data term and λI), by ``torch.func`` over flat θ.

    Computed in float64 whatever the inputs are: the study's small models are exactly where the Hessian's
    smallest eigenvalues decide the answer, and float32 round-off (~1e-7 relative) would swamp them.
    Reverse-over-reverse (``jacrev(jacrev(R))``) rather than ``torch.func.hessian``'s forward-over-reverse:
    same matrix, similar cost at this size, and it avoids torch's forward-AD set-up, which emits a
    deprecation warning (``torch.jit.script``) in every fresh worker process.
    """
    theta64 = theta.detach().to(torch.float64)
    x64 = x.to(torch.float64)
    h = jacrev(jacrev(lambda t: objective(model, t, x64, y, weight_decay)))(theta64)
    # Autograd's H is symmetric only up to round-off; eigh reads one triangle, so make both triangles agree.
    return 0.5 * (h + h.T)


class InverseHVP(ABC):
    """Solves (H + δI) s = v. Subclasses set ``name`` and fill ``diagnostics``."""

    name: str
    diagnostics: dict[str, Any]

    @abstractmethod
    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """s = (H + δI)^{-1} v, for v of shape [P] or a batch [B, P] (one row per vector)."""


class ExactIHVP(InverseHVP):
    """Exact solves from one eigendecomposition H = Q diag(μ) Qᵀ: s = Q diag(1/(μ + δ)) Qᵀ v.

    The decomposition costs O(P³) once; each solve is then two [P, P] products, and it hands over the
    curvature facts (top and minimum eigenvalue) the study reports for free.

    ``damping_policy``: ``"always"`` adds δ = ``damping``; ``"if_indefinite"`` adds it only when the minimum
    eigenvalue is <= 0, zero meaning below 1e-12 of the largest |eigenvalue| (so the convex case stays
    undamped, hence exactly the textbook influence function); ``"never"`` ignores ``damping``.
    """

    name = "exact"

    def __init__(self, H: torch.Tensor, *, damping: float = 0.0, damping_policy: str = "if_indefinite") -> None:
        if damping_policy not in DAMPING_POLICIES:
            raise ValueError(
                f"unknown damping_policy {damping_policy!r}; choose one of {', '.join(DAMPING_POLICIES)}"
            )
        if damping < 0:
            raise ValueError(f"damping must be >= 0; got {damping}")
        if H.ndim != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"H must be a square [P, P] matrix; got shape {tuple(H.shape)}")
        eigenvalues, self._eigenvectors = torch.linalg.eigh(H)
        self.min_eigenvalue = float(eigenvalues[0])
        self.top_eigenvalue = float(eigenvalues[-1])
        # "<= 0" up to round-off: an eigenvalue of +1e-18 next to a top eigenvalue of 1 is a zero that eigh
        # happened to round up (softmax regression without weight decay has an exact null space).
        zero = _SINGULAR_RTOL * float(eigenvalues.abs().max())
        add = damping_policy == "always" or (damping_policy == "if_indefinite" and self.min_eigenvalue <= zero)
        self.damping_used = damping if add else 0.0

        shifted = eigenvalues + self.damping_used
        scale = float(shifted.abs().max())
        smallest = int(shifted.abs().argmin())
        if scale == 0.0 or abs(float(shifted[smallest])) < _SINGULAR_RTOL * scale:
            raise SingularHessian(
                f"H + δI is singular: eigenvalue {float(shifted[smallest]):.3e} (δ = {self.damping_used:g}, "
                f"largest |eigenvalue| {scale:.3e}). Pass a damping larger than "
                f"{max(-self.min_eigenvalue, 0.0) + 1e-3 * max(scale, 1e-12):.1e} with damping_policy='always' "
                f"(or 'if_indefinite'), or train with weight decay so that H contains λI."
            )
        self._inverse_eigenvalues = 1.0 / shifted
        self.diagnostics = {
            "damping_used": self.damping_used,
            "min_eigenvalue": self.min_eigenvalue,
            "top_eigenvalue": self.top_eigenvalue,
            # Still indefinite after damping: the solve exists but the "influence" mixes in ascent directions.
            "positive_definite": bool(shifted[0] > 0),
        }

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        q = self._eigenvectors
        vv = v.to(q.dtype)
        # Row-vector form s = ((v Q) / (μ + δ)) Qᵀ handles [P] and [B, P] alike.
        return ((vv @ q) * self._inverse_eigenvalues) @ q.T


METHODS: tuple[str, ...] = ("exact",)


def make_solver(
    method: str,
    model: MLP,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weight_decay: float,
    **settings: Any,
) -> InverseHVP:
    """The solver for ``method`` at θ̂ on the training data (x, y); ``settings`` go to its constructor.

    ``exact``: ``damping`` (δ, default 0) and ``damping_policy`` (default ``"if_indefinite"``).
    """
    if method == "exact":
        return ExactIHVP(hessian(model, theta, x, y, weight_decay), **settings)
    raise ValueError(f"unknown influence method {method!r}; choose one of {', '.join(METHODS)}")
