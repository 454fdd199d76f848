"""Task bodies: plain functions that call `influence/` and write parts through `storage/`.

Nothing here knows about Ray or where it runs: a runner (`jobs/runner.py` in this process, `cluster/runner.py`
as Ray tasks) calls them. What they compute is decided in `jobs/protocol.py` (damping, seeds, controls, part
names); these bodies do the computing and the writing. Every function writes its parts atomically under
names derived from its task key, so running a task twice writes the same files.

Devices: a task computes on the `device` it is given (`device_for(gpu_ids)`: CUDA when the runner gave it a
GPU that torch can use, else the CPU) and hands back CPU results: θ̂ on the CPU, checkpoints of CPU tensors,
rows from CPU arrays. Inputs arrive on the CPU.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from influence import truths
from influence.data import Dataset
from influence.streaming import StreamedSet
from influence.ihvp import hessian, make_solver
from influence.models import MLP, build_model
from influence.objective import per_example_loss
from influence.scores import influence_estimates, per_example_grads, select_test_points
from influence.retrain import (group_weights, objective_grad_norms, optimiser_steps, removal_weights, retrain_batched,
                               retrain_loop)
from influence.train import TrainResult, train, train_streamed
from jobs import protocol
from jobs.protocol import TrainOutput
from jobs.runner import loader_workers, node_columns
from jobs.science import SCIENCE
from jobs.spec import Configuration
# The data a task gets (re-exported: tasks.DataSource, tasks.datasets_for, ... are the names runners and tests use).
from jobs.data_source import (_LOADED, _STREAMED, DTYPES, DataSource, _node_local, dataset_key,  # noqa: F401
                              datasets_for, holds_whole, load_data, streams)
from storage import tables
from storage.checkpoints import (checkpoint_path, load_checkpoint, load_state, progress_path,
                                 save_checkpoint, save_state)
from storage.tables import CorruptPart
from storage.uri import Store, delete_file

CPU = torch.device("cpu")


def device_for(gpu_ids) -> torch.device:
    """The device of a task given these GPUs: CUDA when it got one and torch can use it, else the CPU.

    Ray points CUDA_VISIBLE_DEVICES at the task's GPUs, so the task's first GPU is plain "cuda". A GPU that
    torch cannot use (a CPU-only build, no driver) falls back to the CPU rather than failing the task.
    """
    if list(gpu_ids) and torch.cuda.is_available():
        return torch.device("cuda")
    return CPU


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a wall time read next measures the computation itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TaskError(RuntimeError):
    """An internal failure, named by task key and output location so it can be found and rerun."""

    def __init__(self, key: str, where: str, cause: BaseException | str):
        text = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"task {key} (output {where}) failed: {text}")
        self.key, self.where, self.text = key, where, text

    def __reduce__(self):  # the message, not the cause object, crosses to the driver
        return (type(self), (self.key, self.where, self.text))


class TransientTaskError(TaskError):
    """A task that failed because the store was unreachable for longer than the retry budget: Ray runs it
    again (`retry_exceptions`); a deterministic failure (a singular matrix, a bad index) is a TaskError."""


def task_error(key: str, where: str, cause: BaseException) -> TaskError:
    """The error a task body raises for `cause`: transient if another attempt may succeed."""
    from storage.retry import is_transient

    return (TransientTaskError if is_transient(cause) else TaskError)(key, where, cause)


def model_for(cfg: Configuration, data: Dataset):
    return build_model(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes,
                       depth=cfg.depth, width=cfg.width, activation=cfg.activation)


def train_options(cfg: Configuration) -> dict:
    """The optimiser settings training and retraining share; L-BFGS stops at the configuration's grad_tol."""
    options = {"optimizer": cfg.optimizer, "momentum": cfg.momentum, "batch_size": cfg.batch_size}
    if cfg.grad_tol is not None:
        options["grad_tol"] = cfg.grad_tol
    return options


EVAL_CHUNK = 1024  # examples per forward when evaluating a whole split (60,000 MNIST images at once would not fit)


def _evaluate(model, theta: torch.Tensor, data: Dataset | StreamedSet, split: str,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses, predicted classes and labels over a whole split, EVAL_CHUNK examples at a time."""
    losses, preds, labels = [], [], []
    with torch.no_grad():
        for xc, yc in data.chunks(split, EVAL_CHUNK, device):
            logits = model.forward(theta, xc)
            losses.append(torch.nn.functional.cross_entropy(logits, yc, reduction="none"))
            preds.append(logits.argmax(dim=-1))
            labels.append(yc)
    return torch.cat(losses), torch.cat(preds), torch.cat(labels)


def assess(cfg: Configuration, model, theta: torch.Tensor, data: Dataset | StreamedSet,
           device: torch.device) -> dict:
    """What the `models` row and the choice of test points need of θ̂, from a pass over each split and the
    spectrum: the mean training loss, both accuracies, every test point's loss (on the CPU), why the model is
    degenerate (or None) and H's top and smallest eigenvalue. Plain values and tensors, so that a data-parallel
    worker can compute it on its own device and hand it back through the store."""
    train_losses, pred, y_train = _evaluate(model, theta, data, "train", device)
    test_losses, test_pred, y_test = _evaluate(model, theta, data, "test", device)
    train_accuracy = float((pred == y_train).double().mean())
    top, smallest = _spectrum(cfg, model, theta, data, device)
    return {"train_loss": float(train_losses.mean()), "train_accuracy": train_accuracy,
            "test_accuracy": float((test_pred == y_test).double().mean()), "test_losses": test_losses.cpu(),
            "degenerate_reason": _degenerate_reason(pred, train_accuracy),
            "top_eigenvalue": top, "min_eigenvalue": smallest}


def _degenerate_reason(pred: torch.Tensor, train_accuracy: float) -> str | None:
    """Deep tanh nets sometimes collapse to one class; every estimate is then equal and rank
    correlations are undefined. Say so instead of reporting NaNs without a reason."""
    classes = torch.unique(pred)
    if classes.numel() == 1:
        return f"constant predictor: every training point is assigned class {int(classes[0])} (train accuracy {train_accuracy:.2f})"
    return None


def checkpoint_problem(state: dict, cfg: Configuration, n_params: int) -> str | None:
    """Why a loaded checkpoint cannot be θ̂ of `cfg` (another model's, another shape), or None if it can."""
    theta = state.get("theta")
    if not isinstance(theta, torch.Tensor):
        return "it holds no parameter vector theta"
    if state.get("model_key") != cfg.model_key:
        return f"it is the checkpoint of model {state.get('model_key')!r}, not of {cfg.model_key!r}"
    if tuple(theta.shape) != (n_params,):
        return f"its parameter vector has shape {tuple(theta.shape)}, the model needs ({n_params},)"
    if theta.dtype != DTYPES[cfg.dtype]:
        return f"its parameters are {theta.dtype}, the configuration trains in {cfg.dtype}"
    if not bool(torch.isfinite(theta).all()):
        return "its parameters are not all finite"
    return None


def load_base(store: Store, cfg: Configuration, n_params: int) -> tuple[dict | None, str | None]:
    """The stored checkpoint of `cfg`'s base model if it is sound, else (None, a notice) after setting the
    bad file aside (it is kept, and θ̂ is trained again). (None, None) when there is none."""
    path = checkpoint_path(store, cfg.experiment, cfg.model_key)
    try:
        state = load_checkpoint(store, cfg.experiment, cfg.model_key)
    except tables.CorruptPart as exc:
        return None, tables.set_aside(store, cfg.experiment, path, exc.reason)
    if state is None:
        return None, None
    problem = checkpoint_problem(state, cfg, n_params)
    if problem is not None:
        return None, tables.set_aside(store, cfg.experiment, path, f"not the base model of configuration "
                                                                  f"{cfg.config_id}: {problem}")
    return state, None


def train_task(store: Store, cfg: Configuration, data: Dataset | DataSource, device: torch.device = CPU,
               fit: Callable[..., tuple[TrainResult, dict]] | None = None) -> tuple[torch.Tensor, TrainOutput]:
    """Train θ̂ (or reuse the stored checkpoint of an identical base model), pick the test points and
    write the `models` and `test_points` parts of this configuration. The train result is read from the
    rows written, as a resumed run reads it from the stored parts (`protocol.train_output`).

    `fit(store, cfg, data, data on the device, model, report)`, when the runner gives one, trains θ̂ elsewhere
    (data-parallel, on workers of its own: `cluster.data_parallel.fit`) and this task only waits for it; it
    returns θ̂ and its `assess`ment, made on the first worker's device. Else θ̂ is trained here."""
    key = f"train/{cfg.config_id}"
    try:
        return _train(store, cfg, data, device, fit)
    except Exception as exc:  # noqa: BLE001 - re-raised with the task key
        raise task_error(key, tables.part_path(store, cfg.experiment, "models", cfg.config_id,
                                               protocol.MODEL_PART), exc) from exc


def _train(store: Store, cfg: Configuration, data: Dataset | DataSource, device: torch.device,
           fit: Callable[..., tuple[TrainResult, dict]] | None) -> tuple[torch.Tensor, TrainOutput]:
    source = data
    streamed = streams(cfg, data)
    if streamed:  # a minibatched file set: streamed through DataLoaders, never whole in this task
        data = data.stream(store, loader_workers())
        labels = data.y_test
    else:
        labels = data.to(CPU).y_test  # for the rows
        data = data.to(device)
    model = model_for(cfg, data)
    start = time.perf_counter()
    state, notice = load_base(store, cfg, model.n_params)
    trained = state is None
    assessment = None  # what the rows need of θ̂ (`assess`), when the training workers computed it
    if trained:
        # θ0 is drawn on the CPU whatever the device, so a GPU task trains from the same θ0 as a CPU task.
        if fit is not None:
            result, assessment = fit(store, cfg, source, data, model, _progress(cfg))
        elif streamed:
            result = train_streamed(model, data, weight_decay=cfg.weight_decay, lr=cfg.lr, epochs=cfg.epochs,
                                    seed=cfg.seed, batch_size=cfg.batch_size, device=device, optimizer=cfg.optimizer,
                                    momentum=cfg.momentum, schedule=cfg.schedule,
                                    mixed_precision=cfg.mixed_precision, progress=_progress(cfg))
        else:
            result = train(model, data.x_train, data.y_train, weight_decay=cfg.weight_decay, lr=cfg.lr,
                           epochs=cfg.epochs, seed=cfg.seed, schedule=cfg.schedule,
                           mixed_precision=cfg.mixed_precision, progress=_progress(cfg), **train_options(cfg))
        theta, grad_norm, objective = result.theta.detach(), result.grad_norm, result.objective
        seconds = result.seconds
        state = {"theta": theta.cpu(), "grad_norm": grad_norm, "objective": objective, "seconds": seconds,
                 "model_key": cfg.model_key, "configuration": cfg.to_dict(), "science": SCIENCE,
                 **({"assessment": assessment} if assessment is not None else {})}
        checkpoint = save_checkpoint(store, cfg.experiment, cfg.model_key, state)
        if fit is not None:  # θ̂ is in its checkpoint now: the progress that led to it is no longer needed
            _remove_quietly(store, progress_path(store, cfg.experiment, cfg.config_id, "train"))
    else:
        theta = state["theta"].to(device)
        grad_norm, objective, seconds = state["grad_norm"], state["objective"], state["seconds"]
        assessment = state.get("assessment")  # (kept with θ̂ by data-parallel training)
        checkpoint = checkpoint_path(store, cfg.experiment, cfg.model_key)

    if assessment is None:
        assessment = assess(cfg, model, theta, data, device)
    test_losses, reason = assessment["test_losses"], assessment["degenerate_reason"]

    models = {
        "model_key": [cfg.model_key], "train_loss": [assessment["train_loss"]],
        "test_loss": [float(test_losses.mean())], "test_accuracy": [assessment["test_accuracy"]],
        "train_accuracy": [assessment["train_accuracy"]], "objective": [objective], "grad_norm": [grad_norm],
        "top_eigenvalue": [assessment["top_eigenvalue"]], "min_eigenvalue": [assessment["min_eigenvalue"]],
        "n_params": [model.n_params], "n_train": [data.n_train],
        "seconds": [seconds if trained else time.perf_counter() - start], "checkpoint": [checkpoint],
        "degenerate": [reason is not None], "degenerate_reason": [reason],
        # θ̂ is what this row describes: a reused checkpoint keeps the stamp of the code that trained it
        "science": [SCIENCE if trained else state.get("science")],
        "stationary": [None if cfg.grad_tol is None else bool(grad_norm <= cfg.grad_tol)],
    } | node_columns(1)
    tables.write_part(store, cfg.experiment, "models", cfg.config_id, protocol.MODEL_PART, models)

    chosen = select_test_points(test_losses, [r.rule() for r in cfg.test_points], seed=cfg.seed)
    idx = [i for i, _ in chosen]
    margin, grad_norms = _test_point_covariates(model, theta, data, idx, device)
    if streamed:
        data.close()  # its loader processes
    test_points = {
        "test_idx": idx, "loss": [float(test_losses[i]) for i in idx],
        "label": [int(labels[i]) for i in idx], "selection": [s for _, s in chosen], "science": [SCIENCE] * len(idx),
        "margin": margin, "grad_norm": grad_norms, "misclassified": [m < 0 for m in margin],
    }
    tables.write_part(store, cfg.experiment, "test_points", cfg.config_id, protocol.TEST_POINTS_PART, test_points)
    return theta.cpu(), protocol.train_output(cfg, models, test_points, notices=(notice,) if notice else ())


def _test_point_covariates(model, theta: torch.Tensor, data: Dataset | StreamedSet, idx: list[int],
                           device: torch.device) -> tuple[list, list]:
    """Per chosen test point: its margin (the logit of its label minus the largest other logit; negative when
    it is misclassified, 0 at a tie) and ‖∇θ L(z_t, θ̂)‖₂."""
    if not idx:
        return [], []
    x, y = data.take("test", idx, device)
    with torch.no_grad():
        logits = model.forward(theta, x).double()
    own = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), -math.inf).max(dim=1).values
    grads = per_example_grads(model, theta, x, y)
    return (own - others).cpu().tolist(), grads.double().norm(dim=1).cpu().tolist()


def _spectrum(cfg: Configuration, model, theta: torch.Tensor, data: Dataset | StreamedSet,
              device: torch.device) -> tuple[float, float]:
    """(top, smallest) eigenvalue of H at θ̂, as `protocol.spectrum_plan` says for this model: exact from the
    dense Hessian (small MLPs; a streamed set is decoded whole for it, as the dense Hessian takes every point at
    once); the top one from a few Arnoldi steps and the smallest unknown (NaN) for the convolutional nets,
    which makes the if_indefinite damping policy add δ; both unknown otherwise."""
    plan = protocol.spectrum_plan(isinstance(model, MLP), model.n_params)
    if plan.method == "none":
        return math.nan, math.nan
    x, y = data.train_inputs()
    if plan.method == "exact":
        eig = torch.linalg.eigvalsh(hessian(model, theta, x, y, cfg.weight_decay))
        return float(eig[-1]), float(eig[0])
    from influence.curvature import CurvatureOperator
    from influence.ihvp_krylov import arnoldi_eigenpairs

    op = CurvatureOperator(model, theta, x, y, cfg.weight_decay)
    values, _, _ = arnoldi_eigenpairs(op, plan.steps, seed=cfg.seed)
    return float(values.max()), math.nan


def _progress(cfg: Configuration):
    """A training progress line every tenth of the epochs (shown in the task's log and the driver's output)."""
    step = max(1, cfg.epochs // 10)

    def report(epoch: int, loss: float) -> None:
        if epoch % step == 0 or epoch == cfg.epochs:
            print(f"train {cfg.config_id} ({cfg.label()}): epoch {epoch}/{cfg.epochs}, loss {loss:.4g}", flush=True)

    return report


def opened(store: Store, data: Dataset | DataSource, device: torch.device) -> Dataset | StreamedSet:
    """What an influence task reads: a file set streamed from this node's copy (with the task's loader
    processes), or the set in memory on `device`."""
    return data.stream(store, loader_workers()) if isinstance(data, DataSource) else data.to(device)


def fitted_solver(store: Store, cfg: Configuration, data: Dataset | DataSource, theta: torch.Tensor, method: str,
                  damping: float, device: torch.device):
    """(data, θ̂ on `device`, the model, `method`'s solver fitted on the whole training set with δ = `damping`);
    a file set is streamed (`opened`)."""
    data, theta = opened(store, data, device), theta.to(device)
    model = model_for(cfg, data)
    settings = protocol.solver_settings(cfg, method, damping)
    x, y = data.train_inputs()
    return data, theta, model, make_solver(method, model, theta, x, y, cfg.weight_decay, **settings)


def influence_task(store: Store, cfg: Configuration, data: Dataset, theta: torch.Tensor, method: str,
                   chunk: int, test_idx: list[int], damping: float, device: torch.device = CPU) -> str:
    """Estimates of `method` for every (test point in this chunk, training point) with δ = `damping`;
    returns the part path. A test point whose solve diverged gets NaN estimates and diverged = true."""
    part = protocol.influence_part(method, chunk)
    where = tables.part_path(store, cfg.experiment, "influence", cfg.config_id, part)
    try:
        start = time.perf_counter()
        data, theta, model, solver = fitted_solver(store, cfg, data, theta, method, damping, device)
        inf = influence_estimates(model, theta, data, test_idx, solver, chunk_size=cfg.grad_chunk)
        _synchronize(device)
        seconds = time.perf_counter() - start
        rows = influence_rows(method, test_idx, 0, inf.estimate, inf.predicted_dtheta, damping, inf, seconds)
        return tables.write_part(store, cfg.experiment, "influence", cfg.config_id, part, rows)
    except Exception as exc:  # noqa: BLE001
        raise task_error(f"influence/{cfg.config_id}/{part}", where, exc) from exc


def influence_rows(method: str, test_idx: list[int], start: int, estimate: torch.Tensor,
                   predicted_dtheta: torch.Tensor, damping: float, solved, seconds: float) -> dict:
    """The `influence` rows of estimate [T, m] (training points start..start+m-1) of the test points `test_idx`,
    with the solve facts of `solved` (iterations, residual, diverged, self_influence: [T]) on each of a test
    point's rows; `seconds` is the task's time, spread over its test points."""
    T, n = estimate.shape
    per_test = lambda t: np.repeat(t.cpu().numpy(), n)  # noqa: E731 - one value per test point, on each row
    return {
        "method": [method] * (T * n),
        "test_idx": np.repeat(np.asarray(test_idx, dtype=np.int64), n),
        "train_idx": np.tile(np.arange(start, start + n, dtype=np.int64), T),
        "estimate": estimate.reshape(-1).cpu().numpy(),
        "predicted_dtheta": np.tile(predicted_dtheta.cpu().numpy(), T),
        "damping": [damping] * (T * n),
        "iterations": per_test(solved.iterations),
        "residual": per_test(solved.residual),
        "diverged": per_test(solved.diverged),
        "seconds": [seconds / max(T, 1)] * (T * n),
        "science": [SCIENCE] * (T * n),
        "self_influence": per_test(solved.self_influence),
    } | node_columns(T * n)


def retrain_base(cfg: Configuration, theta: torch.Tensor, model) -> torch.Tensor:
    """Where every retrain of a configuration starts: θ̂ (warm start) or θ0, the same initialisation θ̂ was
    trained from (scratch)."""
    if cfg.retrain_start == "warm":
        return theta
    return model.init(cfg.seed, dtype=theta.dtype, device=theta.device)


def retrain_task(store: Store, cfg: Configuration, data: Dataset, theta: torch.Tensor, chunk: int,
                 removed: list[int], test_idx: list[int], groups: list[tuple[list[int], str]] | None = None,
                 replicate: int = 0, device: torch.device = CPU) -> str:
    """Retraining without each removal of a chunk (or, with `groups`, without each group of points at once:
    then `removed` are the group ids and `groups` their (members, mode)), as ONE batched computation for
    small models, with the control replicates beside them, under `replicate`'s draw of the training noise
    (its removals and its control share it); writes one row per (removal, test point) and returns the part
    path."""
    part = protocol.retrain_part(chunk, replicate)
    where = tables.part_path(store, cfg.experiment, "retrain", cfg.config_id, part)
    try:
        return _retrain(store, cfg, data, theta, chunk, removed, test_idx, part, groups, replicate, device)
    except Exception as exc:  # noqa: BLE001
        raise task_error(f"retrain/{cfg.config_id}/{part}", where, exc) from exc


class StoredProgress:
    """The saved progress of a long run (``influence.progress.Progress``) as a file of the store
    (``storage.checkpoints.progress_path``), so that a rerun after a failure or preemption, on any node,
    continues where the run was: a retrain run of a part (see `_retrain`), or data-parallel training
    (:func:`train_progress`).

    The file holds the run's identity beside its state (what it computes, the science version, its sizes). A
    file whose identity differs, or that cannot be loaded, was not written by this run: it is set aside (kept
    for inspection) and the run starts from its beginning."""

    def __init__(self, store: Store, experiment: str, path: str, name: str, every: int, identity: dict) -> None:
        self.store, self.experiment, self.path, self.name = store, experiment, path, name
        self.every, self.identity = every, identity

    def load(self) -> dict | None:
        """The saved state (saying where it resumes), or None."""
        state = self.saved()
        if state is not None:
            print(f"{self.name}: resumed at step {state['step']}/{self.identity['steps']}", flush=True)
        return state

    def saved(self) -> dict | None:
        """The saved state if it is this run's own (a file that is not is set aside), or None; quietly."""
        try:
            saved = load_state(self.store, self.path)
        except CorruptPart as exc:
            print(f"{self.name}: {tables.set_aside(self.store, self.experiment, self.path, exc.reason)}", flush=True)
            return None
        if saved is None:
            return None
        if saved.get("identity") != self.identity:
            reason = f"progress of another run: {saved.get('identity')!r}, not {self.identity!r}"
            print(f"{self.name}: {tables.set_aside(self.store, self.experiment, self.path, reason)}", flush=True)
            return None
        return saved["state"]

    def save(self, state: dict) -> None:
        save_state(self.store, self.path, {"identity": self.identity, "state": state}, f"progress of {self.name}")


def _remove_quietly(store: Store, path: str) -> None:
    """Delete a progress file whose result has landed; a failure to (the store away) only leaves a file behind:
    the result is safe, and a rerun that meets the file finds its run complete."""
    try:
        delete_file(store, path)
    except Exception as exc:  # noqa: BLE001 - the landed part must not fail on its clean-up
        print(f"{store.uri_of(path)}: left in place ({type(exc).__name__}: {exc})", flush=True)


def train_progress(store: Store, cfg: Configuration, n_params: int, steps: int) -> StoredProgress:
    """The saved progress of data-parallel training of `cfg`'s θ̂, at ``<experiment>/progress/<config_id>/train.pt``
    (each configuration's own, so that two trials training one θ̂ at once never share a file): saved every
    ``train.checkpoint_every`` steps, and at the end, which is how the workers hand θ̂ back. Deleted once θ̂'s
    checkpoint is written."""
    identity = {"model_key": cfg.model_key, "science": SCIENCE, "n_params": n_params, "steps": steps}
    return StoredProgress(store, cfg.experiment, progress_path(store, cfg.experiment, cfg.config_id, "train"),
                          f"train/{cfg.config_id}", cfg.train_checkpoint_every or steps, identity)


def train_steps(cfg: Configuration, n_train: int) -> int:
    """The optimiser steps of training θ̂."""
    return optimiser_steps(cfg.epochs, n_train, cfg.batch_size)


def _retrain_run(cfg: Configuration, model, starts: torch.Tensor, data: Dataset, weights: torch.Tensor,
                 seed: int, progress: Callable[..., StoredProgress | None]) -> torch.Tensor:
    """One retrain run (its rows share the order `seed`); `progress(rows, n_params, steps, seed, digest)` gives it
    a StoredProgress, or None, for a run of that many rows, parameters and optimiser steps, from these starts
    and weights (their digest)."""
    options = dict(weight_decay=cfg.weight_decay, lr=cfg.retrain_lr, epochs=cfg.retrain_epochs,
                   schedule=protocol.retrain_schedule(cfg), seed=seed, **train_options(cfg))
    steps = optimiser_steps(cfg.retrain_epochs, data.n_train, cfg.batch_size)
    run = retrain_batched if protocol.batched(model.n_params) else retrain_loop
    if run is retrain_loop:  # one row after another: its steps are counted over the rows
        steps *= weights.shape[0]
    # What the run starts from and whom it leaves out: a saved state of other removals (recomputed estimates that
    # reordered a top-k) or of another θ̂ must not be resumed.
    digest = hashlib.sha256(starts.detach().cpu().numpy().tobytes() + weights.detach().cpu().numpy().tobytes())
    x, y = data.train_inputs()
    return run(model, starts, x, y, weights,
               progress=progress(weights.shape[0], model.n_params, steps, seed, digest.hexdigest()[:16]), **options)


SOLVED_TRUTHS = ("pbrf", "last_layer")  # ground truths solved from θ̂ (influence/truths.py); loo and lds retrain


def _solve_truth(cfg: Configuration, model, theta: torch.Tensor, data: Dataset, weights: torch.Tensor):
    """A solved ground truth (influence/truths.py) for every weighting row: (Θ [K, P], ‖∇J‖₂ [K], iterations [K])."""
    x, y = data.train_inputs()
    settings = dict(cfg.truth_settings)
    if cfg.ground_truth == "pbrf":
        solved = truths.pbrf(model, theta, x, y, weights, weight_decay=cfg.weight_decay, damping=settings["damping"],
                             tol=settings["tol"], max_iter=settings["max_iter"], batched=protocol.batched(model.n_params))
    else:
        solved = truths.last_layer(model, theta, x, y, weights, weight_decay=cfg.weight_decay,
                                   damping=settings["damping"], tol=settings["tol"], max_iter=settings["max_iter"])
    late = int((~solved.converged(settings["tol"])).sum())
    if late:
        print(f"{cfg.truth}/{cfg.config_id}: {late} of {weights.shape[0]} solves stopped after {settings['max_iter']} "
              f"iterations above tol {settings['tol']:g} (largest ‖∇J‖₂ {float(solved.grad_norm.max()):.3g}); "
              f"their rows record it in grad_norm", flush=True)
    return solved.theta, solved.grad_norm.cpu(), solved.iterations


def _retrain(store, cfg, data, theta, chunk, removed, test_idx, part, groups, replicate, device) -> str:
    # A minibatched file set streams, as in training (the same batches); any other set is held on the device. A
    # solved ground truth takes every training point at once.
    solved = cfg.ground_truth in SOLVED_TRUTHS
    data = data.stream(store, loader_workers()) if streams(cfg, data) and not solved else data.to(device)
    theta = theta.to(device)
    model = model_for(cfg, data)
    base = protocol.replicate_base(cfg, retrain_base(cfg, theta, model), model, replicate)
    c = protocol.controls_in_chunk(cfg, chunk, replicate)
    order = protocol.replicate_order_seed(cfg, replicate)
    dtype = data.dtype
    if groups is None:
        weights = removal_weights(data.n_train, removed, controls=c, dtype=dtype, device=device)
    else:
        weights = group_weights(data.n_train, [m for m, _ in groups], controls=c, dtype=dtype, device=device)
    starts = torch.cat([protocol.control_starts(cfg, base)[:c], base.expand(len(removed), -1)])
    runs: list[StoredProgress | None] = []  # one per run of the part, in order

    def progress(rows: int, n_params: int, steps: int, seed: int, digest: str) -> StoredProgress | None:
        """The saved progress of the part's next run, when it is long enough to need one."""
        run, saved = len(runs), None
        if cfg.retrain_checkpoint_every is not None and steps > cfg.retrain_checkpoint_every:
            identity = {"config_id": cfg.config_id, "part": part, "run": run, "science": SCIENCE, "rows": rows,
                        "n_params": n_params, "steps": steps, "seed": seed, "inputs": digest}
            saved = StoredProgress(store, cfg.experiment,
                                   progress_path(store, cfg.experiment, cfg.config_id, f"{part}-r{run}"),
                                   f"retrain/{cfg.config_id}/{part} run {run}", cfg.retrain_checkpoint_every, identity)
        runs.append(saved)
        return saved

    start = time.perf_counter()
    iterations = None
    if solved:
        thetas, grad_norms, iterations = _solve_truth(cfg, model, theta, data, weights)
    elif cfg.batch_size is None or c == 1:
        thetas = _retrain_run(cfg, model, starts, data, weights, order, progress)
    else:
        # Minibatch controls r > 0 differ in their order, so each runs apart from the batch.
        keep = [0] + list(range(c, weights.shape[0]))
        thetas = torch.empty_like(starts)
        thetas[keep] = _retrain_run(cfg, model, starts[keep], data, weights[keep], order, progress)
        for r in range(1, c):
            thetas[r] = _retrain_run(cfg, model, starts[r:r + 1], data, weights[r:r + 1], protocol.order_seed(cfg, r),
                                     progress)[0]
    _synchronize(device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        xt, yt = data.take("test", test_idx, device)
        if protocol.batched(model.n_params):
            losses = per_example_loss(model, thetas, xt, yt).cpu()  # [K, T]
        else:
            losses = torch.stack([per_example_loss(model, t, xt, yt) for t in thetas]).cpu()
        dtheta = (thetas - thetas[0]).norm(dim=-1).cpu()  # distance to the unperturbed control
    if not solved:
        x, y = data.train_inputs()
        grad_norms = objective_grad_norms(model, thetas, x, y, weights, cfg.weight_decay, batch_size=EVAL_CHUNK).cpu()
    control = losses[0]
    T = len(test_idx)
    keep = list(range(c)) if chunk == 0 else []
    rows_k = keep + list(range(c, c + len(removed)))
    removed_ids = [-(k + 1) for k in keep] + list(removed)
    if groups is None:
        modes = ["control"] * len(keep) + [cfg.retrain_start if not solved else cfg.truth] * len(removed)
        members = [None] * len(rows_k)
        sizes = [0] * len(keep) + [1] * len(removed)
    else:
        modes = ["control"] * len(keep) + [mode for _, mode in groups]
        members = [None] * len(keep) + [list(m) for m, _ in groups]
        sizes = [0] * len(keep) + [len(m) for m, _ in groups]
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
        "seed": [order] * (len(rows_k) * T),
        "seconds": [seconds / weights.shape[0]] * (len(rows_k) * T),
        "group_size": np.repeat(np.asarray(sizes, dtype=np.int64), T),
        "members": [m for m in members for _ in range(T)],
        "science": [SCIENCE] * (len(rows_k) * T),
        "replicate": [replicate] * (len(rows_k) * T),
        "grad_norm": np.repeat(grad_norms[rows_k].numpy(), T),
        "ground_truth": [cfg.truth] * (len(rows_k) * T),
    } | node_columns(len(rows_k) * T)
    if iterations is not None:
        rows["iterations"] = np.repeat(iterations[rows_k].numpy(), T)
    path = tables.write_part(store, cfg.experiment, "retrain", cfg.config_id, part, rows)
    for run in filter(None, runs):  # the part has landed: what its runs saved on the way is no longer needed
        _remove_quietly(store, run.path)
    return path
