"""The convex control, run as shipped (jobs/specs/convex-control.yaml): multinomial logistic regression on
digits with weight decay, trained and retrained by L-BFGS to ‖∇R‖₂ <= 1e-9. There the influence function is
the first-order answer at the optimum, so estimates and leave-one-out effects must agree: Pearson >= 0.95 and
Spearman >= 0.98 on the highest-loss, the median and a random test point, and nothing at chance."""
from __future__ import annotations

from pathlib import Path

from fragile.cli import main
from storage.query import query
from storage.uri import open_store

SPEC = Path(__file__).resolve().parents[1] / "jobs" / "specs" / "convex-control.yaml"


def test_convex_control_agrees_at_the_optimum(tmp_path):
    assert main(["run", str(SPEC), "--store", str(tmp_path), "--inline"]) == 0
    store = open_store(str(tmp_path))
    models = query("select grad_norm, stationary from models", store, "convex-control").to_pylist()
    assert models[0]["grad_norm"] < 1e-9 and models[0]["stationary"] is True
    # every retrained model is an optimum of its own objective too
    worst = query("select max(grad_norm) from retrain", store, "convex-control").column(0)[0].as_py()
    assert worst < 1e-9
    rows = query("select * from stats where final and method = 'exact'", store, "convex-control").to_pylist()
    assert sorted(r["selection"] for r in rows) == ["highest", "median", "random"]
    for r in rows:
        assert r["n"] >= 40
        assert r["pearson"] >= 0.95 and r["spearman"] >= 0.98, r
        assert r["chance"] is False and r["spearman_p"] < 0.01
        assert r["stationary"] is True and r["retrain_grad_norm"] < 1e-9
