"""Task bodies: plain functions that call `influence/` and write parts through `storage/`.

Nothing here knows about Ray; `cluster/sweep.py` wraps these as remote tasks. Every function writes its
parts atomically under names derived from its task key, so running a task twice writes the same files.
Seeds are derived explicitly from the configuration (and the control replicate), never from global state.

Devices: a task computes on `device_for_task()` (CUDA when Ray gave it a GPU, else the CPU) and hands back
CPU results: θ̂ on the CPU, checkpoints of CPU tensors, rows from CPU arrays. Inputs arrive on the CPU.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from influence.data import Dataset
from influence.ihvp import hessian, make_solver
from influence.models import build_model
from influence.objective import per_example_loss
from influence.scores import influence_estimates, select_test_points
from influence.train import removal_weights, retrain_batched, train
from jobs.spec import Configuration
from storage import tables
from storage.checkpoints import checkpoint_path, load_checkpoint, save_checkpoint
from storage.uri import Store

# Exact Hessians (and their eigenvalues) are formed only up to this many parameters; larger models get
# their curvature from iterative methods in a later version and report NaN here.
EXACT_HESSIAN_MAX_PARAMS = 5000

# The GPU ids Ray assigned to the running task, comma-separated, empty for none. The sweep's task wrapper sets
# it around every task body (a Ray worker process runs many tasks, with and without GPUs); unset means "not
# run by Ray", hence no GPU.
TASK_GPUS_ENV = "FRAGILE_TASK_GPUS"


def device_for_task() -> torch.device:
    """CUDA when this task was given a GPU (see `TASK_GPUS_ENV`) and torch can use one, else the CPU.

    Ray points CUDA_VISIBLE_DEVICES at the task's GPUs, so the task's first GPU is plain "cuda". A GPU that
    torch cannot use (a CPU-only build, no driver) falls back to the CPU rather than failing the task.
    """
    if os.environ.get(TASK_GPUS_ENV, "").strip() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a wall time read next measures the computation itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TaskError(RuntimeError):
    """An internal failure, named by task key and output location so it can be found and rerun."""

    def __init__(self, key: str, where: str, cause: BaseException):
        super().__init__(f"task {key} (output {where}) failed: {type(cause).__name__}: {cause}")
        self.key = key


def model_for(cfg: Configuration, data: Dataset):
    return build_model(cfg.model, in_features=data.in_features, num_classes=data.num_classes,
                       depth=cfg.depth, width=cfg.width, activation=cfg.activation)


def _accuracy(model, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        pred = model.forward(theta, x).argmax(dim=-1)
    return float((pred == y).double().mean()), pred


def _degenerate_reason(pred: torch.Tensor, train_accuracy: float) -> str | None:
    """Deep tanh nets sometimes collapse to one class; every estimate is then equal and rank
    correlations are undefined. Say so instead of reporting NaNs without a reason."""
    classes = torch.unique(pred)
    if classes.numel() == 1:
        return f"constant predictor: every training point is assigned class {int(classes[0])} (train accuracy {train_accuracy:.2f})"
    return None


@dataclass(frozen=True)
class TrainOutput:
    """What the trial needs from the train task (θ̂ itself travels separately as an object reference)."""

    test_points: list[tuple[int, str]]
    n_train: int
    damping: float  # δ every method uses for this configuration (see effective_damping)
    degenerate_reason: str | None
    trained: bool  # False when θ̂ came from a stored checkpoint


def train_task(store: Store, cfg: Configuration, data: Dataset) -> tuple[torch.Tensor, TrainOutput]:
    """Train θ̂ (or reuse the stored checkpoint of an identical base model), pick the test points and
    write the `models` and `test_points` parts of this configuration."""
    key = f"train/{cfg.config_id}"
    try:
        return _train(store, cfg, data)
    except Exception as exc:  # noqa: BLE001 - re-raised with the task key
        raise TaskError(key, tables.part_path(store, cfg.experiment, "models", cfg.config_id, "model"), exc) from exc


def _train(store: Store, cfg: Configuration, data: Dataset) -> tuple[torch.Tensor, TrainOutput]:
    device = device_for_task()
    labels = data.y_test  # CPU, for the rows
    data = data.to(device)
    model = model_for(cfg, data)
    start = time.perf_counter()
    state = load_checkpoint(store, cfg.experiment, cfg.model_key)
    trained = state is None
    if trained:
        # θ0 is drawn on the CPU whatever the device, so a GPU task trains from the same θ0 as a CPU task.
        result = train(model, data.x_train, data.y_train, weight_decay=cfg.weight_decay, lr=cfg.lr,
                       epochs=cfg.epochs, seed=cfg.seed)
        theta, grad_norm, objective = result.theta.detach(), result.grad_norm, result.objective
        seconds = result.seconds
        state = {"theta": theta.cpu(), "grad_norm": grad_norm, "objective": objective, "seconds": seconds,
                 "model_key": cfg.model_key, "configuration": cfg.to_dict()}
        checkpoint = save_checkpoint(store, cfg.experiment, cfg.model_key, state)
    else:
        theta = state["theta"].to(device)
        grad_norm, objective, seconds = state["grad_norm"], state["objective"], state["seconds"]
        checkpoint = checkpoint_path(store, cfg.experiment, cfg.model_key)

    with torch.no_grad():
        train_losses = per_example_loss(model, theta, data.x_train, data.y_train)
        test_losses = per_example_loss(model, theta, data.x_test, data.y_test).cpu()
    train_acc, pred = _accuracy(model, theta, data.x_train, data.y_train)
    test_acc, _ = _accuracy(model, theta, data.x_test, data.y_test)
    reason = _degenerate_reason(pred, train_acc)

    top_eig = min_eig = math.nan
    if model.n_params <= EXACT_HESSIAN_MAX_PARAMS:
        eig = torch.linalg.eigvalsh(hessian(model, theta, data.x_train, data.y_train, cfg.weight_decay))
        top_eig, min_eig = float(eig[-1]), float(eig[0])

    tables.write_part(store, cfg.experiment, "models", cfg.config_id, "model", {
        "model_key": [cfg.model_key], "train_loss": [float(train_losses.mean())],
        "test_loss": [float(test_losses.mean())], "test_accuracy": [test_acc], "train_accuracy": [train_acc],
        "objective": [objective], "grad_norm": [grad_norm], "top_eigenvalue": [top_eig],
        "min_eigenvalue": [min_eig], "n_params": [model.n_params], "n_train": [data.n_train],
        "seconds": [seconds if trained else time.perf_counter() - start], "checkpoint": [checkpoint],
        "degenerate": [reason is not None], "degenerate_reason": [reason],
    })

    rules = [(r.kind, list(r.indices)) if r.kind == "explicit" else (r.kind, r.k) for r in cfg.test_points]
    chosen = select_test_points(test_losses, rules, seed=cfg.seed)
    idx = [i for i, _ in chosen]
    tables.write_part(store, cfg.experiment, "test_points", cfg.config_id, "test_points", {
        "test_idx": idx, "loss": [float(test_losses[i]) for i in idx],
        "label": [int(labels[i]) for i in idx], "selection": [s for _, s in chosen],
    })
    return theta.cpu(), TrainOutput(test_points=chosen, n_train=data.n_train,
                                    damping=effective_damping(cfg, min_eig, top_eig), degenerate_reason=reason,
                                    trained=trained)


def effective_damping(cfg: Configuration, min_eigenvalue: float, top_eigenvalue: float) -> float:
    """The δ of (H + δI) for every method of a configuration, decided once so that all methods solve the same
    system. `if_indefinite` adds δ only when H has an eigenvalue <= 0 (relative to its largest); where the
    spectrum is unknown (models too large for an exact Hessian) it adds δ, the safe choice."""
    if cfg.damping_policy == "never":
        return 0.0
    if cfg.damping_policy == "always" or math.isnan(min_eigenvalue):
        return cfg.damping
    indefinite = min_eigenvalue <= 1e-12 * max(abs(top_eigenvalue), abs(min_eigenvalue))
    return cfg.damping if indefinite else 0.0


def influence_part_name(method: str, chunk: int) -> str:
    return f"{method}-{chunk:03d}"


def influence_task(store: Store, cfg: Configuration, data: Dataset, theta: torch.Tensor, method: str,
                   chunk: int, test_idx: list[int], damping: float) -> str:
    """Estimates of `method` for every (test point in this chunk, training point) with δ = `damping`;
    returns the part path. A test point whose solve diverged gets NaN estimates and diverged = true."""
    part = influence_part_name(method, chunk)
    where = tables.part_path(store, cfg.experiment, "influence", cfg.config_id, part)
    try:
        start = time.perf_counter()
        device = device_for_task()
        data, theta = data.to(device), theta.to(device)
        model = model_for(cfg, data)
        settings = {**cfg.solver_settings(method), "damping": damping}
        if method == "exact":
            settings["damping_policy"] = "always"  # δ is already decided for the configuration
        solver = make_solver(method, model, theta, data.x_train, data.y_train, cfg.weight_decay, **settings)
        inf = influence_estimates(model, theta, data, test_idx, solver, chunk_size=cfg.grad_chunk)
        _synchronize(device)
        seconds = time.perf_counter() - start
        T, n = inf.estimate.shape
        per_test = lambda t: np.repeat(t.cpu().numpy(), n)  # noqa: E731 - one value per test point, on each row
        rows = {
            "method": [method] * (T * n),
            "test_idx": np.repeat(np.asarray(test_idx, dtype=np.int64), n),
            "train_idx": np.tile(np.arange(n, dtype=np.int64), T),
            "estimate": inf.estimate.reshape(-1).cpu().numpy(),
            "predicted_dtheta": np.tile(inf.predicted_dtheta.cpu().numpy(), T),
            "damping": [damping] * (T * n),
            "iterations": per_test(inf.iterations),
            "residual": per_test(inf.residual),
            "diverged": per_test(inf.diverged),
            "seconds": [seconds / max(T, 1)] * (T * n),
        }
        return tables.write_part(store, cfg.experiment, "influence", cfg.config_id, part, rows)
    except Exception as exc:  # noqa: BLE001
        raise TaskError(f"influence/{cfg.config_id}/{part}", where, exc) from exc


def retrain_part_name(chunk: int) -> str:
    return f"retrain-{chunk:05d}"


def control_starts(cfg: Configuration, theta: torch.Tensor) -> torch.Tensor:
    """Starting points of the control retrains: θ̂ itself, then θ̂ perturbed by a relative
    `perturbation` (one seed per replicate, identical in every chunk). The spread of their final test
    losses is the noise floor of the ground truth: warm-started Adam near a minimum amplifies round-off.
    The noise is drawn on the CPU (then moved to θ̂'s device), so the starts are the same on every device."""
    starts = [theta]
    for r in range(1, cfg.controls):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + r)
        noise = torch.randn(theta.shape, generator=g, dtype=theta.dtype, device="cpu").to(theta.device)
        starts.append(theta + cfg.perturbation * theta.abs().clamp_min(1e-3) * noise)
    return torch.stack(starts)


def retrain_task(store: Store, cfg: Configuration, data: Dataset, theta: torch.Tensor, chunk: int,
                 removed: list[int], test_idx: list[int]) -> str:
    """Leave-one-out retraining of a chunk of removals as ONE batched computation, with the control
    replicates in the same batch; writes one row per (removal, test point) and returns the part path."""
    part = retrain_part_name(chunk)
    where = tables.part_path(store, cfg.experiment, "retrain", cfg.config_id, part)
    try:
        return _retrain(store, cfg, data, theta, chunk, removed, test_idx, part)
    except Exception as exc:  # noqa: BLE001
        raise TaskError(f"retrain/{cfg.config_id}/{part}", where, exc) from exc


def _retrain(store, cfg, data, theta, chunk, removed, test_idx, part) -> str:
    device = device_for_task()
    data, theta = data.to(device), theta.to(device)
    model = model_for(cfg, data)
    c = cfg.controls
    weights = removal_weights(data.n_train, removed, controls=c, dtype=data.x_train.dtype, device=device)
    starts = torch.cat([control_starts(cfg, theta), theta.expand(len(removed), -1)])
    start = time.perf_counter()
    thetas = retrain_batched(model, starts, data.x_train, data.y_train, weights,
                             weight_decay=cfg.weight_decay, lr=cfg.retrain_lr, epochs=cfg.retrain_epochs)
    _synchronize(device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        xt, yt = data.x_test[test_idx], data.y_test[test_idx]
        losses = per_example_loss(model, thetas, xt, yt).cpu()  # [K, T]
        dtheta = (thetas - thetas[0]).norm(dim=-1).cpu()  # distance to the unperturbed control
    control = losses[0]
    T = len(test_idx)
    # Control replicates are identical in every chunk, so only the first chunk stores them.
    keep = list(range(c)) if chunk == 0 else []
    rows_k = keep + list(range(c, c + len(removed)))
    removed_ids = [-(k + 1) for k in keep] + list(removed)
    modes = ["control"] * len(keep) + ["warm"] * len(removed)
    lr_ = losses[rows_k]  # [R, T]
    rows = {
        "removed": np.repeat(np.asarray(removed_ids, dtype=np.int64), T),
        "test_idx": np.tile(np.asarray(test_idx, dtype=np.int64), len(rows_k)),
        "loss_retrained": lr_.reshape(-1).numpy(),
        "loss_control": control.repeat(len(rows_k)).numpy(),
        "actual": (lr_ - control).reshape(-1).numpy(),
        "dtheta": np.repeat(dtheta[rows_k].numpy(), T),
        "mode": np.repeat(np.asarray(modes, dtype=object), T).tolist(),
        "epochs": [cfg.retrain_epochs] * (len(rows_k) * T),
        "seed": [cfg.seed] * (len(rows_k) * T),
        "seconds": [seconds / weights.shape[0]] * (len(rows_k) * T),
    }
    return tables.write_part(store, cfg.experiment, "retrain", cfg.config_id, part, rows)
