"""The coordinator's statistics, fed parts in any order and chunking, equal a one-shot computation."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from influence.metrics import pearson, spearman
from jobs.stats import StatsBook, summarise

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


def test_noise_floor_flag():
    """snr = spread of the actual effects / spread of the controls; at or below 1 the effects are noise."""
    *_, influence, retrain = _parts()
    book = StatsBook()
    book.register("c", ["exact"], [(t, "highest") for t in TESTS])
    for part in influence + retrain:
        book.ingest("influence" if "method" in part.column_names else "retrain", "c", part)
    rows = book.rows("c", final=True)
    for snr, noise, std, flag in zip(rows["snr"], rows["noise_floor"], rows["actual_std"], rows["below_noise_floor"]):
        assert snr == pytest.approx(std / noise) and flag == (snr <= 1)


def test_group_removal_statistics():
    """Group rows: each group's estimate is the sum of its members' estimates; a test point's own top group
    and the random groups enter its correlation, another test point's top group does not."""
    est = {3: np.arange(10.0), 7: -np.arange(10.0)}
    influence = pa.table({"method": ["exact"] * 20, "test_idx": [3] * 10 + [7] * 10,
                          "train_idx": list(range(10)) * 2, "estimate": np.concatenate([est[3], est[7]]),
                          "predicted_dtheta": [0.0] * 20})
    groups = [([8, 9], "group"), ([0, 1], "group"), ([2, 5], "random_group"), ([4, 6], "random_group"),
              ([1, 3], "random_group")]
    actual = {3: [20.0, -1.0, 6.0, 9.0, 3.0], 7: [5.0, 2.0, -8.0, -11.0, -4.0]}
    rows = {"removed": [], "test_idx": [], "actual": [], "dtheta": [], "loss_retrained": [], "mode": [], "members": []}
    for t in TESTS:
        for k, c in enumerate([1.0, 1.5]):
            rows["removed"].append(-(k + 1)), rows["test_idx"].append(t), rows["actual"].append(c - 1.0)
            rows["dtheta"].append(0.0), rows["loss_retrained"].append(c), rows["mode"].append("control")
            rows["members"].append(None)
        for g, (members, mode) in enumerate(groups):
            rows["removed"].append(g), rows["test_idx"].append(t), rows["actual"].append(actual[t][g])
            rows["dtheta"].append(0.0), rows["loss_retrained"].append(1.0 + actual[t][g]), rows["mode"].append(mode)
            rows["members"].append(members)
    book = StatsBook()
    book.register("c", ["exact"], [(7, "highest"), (3, "median")])  # top group g belongs to the g-th smallest test_idx
    book.ingest("influence", "c", influence)
    book.ingest("retrain", "c", pa.table(rows))
    out = book.rows("c", final=True)
    for t, own in ((3, 0), (7, 1)):
        i = out["test_idx"].index(t)
        keys = [own, 2, 3, 4]
        sums = [sum(est[t][m] for m in groups[g][0]) for g in keys]
        acts = [actual[t][g] for g in keys]
        assert out["n"][i] == 4
        assert out["spearman"][i] == pytest.approx(spearman(sums, acts))
        assert out["group_actual"][i] == actual[t][own]
        assert out["random_group_mean"][i] == pytest.approx(np.mean(acts[1:]))
        assert out["random_group_std"][i] == pytest.approx(np.std(acts[1:], ddof=1))


def _stored(tmp_path):
    """A store holding one configuration's train, influence and retrain parts (as a run leaves them)."""
    from storage import tables
    from storage.uri import open_store

    *_, influence, retrain = _parts()
    store = open_store(str(tmp_path / "store"))
    tables.write_part(store, "e", "test_points", "c1", "test_points",
                      {"test_idx": list(TESTS), "loss": [1.0, 0.5], "label": [0, 1], "selection": ["highest", "median"]})
    tables.write_part(store, "e", "models", "c1", "model", {"model_key": ["m"], "degenerate_reason": [None]})
    paths = [("influence", tables.write_part(store, "e", "influence", "c1", f"exact-{k:03d}", p))
             for k, p in enumerate(influence)]
    paths += [("retrain", tables.write_part(store, "e", "retrain", "c1", f"retrain-{k:05d}", p))
              for k, p in enumerate(retrain)]
    return store, paths


def test_a_replacement_coordinator_rebuilds_from_the_store(tmp_path):
    """A coordinator that dies mid-run is replaced by one that never saw the registration nor the parts before:
    its first call rebuilds them from the store, calls repeated by Ray change nothing, and the final statistics
    equal those of the coordinator that saw everything."""
    from jobs.coordinator import Coordinator

    store, paths = _stored(tmp_path)
    whole = Coordinator(store, "e", {"c1": ("exact",)})
    whole.register("c1", ["exact"], [(3, "highest"), (7, "median")])
    for table, path in paths:
        whole.ingest(table, "c1", path)
    expected = whole.finalize("c1")

    replacement = Coordinator(store, "e", {"c1": ("exact",)})  # knows the methods only
    table, path = paths[-1]
    replacement.ingest(table, "c1", path)  # the last part, announced after the restart
    replacement.ingest(table, "c1", path)  # ... and delivered twice
    assert replacement.recovered == 1
    assert replacement.finalize("c1") == expected
    for key in ("c1/retrain-00000", "c1/retrain-00000"):
        replacement.task_done("retrain", key=key)
    assert replacement.progress()["done"]["retrain"] == 1


def test_an_unreadable_part_is_set_aside_for_the_trial_to_recompute(tmp_path):
    from jobs.coordinator import Coordinator
    from storage.uri import read_bytes, write_atomic

    store, paths = _stored(tmp_path)
    coordinator = Coordinator(store, "e", {"c1": ("exact",)})
    coordinator.register("c1", ["exact"], [(3, "highest"), (7, "median")])
    table, path = paths[-1]
    write_atomic(store, path, read_bytes(store, path)[:100])
    answer = coordinator.ingest(table, "c1", path)
    assert "set aside" in answer["set_aside"] and path in answer["set_aside"]
    assert coordinator.progress()["notices"] == [answer["set_aside"]]
    assert read_bytes(store, path) is None  # moved, so the ledger no longer counts it as done
