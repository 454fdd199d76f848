"""Replicated ground truth: every removal and its paired control retrained under R independent draws of the
training noise, the ground truth their mean, and its reliability measured.

Known answers: one replicate is the protocol as it was (the same parts, the same rows); replicate r's rows are
measured against replicate r's own control; replicates are their own parts, so a rerun with more of them
computes only the new ones; the noise ceiling is measured with two or more replicates and unknown with one.
"""
from __future__ import annotations

import math

import pytest

from fragile.cli import main
from jobs import plan, protocol
from jobs.spec import Configuration, SpecError, parse_spec
from storage.query import query
from storage.uri import open_store

# Small and quick: depth-1 tanh MLP on Iris, top-12 removals by estimate, short warm retrains.
SPEC = """experiment: rep
train: {{epochs: 400{batch}}}
influence: {{methods: [exact]}}
test_points: [{{highest: 1}}, {{random: 3}}]
ground_truth: {{removals: {{top_k: 12}}, epochs: 60, controls: 2, chunk: 8, replicates: {r}}}
"""


def _run(tmp_path, r: int, store: str = "store", batch: str = "", capsys=None) -> object:
    spec = tmp_path / f"rep{r}{batch.strip(', :')}.yaml"
    spec.write_text(SPEC.format(r=r, batch=batch))
    if capsys is not None:
        capsys.readouterr()
    assert main(["run", str(spec), "--store", str(tmp_path / store), "--inline"]) == 0
    return open_store(str(tmp_path / store))


def _unknown(v) -> bool:
    return v is None or math.isnan(v)


def test_replicates_are_a_measurement_not_an_identity():
    one = Configuration("e")
    three = Configuration("e", replicates=3)
    assert one.config_id == three.config_id and one.model_key == three.model_key
    assert "replicates" not in three.canonical_json()
    with pytest.raises(SpecError, match="not sweepable"):
        parse_spec({"experiment": "e", "sweep": {"replicates": [1, 2]}})
    with pytest.raises(SpecError, match="replicates"):
        Configuration("e", replicates=0)


def test_replicate_parts_seeds_and_tasks():
    cfg = Configuration("e", seed=2, controls=3, replicates=3, batch_size=16)
    assert protocol.retrain_part(4) == "retrain-00004"  # replicate 0 keeps the names stores already hold
    assert protocol.retrain_part(4, 2) == "retrain-00004-r002"
    tasks = plan.retrain_tasks(cfg, list(range(300)))
    assert [(t.replicate, t.chunk) for t in tasks] == [(r, k) for r in range(3) for k in range(3)]
    assert len({t.part for t in tasks}) == 9
    # every draw of the noise has its own seed: control starts and orders, replicate draws
    seeds = [protocol.control_seed(cfg, k) for k in range(1, 3)] + [protocol.order_seed(cfg, k) for k in range(3)]
    seeds += [protocol.replicate_seed(cfg, r) for r in range(1, 3)]
    assert len(set(seeds)) == len(seeds)
    assert protocol.replicate_order_seed(cfg, 0) == protocol.order_seed(cfg)
    assert [protocol.controls_in_chunk(cfg, k, r) for r in (0, 1) for k in (0, 1)] == [3, 1, 1, 1]
    assert plan.task_counts([cfg], lambda c: 120)["retrain"] == 3 * math.ceil(120 / 128)


def test_one_replicate_writes_what_replicate_zero_of_many_writes(tmp_path):
    """Replicate 0 does not depend on how many replicates follow it: an R = 1 run's retrain rows are the
    R = 3 run's replicate-0 rows, and its statistics are the ground truth of that one draw."""
    one = _run(tmp_path, 1, "one")
    three = _run(tmp_path, 3, "three")
    cols = "config_id, removed, test_idx, loss_retrained, loss_control, actual, dtheta, mode, seed, grad_norm"
    a = query(f"select {cols} from retrain order by all", one, "rep").to_pylist()
    b = query(f"select {cols} from retrain where replicate = 0 order by all", three, "rep").to_pylist()
    assert a == b and a
    s1 = query("select * from stats where final", one, "rep").to_pylist()
    assert {r["replicates"] for r in s1} == {1}
    assert all(_unknown(r["reliability"]) and _unknown(r["ceiling"]) and r["unreliable"] is None for r in s1)
    # final rows carry chance levels and bootstrap intervals around the observed correlation
    for r in s1:
        assert 0 < r["spearman_p"] <= 1 and 0 < r["spearman_null95"] < 1
        assert r["spearman_boot_lo"] <= r["spearman"] <= r["spearman_boot_hi"]
        assert r["chance"] == (r["spearman_p"] >= 0.05)
    s3 = query("select * from stats where final", three, "rep").to_pylist()
    assert {r["replicates"] for r in s3} == {3}
    assert all(not _unknown(r["reliability"]) and r["unreliable"] == (r["reliability"] < 0.5) for r in s3)
    for r in s3:
        if r["reliability"] > 0:
            assert r["ceiling"] == pytest.approx(math.sqrt(r["reliability"]))
            assert r["spearman_corrected"] == pytest.approx(r["spearman"] / r["ceiling"])


def test_each_replicate_is_paired_with_its_own_control_and_the_truth_is_their_mean(tmp_path):
    store = _run(tmp_path, 3, batch=", batch_size: 32")  # minibatches: each replicate its own order
    rows = query("select * from retrain", store, "rep").to_pandas()
    assert sorted(rows.replicate.unique()) == [0, 1, 2]
    for rep, g in rows.groupby("replicate"):
        control = g[g.removed == -1].set_index("test_idx").loss_retrained
        removals = g[g.removed >= 0]
        assert (removals.loss_control.values == control.loc[removals.test_idx].values).all()
        assert (removals.actual == removals.loss_retrained - removals.loss_control).all()
        assert g.seed.nunique() == 1
        # replicate 0 keeps its controls; the others store their one paired control
        assert sorted(g[g.removed < 0].removed.unique()) == ([-2, -1] if rep == 0 else [-1])
    assert rows.groupby("replicate").seed.first().nunique() == 3
    # the draws differ: the same removal's effect is not the same number in every replicate
    spread = rows[rows.removed >= 0].groupby(["removed", "test_idx"]).actual.std()
    assert (spread > 0).mean() > 0.9
    # the statistics are computed on the replicate mean
    cid = rows.config_id.iloc[0]
    truth = rows[rows.removed >= 0].groupby(["removed", "test_idx"]).actual.mean()
    inf = query("select test_idx, train_idx, estimate from influence", store, "rep").to_pandas()
    stats = query("select test_idx, pearson from stats where final", store, "rep").to_pandas()
    from influence.metrics import pearson
    for t, p in zip(stats.test_idx, stats.pearson):
        m = truth.xs(t, level="test_idx")
        est = inf[inf.test_idx == t].set_index("train_idx").estimate.loc[m.index]
        assert p == pytest.approx(pearson(est.values, m.values), abs=1e-12), cid


def test_a_rerun_with_more_replicates_computes_only_the_new_ones(tmp_path, capsys):
    store = _run(tmp_path, 2)
    before = query("select * from retrain order by all", store, "rep").to_pylist()
    removed = query("select count(distinct removed) from retrain where removed >= 0", store, "rep").column(0)[0].as_py()
    n_tasks = math.ceil(removed / 8)  # one new task per chunk of removals
    _run(tmp_path, 3, capsys=capsys)
    out = capsys.readouterr().out
    assert f"{n_tasks} tasks run" in out, out
    after = query("select * from retrain where replicate < 2 order by all", store, "rep").to_pylist()
    assert len(after) == len(before)
    assert {r["replicates"] for r in query("select replicates from stats where final", store, "rep").to_pylist()} == {3}
    # and a third run with the same R schedules nothing
    _run(tmp_path, 3, capsys=capsys)
    assert "0 tasks run" in capsys.readouterr().out
