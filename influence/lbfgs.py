"""L-BFGS to a stationary point: full batch, a strong-Wolfe line search, stopped on the 2-norm of the gradient,
with a polish phase past the point where the line search can no longer see a decrease (see
:func:`minimise_lbfgs`). Training and retraining with ``optimizer="lbfgs"`` both run it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# L-BFGS (see minimise_lbfgs): the stop on ‖∇R‖₂ (every train/retrain function's grad_tol default); the (s, y)
# pairs kept (memory 2·history·P: 20 is plenty for the convex problems it is meant for, and affordable for
# ResNet-sized θ); the evaluations one strong-Wolfe line search may spend (torch's own _strong_wolfe default).
GRAD_TOL: float = 1e-10
LBFGS_HISTORY: int = 20
LBFGS_MAX_LINE_SEARCH: int = 25
# torch's L-BFGS keeps a curvature pair only if sᵀy > 1e-10, an absolute threshold. Near the optimum sᵀy ≈
# ∇RᵀH⁻¹∇R drops below it (digits logistic regression: from ‖∇R‖ ≈ 1e-5 on), the history freezes and the
# run crawls (222 iterations to ‖∇R‖ = 7.5e-9 where the line search gives up, against 98 to 2.6e-9 scaled,
# before polishing).
# So torch minimises c·R: with c a power of two every value and gradient is exactly c times R's (scaling by
# 2^k is exact in floating point); only the threshold moves, to 1e-10/c. 2^30 keeps c²‖y‖² far from float32's
# overflow.
LBFGS_SCALE: float = 2.0**30
# Polishing (see minimise_lbfgs): a point counts as better only with R within this many ulps of R where the
# line search stopped (R's own noise there was measured below 1 ulp), and polishing ends after this many
# steps in a row without a better point (‖∇R‖ along L-BFGS steps is not monotone: one worse step is no stop).
LBFGS_POLISH_ULPS: int = 64
LBFGS_POLISH_PATIENCE: int = 10


# eq=False: the generated __eq__/__hash__ would compare tensors elementwise and fail; identity is right.
@dataclass(frozen=True, eq=False)
class LbfgsRun:
    """Where :func:`minimise_lbfgs` stopped: θ, the iterations run, and R(θ) and ‖∇R(θ)‖₂ there."""

    theta: torch.Tensor
    iterations: int
    objective: float
    grad_norm: float


def minimise_lbfgs(
    fn: Callable[[torch.Tensor], torch.Tensor],
    theta0: torch.Tensor,
    *,
    lr: float,
    iterations: int,
    grad_tol: float = GRAD_TOL,
    progress: Callable[[int, float], None] | None = None,
) -> LbfgsRun:
    """Minimise the scalar R = ``fn(θ)`` from θ0 with ``torch.optim.LBFGS``, to ‖∇R(θ)‖₂ <= ``grad_tol``.

    An iteration is one L-BFGS direction and its strong-Wolfe line search (at most
    :data:`LBFGS_MAX_LINE_SEARCH` evaluations of R). ``lr`` is the line search's first trial step (1 is the
    quasi-Newton step; torch scales the very first one by min(1, 1/‖∇R‖₁)). ``progress(i, R)`` is called after
    every iteration i with R at the point that would be returned then.

    The run stops at the first of: ‖∇R‖₂ <= ``grad_tol``; ``iterations`` iterations; no useful step left. The
    line search must see R decrease, and near the optimum a step's decrease, about ½ ∇Rᵀ H⁻¹ ∇R, falls below
    R's round-off (float64: ~1e-16·|R|) while ∇R itself is still accurate: for digits logistic regression
    (λ = 0.01) at ‖∇R‖₂ between 5e-10 and 1e-8, where the line search returns a zero step. From there the run
    polishes: unit quasi-Newton steps, no line search, same history, judged by ‖∇R‖₂. The point returned is
    the one with the smallest ‖∇R‖₂ among those with R within :data:`LBFGS_POLISH_ULPS` of where the line
    search stopped; polishing ends at ``grad_tol``, at the cap, at a step that moves nothing, or after
    :data:`LBFGS_POLISH_PATIENCE` steps in a row without a better point. (Digits: 119 iterations to 9.5e-11.)

    torch's own stops are off (``tolerance_grad`` = ``tolerance_change`` = 0): its gradient test is on
    max|∂R/∂θ_j|, not the 2-norm, and its default change tolerance of 1e-9 on R and on ∇Rᵀd ends a run at
    ‖∇R‖ ≈ 1e-4. Instead each ``step`` runs one iteration (``max_iter=1``; the history persists between steps,
    so the iterates are those of one long run) and the 2-norm is tested in between, on the evaluation the next
    step starts from (handed to it, not recomputed). torch sees c·R with c = :data:`LBFGS_SCALE` (why: there);
    what is reported and tested is R.
    """
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=lr, max_iter=1, max_eval=1 + LBFGS_MAX_LINE_SEARCH, tolerance_grad=0.0,
                            tolerance_change=0.0, history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe")
    pending: list[torch.Tensor] = []  # R at the current θ, with ∇R in θ.grad: what the next step starts from

    def evaluate() -> torch.Tensor:  # c·R, with c·∇R in θ.grad
        theta.grad = None
        value = fn(theta) * LBFGS_SCALE
        value.backward()
        return value.detach()

    def closure() -> torch.Tensor:
        return pending.pop() if pending else evaluate()

    with torch.enable_grad():
        value = evaluate()
        grad_norm = float(theta.grad.norm()) / LBFGS_SCALE
        best: tuple[torch.Tensor, torch.Tensor, float] | None = None  # once polishing: θ, c·R, ‖∇R‖ to return
        misses = done = 0
        slack = 0.0  # how far above R where the line search stopped a better point's R may be (set there)
        while done < iterations and grad_norm > grad_tol:
            before = theta.detach().clone()
            pending.append(value)
            opt.step(closure)
            done += 1
            if torch.equal(before, theta.detach()):  # no step: no decrease found, or no descent direction
                if best is not None:
                    break
                # Polish: unit quasi-Newton steps, no line search, judged by ‖∇R‖ (see the docstring).
                opt.param_groups[0]["line_search_fn"] = None
                best = (before, value, grad_norm)
                slack = LBFGS_POLISH_ULPS * torch.finfo(value.dtype).eps * abs(float(value))
            else:
                value = evaluate()
                grad_norm = float(theta.grad.norm()) / LBFGS_SCALE
                if best is not None:
                    if grad_norm < best[2] and float(value) <= float(best[1]) + slack:
                        best, misses = (theta.detach().clone(), value, grad_norm), 0
                    else:
                        misses += 1
                        if misses == LBFGS_POLISH_PATIENCE:
                            break
            if progress is not None:
                progress(done, float(value if best is None else best[1]) / LBFGS_SCALE)
    if best is not None:
        theta, value, grad_norm = best
    return LbfgsRun(theta=theta.detach(), iterations=done, objective=float(value) / LBFGS_SCALE, grad_norm=grad_norm)
