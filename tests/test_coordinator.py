"""The coordinator's statistics, fed parts in any order and chunking, equal a one-shot computation."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from influence.metrics import pearson, spearman
from jobs.coordinator import StatsBook, summarise

N, TESTS = 40, (3, 7)


def _parts(seed: int = 0):
    rng = np.random.default_rng(seed)
    est = {t: rng.normal(size=N) for t in TESTS}
    act = {t: 0.8 * est[t] + 0.3 * rng.normal(size=N) for t in TESTS}
    pred_dtheta = rng.random(N)
    act_dtheta = pred_dtheta + 0.1 * rng.random(N)
    controls = {t: [1.0, 1.0 + 1e-4, 1.0 - 2e-4] for t in TESTS}
    influence = [pa.table({"method": ["exact"] * N, "test_idx": [t] * N, "train_idx": list(range(N)),
                           "estimate": est[t], "predicted_dtheta": pred_dtheta}) for t in TESTS]
    retrain = []
    for lo in range(0, N, 7):  # chunks of removals, every chunk holding all test points
        ids = list(range(lo, min(N, lo + 7)))
        rows = {"removed": [], "test_idx": [], "actual": [], "dtheta": [], "loss_retrained": []}
        if lo == 0:
            for t in TESTS:
                for k, c in enumerate(controls[t]):
                    rows["removed"].append(-(k + 1))
                    rows["test_idx"].append(t)
                    rows["actual"].append(c - controls[t][0])
                    rows["dtheta"].append(0.0)
                    rows["loss_retrained"].append(c)
        for i in ids:
            for t in TESTS:
                rows["removed"].append(i)
                rows["test_idx"].append(t)
                rows["actual"].append(act[t][i])
                rows["dtheta"].append(act_dtheta[i])
                rows["loss_retrained"].append(1.0 + act[t][i])
        retrain.append(pa.table(rows))
    return est, act, pred_dtheta, act_dtheta, controls, influence, retrain


@pytest.mark.parametrize("order_seed", [0, 1, 2])
def test_incremental_equals_one_shot_in_any_order(order_seed):
    est, act, pdt, adt, controls, influence, retrain = _parts()
    parts = [("influence", p) for p in influence] + [("retrain", p) for p in retrain]
    np.random.default_rng(order_seed).shuffle(parts)
    book = StatsBook()
    book.register("c1", ["exact"], [(3, "highest"), (7, "median")])
    for table, rows in parts:
        book.ingest(table, "c1", rows)
    rows = book.rows("c1", final=True)
    for k, t in enumerate(TESTS):
        assert rows["n"][k] == N
        assert rows["spearman"][k] == pytest.approx(spearman(est[t], act[t]), abs=1e-12)
        assert rows["pearson"][k] == pytest.approx(pearson(est[t], act[t]), abs=1e-12)
        assert rows["noise_floor"][k] == pytest.approx(np.std(controls[t], ddof=1), rel=1e-12)
        assert rows["actual_std"][k] == pytest.approx(np.std(act[t], ddof=1), rel=1e-12)
        assert rows["dtheta_spearman"][k] == pytest.approx(spearman(pdt, adt), abs=1e-12)
        assert rows["final"][k] is True
    assert rows["selection"] == ["highest", "median"]


def test_partial_results_count_only_complete_pairs():
    _, _, _, _, _, influence, retrain = _parts()
    book = StatsBook()
    book.register("c1", ["exact"], [(3, "highest"), (7, "median")])
    book.ingest("retrain", "c1", retrain[0])
    assert book.rows("c1", final=False)["n"] == [0, 0]  # actuals without estimates are not pairs yet
    book.ingest("influence", "c1", influence[0])
    rows = book.rows("c1", final=False)
    assert rows["n"] == [7, 0] and rows["snapshot"] == [2, 2]
    s = summarise(rows)
    assert s["pairs"] == 7 and not math.isnan(s["spearman_mean"])


def test_degenerate_configuration_reason_travels_to_stats():
    book = StatsBook()
    book.register("c2", ["exact"], [(0, "highest")], degenerate_reason="constant predictor")
    rows = book.rows("c2", final=True)
    assert rows["degenerate_reason"] == ["constant predictor"] and math.isnan(rows["spearman"][0])


def test_diverged_solve_is_named_not_averaged():
    book = StatsBook()
    book.register("c3", ["lissa"], [(1, "highest")])
    book.ingest("influence", "c3", pa.table({"method": ["lissa"] * 3, "test_idx": [1] * 3, "train_idx": [0, 1, 2],
                                             "estimate": [math.nan] * 3, "predicted_dtheta": [math.nan] * 3,
                                             "diverged": [True] * 3}))
    rows = book.rows("c3", final=True)
    assert rows["degenerate_reason"] == ["the lissa solve diverged for this test point"]
