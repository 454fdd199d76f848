"""Leave-one-out (and leave-group-out) retraining of many models at once (what every training loop shares, the
options, schedule and minibatch order, is in :mod:`influence.order`).

Ground truth for the study is retraining without a point: one model per removal, warm-started from θ̂ (or from the
initial θ0, for retraining from scratch), each with its own weighting w of the training points (see
:mod:`influence.objective`). The paths, all returning Θ [K, P]:

- :func:`retrain_batched`, full batch, MLP (Adam or SGD, any schedule): the K copies run on :class:`~influence.stacked.StackedMLP`'s
  hand-derived gradient; for Iris-sized networks the step is mostly per-op overhead, and this halves it.
- :func:`retrain_batched`, any other case (minibatches, any model with ``forward(Θ, x)``): Θ [K, P] is one
  tensor, and each step is one forward/backward of :func:`~influence.objective.objective` for all K copies.
- :func:`retrain_loop`: one copy at a time with plain autograd: the reference for tests, and the path for
  models too large to stack K copies on one device (ResNet-50).
- ``optimizer="lbfgs"`` (full batch only): :func:`retrain_batched` hands it to :func:`retrain_loop`, one
  independent :func:`~influence.lbfgs.minimise_lbfgs` run per copy.

Adam and SGD are elementwise, so one optimiser over the stacked tensor is exactly K independent optimisers.
L-BFGS is not: its line search takes one step length for the whole parameter tensor, and on a stacked Θ that
step (and the curvature pairs, through inner products over all of Θ) would couple the copies, so a copy's
result would depend on which others share its batch. Each copy therefore runs alone.

:func:`objective_grad_norms` gives ‖∇R(θ_k; w_k)‖₂ for every retrained copy, whatever the optimiser: how far
each one is from the stationary point that leave-one-out ground truth assumes.

Minibatches. Epoch e visits every training point once, in the order :func:`epoch_order` ``(n, seed, e)``: a
permutation drawn on the CPU (so every device sees the same order), cut into batches of ``batch_size`` with the
last, partial batch included. Every copy sees the same order: the removal rows and the control rows then share
their training noise, and it cancels in actual = loss_removed − loss_control. A batch B is normalised by |B|,
R_B(θ; w) = (1/|B|) Σ_{i∈B} w_i L(z_i, θ) + (λ/2)‖θ‖², so the full batch is R(θ; w) exactly, and λ is always
the objective's L2 term (gradient λθ), never an optimiser's decoupled decay: the trained θ̂ is then a stationary
point of the R that the influence function differentiates.

Progress. A long retrain (a ResNet group retrain, hours on a preemptible GPU) may be given a
:class:`Progress`: every ``progress.every`` optimiser steps (and once at the end) it receives the run's whole
state (parameters, optimiser buffers and step count, and for :func:`retrain_loop` the rows already done), and a
run given a progress that holds a state continues from it. The minibatch order of every epoch is a function of
(seed, epoch) alone and the learning rate of the step count alone, so a resumed run takes exactly the steps the
uninterrupted one would have taken: the two results are equal, not merely close. L-BFGS runs are not resumable
(their curvature pairs and line search are not part of the state); they are refused a progress.

Devices: everything runs where the data x is (CPU or CUDA) and in its dtype; θ0 must be there too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from influence.lbfgs import GRAD_TOL, minimise_lbfgs
from influence.models import MLP, Model
from influence.objective import objective, per_example_loss
# What every training loop shares (re-exported: many callers name them from here).
from influence.order import (OPTIMIZERS, SCHEDULES, check_options, check_same_device,  # noqa: F401
                             epoch_batches, epoch_order, epoch_seed, full_batch_or, minibatches, n_points,
                             optimiser_steps, scheduled_lr, steps_per_epoch, streamed)
from influence.progress import Progress, resumed_state, save_due
from influence.stacked import StackedMLP

# torch.optim.Adam's defaults; the hand-written retraining step uses the same constants so the two agree.
ADAM_BETAS: tuple[float, float] = (0.9, 0.999)
ADAM_EPS: float = 1e-8
_STREAMED_CHUNK = 1024  # examples per chunk of a streamed set's gradient passes, when no batch size is given


# ---- weightings --------------------------------------------------------------------------------------------------


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
    return group_weights(n, [[int(i)] for i in removed], controls=controls, dtype=dtype, device=device)


def group_weights(
    n: int,
    groups: Sequence[Sequence[int]],
    controls: int = 1,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Weights [controls + len(groups), n]: ``controls`` rows of ones, then one row per group G with w_i = 0 for
    every i ∈ G.

    At ImageNet scale one point's effect is below the training noise, so the top-k influential points are
    removed together and compared with random groups of the same size. An empty group is a control row.
    """
    groups = [[int(i) for i in group] for group in groups]
    bad = [i for group in groups for i in group if not 0 <= i < n]
    if bad:
        raise ValueError(f"removed indices must lie in [0, {n}); got {bad[:5]}")
    if controls < 0:
        raise ValueError(f"controls must be >= 0; got {controls}")
    weights = torch.ones(controls + len(groups), n, dtype=dtype, device=device)
    rows = [controls + g for g, group in enumerate(groups) for _ in group]
    cols = [i for group in groups for i in group]
    if cols:  # one scatter for all groups, not one per group
        weights[torch.as_tensor(rows, dtype=torch.long, device=device),
                torch.as_tensor(cols, dtype=torch.long, device=device)] = 0.0
    return weights


# ---- optimiser steps on one tensor -------------------------------------------------------------------------------


class _Adam:
    """Adam's update for one parameter tensor, in place, on buffers allocated once.

    The same arithmetic, in the same order, as ``torch.optim.Adam``'s single-tensor path with default settings
    (``tests/test_influence_train.py`` checks they agree), written out so that the retraining loops pay for
    seven tensor ops per step and nothing else: no param groups, no state dicts, no hooks. Every entry of the
    tensor is updated independently, so one ``_Adam`` over Θ [K, P] is K independent Adams. Its state lives
    where the parameter does (``*_like``), and the step count is a Python int, so a CUDA step never syncs.
    ``lr`` may be changed between updates (a schedule), as ``param_groups[0]["lr"]`` may in torch.
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

    def state(self) -> dict:
        """Copies of what the next update depends on besides the parameter: the step count and both moments."""
        return {"step": self.step, "exp_avg": self._exp_avg.clone(), "exp_avg_sq": self._exp_avg_sq.clone()}

    def load(self, state: dict) -> None:
        """Continue from :meth:`state`'s result (copied into the buffers, which stay where they are)."""
        self.step = int(state["step"])
        self._exp_avg.copy_(state["exp_avg"])
        self._exp_avg_sq.copy_(state["exp_avg_sq"])


class _SGD:
    """SGD with (heavy-ball) momentum for one tensor, in place: ``torch.optim.SGD``'s single-tensor arithmetic
    with dampening 0 and no nesterov. The first step seeds the buffer with the gradient itself, as torch does.
    Elementwise, so one ``_SGD`` over Θ [K, P] is K independent SGDs."""

    def __init__(self, param: torch.Tensor, lr: float, momentum: float) -> None:
        self.param = param
        self.lr = lr
        self.momentum = momentum
        self.step = 0
        self._buf = torch.zeros_like(param) if momentum else None

    def update(self, grad: torch.Tensor) -> None:
        if self._buf is not None:
            if self.step == 0:
                self._buf.copy_(grad)  # a copy: the caller's grad buffer may be overwritten by the next step
            else:
                self._buf.mul_(self.momentum).add_(grad)
            grad = self._buf
        self.step += 1
        self.param.add_(grad, alpha=-self.lr)

    def state(self) -> dict:
        """Copies of the step count and the momentum buffer (None without momentum)."""
        return {"step": self.step, "buf": None if self._buf is None else self._buf.clone()}

    def load(self, state: dict) -> None:
        self.step = int(state["step"])
        if self._buf is not None:
            self._buf.copy_(state["buf"])


def optimizer_for(optimizer: str, param: torch.Tensor, lr: float, momentum: float) -> _Adam | _SGD:
    """The written-out update of ``optimizer`` (\"adam\" or \"sgd\") for ``param``, in place."""
    return _Adam(param, lr) if optimizer == "adam" else _SGD(param, lr, momentum)


def _no_lbfgs_progress(optimizer: str, progress: Progress | None) -> None:
    if optimizer == "lbfgs" and progress is not None:
        raise ValueError("optimizer 'lbfgs' cannot resume from saved progress (its curvature pairs and line search "
                         "are not saved); pass progress=None, or use adam or sgd")


# ---- retraining --------------------------------------------------------------------------------------------------


def _check_retrain_args(model: Model, theta0: torch.Tensor, x, weights: torch.Tensor) -> int:
    n = n_points(x)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must be [K, n] with n={n}; got {tuple(weights.shape)}")
    k = weights.shape[0]
    if theta0.shape not in ((model.n_params,), (k, model.n_params)):
        raise ValueError(f"theta0 must be [{model.n_params}] or [{k}, {model.n_params}]; got {tuple(theta0.shape)}")
    if streamed(x):
        check_same_device(theta0=theta0, weights=weights)
    else:
        check_same_device(theta0=theta0, x=x, weights=weights)
    return k


def _check_streamed_minibatches(x, batch_size: int | None, optimizer: str) -> None:
    if streamed(x) and (optimizer == "lbfgs" or full_batch_or(batch_size, x.n_train) is None):
        raise ValueError(f"a streamed training set retrains with adam or sgd in minibatches smaller than its "
                         f"{x.n_train} points (got optimizer {optimizer!r}, batch_size {batch_size}); retrain on "
                         f"the set in memory instead")


def retrain_batched(
    model: Model,
    theta0: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    *,
    weight_decay: float,
    lr: float,
    epochs: int,
    optimizer: str = "adam",
    momentum: float = 0.9,
    batch_size: int | None = None,
    schedule: str = "constant",
    seed: int = 0,
    grad_tol: float = GRAD_TOL,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Θ [K, P]: row k minimises R(θ; w_k) for ``epochs`` epochs from θ0, all K copies in one computation.

    ``theta0`` is [P] (every copy starts from it: θ̂ for a warm start, the initial θ0 for retraining from
    scratch) or [K, P]; ``weights`` is [K, n], e.g. from :func:`removal_weights` or :func:`group_weights`. Each
    row gets its own, fresh optimiser state (``"adam"``, or ``"sgd"`` with ``momentum``); every row sees the
    same minibatch order (seeded by ``seed``, see :func:`epoch_order`) and the same ``schedule`` of learning
    rates (:func:`scheduled_lr`, per step). Zero epochs return θ0.

    Full batch and an :class:`~influence.models.MLP`: the gradient comes from
    :class:`~influence.stacked.StackedMLP` (hand-derived backward, no allocations in the loop). Otherwise the
    generic path: autograd through ``objective`` on ``model.forward(Θ, x_B)`` for all K copies at once.

    ``"lbfgs"`` (full batch, constant schedule; ``momentum`` and ``seed`` unused) is :func:`retrain_loop`'s
    result, one independent run per copy: ``epochs`` caps each copy's iterations and ``grad_tol`` is its stop on
    ‖∇R(θ; w_k)‖₂ (see :func:`~influence.lbfgs.minimise_lbfgs`). ``grad_tol`` is ignored by adam and sgd.

    ``progress`` (adam and sgd): save the run's state every ``progress.every`` steps and resume from the state it
    holds (module docstring); the result equals the uninterrupted run's.

    ``x`` may be a streamed set (:class:`influence.streaming.StreamedSet`, ``y`` None) retrained in minibatches
    smaller than it: each step's batch is decoded by its loader, the same batches and the same Θ.
    """
    k = _check_retrain_args(model, theta0, x, weights)
    check_options(optimizer=optimizer, schedule=schedule, batch_size=batch_size, momentum=momentum, epochs=epochs,
                  grad_tol=grad_tol)
    _check_streamed_minibatches(x, batch_size, optimizer)
    _no_lbfgs_progress(optimizer, progress)
    if optimizer == "lbfgs":  # one line search per copy: stacked, the copies would share one (module docstring)
        return retrain_loop(model, theta0, x, y, weights, weight_decay=weight_decay, lr=lr, epochs=epochs,
                            optimizer=optimizer, momentum=momentum, batch_size=batch_size, schedule=schedule,
                            seed=seed, grad_tol=grad_tol)
    batch_size = full_batch_or(batch_size, n_points(x))
    settings = dict(weight_decay=weight_decay, lr=lr, epochs=epochs, optimizer=optimizer, momentum=momentum,
                    schedule=schedule, progress=progress)
    if batch_size is None and isinstance(model, MLP):
        return stacked_mlp_descent(model, theta0, x, y, weights, **settings)
    return _retrain_generic(model, theta0, x, y, weights, k=k, batch_size=batch_size, seed=seed, **settings)


def stacked_mlp_descent(model: MLP, theta0, x, y, weights, *, weight_decay, lr, epochs, optimizer, momentum,
                        schedule, before_step: Callable[[int, StackedMLP], None] | None = None,
                        progress: Progress | None = None) -> torch.Tensor:
    """Full-batch Adam or SGD on K stacked MLP copies (weights [K, n]) from θ0 for ``epochs`` steps, through the
    hand-derived gradient of :class:`StackedMLP`; Θ [K, P] in the model's layout. ``before_step(step, stack)``,
    if given, sees the parameters before each step (training reports its progress there); ``progress`` as in
    :func:`retrain_batched` (its states hold the parameters in StackedMLP's layout)."""
    stack = StackedMLP(model, x, y, weights)
    stack.load(theta0)
    # The optimiser sees StackedMLP's layout, a permutation of θ's entries: fine, every update is elementwise.
    opt = optimizer_for(optimizer, stack.params, lr, momentum)
    start = 0
    if (state := resumed_state(progress, epochs, params=tuple(stack.params.shape))) is not None:
        stack.params.copy_(state["params"])
        opt.load(state["opt"])
        start = state["step"]
    for step in range(start, epochs):
        if before_step is not None:
            before_step(step, stack)
        grad = stack.grad()
        if weight_decay:
            grad.add_(stack.params, alpha=weight_decay)
        opt.lr = scheduled_lr(schedule, lr, step, epochs)
        opt.update(grad)
        if save_due(progress, step + 1, epochs):
            progress.save({"step": step + 1, "params": stack.params.clone(), "opt": opt.state()})
    return stack.theta()


def _retrain_generic(model: Model, theta0, x, y, weights, *, k, batch_size, seed, weight_decay, lr, epochs,
                     optimizer, momentum, schedule, progress) -> torch.Tensor:
    n = n_points(x)
    params = theta0.detach().expand(k, -1).clone()  # Θ [K, P], updated in place by the optimiser
    theta = params.detach().requires_grad_(True)  # same storage: the updates are invisible to autograd
    opt = optimizer_for(optimizer, params, lr, momentum)
    # ∂(Σ_k R_k)/∂Θ is [∇R_k]_k, since row k of Θ enters R_k only; ones as grad_outputs skips the sum's op.
    ones = torch.ones(k, dtype=params.dtype, device=params.device)
    if batch_size is None:
        batches = [(x, y, weights)]
    elif not streamed(x):
        # Each epoch gathers x, y and w in its order into these buffers, once; the batches are fixed views of
        # them. No per-step indexing, no per-step allocation outside autograd's own.
        x_epoch, y_epoch, w_epoch = torch.empty_like(x), torch.empty_like(y), torch.empty_like(weights)
        batches = list(zip(x_epoch.split(batch_size), y_epoch.split(batch_size), w_epoch.split(batch_size, dim=1)))
    per_epoch = steps_per_epoch(n, batch_size)
    total = epochs * per_epoch
    step = 0
    if (state := resumed_state(progress, total, params=tuple(params.shape))) is not None:
        params.copy_(state["params"])
        opt.load(state["opt"])
        step = state["step"]
    for epoch in range(step // per_epoch, epochs):
        skip = step - epoch * per_epoch  # a resumed run enters its first epoch at the batch it had reached
        if streamed(x):  # the loader's batches, and the weights of their points
            batches_now = ((xb, yb, weights[:, idx]) for idx, xb, yb in
                           epoch_batches(x, y, batch_size, seed, epoch, params.device, skip=skip))
        else:
            if batch_size is not None:
                order = epoch_order(n, seed, epoch).to(x.device)
                torch.index_select(x, 0, order, out=x_epoch)
                torch.index_select(y, 0, order, out=y_epoch)
                torch.index_select(weights, 1, order, out=w_epoch)
            batches_now = batches[skip:]
        for x_b, y_b, w_b in batches_now:
            # The data term through autograd; the L2 term's gradient λθ is one in-place add (autograd would
            # spend a square, a sum and their backward on it).
            (grad,) = torch.autograd.grad(objective(model, theta, x_b, y_b, 0.0, w_b), theta, grad_outputs=ones)
            if weight_decay:
                grad.add_(params, alpha=weight_decay)
            opt.lr = scheduled_lr(schedule, lr, step, total)
            opt.update(grad)
            step += 1
            if save_due(progress, step, total):
                progress.save({"step": step, "params": params.clone(), "opt": opt.state()})
    return params


def retrain_loop(
    model: Model,
    theta0: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    *,
    weight_decay: float,
    lr: float,
    epochs: int,
    optimizer: str = "adam",
    momentum: float = 0.9,
    batch_size: int | None = None,
    schedule: str = "constant",
    seed: int = 0,
    grad_tol: float = GRAD_TOL,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Same result as :func:`retrain_batched`, one model at a time: the reference, the benchmark baseline, and
    the path for models too large to stack K copies on one device.

    Deliberately the plain way: ``torch.autograd`` through :func:`~influence.objective.objective` (L2 term
    included) and ``model.forward`` on each minibatch x[idx], so that agreement with :func:`retrain_batched`
    checks the stacked computations against the definitions. Only the optimiser update is shared (same math,
    so the two agree to round-off). ``"lbfgs"``: one :func:`~influence.lbfgs.minimise_lbfgs` run per copy on the
    full batch, at most ``epochs`` iterations, stopping at ‖∇R(θ; w_k)‖₂ <= ``grad_tol`` (ignored by adam and sgd).

    ``progress`` (adam and sgd) counts the steps of all K rows in turn; its states hold the rows already done,
    the row under way and its step. ``x`` may be streamed, as for :func:`retrain_batched`.
    """
    k = _check_retrain_args(model, theta0, x, weights)
    check_options(optimizer=optimizer, schedule=schedule, batch_size=batch_size, momentum=momentum, epochs=epochs,
                  grad_tol=grad_tol)
    _check_streamed_minibatches(x, batch_size, optimizer)
    _no_lbfgs_progress(optimizer, progress)
    n = n_points(x)
    batch_size = full_batch_or(batch_size, n)
    per_epoch = steps_per_epoch(n, batch_size)
    total = epochs * per_epoch
    out = torch.empty(k, model.n_params, dtype=theta0.dtype, device=theta0.device)
    first, state = 0, resumed_state(progress, k * total, theta=(model.n_params,))
    if state is not None:
        first = state["row"]
        out[:first] = state["done"]
    for i in range(first, k):
        start = theta0 if theta0.ndim == 1 else theta0[i]
        if optimizer == "lbfgs":
            def fn(theta: torch.Tensor, w: torch.Tensor = weights[i]) -> torch.Tensor:
                return objective(model, theta, x, y, weight_decay, w)
            out[i] = minimise_lbfgs(fn, start, lr=lr, iterations=epochs, grad_tol=grad_tol).theta
            continue
        theta = start.detach().clone().requires_grad_(True)
        opt = optimizer_for(optimizer, theta.detach(), lr, momentum)  # same storage: invisible to autograd
        step = 0
        if state is not None and i == first:  # the row the saved state was in the middle of
            with torch.no_grad():
                theta.copy_(state["theta"])
            opt.load(state["opt"])
            step = state["step"] - i * total
        for epoch in range(step // per_epoch, epochs):
            skip = step - epoch * per_epoch
            for idx, x_b, y_b in epoch_batches(x, y, batch_size, seed, epoch, theta.device, skip=skip):
                w_b = weights[i] if idx is None else weights[i, idx]
                (grad,) = torch.autograd.grad(objective(model, theta, x_b, y_b, weight_decay, w_b), theta)
                opt.lr = scheduled_lr(schedule, lr, step, total)
                opt.update(grad)
                step += 1
                if save_due(progress, i * total + step, k * total):
                    progress.save({"step": i * total + step, "row": i, "theta": theta.detach().clone(),
                                   "opt": opt.state(), "done": out[:i].clone()})
        out[i] = theta.detach()
    return out


# ---- how stationary the retrained copies are --------------------------------------------------------------------


def objective_grad_norms(
    model: Model,
    thetas: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    weight_decay: float,
    *,
    batch_size: int | None = None,
) -> torch.Tensor:
    """‖∇_θ R(θ_k; w_k)‖₂ [K] for every row θ_k of ``thetas`` [K, P] under its own weighting w_k (``weights`` [K, n]).

    By autograd through :func:`~influence.objective.per_example_loss`, independently of the optimiser that
    produced Θ (so also a check on :class:`~influence.stacked.StackedMLP`'s hand-derived gradient). The data
    term is summed over chunks of ``batch_size`` examples (None: all n at once), each normalised by n, so
    memory is a chunk's forward and backward. MLPs: all K copies in one stacked forward per chunk; since θ_k
    enters R_k only, one backward of Σ_k R_k gives every ∇R_k. Image networks: one copy after another (K
    stacked copies of their activations is what :func:`retrain_loop` exists to avoid). ``x`` may be streamed
    (``y`` None): its chunks of ``batch_size`` (default 1,024) are then decoded by its loader.
    """
    k = _check_retrain_args(model, thetas, x, weights)
    thetas = thetas.expand(k, -1)
    if isinstance(model, MLP):
        return _objective_grad(model, thetas, x, y, weights, weight_decay, batch_size).norm(dim=1)
    return torch.stack([_objective_grad(model, thetas[i], x, y, weights[i], weight_decay, batch_size).norm()
                        for i in range(k)])


def _objective_grad(model: Model, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                    weight_decay: float, batch_size: int | None) -> torch.Tensor:
    """∇R(θ; w) for θ [P] and w [n], or the rows ∇R(θ_k; w_k) for Θ [K, P] and w [K, n]."""
    n = n_points(x)
    if streamed(x):
        chunk = _STREAMED_CHUNK if batch_size is None else batch_size
        chunks = x.chunks("train", chunk, theta.device)
    else:
        chunk = n if batch_size is None else batch_size
        chunks = ((x[a:a + chunk], y[a:a + chunk]) for a in range(0, n, chunk))
    theta = theta.detach().requires_grad_(True)
    grad = torch.zeros_like(theta)
    with torch.enable_grad():
        for a, (xc, yc) in zip(range(0, n, chunk), chunks):
            losses = per_example_loss(model, theta, xc, yc)
            (g,) = torch.autograd.grad((losses * w[..., a : a + chunk]).sum() / n, theta)
            grad.add_(g)
    return grad.add_(theta.detach(), alpha=weight_decay)
