"""Krylov-subspace inverse-HVPs from products with C alone: conjugate gradient, and Arnoldi (Lanczos).

Both see C (the Hessian or the GGN of R at θ̂, see :mod:`influence.curvature`) only through ``op.matvec``, so
neither ever forms a [P, P] matrix beyond the small projected one Arnoldi diagonalises.

CG (Shewchuk 1994; Koh & Liang's second method) solves each right-hand side to a tolerance, and its cost is per
solve. Arnoldi (Schioppa et al. 2022) pays once for the top eigenpairs of C and then every solve is two thin
products, so it is *amortised*: cheap enough for a solve per training point.
"""

from __future__ import annotations

import torch

from influence.curvature import Operator
from influence.ihvp import InverseHVP, Solve, check_damping, check_spectrum, direct_solve_info, relative_residual


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


class ConjugateGradientIHVP(InverseHVP):
    """Batched CG on (C + δI) x = v: every column has its own step sizes α, β and stops on its own.

    A block of B right-hand sides costs one ``vmap``-ed product with C per iteration for the columns still
    running. Column b stops when ‖r_b‖ <= ``tol`` · ‖v_b‖ (``tol``: relative residual, default 1e-8 as in Koh &
    Liang) or after ``max_iter`` iterations; ``residual`` is then recomputed as the *true* ‖(C + δI) x − v‖/‖v‖
    (one more product), not CG's recursively updated one, which drifts.

    CG needs C + δI positive definite. A non-convex network's Hessian need not be, and CG on an indefinite
    matrix can return a finite vector that solves nothing. So every step checks the curvature along its search
    direction: pᵀ(C + δI)p <= 0 proves C + δI is not positive definite, and that column stops, is reported
    ``diverged`` (its x is NaN) and the most negative Rayleigh quotient seen (over all solves) is kept in
    ``diagnostics["negative_curvature"]``, with a ``message`` naming the damping that would be needed at least.
    (The check can miss an indefinite C whose negative directions the Krylov space never reaches; then the
    iteration behaves as on the positive part, and ``exact`` with ``damping_policy="never"`` agrees with it.)
    A column that runs out of iterations is not diverged: its residual says how far it got.
    """

    name = "cg"
    amortised = False

    def __init__(self, op: Operator, *, damping: float = 0.0, tol: float = 1e-8, max_iter: int = 100) -> None:
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
            raise ValueError(f"tol is CG's relative residual and must be > 0; got {tol!r}")
        self.op = op
        self.damping = check_damping(damping)
        self.tol = float(tol)
        self.max_iter = _check_int("max_iter", max_iter, 1)
        # Counts and extremes over every solve so far (per-solve facts are in each Solve).
        self.diagnostics = {"damping_used": self.damping, "tol": self.tol, "max_iter": self.max_iter,
                            "not_converged": 0, "negative_curvature": None, "message": ""}

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        return self.op.matvec(v) + self.damping * v

    def _solve(self, v: torch.Tensor) -> Solve:
        b = v.shape[0]
        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        v_norm = v.norm(dim=1)
        iterations = torch.zeros(b, dtype=torch.int64, device=v.device)
        diverged = torch.zeros(b, dtype=torch.bool, device=v.device)
        active = v_norm > 0  # v = 0 is solved by x = 0 before any iteration
        worst = float("inf")  # most negative Rayleigh quotient pᵀ(C + δI)p / pᵀp seen
        for _ in range(self.max_iter):
            cols = active.nonzero().squeeze(1)
            if cols.numel() == 0:
                break
            pc = p[cols]
            ap = self._apply(pc)
            pap = (pc * ap).sum(1)
            bad = ~(pap > 0)  # also catches NaN
            if bool(bad.any()):
                quotients = pap[bad] / (pc[bad] * pc[bad]).sum(1)
                worst = min(worst, float(torch.nan_to_num(quotients, nan=-float("inf")).min()))
                diverged[cols[bad]] = True
                active[cols[bad]] = False
                good = ~bad
                cols, pc, ap, pap = cols[good], pc[good], ap[good], pap[good]
            alpha = rs[cols] / pap
            x[cols] += alpha.unsqueeze(1) * pc
            rc = r[cols] - alpha.unsqueeze(1) * ap
            r[cols] = rc
            rs_new = (rc * rc).sum(1)
            iterations[cols] += 1
            p[cols] = rc + (rs_new / rs[cols]).unsqueeze(1) * pc
            rs[cols] = rs_new
            active[cols[rs_new.sqrt() <= self.tol * v_norm[cols]]] = False

        residual = relative_residual(self._apply(x), v)
        self.diagnostics["not_converged"] += int(((residual > self.tol) & ~diverged).sum())
        if bool(diverged.any()):
            previous = self.diagnostics["negative_curvature"]
            worst = worst if previous is None else min(worst, previous)
            self.diagnostics["negative_curvature"] = worst
            self.diagnostics["message"] = (
                f"CG found pᵀ(C + δI)p <= 0 (Rayleigh quotient {worst:.3e}) for {int(diverged.sum())} of {b} "
                f"right-hand sides: C + δI with δ = {self.damping:g} is not positive definite, so CG's answer "
                f"would be meaningless and those rows are NaN. Use damping > {max(-worst, 0.0):.1e} at least "
                f"(the minimum eigenvalue may be lower still), or curvature='ggn', which is PSD."
            )
        return Solve(x, iterations, residual, diverged)


def arnoldi_eigenpairs(
    op: Operator, iterations: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz pairs of C from an ``iterations``-dimensional Krylov space: (values [m], vectors [m, P], residuals [m]).

    Arnoldi with full re-orthogonalisation (Gram-Schmidt twice, "twice is enough"), which for symmetric C is
    Lanczos without its loss of orthogonality. The projected matrix Qᵀ C Q is formed from the stored products
    rather than from Lanczos' α, β recurrence, so it is the exact Rayleigh-Ritz projection. When the Krylov space
    becomes invariant before P steps (always when C has a repeated eigenvalue, e.g. λ on the softmax shift
    directions: one start vector's Krylov space holds one direction per eigenspace), the iteration restarts from
    a fresh random vector orthogonal to the basis, so ``iterations`` = P always spans all of R^P. ``residuals`` are
    ‖C u − θ u‖ per Ritz pair (θ, u): small means that pair has converged to an eigenpair.

    Everything lives on ``op.device``; the random starts are drawn on the CPU and moved, so a seed gives the same
    start vectors on every device.
    """
    p = op.n_params
    gen = torch.Generator().manual_seed(seed)
    q = torch.zeros(iterations, p, dtype=torch.float64, device=op.device)
    cq = torch.zeros(iterations, p, dtype=torch.float64, device=op.device)

    def fresh(j: int) -> torch.Tensor:
        w = torch.randn(p, generator=gen, dtype=torch.float64, device="cpu").to(op.device)
        for _ in range(2):
            w -= q[:j].T @ (q[:j] @ w)
        return w

    w = fresh(0)
    scale = 0.0  # largest ‖C q_j‖ so far: what "round-off" is relative to
    for j in range(iterations):
        norm = float(w.norm())
        if norm <= 1e-10 * scale:
            # Breakdown: the Krylov space is invariant under C. A direction of round-off size is not new, so
            # restart from a random vector orthogonal to the basis rather than normalise noise into it.
            w = fresh(j)
            norm = float(w.norm())
        q[j] = w / norm
        cq[j] = op.matvec(q[j])
        scale = max(scale, float(cq[j].norm()))
        w = cq[j].clone()
        for _ in range(2):
            w -= q[: j + 1].T @ (q[: j + 1] @ w)
    t = q @ cq.T
    values, s = torch.linalg.eigh(0.5 * (t + t.T))
    vectors = s.T @ q  # row k is the Ritz vector for values[k]
    residuals = (s.T @ cq - values.unsqueeze(1) * vectors).norm(dim=1)
    return values, vectors, residuals


class ArnoldiIHVP(InverseHVP):
    """Low-rank inverse from the top-``rank`` eigenpairs of C (Schioppa et al. 2022), found with HVPs only.

    Once per configuration: ``iterations`` (>= ``rank``, default 2·rank, at most P) Arnoldi steps from a random
    start (``seed``) give Ritz pairs, and the ``rank`` of largest |eigenvalue| are kept, C ≈ V diag(μ) Vᵀ. Then
    each solve is a projection,

        x = V diag(1/(μ + δ)) Vᵀ v,

    and **the component of v orthogonal to span(V) is dropped** (as Schioppa et al. do), not divided by any
    eigenvalue. Those are the directions of *small* curvature, where the exact inverse is largest, so rank < P
    is a real approximation, not round-off; rank = P (with iterations = P) is exact. Gradients never have a
    component along the softmax shift directions (the loss is invariant along them), so dropping those is free.

    ``residual`` is ‖v − VVᵀv‖ / ‖v‖, the relative size of what was dropped, which equals the true
    ‖(C + δI)x − v‖/‖v‖ when the Ritz pairs are eigenpairs (``diagnostics["max_ritz_residual"]`` says how far they
    are); ``iterations`` is 0 per solve (the one-off steps are ``diagnostics["iterations"]``).
    ``rank`` larger than P is capped at P (the full decomposition); so is ``iterations``.
    """

    name = "arnoldi"
    amortised = True
    _STATE = ("damping", "eigenvalues", "eigenvectors", "_inverse", "diagnostics")

    def __init__(
        self, op: Operator, *, damping: float = 0.0, rank: int = 20, iterations: int | None = None, seed: int = 0
    ) -> None:
        self.damping = check_damping(damping)
        p = op.n_params
        rank = min(_check_int("rank", rank, 1), p)
        iterations = min(2 * rank, p) if iterations is None else min(_check_int("iterations", iterations, 1), p)
        if iterations < rank:
            raise ValueError(f"arnoldi needs iterations >= rank; got iterations={iterations}, rank={rank}")
        values, vectors, residuals = arnoldi_eigenpairs(op, iterations, _check_int("seed", seed, 0))
        keep = torch.argsort(values.abs(), descending=True, stable=True)[:rank]
        self.eigenvalues = values[keep]
        self.eigenvectors = vectors[keep]  # [rank, P], rows orthonormal
        shifted = self.eigenvalues + self.damping
        check_spectrum(shifted, self.damping, float(self.eigenvalues.min()))
        self._inverse = 1.0 / shifted
        self.diagnostics = {
            "damping_used": self.damping,
            "rank": rank,
            "iterations": iterations,
            "top_eigenvalue": float(values.max()),
            "min_kept_eigenvalue": float(self.eigenvalues.min()),
            "positive_definite": bool(shifted.min() > 0),  # on the kept subspace
            "max_ritz_residual": float(residuals[keep].max()),
        }

    def _solve(self, v: torch.Tensor) -> Solve:
        coeff = v @ self.eigenvectors.T  # [B, rank]
        x = (coeff * self._inverse) @ self.eigenvectors
        residual = relative_residual(coeff @ self.eigenvectors, v)
        iterations, _, diverged = direct_solve_info(v)
        return Solve(x, iterations, residual, diverged)
