"""benchmarks/ihvp.py in quick mode (a 200-parameter CNN, 200 digits, 4 test points): the table has a row per
method with every column, CG agrees with exact, a worker in its own process gives what the in-process run gives,
and, where captum is installed, its naive influence equals our exact estimate (values, so sign and scale too)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ihvp.py"
_spec = importlib.util.spec_from_file_location("benchmark_ihvp", _PATH)
bench = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look the module up
_spec.loader.exec_module(bench)

CAPTUM = importlib.util.find_spec("captum") is not None
COLUMNS = ("fit_s", "solve_ms", "e2e_ms", "total_s", "peak_mb", "spearman", "rel_err", "solve_ms_vs_cg",
           "e2e_ms_vs_cg", "total_s_vs_cg")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "ihvp.json"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = bench.main(["--quick", "--json", str(out)])
    return result, printed.getvalue(), out


def test_quick_run_prints_a_row_per_method_and_cg_agrees_with_exact(quick):
    result, printed, out = quick
    rows = {r["method"]: r for r in result["rows"]}
    expected = ["exact", "cg", "ekfac"] + (["captum-arnoldi"] if CAPTUM else [])
    assert list(rows) == expected
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        assert all(key in row for key in COLUMNS), name
        assert row["fit_s"] >= 0 and row["e2e_ms"] > 0 and row["total_s"] > 0 and row["peak_mb"] >= 0
    assert rows["exact"]["spearman"] == pytest.approx(1.0) and rows["exact"]["rel_err"] == 0.0
    assert rows["cg"]["spearman"] > 0.99 and rows["cg"]["rel_err"] < 1e-4 and rows["cg"]["diverged"] == 0
    assert rows["cg"]["solve_ms_vs_cg"] == 1.0 and rows["cg"]["iterations"] > 0
    assert 0 < rows["ekfac"]["solve_ms_vs_cg"] < 1  # a solve is two small products per layer
    if CAPTUM:
        assert math.isnan(rows["captum-arnoldi"]["solve_ms"])  # captum has no separate solve: e2e only

    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    for column in ("fit s", "solve ms/pt", "e2e ms/pt", "peak MB", "ρ vs exact", "÷CG"):
        assert column in lines[header]
    assert [line.split()[0] for line in lines[header + 2 : header + 2 + len(expected)]] == expected
    if not CAPTUM:
        assert "captum is not installed" in printed

    stored = json.loads(out.read_text())
    assert stored["config"]["model"] == "tiny_cnn" and stored["config"]["test_points"] == 4
    assert stored["setup"]["n_params"] == 200 and [r["method"] for r in stored["rows"]] == expected


def test_a_worker_in_its_own_process_gives_the_in_process_numbers(tmp_path):
    cfg = bench.Config(**{**bench.QUICK, "in_process": False, "peers": ()})
    model, data = bench.load(cfg)
    theta = model.init(0, dtype=data.x_train.dtype)
    bench.prepare(cfg, theta, tmp_path)
    logged = []
    spawned = bench.spawn("ekfac", tmp_path, logged.append)
    assert "error" not in spawned, logged
    here = bench.run_ours(cfg, "ekfac", model, data, theta)
    assert spawned["estimate"].shape == (4, 200)
    assert torch.allclose(spawned["estimate"], here["estimate"], rtol=1e-10, atol=0)
    assert spawned["peak_mb"] >= 0 and spawned["fit_s"] > 0


@pytest.mark.skipif(not CAPTUM, reason="captum is not installed (pip install captum: the bench extra)")
def test_captum_naive_influence_is_our_exact_estimate(tmp_path):
    """hessian_reg = n(λ + δ) makes captum's ∇L_tᵀ (H_Σ + reg)^{-1} ∇L_i our (1/n) ∇L_tᵀ (H + δI)^{-1} ∇L_i."""
    cfg = bench.Config(**{**bench.QUICK, "train_subset": 60, "epochs": 30, "test_points": 3})
    model, data = bench.load(cfg)
    theta = bench.train(model, data.x_train, data.y_train, weight_decay=cfg.weight_decay, lr=cfg.lr,
                        epochs=cfg.epochs, seed=0).theta
    ours = bench.run_ours(cfg, "exact", model, data, theta)["estimate"]
    captum = bench.run_captum(cfg, "captum-naive", model, data, theta, tmp_path)["estimate"]
    assert torch.allclose(captum, ours, rtol=1e-6, atol=1e-9 * float(ours.abs().max()))


def test_arguments_are_checked_and_documented(capsys):
    for bad in (["--methods", "newton"], ["--methods", "lissa:ggn"], ["--dtype", "float16"]):
        with pytest.raises(SystemExit):
            bench.main(bad)
    assert "newton" in capsys.readouterr().err
    text = bench.make_parser().format_help()
    for option in ("--test-points", "--methods", "--dtype", "--quick", "--peers", "--curvature"):
        assert option in text
    quick = bench.config_from_args(bench.make_parser().parse_args(["--quick", "--test-points", "2"]),
                                   ["--quick", "--test-points", "2"])
    assert quick.test_points == 2 and quick.model == "tiny_cnn"  # given on the command line: kept
