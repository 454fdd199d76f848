"""Data-parallel training: W workers take the same minibatch steps as one, each on its share of every batch.

Every worker holds the whole training set, or streams its pieces of the batches from a file set
(:class:`~influence.streaming.StreamedSet`: a piece is all it decodes), and the same θ. A step's batch B (the order of
:func:`~influence.order.epoch_order`, as one worker would visit it) is cut into W contiguous pieces; worker w
computes ∇ of (1/|B|) Σ_{i∈B_w} L(z_i, θ), the piece's share of the batch objective, the W shares are summed
by ``all_reduce`` (torch.distributed's SUM: gloo on CPUs, NCCL on GPUs, once per step), and every worker adds
the L2 term's λθ and takes the same ``torch.optim`` step. The sum of the shares is the batch gradient one
worker computes, so W workers reach the θ̂ of :func:`~influence.train.train` with the same global batch and
seed, up to the order of floating-point sums (pieces are normalised by |B|, not by their own sizes, so an
uneven last batch weighs its points as one worker does).

Progress (a :class:`~influence.progress.Progress`): worker 0 saves θ, the optimiser's state and the step every
``progress.every`` steps and at the end; every worker of a restarted group loads the same state and goes on
from it, taking exactly the steps the uninterrupted run would have taken.

Nothing here knows who runs the workers (the cluster layer starts them with Ray Train).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from influence.models import Model
from influence.objective import per_example_loss
from influence.progress import Progress, resumed_state, save_due
from influence.order import (check_options, epoch_batches, full_batch_or, n_points, scheduled_lr, steps_per_epoch,
                             streamed)
from influence.train import PROGRESS_CALLS, TrainResult, check_mixed_precision, summarise, torch_optimizer

AllReduce = Callable[[torch.Tensor], None]  # sums a tensor over the workers, in place


def train_data_parallel(
    model: Model,
    x,
    y: torch.Tensor | None,
    *,
    rank: int,
    world: int,
    all_reduce: AllReduce,
    weight_decay: float,
    lr: float,
    epochs: int,
    seed: int,
    optimizer: str = "adam",
    momentum: float = 0.9,
    batch_size: int | None = None,
    schedule: str = "constant",
    mixed_precision: bool = False,
    theta0: torch.Tensor | None = None,
    progress: Progress | None = None,
    report: Callable[[int, float], None] | None = None,
    summary: bool = True,
    device: torch.device | str | None = None,
) -> TrainResult | None:
    """Worker ``rank`` of ``world``'s part of training θ̂ (module docstring); every worker returns the same θ̂.

    Arguments as :func:`~influence.train.train` (adam or sgd: L-BFGS runs on one worker; ``mixed_precision``
    puts the forward under bfloat16 autocast, on CUDA, as train() does). ``report(epoch, loss)`` is called on worker 0, about every 1% of the epochs, with the mean batch
    objective of the epoch (summed over the workers, so the one a single worker would report); give it to every
    worker or to none, since summing the loss is a collective that all of them take part in. ``summary=False``
    returns None instead of the :class:`TrainResult` (and skips its full pass over the data).

    ``x`` may be a :class:`~influence.streaming.StreamedSet` (``y`` None) trained in minibatches smaller than
    the set on ``device``: each worker then decodes only its pieces of the batches."""
    check_options(optimizer=optimizer, schedule=schedule, batch_size=batch_size, momentum=momentum, epochs=epochs)
    if optimizer == "lbfgs":
        raise ValueError("data-parallel training takes adam or sgd steps; L-BFGS runs on one worker")
    if not (0 <= rank < world):
        raise ValueError(f"rank {rank} is not one of the {world} workers")
    n = n_points(x)
    batch_size = full_batch_or(batch_size, n)
    if streamed(x):
        if batch_size is None:
            raise ValueError(f"a streamed set trains data-parallel in minibatches smaller than its {n} points")
        device = torch.device("cpu" if device is None else device)
        dtype = x.dtype
    else:
        device, dtype = x.device, x.dtype
    if mixed_precision:
        check_mixed_precision(torch.empty(0, dtype=dtype, device=device))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if mixed_precision else contextlib.nullcontext
    start = time.perf_counter()
    if theta0 is None:
        theta0 = model.init(seed, dtype=dtype, device=device)
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch_optimizer(optimizer, theta, lr, momentum)  # as train() builds it: the same arithmetic
    per_epoch = steps_per_epoch(n, batch_size)
    total = epochs * per_epoch
    step = 0
    if (state := resumed_state(progress, total, theta=(model.n_params,))) is not None:
        with torch.no_grad():
            theta.copy_(state["theta"])
        opt.load_state_dict(state["opt"])  # (which replaces the param group dicts: take the group after it)
        step = state["step"]
    group = opt.param_groups[0]
    every = max(1, epochs // PROGRESS_CALLS)
    for epoch in range(step // per_epoch, epochs):
        reporting = report is not None and ((epoch + 1) % every == 0 or epoch + 1 == epochs)
        seen = torch.zeros(1, dtype=theta.dtype, device=theta.device)
        for idx, x_piece, y_piece in epoch_batches(x, y, batch_size, seed, epoch, device,
                                                   skip=step - epoch * per_epoch, piece=(rank, world)):
            size = len(idx)  # the whole batch's: each piece is normalised by |B|
            with autocast():
                losses = per_example_loss(model, theta, x_piece, y_piece).sum()
            (grad,) = torch.autograd.grad(losses / size, theta)
            all_reduce(grad)
            with torch.no_grad():
                grad.add_(theta, alpha=weight_decay)
            if reporting:  # as train() sums its batch objectives (before the step): the L2 term once, from worker 0
                seen += losses.detach() + (0.5 * weight_decay * float(theta.detach().square().sum()) * size
                                           if rank == 0 else 0.0)
            theta.grad = grad
            group["lr"] = scheduled_lr(schedule, lr, step, total)
            opt.step()
            step += 1
            if rank == 0 and save_due(progress, step, total):
                progress.save({"step": step, "theta": theta.detach().clone(), "opt": opt.state_dict()})
        if reporting:
            all_reduce(seen)  # every worker takes part in the collective; worker 0 reports
            if rank == 0:
                report(epoch + 1, float(seen) / n)
    if not summary:  # (the caller computes R and ‖∇R‖ once, not on every worker)
        return None
    return summarise(model, theta, x, y, weight_decay, batch_size, epochs, time.perf_counter() - start)

