"""Influence sharded over the training set: a solve per (method, chunk of test points), then tasks per shard.

With `influence.train_shard` set, the influence stage of a configuration is two kinds of task instead of one:

- `solve_task`: fits the method's solver on the whole training set and solves s_t = (H + δI)^{-1} ∇L(z_t) for
  the chunk's test points, once; the vectors, the per-test-point solve facts and (for the amortised methods:
  exact, arnoldi, ekfac) the fitted solver's state go to an `ihvp` artifact in the store
  (`<experiment>/ihvp/<config_id>/<method>-<chunk>.pt`, beside the checkpoints). A rerun finds a sound artifact
  and solves nothing.
- `shard_task`: per shard of `train_shard` training points, loads the artifact, forms the shard's per-example
  gradients and writes their estimates against every s_t as one `influence` part (and the predicted ‖Δθ‖
  from the stored solver, as the unsharded task computes it). The shards are independent: a cluster spreads
  them over its workers, and a missing one is computed again alone, from the stored solve.

The rows are those of the unsharded task, to round-off (the same products, in other batches); `seconds` on a
shard's rows is its own time plus its share of the solve's, per test point, so that summing one row per part
of a test point gives what the test point cost in either layout.
"""
from __future__ import annotations

import time

import torch

from influence.data import Dataset
from influence.ihvp import restore_solver
from influence.scores import TestSolve, shard_estimates, solve_test_points
from jobs import protocol
from jobs.science import SCIENCE
from jobs.spec import Configuration
from jobs.tasks import CPU, _synchronize, fitted_solver, influence_rows, model_for, opened, task_error
from storage import tables
from storage.checkpoints import ihvp_path, load_state, save_state
from storage.uri import Store

_SOLVE_FIELDS = ("s_test", "test_loss", "self_influence", "iterations", "residual", "diverged")


def solve_task(store: Store, cfg: Configuration, data: Dataset, theta: torch.Tensor, method: str, chunk: int,
               test_idx: list[int], damping: float, device: torch.device = CPU) -> tuple[str, bool, str | None]:
    """Make sure the `ihvp` artifact of (method, chunk) is in the store: (its path, whether a sound one was
    already there, the notice when one was set aside). One that cannot be loaded, or was solved for other
    test points, damping or science code, is set aside and solved again."""
    solve = protocol.influence_part(method, chunk)
    where = ihvp_path(store, cfg.experiment, cfg.config_id, solve)
    try:
        found, notice = _usable(store, cfg, where, method, test_idx, damping)
        if found is not None:
            return where, True, None
        start = time.perf_counter()
        data, theta, model, solver = fitted_solver(store, cfg, data, theta, method, damping, device)
        solved = solve_test_points(model, theta, data, test_idx, solver, chunk_size=cfg.grad_chunk)
        _synchronize(device)
        state = {name: getattr(solved, name) for name in _SOLVE_FIELDS} | {
            "config_id": cfg.config_id, "method": method, "test_idx": list(test_idx), "damping": damping,
            "science": SCIENCE, "seconds": time.perf_counter() - start,
            "solver": solver.state() if solver.amortised else None,
        }
        return save_state(store, where, state, f"ihvp {cfg.config_id}/{solve}"), False, notice
    except Exception as exc:  # noqa: BLE001
        raise task_error(f"influence/{cfg.config_id}/{protocol.solve_task_part(solve)}", where, exc) from exc


def _usable(store: Store, cfg: Configuration, path: str, method: str, test_idx: list[int], damping: float,
            map_location: torch.device = CPU) -> tuple[dict | None, str | None]:
    """(The artifact at `path`, None) if it is the solve of these test points with this damping and science
    code; else (None, the set-aside notice), after setting a present one aside."""
    try:
        state = load_state(store, path, map_location=map_location)
    except tables.CorruptPart as exc:
        return None, tables.set_aside(store, cfg.experiment, path, exc.reason)
    if state is None:
        return None, None
    expected = {"config_id": cfg.config_id, "method": method, "test_idx": list(test_idx), "damping": damping,
                "science": SCIENCE}
    wrong = [key for key, value in expected.items() if state.get(key) != value]
    if wrong or any(not isinstance(state.get(name), torch.Tensor) for name in _SOLVE_FIELDS):
        what = ", ".join(wrong) if wrong else "its tensors"
        return None, tables.set_aside(store, cfg.experiment, path, f"not the solve this run needs (it differs in {what})")
    return state, None


def shard_task(store: Store, cfg: Configuration, data: Dataset, theta: torch.Tensor, method: str, chunk: int,
               shard: int, start: int, stop: int, test_idx: list[int], damping: float, n_shards: int,
               device: torch.device = CPU) -> str:
    """The estimates of (method, chunk) for the training points start..stop-1 from the stored solve; returns
    the part path. Fails (to be rerun after its solve) when the solve is not in the store."""
    part = protocol.shard_part(method, chunk, shard)
    where = tables.part_path(store, cfg.experiment, "influence", cfg.config_id, part)
    try:
        began = time.perf_counter()
        source = ihvp_path(store, cfg.experiment, cfg.config_id, protocol.influence_part(method, chunk))
        state, _ = _usable(store, cfg, source, method, test_idx, damping, map_location=device)
        if state is None:
            raise FileNotFoundError(f"the solve {store.uri_of(source)} this shard is computed from is not in the "
                                    f"store (or not this run's); its solve task writes it")
        data, theta = opened(store, data, device), theta.to(device)  # a file set: only the shard's points are decoded
        model = model_for(cfg, data)
        solved = TestSolve(**{name: state[name] for name in _SOLVE_FIELDS})
        solver = None if state["solver"] is None else restore_solver(state["solver"], model, device)
        estimate, predicted_dtheta = shard_estimates(model, theta, data, solved.s_test, start, stop,
                                                     dtheta_solver=solver, chunk_size=cfg.grad_chunk)
        _synchronize(device)
        seconds = time.perf_counter() - began + float(state["seconds"]) / n_shards
        rows = influence_rows(method, test_idx, start, estimate, predicted_dtheta, damping, solved, seconds)
        return tables.write_part(store, cfg.experiment, "influence", cfg.config_id, part, rows)
    except Exception as exc:  # noqa: BLE001
        raise task_error(f"influence/{cfg.config_id}/{part}", where, exc) from exc
