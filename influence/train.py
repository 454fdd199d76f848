"""Training to θ̂: minimise R(θ) = (1/n) Σ L(z_i, θ) + (λ/2)‖θ‖², full batch or in minibatches, or to
‖∇R‖₂ <= grad_tol with full-batch L-BFGS.

Retraining (leave-one-out ground truth) lives in :mod:`influence.retrain`. Training and retraining share one
definition of the minibatch order (:func:`~influence.order.epoch_order`), the learning
rate schedule (:func:`~influence.order.scheduled_lr`) and the objective's L2 term, so a retrained model sees
what θ̂ saw.

Devices: everything runs where the data x is (CPU or CUDA) and in its dtype; θ0 must be there too. θ0 drawn
here (``train`` without ``theta0``) is drawn on the CPU and moved, so it is the same on every device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from influence.lbfgs import GRAD_TOL, minimise_lbfgs
from influence.models import MLP, Model
from influence.objective import objective, per_example_loss
from influence.order import (check_options, check_same_device, epoch_batches, full_batch_or, scheduled_lr,
                             steps_per_epoch)
from influence.retrain import stacked_mlp_descent
from influence.stacked import StackedMLP

# progress is called about this many times over a run (every 1% of the epochs), and every epoch for short runs.
PROGRESS_CALLS: int = 100


# eq=False: the generated __eq__/__hash__ would compare tensors elementwise and fail; identity is right.
@dataclass(frozen=True, eq=False)
class TrainResult:
    """θ̂ and facts about it: R(θ̂), the mean training loss, ‖∇R(θ̂)‖₂, epochs run (L-BFGS: iterations) and wall
    time."""

    theta: torch.Tensor
    objective: float
    train_loss: float
    grad_norm: float
    epochs: int
    seconds: float


def train(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    weight_decay: float,
    lr: float,
    epochs: int,
    seed: int,
    theta0: torch.Tensor | None = None,
    optimizer: str = "adam",
    momentum: float = 0.9,
    batch_size: int | None = None,
    schedule: str = "constant",
    mixed_precision: bool = False,
    progress: Callable[[int, float], None] | None = None,
    grad_tol: float = GRAD_TOL,
) -> TrainResult:
    """Minimise R(θ) = (1/n) Σ L(z_i, θ) + (λ/2)‖θ‖² for ``epochs`` epochs with ``torch.optim`` from θ0.

    Full-batch MLP training (not mixed precision) takes the hand-derived stacked step of retraining instead of
    autograd and ``torch.optim``: the same updates up to the order of floating-point sums (θ agrees to 1e-16..
    1e-13 over 300 steps; ``tests/test_influence_train.py``), 4-8x faster on Iris-sized networks
    (``benchmarks/train.py``). Deep
    tanh networks amplify round-off exponentially in training (a 1e-15 change of θ0 moves θ̂ at depth 8 by
    O(1) within 1,000 epochs), so the two paths reach θ̂s that differ as much as two such starts do.

    θ0 = ``model.init(seed)`` unless given. ``optimizer``: ``"adam"`` (``torch.optim.Adam``) or ``"sgd"``
    (``torch.optim.SGD`` with ``momentum``, no nesterov); λ enters only as the objective's L2 term, never as
    the optimiser's weight decay, so θ̂ is a stationary point of the R the influence function differentiates.
    ``batch_size``: None (or ≥ n) is one full-batch step per epoch; otherwise each epoch visits every point
    once in the order :func:`~influence.order.epoch_order` ``(n, seed, epoch)``, in batches B normalised by
    |B|, the last partial batch included. ``schedule`` sets the lr per step (:func:`scheduled_lr`).
    ``mixed_precision``: the forward under bfloat16 autocast (CUDA only); θ, its gradient and the optimiser
    stay in θ's dtype. ``progress(epoch, loss)`` is called after about every 1% of the epochs (every epoch
    of a run shorter than 100), with ``epoch`` the number of epochs done and ``loss`` the mean minibatch
    objective over that epoch (for the full batch: R before the epoch's step).

    ``optimizer="lbfgs"``: ``torch.optim.LBFGS`` with a strong-Wolfe line search on the full-batch R, in the
    data's dtype (see :func:`~influence.lbfgs.minimise_lbfgs`). An epoch is one iteration (one direction and
    its line search): ``epochs`` caps them, and the run stops earlier once ‖∇R‖₂ <= ``grad_tol`` or no
    useful step is left (where the line search stalls at R's round-off, unit steps polish ∇R further).
    ``lr`` is the line search's first trial step (1.0 is the natural value).
    Full batch only (``batch_size`` None), constant ``schedule``; ``momentum`` is unused, ``mixed_precision``
    refused (the line search compares objective values). ``progress(i, R)`` as above, with i iterations done
    and R after them, and once more at an early stop. ``grad_tol`` is ignored by adam and sgd.

    ``grad_norm`` is ‖∇R‖₂ over the full training set at the returned θ (computed in float, not under autocast,
    and in chunks of ``batch_size`` examples when minibatched, so memory stays what training needed): the
    influence function assumes a stationary point, so this is the first thing to check when estimates look
    wrong.
    """
    check_options(optimizer=optimizer, schedule=schedule, batch_size=batch_size, momentum=momentum, epochs=epochs,
                  grad_tol=grad_tol)
    if mixed_precision:
        if optimizer == "lbfgs":
            raise ValueError("mixed_precision does not apply to optimizer 'lbfgs': its line search compares "
                             "objective values, which bfloat16 rounds away; pass mixed_precision=False")
        check_mixed_precision(x)
    start = time.perf_counter()
    if theta0 is None:
        theta0 = model.init(seed, dtype=x.dtype, device=x.device)
    check_same_device(theta0=theta0, x=x, y=y)
    if optimizer == "lbfgs":
        return _train_lbfgs(model, theta0, x, y, weight_decay=weight_decay, lr=lr, epochs=epochs,
                            grad_tol=grad_tol, progress=progress, start=start)
    n = x.shape[0]
    batch_size = full_batch_or(batch_size, n)
    if batch_size is None and not mixed_precision and isinstance(model, MLP):
        return _train_stacked_mlp(model, theta0, x, y, weight_decay=weight_decay, lr=lr, epochs=epochs,
                                  optimizer=optimizer, momentum=momentum, schedule=schedule, progress=progress,
                                  start=start)

    def batches(epoch: int):
        return ((xb, yb) for _, xb, yb in epoch_batches(x, y, batch_size, seed, epoch, x.device))

    theta = _descent(model, theta0, batches, n, steps_per_epoch(n, batch_size), weight_decay=weight_decay, lr=lr,
                     epochs=epochs, optimizer=optimizer, momentum=momentum, schedule=schedule,
                     mixed_precision=mixed_precision, progress=progress)
    return summarise(model, theta, x, y, weight_decay, batch_size, epochs, time.perf_counter() - start)


def train_streamed(
    model: Model,
    data,
    *,
    weight_decay: float,
    lr: float,
    epochs: int,
    seed: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    theta0: torch.Tensor | None = None,
    optimizer: str = "adam",
    momentum: float = 0.9,
    schedule: str = "constant",
    mixed_precision: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """:func:`train` in minibatches over a streamed file set (:class:`influence.streaming.StreamedSet`), on
    ``device``: the same minibatches in the same order, the same steps, so the same θ̂ as ``train`` on the set in
    memory (to the bit, on one device); R, the loss and ‖∇R‖₂ at the end in chunks of ``batch_size``, as there.
    Only the data loader's batches are ever in memory. Adam or SGD in minibatches smaller than the set: the
    full batch and L-BFGS take every point at once, so they train on the set in memory (``train``)."""
    n = data.n_train
    if optimizer == "lbfgs" or full_batch_or(batch_size, n) is None:
        raise ValueError(f"streamed training runs adam or sgd in minibatches smaller than the {n} training points "
                         f"(got optimizer {optimizer!r}, batch_size {batch_size}); train the set in memory instead")
    check_options(optimizer=optimizer, schedule=schedule, batch_size=batch_size, momentum=momentum, epochs=epochs,
                  grad_tol=GRAD_TOL)
    device = torch.device(device)
    if mixed_precision:
        check_mixed_precision(torch.empty(0, dtype=data.dtype, device=device))
    start = time.perf_counter()
    if theta0 is None:
        theta0 = model.init(seed, dtype=data.dtype, device=device)
    def batches(epoch: int):
        return ((xb, yb) for _, xb, yb in epoch_batches(data, None, batch_size, seed, epoch, device))

    theta = _descent(model, theta0.to(device), batches, n,
                     steps_per_epoch(n, batch_size), weight_decay=weight_decay, lr=lr, epochs=epochs,
                     optimizer=optimizer, momentum=momentum, schedule=schedule, mixed_precision=mixed_precision,
                     progress=progress)
    return summarise(model, theta, data, None, weight_decay, batch_size, epochs, time.perf_counter() - start)


def _descent(model: Model, theta0: torch.Tensor, batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
             n: int, per_epoch: int, *, weight_decay: float, lr: float, epochs: int, optimizer: str, momentum: float,
             schedule: str, mixed_precision: bool, progress: Callable[[int, float], None] | None) -> torch.Tensor:
    """Adam or SGD through autograd over ``batches(epoch)`` (x_b, y_b) for each epoch; θ at the end."""
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch_optimizer(optimizer, theta, lr, momentum)
    group = opt.param_groups[0]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if mixed_precision else contextlib.nullcontext
    total = epochs * per_epoch
    every = max(1, epochs // PROGRESS_CALLS)
    step = 0
    for epoch in range(epochs):
        report = progress is not None and ((epoch + 1) % every == 0 or epoch + 1 == epochs)
        seen = torch.zeros((), dtype=theta.dtype, device=theta.device) if report else None
        for x_b, y_b in batches(epoch):
            group["lr"] = scheduled_lr(schedule, lr, step, total)
            opt.zero_grad(set_to_none=True)
            with autocast():
                value = objective(model, theta, x_b, y_b, weight_decay)
            value.backward()
            opt.step()
            step += 1
            if report:  # only in reporting epochs: elsewhere the loop pays nothing for progress
                seen += value.detach() * x_b.shape[0]
        if report:
            progress(epoch + 1, float(seen) / n)
    return theta


def torch_optimizer(optimizer: str, theta: torch.Tensor, lr: float, momentum: float) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` or ``torch.optim.SGD`` (with ``momentum``) over the one tensor θ.

    foreach=False: one parameter tensor leaves foreach nothing to batch, and torch would pick it on CUDA only;
    the single-tensor update on every device keeps CPU and GPU runs the same arithmetic."""
    if optimizer == "adam":
        return torch.optim.Adam([theta], lr=lr, foreach=False)
    return torch.optim.SGD([theta], lr=lr, momentum=momentum, foreach=False)


def summarise(model: Model, theta: torch.Tensor, x, y: torch.Tensor | None, weight_decay: float,
              batch_size: int | None, epochs: int, seconds: float) -> TrainResult:
    """The :class:`TrainResult` of a run that ended at ``theta``: R, the mean loss and ‖∇R‖₂ over all n points
    (in chunks of ``batch_size`` examples unless None), where θ is. ``x`` may be a streamed set (``y`` None,
    ``batch_size`` given): its chunks are then read from its loader."""
    theta = theta.detach().requires_grad_(True)
    if isinstance(x, torch.Tensor):
        value, train_loss, grad_norm = _final_state(model, theta, x, y, weight_decay, batch_size)
    else:
        value, train_loss, grad_norm = final_state(model, theta, x.chunks("train", batch_size, theta.device),
                                                   x.n_train, weight_decay)
    return TrainResult(theta=theta.detach(), objective=value, train_loss=train_loss, grad_norm=grad_norm,
                       epochs=epochs, seconds=seconds)


def _train_stacked_mlp(model: MLP, theta0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
                       lr: float, epochs: int, optimizer: str, momentum: float, schedule: str,
                       progress: Callable[[int, float], None] | None, start: float) -> TrainResult:
    """Full-batch MLP training through the hand-derived step that retraining uses (one stacked copy, weights
    all one; :func:`~influence.retrain.stacked_mlp_descent`): the same arithmetic as the autograd loop up to the
    order of floating-point sums, several times faster for small networks (all per-step overhead). Progress
    reports R before the reporting epoch's step, as the autograd loop does."""
    every = max(1, epochs // PROGRESS_CALLS)

    def report(step: int, stack: StackedMLP) -> None:
        if (step + 1) % every == 0 or step + 1 == epochs:
            with torch.no_grad():
                progress(step + 1, float(objective(model, stack.theta()[0], x, y, weight_decay)))

    theta = stacked_mlp_descent(model, theta0.detach(), x, y, torch.ones(1, x.shape[0], dtype=x.dtype, device=x.device),
                                weight_decay=weight_decay, lr=lr, epochs=epochs, optimizer=optimizer,
                                momentum=momentum, schedule=schedule,
                                before_step=None if progress is None else report)[0].requires_grad_(True)
    value, train_loss, grad_norm = _final_state(model, theta, x, y, weight_decay, None)
    return TrainResult(theta=theta.detach(), objective=value, train_loss=train_loss, grad_norm=grad_norm,
                       epochs=epochs, seconds=time.perf_counter() - start)


def _train_lbfgs(model: Model, theta0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
                 lr: float, epochs: int, grad_tol: float, progress: Callable[[int, float], None] | None,
                 start: float) -> TrainResult:
    every = max(1, epochs // PROGRESS_CALLS)
    reported = 0

    def report(iteration: int, value: float) -> None:
        nonlocal reported
        if iteration % every == 0 or iteration == epochs:
            progress(iteration, value)
            reported = iteration

    run = minimise_lbfgs(lambda theta: objective(model, theta, x, y, weight_decay), theta0, lr=lr,
                         iterations=epochs, grad_tol=grad_tol, progress=None if progress is None else report)
    if progress is not None and 0 < run.iterations != reported:  # stopped early, between two reports
        progress(run.iterations, run.objective)
    theta = run.theta.requires_grad_(True)  # a fresh leaf: _final_state differentiates R at it
    value, train_loss, grad_norm = _final_state(model, theta, x, y, weight_decay, None)
    return TrainResult(theta=theta.detach(), objective=value, train_loss=train_loss, grad_norm=grad_norm,
                       epochs=run.iterations, seconds=time.perf_counter() - start)


def check_mixed_precision(x: torch.Tensor) -> None:
    if x.device.type != "cuda":
        raise ValueError(f"mixed_precision needs a CUDA device (bfloat16 autocast of the forward); x is on "
                         f"{x.device}: move the data to CUDA or pass mixed_precision=False")
    if x.dtype == torch.float64:
        # autocast leaves float64 alone, so the flag would silently do nothing.
        raise ValueError("mixed_precision has no effect on float64 (autocast only lowers float32): pass float32 "
                         "data, or mixed_precision=False")


def _final_state(model: Model, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float,
                 chunk: int | None) -> tuple[float, float, float]:
    """R(θ), the mean training loss and ‖∇R(θ)‖ over all n points; in chunks of ``chunk`` examples unless None."""
    if chunk is None:
        value = objective(model, theta, x, y, weight_decay)
        (grad,) = torch.autograd.grad(value, theta)
        with torch.no_grad():
            train_loss = per_example_loss(model, theta, x, y).mean()
        return float(value.detach()), float(train_loss), float(grad.norm())
    n = x.shape[0]
    return final_state(model, theta, ((x[a:a + chunk], y[a:a + chunk]) for a in range(0, n, chunk)), n, weight_decay)


def final_state(model: Model, theta: torch.Tensor, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int,
                weight_decay: float) -> tuple[float, float, float]:
    """R(θ), the mean training loss and ‖∇R(θ)‖ summed over ``chunks`` (x, y) of the n training points."""
    grad = torch.zeros_like(theta)
    loss_sum = torch.zeros((), dtype=theta.dtype, device=theta.device)
    for xc, yc in chunks:
        losses = per_example_loss(model, theta, xc, yc).sum()
        (g,) = torch.autograd.grad(losses / n, theta)  # ∇ of this chunk's share of (1/n) Σ_i L_i
        grad.add_(g)
        loss_sum += losses.detach()
    with torch.no_grad():
        grad.add_(theta, alpha=weight_decay)
        train_loss = loss_sum / n
        value = train_loss + 0.5 * weight_decay * (theta * theta).sum()
    return float(value), float(train_loss), float(grad.norm())
