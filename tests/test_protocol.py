"""The study's decisions (jobs/protocol.py), each against a known answer, and the per-configuration pipeline
(jobs/pipeline.py) in this process with the inline runner: no Ray anywhere in this file."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from jobs import pipeline, protocol
from jobs.coordinator import Coordinator
from jobs.runner import InlineRunner
from jobs.spec import parse_spec
from storage import tables
from storage.uri import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**sections):
    return parse_spec({"experiment": "proto", **sections}).configurations()[0]


def test_part_names():
    assert protocol.influence_part("lissa", 3) == "lissa-003"
    assert protocol.retrain_part(12) == "retrain-00012"
    assert (protocol.MODEL_PART, protocol.TEST_POINTS_PART, protocol.FINAL_PART) == ("model", "test_points", "final")


@pytest.mark.parametrize("policy, spectrum, expected", [
    ("if_indefinite", (0.5, 3.0), 0.0),  # positive definite: the textbook influence function, undamped
    ("if_indefinite", (-0.1, 3.0), 0.01),  # indefinite
    ("if_indefinite", (1e-18, 1.0), 0.01),  # a numerical zero (softmax regression's null space)
    ("if_indefinite", (math.nan, 3.0), 0.01),  # unknown smallest eigenvalue: the safe choice
    ("always", (0.5, 3.0), 0.01),
    ("never", (-0.1, 3.0), 0.0),
])
def test_damping_is_decided_once_from_the_spectrum(policy, spectrum, expected):
    cfg = _cfg(influence={"damping": 0.01, "damping_policy": policy})
    assert protocol.damping(cfg, *spectrum) == expected


def test_every_solver_gets_the_configurations_damping_and_exact_does_not_decide_again():
    cfg = _cfg(influence={"methods": ["exact", "cg", "ekfac"], "grad_chunk": 77})
    exact = protocol.solver_settings(cfg, "exact", 0.25)
    assert exact["damping"] == 0.25 and exact["damping_policy"] == "always"
    assert protocol.solver_settings(cfg, "cg", 0.0) == {**cfg.solver_settings("cg"), "damping": 0.0}
    assert protocol.solver_settings(cfg, "ekfac", 0.1)["chunk_size"] == 77


def test_exact_told_always_adds_exactly_the_decided_damping():
    """The reconciliation of the two deciders: an exact solver built with solver_settings adds the δ that
    protocol.damping chose, whatever the spectrum."""
    from influence.ihvp import ExactIHVP

    cfg = _cfg(influence={"damping": 0.05})
    for eigenvalues in ((0.5, 1.0, 3.0), (-0.2, 1.0, 3.0)):
        h = torch.diag(torch.tensor(eigenvalues, dtype=torch.float64))
        delta = protocol.damping(cfg, min(eigenvalues), max(eigenvalues))
        settings = protocol.solver_settings(cfg, "exact", delta)
        solver = ExactIHVP(h, damping=settings["damping"], damping_policy=settings["damping_policy"])
        assert solver.damping_used == delta


def test_spectrum_plan():
    assert protocol.spectrum_plan(True, 43) == protocol.SpectrumPlan("exact")
    assert protocol.spectrum_plan(True, 10_000).method == "none"
    assert protocol.spectrum_plan(False, 2616) == protocol.SpectrumPlan("arnoldi", 20)
    assert protocol.spectrum_plan(False, 11_000_000) == protocol.SpectrumPlan("arnoldi", 6)
    assert protocol.spectrum_plan(False, 5).steps == 5


def test_ground_truth_seeds_controls_and_schedule():
    cfg = _cfg(train={"seed": 3}, ground_truth={"controls": 3})
    assert protocol.order_seed(cfg) == 3500 and protocol.order_seed(cfg, 2) == 3502
    assert protocol.control_seed(cfg, 1) == 3001
    assert [protocol.controls_in_chunk(cfg, c) for c in (0, 1, 5)] == [3, 1, 1]
    assert protocol.retrain_schedule(_cfg(train={"schedule": "cosine"})) == "constant"  # warm: constant lr
    assert protocol.retrain_schedule(_cfg(train={"schedule": "cosine"}, ground_truth={"start": "scratch"})) == "cosine"
    assert protocol.batched(200_000) and not protocol.batched(200_001)


def test_control_starts_full_batch_perturbed_minibatch_exact():
    base = torch.linspace(-1, 1, 7, dtype=torch.float64)
    full = protocol.control_starts(_cfg(ground_truth={"controls": 3, "perturbation": 1e-6}), base)
    assert full.shape == (3, 7) and torch.equal(full[0], base)
    rel = (full[1:] - base).abs() / base.abs().clamp_min(1e-3)
    assert 0 < float(rel.max()) < 1e-5 and not torch.equal(full[1], full[2])
    again = protocol.control_starts(_cfg(ground_truth={"controls": 3, "perturbation": 1e-6}), base)
    assert torch.equal(full, again)  # the same starts in every chunk and every run
    mini = protocol.control_starts(_cfg(train={"batch_size": 16}, ground_truth={"controls": 3}), base)
    assert all(torch.equal(row, base) for row in mini)  # minibatch replicates differ in their order instead


def _influence(rows: dict[str, list[list[float]]]) -> pa.Table:
    """An influence table from method -> estimates [T][n] (test points 10, 11, ...)."""
    cols = {"method": [], "test_idx": [], "train_idx": [], "estimate": []}
    for method, per_test in rows.items():
        for t, values in enumerate(per_test):
            for i, v in enumerate(values):
                cols["method"].append(method)
                cols["test_idx"].append(10 + t)
                cols["train_idx"].append(i)
                cols["estimate"].append(v)
    return pa.table(cols)


def test_removals_are_ranked_by_the_first_method_that_converged_everywhere():
    cfg = _cfg(influence={"methods": ["cg", "exact"]}, ground_truth={"removals": {"top_k": 1}})
    converged = _influence({"cg": [[0.1, 0.9, 0.2], [0.5, 0.1, 0.0]], "exact": [[0.9, 0.0, 0.0], [0.0, 0.0, 0.9]]})
    assert protocol.ranking_estimates(cfg, converged, 3)[0] == "cg"
    assert protocol.removals(cfg, converged, 3, 2) == ([0, 1], None)  # cg's top 1 of each test point
    diverged = _influence({"cg": [[0.1, 0.9, 0.2], [math.nan] * 3], "exact": [[0.9, 0.0, 0.0], [0.0, 0.0, 0.9]]})
    assert protocol.ranking_estimates(cfg, diverged, 3)[0] == "exact"
    assert protocol.removals(cfg, diverged, 3, 2) == ([0, 2], None)
    nowhere = _influence({"cg": [[math.nan] * 3], "exact": [[0.1, math.nan, 0.0]]})
    with pytest.raises(ValueError, match="every method's solve diverged"):
        protocol.removals(cfg, nowhere, 3, 1)
    assert protocol.removals(_cfg(), None, 4, 2) == ([0, 1, 2, 3], None)  # `all` reads no estimates


def test_the_train_result_is_the_same_read_from_fresh_rows_and_from_the_stored_parts(tmp_path, iris):
    """One path for fresh and resumed runs: what the train task hands on equals what resume reads back."""
    from jobs.tasks import train_task

    cfg = _cfg(train={"epochs": 50, "weight_decay": 0.0}, influence={"damping": 0.02})
    store = open_store(str(tmp_path))
    theta, fresh = train_task(store, cfg, iris)
    state, resumed = pipeline.resume_train(cfg, store, Coordinator(store, cfg.experiment))
    assert torch.equal(state, theta) and resumed == fresh
    assert fresh.n_train == iris.n_train and len(fresh.test_points) == 2
    assert fresh.damping in (0.0, 0.02) and set(fresh.science) == {"models", "test_points"}


SMALL = {"train": {"epochs": 60}, "influence": {"methods": ["exact", "cg"]},
         "ground_truth": {"epochs": 5, "controls": 2, "chunk": 50}}


def _run_one(store, cfg, iris):
    runner = InlineRunner()
    coord = Coordinator(store, cfg.experiment, {cfg.config_id: cfg.methods})
    return runner, pipeline.run_configuration(cfg, store, runner, coord, iris)


def test_a_configuration_runs_in_this_process_and_resumes_what_is_missing(tmp_path, iris):
    cfg = _cfg(**SMALL)
    store = open_store(str(tmp_path))
    runner, result = _run_one(store, cfg, iris)
    assert result["done"] and not result["skipped"]
    assert [kind for kind, _ in runner.ran] == ["train", "influence", "influence", "retrain", "retrain", "retrain"]
    final = tables.read_table(store, cfg.experiment, "stats").sort_by([("method", "ascending"),
                                                                      ("test_idx", "ascending")])
    assert final.num_rows == 4 and all(final["final"].to_pylist())

    runner, result = _run_one(store, cfg, iris)  # finished: nothing runs
    assert result["skipped"] and runner.ran == []

    tables.delete_part(store, cfg.experiment, "retrain", cfg.config_id, protocol.retrain_part(1))
    tables.delete_part(store, cfg.experiment, "stats", cfg.config_id, protocol.FINAL_PART)
    runner, result = _run_one(store, cfg, iris)
    assert runner.ran == [("retrain", f"retrain {cfg.config_id} retrain-00001")]
    again = tables.read_table(store, cfg.experiment, "stats").sort_by([("method", "ascending"),
                                                                      ("test_idx", "ascending")])
    assert again.drop_columns(["snapshot"]).equals(final.drop_columns(["snapshot"]))


def test_a_failing_task_reaches_the_caller_and_is_counted(tmp_path, iris):
    cfg = _cfg(model={"family": "logistic"}, train={"epochs": 20, "weight_decay": 0.0},
               influence={"damping_policy": "never"}, ground_truth={"epochs": 2, "controls": 2})
    store = open_store(str(tmp_path))
    coord = Coordinator(store, cfg.experiment, {cfg.config_id: cfg.methods})
    from jobs.tasks import TaskError

    with pytest.raises(TaskError, match=f"influence/{cfg.config_id}/exact-000"):
        pipeline.run_configuration(cfg, store, InlineRunner(), coord, iris)
    assert coord.progress()["failed"]["influence"] == 1
    assert tables.read_table(store, cfg.experiment, "influence").num_rows == 0


def test_the_inline_runner_retries_store_outages_only_and_sets_threads_per_kind():
    from jobs.runner import TASK_RETRIES
    from jobs.tasks import TaskError, TransientTaskError

    calls = []

    def flaky(fail_times, error, device):
        calls.append(torch.get_num_threads())
        if len(calls) <= fail_times:
            raise error("retrain/c/retrain-00000", "s3://b/x.parquet", "OSError: AWS Error NETWORK_CONNECTION")
        return "done"

    runner = InlineRunner(threads={"retrain": 1})
    assert runner.get(runner.submit("retrain", "r", flaky, 2, TransientTaskError)) == "done"
    assert calls == [1, 1, 1] and len(runner.ran) == 3
    calls.clear()
    with pytest.raises(TransientTaskError):  # still unreachable after every retry
        runner.get(runner.submit("retrain", "r", flaky, TASK_RETRIES + 1, TransientTaskError))
    assert len(calls) == TASK_RETRIES + 1
    calls.clear()
    with pytest.raises(TaskError):  # a task's own failure is deterministic: run once
        runner.get(runner.submit("retrain", "r", flaky, 1, TaskError))
    assert len(calls) == 1


def test_a_failed_configuration_is_one_line_naming_what_failed():
    from jobs.tasks import TaskError

    task = TaskError("influence/abc/exact-000", "/s/x.parquet", "SingularHessian: add damping")
    assert pipeline.failure_line(task) == str(task)
    assert pipeline.failure_line(ValueError("first\nevery method's solve diverged")) == (
        "ValueError: every method's solve diverged")
    assert pipeline.failure_line(KeyError("x")) == "KeyError: 'x'"
