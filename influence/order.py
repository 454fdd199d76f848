"""What every training loop shares: its options, the learning-rate schedule, and the order in which an epoch
visits the training points, as index batches and as the batches themselves from either kind of data.

Training (:mod:`influence.train`), data-parallel training (:mod:`influence.data_parallel`) and retraining
(:mod:`influence.retrain`) take their minibatches from :func:`epoch_batches`, so all of them, in memory or
streamed (:class:`influence.streaming.StreamedSet`), visit the same points in the same batches.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from influence.lbfgs import GRAD_TOL

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "lbfgs")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise, naming the arguments, unless every tensor is on one device (torch's own error names none)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"inputs are on different devices ({where}); move them to one with .to(device)")


def check_options(*, optimizer: str, schedule: str, batch_size: int | None, momentum: float, epochs: int,
                  grad_tol: float = GRAD_TOL) -> None:
    """Refuse unknown optimisers and schedules, impossible sizes, and what L-BFGS cannot do, naming the argument."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, or None for the full batch; got {batch_size!r}")
    if momentum < 0:
        raise ValueError(f"momentum must be >= 0 (0 is plain SGD); got {momentum}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0; got {epochs}")
    if not grad_tol >= 0:  # also refuses NaN
        raise ValueError(f"grad_tol must be >= 0 (the L-BFGS stop on the gradient's 2-norm); got {grad_tol}")
    if optimizer == "lbfgs":
        # Its line search compares values of one objective; minibatches would change the objective between them.
        if batch_size is not None:
            raise ValueError(f"optimizer 'lbfgs' is full batch only (its line search needs the whole objective R); "
                             f"got batch_size={batch_size!r}: pass batch_size=None, or use adam or sgd")
        if schedule != "constant":
            raise ValueError(f"optimizer 'lbfgs' takes no learning-rate schedule (its line search sets every step); "
                             f"got schedule={schedule!r}: pass schedule='constant'")


def full_batch_or(batch_size: int | None, n: int) -> int | None:
    """``batch_size``, or None (the full batch, in the data's own order) when it covers all n points.

    A single batch of all n points in a permuted order would only change the round-off of the sums, so it is
    run as the full batch: ``batch_size >= n`` and ``None`` give the same numbers.
    """
    return None if batch_size is None or batch_size >= n else int(batch_size)


def steps_per_epoch(n: int, batch_size: int | None) -> int:
    """⌈n / batch_size⌉ (the last, partial batch counts), or 1 for the full batch."""
    return 1 if batch_size is None else -(-n // batch_size)


def optimiser_steps(epochs: int, n: int, batch_size: int | None) -> int:
    """The steps of ``epochs`` epochs over n points in batches of ``batch_size`` (None, or >= n: the full batch)."""
    return epochs * steps_per_epoch(n, full_batch_or(batch_size, n))


def scheduled_lr(schedule: str, lr: float, step: int, total: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``: one step is one minibatch, not one epoch.

    ``"constant"``: lr. ``"cosine"``: lr·½(1 + cos(π·step/total)), from lr down towards 0. ``"step"``: lr, ×0.1
    from 50% of the steps on, ×0.01 from 75% on (step·2 ≥ total and step·4 ≥ 3·total, in exact integers).
    """
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
    if schedule == "step":
        return lr * 0.1 ** ((2 * step >= total) + (4 * step >= 3 * total))
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


_MASK32, _MASK64 = 2**32 - 1, 2**64 - 1


def _mix32(z: int) -> int:
    """A bijection of 32-bit ints that spreads every input bit over the output (Wellons' "lowbias32")."""
    z ^= z >> 16
    z = (z * 0x7FEB352D) & _MASK32
    z ^= z >> 15
    z = (z * 0x846CA68B) & _MASK32
    return z ^ (z >> 16)


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit ints (any Python int is taken modulo 2⁶⁴ first)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def epoch_seed(seed: int, epoch: int) -> int:
    """The 32-bit seed of epoch ``epoch``'s order in a run seeded ``seed``: mix32((mix64(seed + γ) + epoch) mod 2³²)
    with SplitMix64's γ = 0x9E3779B97F4A7C15 (so that seed 0 is no fixed point).

    32 bits, because torch's CPU generator (mt19937) keeps only the low 32 bits of its seed: seed·2³² + epoch
    would give every seed the same orders. Hashed, not seed + epoch: control replicates are retrained with
    neighbouring seeds, and seed + epoch would give seed s+1 the orders of seed s shifted by one epoch, so their
    spread would understate the training noise. Within one run the epochs' seeds are all distinct (mix32 is a
    bijection); two runs share one only by a 32-bit hash coincidence.
    """
    return _mix32((_mix64(seed + 0x9E3779B97F4A7C15) + epoch) & _MASK32)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order [n] (int64, on the CPU) in which epoch ``epoch`` of a run seeded ``seed`` visits the points:
    ``torch.randperm(n)`` from ``torch.Generator().manual_seed(epoch_seed(seed, epoch))``.

    Drawn on the CPU, so every device sees the same order (CUDA generators give other numbers), and from a
    generator of its own per epoch, so any epoch's order is known without drawing the earlier ones: a run
    resumed at epoch e continues with the order it would have had.
    """
    generator = torch.Generator(device="cpu").manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=generator, device="cpu")


def minibatches(
    n: int, batch_size: int | None, seed: int, epoch: int, device: torch.device
) -> list[torch.Tensor | None]:
    """The index tensors (on ``device``) of epoch ``epoch``'s batches; ``[None]`` for the full batch."""
    if batch_size is None:
        return [None]
    return list(epoch_order(n, seed, epoch).to(device).split(batch_size))


def streamed(x) -> bool:
    """Whether training inputs are a streamed set (:class:`influence.streaming.StreamedSet`) instead of a tensor."""
    return not isinstance(x, torch.Tensor)


def n_points(x) -> int:
    """The number of training points of inputs ``x`` (a tensor or a streamed set)."""
    return x.n_train if streamed(x) else int(x.shape[0])


def epoch_batches(x, y: torch.Tensor | None, batch_size: int | None, seed: int, epoch: int, device, *, skip: int = 0,
                  piece: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """(idx, x_B, y_B) for each batch B of epoch ``epoch`` from batch ``skip`` on: idx the positions of B (on
    ``device``; None for the full batch of a tensor), x_B and y_B its inputs and labels, or with ``piece`` =
    (rank, world) those of piece ``rank`` of B as ``idx.tensor_split(world)[rank]`` cuts it (data-parallel).
    Indexed from a tensor x (on its own device), or decoded by a streamed set's loader (minibatches only)."""
    n = n_points(x)
    if streamed(x):
        order = minibatches(n, batch_size, seed, epoch, device)[skip:]
        loaded = x.epoch_batches(batch_size, seed, epoch, device, skip=skip, piece=piece)
        yield from ((idx, xb, yb) for idx, (xb, yb) in zip(order, loaded))
        return
    if batch_size is None and piece is None:
        yield None, x, y
        return
    order = ([torch.arange(n, device=x.device)] if batch_size is None
             else minibatches(n, batch_size, seed, epoch, x.device))[skip:]
    for idx in order:
        part = idx if piece is None else idx.tensor_split(piece[1])[piece[0]]
        yield idx, x[part], y[part]
