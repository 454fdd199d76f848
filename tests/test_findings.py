"""The findings on synthetic stores with planted answers: Spearman = 0.7 − 0.1·depth + 0.2·[wd > 0] + a test-point
offset (spread 0.15 IQR, tied to the margin, higher for the highest-loss points) + small noise, over 3 seeds ×
depths 1..4 × weight decay {0, 0.005}; one configuration collapsed (its cells carry an absurd −0.99) and one cell
diverged. A second store has no depth trend, a third a rising one, a fourth group removals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from jobs.findings import Finding, findings
from jobs.findings_text import finding_sentence, findings_markdown, findings_table
from storage.query import connect
from storage.tables import write_part
from storage.uri import open_store

EXP = "find"
SEEDS = (0, 1, 2)
DEPTHS = (1, 2, 3, 4)
WDS = (0.0, 0.005)
TESTS = 6
OFFSETS = [0.06 * (j - 2.5) for j in range(TESTS)]  # IQR (linear percentiles) = 0.15
SELECTION = ["median"] * 3 + ["highest"] * 3  # highest - median = 0.18
COLLAPSED = (4, 2, 0.0)  # (depth, seed, wd) of the collapsed configuration
DIVERGED = (2, 1, 0.005, 3)  # (depth, seed, wd, test_idx) of the diverged cell
TRAIN = 10


def _rho(depth, seed, wd, j, slope=-0.1, wd_slopes=None):
    if wd_slopes is not None:
        base = 0.5 + wd_slopes[wd > 0] * depth
    else:
        base = 0.7 + slope * depth if not isinstance(slope, dict) else 0.5 + slope[seed] * depth
    return base + (0.2 if wd > 0 else 0.0) + OFFSETS[j]


def build_store(root, *, slope=-0.1, seeds=SEEDS, pairs=False, methods=("exact",), experiment=EXP, wd_slopes=None):
    """The synthetic store; ``pairs`` adds influence and retrain rows (2 replicates) for the scatter panels.
    ``slope``: the planted depth slope, or a dict seed -> slope (per-seed trends that cancel); ``wd_slopes``:
    (slope without weight decay, slope with) instead."""
    store = open_store(str(root))
    rng = np.random.default_rng(7)
    k = 0
    for depth in DEPTHS:
        for seed in seeds:
            for wd in WDS:
                cid = f"d{depth}s{seed}wd{int(wd * 1000)}"
                write_part(store, experiment, "configs", cid, "config",
                           {"spec_hash": ["h"], "experiment": [experiment], "dataset": ["iris"], "model": ["mlp"],
                            "depth": [depth], "width": [5], "weight_decay": [wd], "seed": [seed],
                            "methods": [",".join(methods)]})
                collapsed = (depth, seed, wd) == COLLAPSED
                stats = {n: [] for n in ("method", "test_idx", "snapshot", "selection", "spearman", "spearman_lo",
                                         "spearman_hi", "final", "collapsed", "diverged", "ceiling",
                                         "spearman_null95", "chance", "unreliable", "spearman_corrected",
                                         "replicates")}
                for mi, method in enumerate(methods):
                    for j in range(TESTS):
                        diverged = (depth, seed, wd, j) == DIVERGED and mi == 0
                        rho = _rho(depth, seed, wd, j, slope, wd_slopes) + rng.normal(0, 0.01) - 0.05 * mi
                        if collapsed or diverged:
                            rho = -0.99  # if it entered any statistic, the answers below would be off
                        for name, v in (("method", method), ("test_idx", j), ("snapshot", 1),
                                        ("selection", SELECTION[j]), ("spearman", rho), ("spearman_lo", rho - 0.02),
                                        ("spearman_hi", rho + 0.02), ("final", True), ("collapsed", collapsed),
                                        ("diverged", diverged), ("ceiling", 0.9), ("spearman_null95", 0.4),
                                        ("chance", None if collapsed or diverged else bool(rho < 0.3)),
                                        ("unreliable", False), ("spearman_corrected", rho / 0.9),
                                        ("replicates", 2)):
                            stats[name].append(v)
                # a running snapshot that must never count
                write_part(store, experiment, "stats", cid, "snap",
                           {"method": [methods[0]], "test_idx": [0], "snapshot": [0], "spearman": [0.99],
                            "final": [False]})
                write_part(store, experiment, "stats", cid, "stats", stats)
                # Covariates: margin follows the offset (shifted per configuration, so only within-configuration
                # ranks relate); the others are noise.
                write_part(store, experiment, "test_points", cid, "tp",
                           {"test_idx": list(range(TESTS)), "selection": SELECTION,
                            "loss": rng.uniform(0.1, 2.0, TESTS).tolist(),
                            "margin": [10.0 * k + j for j in range(TESTS)],
                            "grad_norm": rng.uniform(0.1, 1.0, TESTS).tolist(),
                            "misclassified": (rng.uniform(size=TESTS) < 0.5).tolist(), "label": [0] * TESTS})
                inf = {n: [] for n in ("method", "test_idx", "train_idx", "estimate", "self_influence")}
                ret = {n: [] for n in ("removed", "test_idx", "actual", "mode", "replicate")}
                for method in methods:
                    for j in range(TESTS):
                        si = float(rng.uniform(0.5, 5.0))
                        for i in range(TRAIN if pairs else 1):
                            e = float(rng.normal())
                            for name, v in (("method", method), ("test_idx", j), ("train_idx", i), ("estimate", e),
                                            ("self_influence", si)):
                                inf[name].append(v)
                            if pairs and method == methods[0]:
                                for rep in (0, 1):
                                    for name, v in (("removed", i), ("test_idx", j),
                                                    ("actual", 0.8 * e + float(rng.normal(0, 0.3))),
                                                    ("mode", "warm"), ("replicate", rep)):
                                        ret[name].append(v)
                if pairs:
                    for j in range(TESTS):  # controls: never a pair
                        for name, v in (("removed", -1), ("test_idx", j), ("actual", 0.0), ("mode", "control"),
                                        ("replicate", 0)):
                            ret[name].append(v)
                    write_part(store, experiment, "retrain", cid, "retrain", ret)
                write_part(store, experiment, "influence", cid, "influence", inf)
                k += 1
    return store


def _con(store, experiment=EXP):
    return connect(store, experiment)


def _keyed(found):
    """(name, method) -> finding, and (name, method, within) for the findings over a subset of the cells."""
    return {((f.name, f.method, f.within) if f.within else (f.name, f.method)): f for f in found}


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("findings"))
    con = _con(store)
    yield _keyed(findings(con))
    con.close()


N_CELLS = len(SEEDS) * len(DEPTHS) * len(WDS) * TESTS
N_LEFT = TESTS + 1  # the collapsed configuration's cells and the diverged one


def test_depth_slope_is_found_with_an_interval_below_zero(found):
    f = found[("depth", "exact")]
    assert f.effect == pytest.approx(-0.1, abs=0.01)
    assert f.hi < 0 and f.lo < f.effect < f.hi and f.holds is True
    assert (f.n_cells, f.left_out) == (N_CELLS - N_LEFT, N_LEFT)
    assert "3 seeds" in f.detail and f"{TESTS} collapsed" in f.detail and "1 diverged" in f.detail
    assert f.ceiling == pytest.approx(0.9) and f.null95 == pytest.approx(0.4) and f.unreliable == 0
    # chance was planted where ρ < 0.3: only depth-4 cells without weight decay at the lowest offsets
    assert 0 < f.at_chance == pytest.approx(f.chance_share * f.n_cells)


def test_depth_slope_within_each_weight_decay(found, tmp_path):
    for within, n in (("weight decay 0.005", N_CELLS // 2 - 1), ("weight decay 0", N_CELLS // 2 - TESTS)):
        f = found[("depth", "exact", within)]
        assert f.effect == pytest.approx(-0.1, abs=0.01) and f.hi < 0 and f.holds is True
        assert f.n_cells == n  # the diverged cell has weight decay, the collapsed configuration none
        assert finding_sentence(f).startswith(f"exact ({within}): Spearman falls with depth by 0.10")
    # Opposite trends with and without weight decay cancel in the pooled slope; each weight decay shows its own.
    f = _keyed(findings(_con(build_store(tmp_path, wd_slopes={False: 0.08, True: -0.08}))))
    assert f[("depth", "exact")].effect == pytest.approx(0.0, abs=0.01)
    assert f[("depth", "exact", "weight decay 0.005")].effect == pytest.approx(-0.08, abs=0.01)
    assert f[("depth", "exact", "weight decay 0")].effect == pytest.approx(0.08, abs=0.01)
    assert f[("depth", "exact", "weight decay 0.005")].holds is True
    assert f[("depth", "exact", "weight decay 0")].holds is False
    assert "| depth (weight decay 0.005) | exact |" in findings_markdown(list(f.values()), "x")


def test_weight_decay_difference_is_paired_and_holds(found):
    f = found[("weight_decay", "exact")]
    assert f.effect == pytest.approx(0.2, abs=0.01) and f.lo > 0 and f.holds is True
    assert "paired differences" in f.detail
    assert f.left_out == N_LEFT
    # the collapsed configuration's partner (d4 s2 wd0.005) has no pair: its cells are not used either
    assert f.n_cells == N_CELLS - 2 * TESTS - 1


def test_spread_across_test_points_is_the_planted_iqr(found):
    f = found[("spread", "exact")]
    assert f.effect == pytest.approx(0.15, abs=0.02) and f.lo <= f.effect <= f.hi
    assert f.holds is True  # 0.15 against a sampling IQR of ≈ 0.014
    assert "23 configuration(s)" in f.detail  # the collapsed one has no defined cell


def test_the_planted_covariate_is_named(found):
    assert found[("covariate_margin", "exact")].effect == pytest.approx(1.0, abs=0.05)
    for cov in ("loss", "grad_norm", "self_influence", "misclassified"):
        assert abs(found[(f"covariate_{cov}", "exact")].effect) < 0.3
    driver = found[("spread_driver", "exact")]
    assert "margin" in driver.statement and driver.holds is True
    assert "loss" in driver.detail and "self_influence" in driver.detail


def test_highest_loss_points_fare_better(found):
    f = found[("highest_vs_median", "exact")]
    assert f.effect == pytest.approx(0.18, abs=0.01) and f.lo > 0 and f.holds is True


def test_sentences_table_and_markdown(found):
    f = found[("depth", "exact")]
    sentence = finding_sentence(f)
    assert sentence.startswith("exact: Spearman falls with depth by 0.10") and "per layer" in sentence
    assert f"{f.n_cells} cells, {N_LEFT} left out): holds; mean ceiling 0.900, chance |ρ| 0.400" in sentence
    table = findings_table(list(found.values()))
    assert table.num_rows == len(found) and "sentence" in table.column_names
    assert set(table.column("holds").to_pylist()) <= {True, False, None}
    md = findings_markdown(list(found.values()), "synthetic")
    assert md.startswith("# synthetic") and sentence in md and "| depth | exact |" in md


def test_bootstrap_is_reproducible(tmp_path, found):
    con = _con(build_store(tmp_path))
    again = _keyed(findings(con))
    assert again == found


def test_no_depth_trend_cannot_tell(tmp_path):
    # per-seed slopes +0.05, −0.05, 0 cancel: the cluster bootstrap's interval straddles 0
    con = _con(build_store(tmp_path, slope={0: 0.05, 1: -0.05, 2: 0.0}))
    f = _keyed(findings(con))[("depth", "exact")]
    assert f.effect == pytest.approx(0.0, abs=0.01)
    assert f.lo < 0 < f.hi and f.holds is None and "cannot tell" in finding_sentence(f)


def test_a_rising_depth_trend_fails_and_one_seed_resamples_test_points(tmp_path):
    con = _con(build_store(tmp_path, slope=0.05, seeds=(0,)))
    f = _keyed(findings(con))[("depth", "exact")]
    assert f.effect == pytest.approx(0.05, abs=0.01) and f.lo > 0 and f.holds is False
    assert "one seed" in f.detail
    assert "rises with depth" in finding_sentence(f)


def test_collapsed_cells_never_count(tmp_path):
    # The same store with the collapsed cells' −0.99 would move the depth slope by far more than 0.01 if used.
    con = _con(build_store(tmp_path))
    rows = con.sql("select count(*) from stats where final and collapsed").fetchall()[0][0]
    assert rows == TESTS
    f = _keyed(findings(con))
    assert all(g.n_cells <= N_CELLS - N_LEFT for g in f.values())


def test_groups_and_omitted_questions(tmp_path):
    """Group removal: top group vs random groups; a store without depth/width/wd variation omits those."""
    store = open_store(str(tmp_path))
    exp = "groups"
    gaps = {}
    for c in range(2):
        cid = f"g{c}"
        write_part(store, exp, "configs", cid, "config",
                   {"spec_hash": ["h"], "model": ["cnn"], "depth": [1], "width": [5], "weight_decay": [0.001],
                    "seed": [c], "methods": ["lissa"]})
        stats = {n: [] for n in ("method", "test_idx", "snapshot", "final", "spearman", "group_actual",
                                 "random_group_mean", "random_group_std", "collapsed", "diverged", "selection")}
        ret = {n: [] for n in ("removed", "test_idx", "actual", "mode", "replicate")}
        for t in range(4):
            top = 0.12 if (c, t) == (1, 3) else 0.5  # one top group that does not beat the best random group
            randoms = [0.05, 0.1, 0.15]
            gaps[(c, t)] = top - np.mean(randoms)
            for name, v in (("method", "lissa"), ("test_idx", t), ("snapshot", 1), ("final", True),
                            ("spearman", 0.1), ("group_actual", top), ("random_group_mean", float(np.mean(randoms))),
                            ("random_group_std", float(np.std(randoms, ddof=1))), ("collapsed", False),
                            ("diverged", False), ("selection", "highest")):
                stats[name].append(v)
            for g, a in enumerate(randoms, start=4):
                for rep, noise in ((0, -0.01), (1, 0.01)):  # replicate mean = a
                    for name, v in (("removed", g), ("test_idx", t), ("actual", a + noise), ("mode", "random_group"),
                                    ("replicate", rep)):
                        ret[name].append(v)
        write_part(store, exp, "stats", cid, "stats", stats)
        write_part(store, exp, "retrain", cid, "retrain", ret)
    con = connect(store, exp)
    f = {g.name: g for g in findings(con)}
    assert not {"depth", "width", "weight_decay", "highest_vs_median"} & set(f)
    g = f["group"]
    assert g.effect == pytest.approx(np.mean(list(gaps.values()))) and g.lo > 0 and g.holds is True
    assert "7 of 8" in g.detail and g.n_cells == 8 and math.isnan(g.ceiling)
    assert "ceiling unknown" in finding_sentence(g)
    md = findings_markdown(list(f.values()), "groups")
    assert "- depth: not answered; it needs MLP configurations at two or more depths" in md
    assert "group: not answered" not in md


def test_an_empty_store_has_no_findings(tmp_path):
    con = connect(open_store(str(tmp_path)), "empty")
    assert findings(con) == []
    assert "No finding" in findings_markdown([], "empty")
    assert findings_table([]).num_rows == 0
    assert isinstance(Finding, type)
