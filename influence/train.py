"""Training to θ̂, and leave-one-out retraining of many models at once.

Ground truth for the study is retraining without a point: one model per removal, warm-started from θ̂, each with
its own weighting w of the training points (see :mod:`influence.objective`). For Iris-sized networks one such
model is a few hundred parameters, so retraining them one by one is dominated by per-operation overhead, not by
arithmetic. :func:`retrain_batched` therefore stacks the K models into one tensor Θ ∈ R^{K×P} and runs *one*
forward, backward and Adam step per epoch for all of them. Adam is elementwise, so Adam on the stacked tensor is
exactly K independent Adams; :func:`retrain_loop` is the plain one-model-at-a-time reference.

Devices: everything runs where the data x is (CPU or CUDA) and in its dtype; θ0 must be there too. θ0 drawn
here (``train`` without ``theta0``) is drawn on the CPU and moved, so it is the same on every device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from influence.models import MLP
from influence.objective import objective, per_example_loss
from influence.stacked import StackedMLP

# torch.optim.Adam's defaults; the hand-written retraining step uses the same constants so the two agree.
ADAM_BETAS: tuple[float, float] = (0.9, 0.999)
ADAM_EPS: float = 1e-8


# eq=False: the generated __eq__/__hash__ would compare tensors elementwise and fail; identity is right.
@dataclass(frozen=True, eq=False)
class TrainResult:
    """θ̂ and facts about it: R(θ̂), the mean training loss, ‖∇R(θ̂)‖, epochs run and wall time."""

    theta: torch.Tensor
    objective: float
    train_loss: float
    grad_norm: float
    epochs: int
    seconds: float


def train(
    model: MLP,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    weight_decay: float,
    lr: float,
    epochs: int,
    seed: int,
    theta0: torch.Tensor | None = None,
) -> TrainResult:
    """Minimise R(θ) = (1/n) Σ L(z_i, θ) + (λ/2)‖θ‖² with full-batch ``torch.optim.Adam`` for ``epochs`` steps.

    θ0 = ``model.init(seed)`` unless given. ``grad_norm`` is ‖∇R‖ at the returned θ: the influence function
    assumes a stationary point, so this is the first thing to check when estimates look wrong.
    """
    start = time.perf_counter()
    if theta0 is None:
        theta0 = model.init(seed, dtype=x.dtype, device=x.device)
    check_same_device(theta0=theta0, x=x, y=y)
    theta = theta0.detach().clone().requires_grad_(True)
    # foreach=False: one parameter tensor leaves foreach nothing to batch, and torch would pick it on CUDA only;
    # the single-tensor update on every device keeps CPU and GPU runs the same arithmetic.
    opt = torch.optim.Adam([theta], lr=lr, foreach=False)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        objective(model, theta, x, y, weight_decay).backward()
        opt.step()

    value = objective(model, theta, x, y, weight_decay)
    (grad,) = torch.autograd.grad(value, theta)
    with torch.no_grad():
        train_loss = per_example_loss(model, theta, x, y).mean()
    return TrainResult(
        theta=theta.detach(),
        objective=float(value.detach()),
        train_loss=float(train_loss),
        grad_norm=float(grad.norm()),
        epochs=epochs,
        seconds=time.perf_counter() - start,
    )


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise, naming the arguments, unless every tensor is on one device (torch's own error names none)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"inputs are on different devices ({where}); move them to one with .to(device)")


def removal_weights(
    n: int,
    removed: Sequence[int],
    controls: int = 1,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Weights [controls + len(removed), n]: ``controls`` rows of ones, then one row per removal with w_i = 0.

    Control rows are retrained with the same schedule and nothing removed, so that actual(i, t) can subtract
    the effect of the extra training itself (the noise floor).
    """
    removed = [int(i) for i in removed]
    bad = [i for i in removed if not 0 <= i < n]
    if bad:
        raise ValueError(f"removed indices must lie in [0, {n}); got {bad[:5]}")
    if controls < 0:
        raise ValueError(f"controls must be >= 0; got {controls}")
    weights = torch.ones(controls + len(removed), n, dtype=dtype, device=device)
    rows = torch.arange(controls, controls + len(removed), device=device)
    weights[rows, torch.as_tensor(removed, dtype=torch.long, device=device)] = 0.0
    return weights


class _Adam:
    """Adam's update for one parameter tensor, in place, on buffers allocated once.

    The same arithmetic, in the same order, as ``torch.optim.Adam``'s single-tensor path with default settings
    (``tests/test_influence_train.py`` checks they agree), written out so that the retraining loops pay for
    seven tensor ops per step and nothing else: no param groups, no state dicts, no hooks. Every entry of the
    tensor is updated independently, so one ``_Adam`` over Θ [K, P] is K independent Adams. Its state lives
    where the parameter does (``*_like``), and the step count is a Python int, so a CUDA step never syncs.
    """

    def __init__(self, param: torch.Tensor, lr: float) -> None:
        self.param = param
        self.lr = lr
        self.step = 0
        self._exp_avg = torch.zeros_like(param)
        self._exp_avg_sq = torch.zeros_like(param)
        self._denom = torch.empty_like(param)

    def update(self, grad: torch.Tensor) -> None:
        beta1, beta2 = ADAM_BETAS
        self.step += 1
        self._exp_avg.lerp_(grad, 1.0 - beta1)
        self._exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        torch.sqrt(self._exp_avg_sq, out=self._denom).div_(math.sqrt(1.0 - beta2**self.step)).add_(ADAM_EPS)
        self.param.addcdiv_(self._exp_avg, self._denom, value=-self.lr / (1.0 - beta1**self.step))


def _check_retrain_args(model: MLP, theta0: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> int:
    if weights.ndim != 2 or weights.shape[1] != x.shape[0]:
        raise ValueError(f"weights must be [K, n] with n={x.shape[0]}; got {tuple(weights.shape)}")
    k = weights.shape[0]
    if theta0.shape not in ((model.n_params,), (k, model.n_params)):
        raise ValueError(f"theta0 must be [{model.n_params}] or [{k}, {model.n_params}]; got {tuple(theta0.shape)}")
    check_same_device(theta0=theta0, x=x, weights=weights)
    return k


def retrain_batched(
    model: MLP,
    theta0: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    *,
    weight_decay: float,
    lr: float,
    epochs: int,
) -> torch.Tensor:
    """Θ [K, P]: row k minimises R(θ; w_k) by ``epochs`` full-batch Adam steps from θ0, all K in one computation.

    ``theta0`` is [P] (every copy warm-starts from θ̂) or [K, P]; ``weights`` is [K, n], e.g. from
    :func:`removal_weights`. Each row gets its own, fresh Adam state.

    The gradient of the data term comes from :class:`~influence.stacked.StackedMLP` (hand-derived backward,
    no allocations in the loop); the L2 term's gradient λθ is one in-place add.
    """
    _check_retrain_args(model, theta0, x, weights)
    stack = StackedMLP(model, x, y, weights)
    stack.load(theta0)
    adam = _Adam(stack.params, lr)
    for _ in range(epochs):
        grad = stack.grad()
        if weight_decay:
            grad.add_(stack.params, alpha=weight_decay)
        adam.update(grad)
    return stack.theta()


def retrain_loop(
    model: MLP,
    theta0: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    *,
    weight_decay: float,
    lr: float,
    epochs: int,
) -> torch.Tensor:
    """Same result as :func:`retrain_batched`, one model at a time: the reference and the benchmark baseline.

    Deliberately the plain way: ``torch.autograd`` through :func:`~influence.objective.objective` and
    ``model.forward``, so that agreement with :func:`retrain_batched` checks the stacked, hand-derived gradient
    against the definitions. Only the Adam update is shared (same math, so the two agree to round-off).
    """
    k = _check_retrain_args(model, theta0, x, weights)
    out = torch.empty(k, model.n_params, dtype=theta0.dtype, device=theta0.device)
    for i in range(k):
        theta = (theta0 if theta0.ndim == 1 else theta0[i]).detach().clone().requires_grad_(True)
        adam = _Adam(theta.detach(), lr)  # same storage: the update is invisible to autograd
        for _ in range(epochs):
            (grad,) = torch.autograd.grad(objective(model, theta, x, y, weight_decay, weights[i]), theta)
            adam.update(grad)
        out[i] = theta.detach()
    return out
