"""Ground truths other than leave-one-out retraining, solved from θ̂ for a batch of removals at once.

* **PBRF**, the proximal Bregman response function (Bae et al. 2022): the response a damped Gauss-Newton
  influence function linearises, with no training noise and no warm-start gap. For a removal weighting w
  (w_i = 0 for the removed points, 1 else; v = w − 1, so ε = −1/n on each removed point)

      J(θ; v) = (1/n) Σ_j [ D(f(θ, x_j), f(θ̂, x_j)) + v_j L(z_j, θ) ] + ((λ_wd + λ)/2) ‖θ − θ̂‖²,

  D the Bregman divergence of the cross-entropy in logit space, KL(softmax f(θ̂, x) ‖ softmax f(θ, x)).
  The weight decay (λ_wd/2)‖θ‖² of the training objective is its own Bregman divergence, (λ_wd/2)‖θ − θ̂‖²,
  so to first order θ_PBRF − θ̂ = (1/n) (G + (λ_wd + λ) I)⁻¹ Σ_{i removed} ∇L(z_i, θ̂), with G the Gauss-Newton
  matrix of the data term: exactly what an influence estimate with curvature ``ggn`` and damping λ predicts.
* **Last-layer retraining** (Epifano et al. 2023): every parameter but the last layer's (W, b) stays at θ̂;
  the last layer is refitted without the removed points, exactly. Its objective (1/n) Σ w_j L(a_j Vᵀ, y_j) +
  (λ_wd/2)‖V‖², with a_j = [h_j, 1] the last layer's input at θ̂ and V = [W | b], is convex in V, so the
  refit has one answer and measures the estimator's error without the network's non-convexity. Without
  weight decay, features that separate the classes have no minimum; a proximal (λ/2)‖V − V̂‖² then keeps the
  refit finite (and pairs it with an estimate damped by λ).

Both are solved by one batched Newton-CG (:func:`newton_batched`): Hessian-vector products of each row's
own objective through ``torch.func``, conjugate gradients to a forcing tolerance, a backtracking line search,
until ‖∇J‖₂ <= tol for every row. The gradient norm reached is returned and recorded with the rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from influence.models import Model

ARMIJO = 1e-4  # sufficient decrease of the line search
BACKTRACKS = 40  # step halvings before a row's step is refused (it then keeps its parameters this iteration)


@dataclass(frozen=True)
class Solved:
    """Rows θ_k [K, P] of a batched solve, with ‖∇J(θ_k)‖₂ [K] and the Newton iterations each row took."""
    theta: torch.Tensor
    grad_norm: torch.Tensor
    iterations: torch.Tensor

    def converged(self, tol: float) -> torch.Tensor:
        return self.grad_norm <= tol


def newton_batched(fun: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], theta0: torch.Tensor,
                   aux: torch.Tensor, *, tol: float, max_iter: int, cg_max: int | None = None) -> Solved:
    """Minimise fun(θ_k, aux_k) for every row k from θ0 [K, P], all rows together.

    Inexact Newton: each step solves H_k d = −g_k by conjugate gradients with Hessian-vector products (forward
    over reverse), to the relative residual min(0.5, √‖g_k‖); CG stops early on a direction of non-positive
    curvature (then the steepest-descent direction, or the CG iterate so far, is used). The step is
    backtracked until the Armijo condition holds, with a margin of a few ulps of |fun| for rounding.
    """
    if theta0.ndim != 2 or aux.shape[0] != theta0.shape[0]:
        raise ValueError(f"theta0 must be [K, P] and aux [K, ...]; got {tuple(theta0.shape)}, {tuple(aux.shape)}")
    k_rows, p = theta0.shape
    cg_max = min(2 * p, 500) if cg_max is None else cg_max
    value = vmap(fun)
    gradient = vmap(grad(fun))

    def hvp(theta: torch.Tensor, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return jvp(lambda t: grad(fun)(t, a), (theta,), (v,))[1]

    hvps = vmap(hvp)
    theta = theta0.detach().clone()
    iterations = torch.zeros(k_rows, dtype=torch.long, device="cpu")
    eps = torch.finfo(theta.dtype).eps
    for _ in range(max_iter):
        g = gradient(theta, aux)
        gn = g.norm(dim=1)
        active = gn > tol
        if not bool(active.any()):
            break
        iterations += active.cpu().long()
        d = _cg_direction(lambda v: hvps(theta, aux, v), g, torch.clamp(gn.sqrt(), max=0.5), cg_max)
        d = torch.where(active[:, None], d, torch.zeros_like(d))
        f0 = value(theta, aux)
        slope = (g * d).sum(1)
        step = torch.ones(k_rows, dtype=theta.dtype, device=theta.device)
        accepted = ~active
        for _ in range(BACKTRACKS):
            trial = theta + step[:, None] * d
            ok = value(trial, aux) <= f0 + ARMIJO * step * slope + 8 * eps * f0.abs().clamp(min=1.0)
            newly = ok & ~accepted
            theta = torch.where(newly[:, None], trial, theta)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step / 2)
    gn = gradient(theta, aux).norm(dim=1)
    return Solved(theta.detach(), gn.detach(), iterations)


def _cg_direction(hvp: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, forcing: torch.Tensor,
                  max_iter: int) -> torch.Tensor:
    """Rows of d ≈ −H_k⁻¹ g_k by batched CG from 0, each row to ‖H d + g‖ <= forcing_k ‖g_k‖."""
    d = torch.zeros_like(g)
    r = -g.clone()
    q = r.clone()
    rr = (r * r).sum(1)
    target = (forcing * g.norm(dim=1)) ** 2
    live = rr > target
    first = torch.ones_like(live)
    for _ in range(max_iter):
        if not bool(live.any()):
            break
        hq = hvp(q)
        curvature = (q * hq).sum(1)
        negative = live & (curvature <= 0)
        # Non-positive curvature: at the first iteration step along −g; later keep the iterate so far.
        d = torch.where((negative & first)[:, None], -g, d)
        live = live & ~negative
        alpha = torch.where(live, rr / torch.where(live, curvature, torch.ones_like(curvature)), torch.zeros_like(rr))
        d = d + alpha[:, None] * q
        r = r - alpha[:, None] * hq
        rr_new = (r * r).sum(1)
        beta = torch.where(live, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        q = r + beta[:, None] * q
        rr = torch.where(live, rr_new, rr)
        live = live & (rr > target)
        first = torch.zeros_like(first)
    return d


# ---- PBRF -------------------------------------------------------------------------------------------------------


def pbrf_objective(model: Model, theta_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                   weight_decay: float, damping: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """J(θ; v) of the module docstring for one row: θ [P], v [n] (v_j = w_j − 1, −1 on a removed point)."""
    n = x.shape[0]
    with torch.no_grad():
        logp_hat = F.log_softmax(model.forward(theta_hat, x), dim=-1)
    p_hat = logp_hat.exp()
    prox = weight_decay + damping

    def fun(theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(model.forward(theta, x), dim=-1)
        kl = (p_hat * (logp_hat - logp)).sum(-1)
        nll = -logp.gather(1, y[:, None]).squeeze(1)
        diff = theta - theta_hat
        return (kl + v * nll).sum() / n + 0.5 * prox * (diff * diff).sum()

    return fun


def pbrf(model: Model, theta_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, *,
         weight_decay: float, damping: float, tol: float, max_iter: int, batched: bool = True,
         scale: float = 1.0) -> Solved:
    """θ_PBRF for every weighting row of ``weights`` [K, n] (removal weights: 1 kept, 0 removed; a row of ones is
    θ̂ itself), from θ̂; all rows in one batched solve, or (``batched`` False, for large models) one after another
    with the same iteration. ``scale`` multiplies ε (= −1/n per removed point): the response is linear in it
    as it shrinks, with the slope the Gauss-Newton influence estimate."""
    fun = pbrf_objective(model, theta_hat, x, y, weight_decay=weight_decay, damping=damping)
    v = (weights - 1.0) * scale
    return _solve_rows(fun, theta_hat.expand(weights.shape[0], -1), v, tol=tol, max_iter=max_iter, batched=batched)


def _solve_rows(fun, theta0: torch.Tensor, aux: torch.Tensor, *, tol: float, max_iter: int, batched: bool) -> Solved:
    if batched:
        return newton_batched(fun, theta0, aux, tol=tol, max_iter=max_iter)
    rows = [newton_batched(fun, theta0[k:k + 1], aux[k:k + 1], tol=tol, max_iter=max_iter)
            for k in range(theta0.shape[0])]
    return Solved(torch.cat([r.theta for r in rows]), torch.cat([r.grad_norm for r in rows]),
                  torch.cat([r.iterations for r in rows]))


# ---- last-layer retraining --------------------------------------------------------------------------------------


def last_layer_inputs(model: Model, theta_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a_j = [h_j, 1] [n, d + 1]: the last layer's input at θ̂ with a 1 for its bias. Refuses a model whose last
    Linear layer's output is not its logits (something after it would make the refit not convex)."""
    layers = model.layers()
    last = layers[-1]
    if last.kind != "linear" or last.bias is None:
        raise ValueError(f"last-layer retraining needs a model ending in a Linear layer with a bias; "
                         f"{type(model).__name__}'s last layer is a {last.kind} layer {last.name}")
    with torch.no_grad():
        logits, taps = model.forward_with_taps(theta_hat, x)
        h, z = taps[-1]
        if h.ndim != 2 or not torch.equal(z, logits):
            raise ValueError(f"last-layer retraining needs the last layer's output to be the logits; after "
                             f"{last.name} the model computes more")
        return torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)


def last_layer(model: Model, theta_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, *,
               weight_decay: float, damping: float, tol: float, max_iter: int) -> Solved:
    """θ̂ with its last layer refitted under each weighting row of ``weights`` [K, n], to ‖∇‖₂ <= tol of the
    last-layer objective plus (damping/2)‖V − V̂‖² (without any L2 term, features that separate the classes
    have no minimum: the refit would run off to infinity); the returned grad_norm is that of this objective."""
    last = model.layers()[-1]
    a = last_layer_inputs(model, theta_hat, x)
    n, width = a.shape
    classes = last.weight_shape[0]
    v0 = torch.cat([theta_hat[last.weight].view(classes, width - 1), theta_hat[last.bias].view(classes, 1)], dim=1)

    def fun(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = a @ v.view(classes, width).t()
        losses = F.cross_entropy(logits, y, reduction="none")
        diff = v - v0.reshape(-1)
        return (w * losses).sum() / n + 0.5 * weight_decay * (v * v).sum() + 0.5 * damping * (diff * diff).sum()

    solved = newton_batched(fun, v0.reshape(1, -1).expand(weights.shape[0], -1), weights, tol=tol,
                            max_iter=max_iter)
    theta = theta_hat.expand(weights.shape[0], -1).clone()
    vs = solved.theta.view(-1, classes, width)
    theta[:, last.weight] = vs[:, :, :-1].reshape(weights.shape[0], -1)
    theta[:, last.bias] = vs[:, :, -1]
    return Solved(theta, solved.grad_norm, solved.iterations)
