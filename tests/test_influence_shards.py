"""Influence sharded over the training set (`influence.train_shard`): a stored solve per (method, chunk of test
points), then one task per shard of training points. Known answers: the shards tile the unsharded estimates
to round-off for every method; a restored solver solves as the fitted one; a run with shards writes the rows
and statistics of a run without; a missing shard is computed again alone, from the stored solve."""
from __future__ import annotations

import math
import os

import pytest
import torch

from fragile.cli import main
from influence.ihvp import make_solver, restore_solver
from influence.models import build_model
from influence.scores import influence_estimates, shard_estimates, solve_test_points
from influence.train import train
from jobs.science import SCIENCE
from jobs.spec import load_spec
from storage import tables
from storage.checkpoints import ihvp_path, load_state, save_state
from storage.ledger import Ledger
from storage.uri import open_store

METHODS = {"exact": {}, "cg": {}, "lissa": {"depth": 30, "batch_size": 30, "scale": 3.0},
           "arnoldi": {"rank": 20}, "ekfac": {}}


@pytest.fixture(scope="module")
def fitted(iris):
    """A depth-2 Iris MLP trained near its optimum."""
    model = build_model("mlp", in_features=4, num_classes=3, depth=2, width=5)
    return model, train(model, iris.x_train, iris.y_train, weight_decay=0.005, lr=0.05, epochs=500, seed=0).theta


def _solver(iris, fitted, method):
    model, theta = fitted
    return make_solver(method, model, theta, iris.x_train, iris.y_train, 0.005, damping=0.01, **METHODS[method])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shards_of_any_size_tile_the_unsharded_estimates(iris, fitted, method):
    model, theta = fitted
    solver = _solver(iris, fitted, method)
    whole = influence_estimates(model, theta, iris, range(6), solver, chunk_size=1024, dtheta=solver.amortised)
    solved = solve_test_points(model, theta, iris, range(6), solver, chunk_size=1024)
    bounds = [0, 1, 38, 38, 90, 120]  # uneven, one empty, one of a single point
    pieces = [shard_estimates(model, theta, iris, solved.s_test, a, b, chunk_size=16,
                              dtheta_solver=solver if solver.amortised else None) for a, b in zip(bounds, bounds[1:])]
    estimate = torch.cat([e for e, _ in pieces], dim=1)
    dtheta = torch.cat([d for _, d in pieces])
    scale = float(whole.estimate.abs().max())
    assert estimate.shape == whole.estimate.shape and torch.isfinite(estimate).all()
    # The same solve; only the batches of the training gradients differ: round-off.
    assert torch.allclose(estimate, whole.estimate, rtol=0, atol=1e-13 * scale)
    assert torch.allclose(dtheta, whole.predicted_dtheta, rtol=1e-12, atol=0, equal_nan=True)
    assert torch.isnan(dtheta).all() != solver.amortised
    assert torch.equal(solved.iterations, whole.iterations) and torch.equal(solved.diverged, whole.diverged)


def test_a_shard_out_of_range_is_refused(iris, fitted):
    model, theta = fitted
    solved = solve_test_points(model, theta, iris, [0], _solver(iris, fitted, "exact"))
    with pytest.raises(ValueError, match=r"0 <= start <= stop <= 120; got 100\.\.121"):
        shard_estimates(model, theta, iris, solved.s_test, 100, 121)


@pytest.mark.parametrize("method", ["exact", "arnoldi", "ekfac"])
def test_a_stored_solver_solves_as_the_fitted_one(iris, fitted, method, tmp_path):
    """Saved to a store as tensors and plain values, loaded with weights_only, rebuilt: the same solutions."""
    model, _ = fitted
    solver = _solver(iris, fitted, method)
    store = open_store(str(tmp_path))
    path = store.path("e", "ihvp", "c", "x.pt")
    save_state(store, path, {"solver": solver.state()}, "test")
    restored = restore_solver(load_state(store, path)["solver"], model)
    v = torch.randn(4, model.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(restored.solve(v), solver.solve(v))
    assert restored.diagnostics == solver.diagnostics


def test_solvers_that_solve_from_the_operator_have_no_state(iris, fitted):
    with pytest.raises(ValueError, match="cg solves from the curvature operator"):
        _solver(iris, fitted, "cg").state()


# -- through the pipeline -----------------------------------------------------------------------------------

SPEC = """experiment: {name}
model: {{depth: 2}}
train: {{epochs: 400}}
influence: {{methods: [exact, cg, ekfac], {shard}}}
test_points: [{{highest: 1}}, {{random: 2}}]
ground_truth: {{epochs: 40, controls: 2, chunk: 64}}
"""
RUN_COLUMNS = ("seconds", "checkpoint", "node_id", "node_ip", "config_id", "spec_hash", "experiment")


def _spec(folder, name: str, shard: int | None):
    path = folder / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, shard="" if shard is None else f"train_shard: {shard}"))
    return path


def _rows(store, experiment: str, table: str) -> list[dict]:
    data = tables.read_table(store, experiment, table)
    data = data.drop_columns([c for c in RUN_COLUMNS if c in data.column_names])
    keys = [c for c in ("method", "test_idx", "train_idx", "removed", "snapshot") if c in data.column_names]
    return data.sort_by([(k, "ascending") for k in keys]).to_pylist()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same study with and without shards of 50 training points (120: shards of 50, 50 and 20)."""
    folder = tmp_path_factory.mktemp("shards")
    store = open_store(str(folder / "store"))
    assert main(["run", str(_spec(folder, "whole", None)), "--store", str(folder / "store"), "--inline"]) == 0
    sharded = _spec(folder, "sharded", 50)
    assert main(["run", str(sharded), "--store", str(folder / "store"), "--inline"]) == 0
    return folder, store, sharded


def _close(a: float | None, b: float | None, tol: float) -> bool:
    """Equal within tol; missing (null) or NaN on both sides counts as equal."""
    if a is None or b is None:
        return a is None and b is None
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def test_a_sharded_run_writes_the_rows_and_statistics_of_an_unsharded_one(runs):
    folder, store, _ = runs
    cid = load_spec(folder / "sharded.yaml").configurations()[0].config_id
    parts = Ledger(store, "sharded").parts("influence", cid)
    assert parts == [f"{m}-000-s{k:04d}" for m in ("cg", "ekfac", "exact") for k in range(3)]
    for m in ("cg", "ekfac", "exact"):
        state = load_state(store, ihvp_path(store, "sharded", cid, f"{m}-000"))
        assert state["s_test"].shape[0] == 3 and state["science"] == SCIENCE
        assert (state["solver"] is None) == (m == "cg")

    ours, theirs = _rows(store, "sharded", "influence"), _rows(store, "whole", "influence")
    assert len(ours) == len(theirs) == 3 * 3 * 120
    scale = max(abs(r["estimate"]) for r in theirs)
    for a, b in zip(ours, theirs):
        assert (a["method"], a["test_idx"], a["train_idx"]) == (b["method"], b["test_idx"], b["train_idx"])
        assert _close(a["estimate"], b["estimate"], 1e-13 * scale)
        assert _close(a["predicted_dtheta"], b["predicted_dtheta"], 1e-12 * abs(b["predicted_dtheta"] or 0))
        for column in ("damping", "iterations", "diverged", "science"):
            assert a[column] == b[column], column
        assert _close(a["self_influence"], b["self_influence"], 0.0) and _close(a["residual"], b["residual"], 0.0)
    assert _rows(store, "sharded", "retrain") == _rows(store, "whole", "retrain")  # removals: all, not ranked

    ours, theirs = _rows(store, "sharded", "stats"), _rows(store, "whole", "stats")
    assert len(ours) == len(theirs) == 9
    for a, b in zip(ours, theirs):
        for column in ("pearson", "spearman", "pearson_lo", "pearson_hi", "sign_agreement"):
            assert _close(a[column], b[column], 1e-9), column


def test_a_lost_shard_is_computed_again_alone_from_the_stored_solve(runs, capsys):
    folder, store, spec = runs
    cid = load_spec(spec).configurations()[0].config_id
    before = _rows(store, "sharded", "influence")
    solves = {m: ihvp_path(store, "sharded", cid, f"{m}-000") for m in ("cg", "ekfac", "exact")}
    stamps = {m: store.fs.get_file_info(p).mtime for m, p in solves.items()}
    store.fs.delete_file(tables.part_path(store, "sharded", "influence", cid, "ekfac-000-s0001"))
    store.fs.delete_file(tables.part_path(store, "sharded", "stats", cid, "final"))
    capsys.readouterr()
    assert main(["run", str(spec), "--store", str(folder / "store"), "--inline"]) == 0
    out = capsys.readouterr().out
    assert "1 tasks run" in out, out  # the shard; its solve was found in the store
    assert {m: store.fs.get_file_info(p).mtime for m, p in solves.items()} == stamps
    after = _rows(store, "sharded", "influence")
    assert len(after) == len(before)
    assert [r["estimate"] for r in after] == [r["estimate"] for r in before]

    # A solve that cannot be loaded is set aside and solved again, and its lost shard computed from it.
    with store.fs.open_output_stream(solves["exact"]) as f:
        f.write(b"not a tensor file")
    store.fs.delete_file(tables.part_path(store, "sharded", "influence", cid, "exact-000-s0002"))
    store.fs.delete_file(tables.part_path(store, "sharded", "stats", cid, "final"))
    assert main(["run", str(spec), "--store", str(folder / "store"), "--inline"]) == 0
    out = capsys.readouterr().out
    assert "2 tasks run" in out and "set aside" in out, out  # the solve and the shard
    assert load_state(store, solves["exact"])["science"] == SCIENCE
    assert os.listdir(folder / "store" / "sharded" / "_set_aside")
    again = _rows(store, "sharded", "influence")
    scale = max(abs(r["estimate"]) for r in before)
    assert all(_close(a["estimate"], b["estimate"], 1e-13 * scale) for a, b in zip(again, before))


def test_a_sharded_run_on_ray_writes_the_rows_of_the_inline_run(ray_cluster, runs, tmp_path, capsys):
    """Solves and shards as Ray tasks (the solve's result a tuple, the shards reading the stored solve)."""
    folder, inline, spec = runs
    capsys.readouterr()
    assert main(["run", str(spec), "--store", str(tmp_path / "ray")]) == 0
    assert "15 tasks run" in capsys.readouterr().out  # train, 3 solves, 9 shards, 2 retrain chunks
    ray_store = open_store(str(tmp_path / "ray"))
    for table in ("influence", "retrain", "stats"):
        assert _rows(ray_store, "sharded", table) == _rows(inline, "sharded", table), table


def test_a_bad_shard_size_is_one_message(tmp_path, capsys):
    spec = _spec(tmp_path, "bad", 0)
    assert main(["run", str(spec), "--store", str(tmp_path / "store"), "--inline"]) == 2
    err = capsys.readouterr().err
    assert "train_shard" in err and ">= 1" in err, err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))
