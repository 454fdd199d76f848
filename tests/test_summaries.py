"""Summaries leave out what they say they leave out: a study of three seeds where one seed's network collapsed
to a constant predictor and one seed's CG solve diverged for one test point. Every summary (the end-of-run
tables, `fragile report`'s summary, the figure's points, the per-configuration line) must average the valid
cells only and count the others apart."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import yaml

from influence.metrics import pearson, spearman
from jobs.records import write_configs
from jobs.report import summary, summary_tables
from jobs.spec import load_spec
from jobs.stats import StatsBook, summarise
from storage import tables
from storage.query import connect
from storage.uri import open_store

N = 12  # training points
METHODS = ("exact", "cg")
TEST_POINTS = [(0, "highest"), (1, "median")]
COLLAPSED_SEED, DIVERGED_SEED = 2, 1


def _spec(tmp_path):
    doc = {
        "experiment": "summaries", "data": {"name": "iris"},
        "model": {"family": "mlp", "depth": 1, "width": 5, "activation": "tanh"},
        "train": {"optimizer": "adam", "lr": 0.01, "epochs": 10, "weight_decay": 0.005, "seed": 0},
        "influence": {"methods": list(METHODS)},
        "ground_truth": {"removals": "all", "epochs": 5, "controls": 3},
        "sweep": [{"depth": [1], "seed": [0, 1, 2]}],
    }
    path = tmp_path / "summaries.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_spec(path)


def _rows(seed: int):
    """Influence and retrain rows of one configuration with known correlations (seed-dependent noise)."""
    rng = np.random.default_rng(seed)
    inf = {k: [] for k in ("method", "test_idx", "train_idx", "estimate", "predicted_dtheta", "diverged", "science")}
    est = {t: rng.normal(size=N) for t, _ in TEST_POINTS}
    for m in METHODS:
        for t, _ in TEST_POINTS:
            diverged = seed == DIVERGED_SEED and m == "cg" and t == 0
            inf["method"] += [m] * N
            inf["test_idx"] += [t] * N
            inf["train_idx"] += list(range(N))
            inf["estimate"] += [math.nan] * N if diverged else list(est[t])
            inf["predicted_dtheta"] += list(np.abs(est[t]))
            inf["diverged"] += [diverged] * N
            inf["science"] += ["test"] * N
    ret = {k: [] for k in ("removed", "test_idx", "actual", "dtheta", "loss_retrained", "mode", "members", "science")}
    actual = {t: est[t] + rng.normal(scale=0.8, size=N) for t, _ in TEST_POINTS}
    for t, _ in TEST_POINTS:
        for r in range(-3, N):
            ret["removed"].append(r)
            ret["test_idx"].append(t)
            ret["actual"].append(0.0 if r < 0 else float(actual[t][r]))
            ret["dtheta"].append(0.0 if r < 0 else float(abs(actual[t][r])))
            ret["loss_retrained"].append(1.0 + 1e-9 * r if r < 0 else 1.0 + float(actual[t][r]))
            ret["mode"].append("control" if r < 0 else "warm")
            ret["members"].append(None)
            ret["science"].append("test")
    return pa.table(inf), pa.table(ret), est, actual


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("summaries")
    spec = _spec(tmp)
    store = open_store(str(tmp / "store"))
    configs = spec.configurations()
    write_configs(store, spec, configs, version="test")
    book, expected, lines = StatsBook(), {}, {}
    for cfg in configs:
        reason = "every training point gets the same prediction" if cfg.seed == COLLAPSED_SEED else None
        book.register(cfg.config_id, METHODS, TEST_POINTS, reason)
        inf, ret, est, actual = _rows(cfg.seed)
        book.ingest("influence", cfg.config_id, inf)
        book.ingest("retrain", cfg.config_id, ret)
        rows = book.rows(cfg.config_id, final=True)
        tables.write_part(store, spec.experiment, "stats", cfg.config_id, "final", rows)
        lines[cfg.seed] = summarise(rows)
        for t, sel in TEST_POINTS:
            expected[(cfg.seed, sel)] = (spearman(est[t], actual[t]), pearson(est[t], actual[t]))
    return spec, store, expected, lines


def _valid_mean(expected, selection, seeds, k):
    return float(np.mean([expected[(s, selection)][k] for s in seeds]))


def test_stats_rows_of_left_out_cells_carry_no_correlation(study):
    spec, store, _, _ = study
    stats = tables.read_table(store, spec.experiment, "stats").to_pylist()
    seed_of = {c.config_id: c.seed for c in spec.configurations()}
    for row in stats:
        seed = seed_of[row["config_id"]]
        collapsed = seed == COLLAPSED_SEED
        diverged = seed == DIVERGED_SEED and row["method"] == "cg" and row["test_idx"] == 0
        assert row["collapsed"] is collapsed and row["diverged"] is diverged
        if collapsed or diverged:
            # NaN in memory; a part stores it as null (undefined either way)
            assert all(row[k] is None or math.isnan(row[k]) for k in ("spearman", "pearson", "spearman_lo"))
            assert row["degenerate_reason"] and row["n"] == N
        else:
            assert row["spearman"] is not None and not math.isnan(row["spearman"])
            assert row["degenerate_reason"] is None


@pytest.mark.parametrize("source", ["console", "report"])
def test_summaries_average_valid_cells_and_count_the_rest(study, source):
    spec, store, expected, _ = study
    if source == "console":
        [(title, names, table)] = summary_tables(store, spec)
        assert names == ["selection", "method"]
    else:
        table = summary(connect(store, spec.experiment), [])
    # one summary: the same columns, named alike, for the console and for `fragile report`
    assert table.column_names == ["selection", "method", "spearman", "pearson", "dtheta_spearman", "min_snr",
                                  "median_snr", "ceiling", "spearman_corrected", "chance_share",
                                  "unreliable_share", "seeds_used", "seeds_run", "collapsed", "diverged"]
    got = {(r["selection"], r["method"]): r for r in table.to_pylist()}
    assert set(got) == {(sel, m) for _, sel in TEST_POINTS for m in METHODS}
    for (sel, m), r in got.items():
        diverged_here = m == "cg" and sel == "highest"
        seeds = [0] if diverged_here else [0, 1]
        assert r["spearman"] == pytest.approx(_valid_mean(expected, sel, seeds, 0), abs=1e-12)
        assert r["pearson"] == pytest.approx(_valid_mean(expected, sel, seeds, 1), abs=1e-12)
        assert (r["seeds_used"], r["seeds_run"], r["collapsed"], r["diverged"]) == (
            len(seeds), 3, 1, 1 if diverged_here else 0)


def test_console_summary_shows_seeds_used_of_run(study, capsys):
    from rich.console import Console

    from fragile.printing import print_summary as _print_summary

    spec, store, expected, _ = study
    [(title, names, table)] = summary_tables(store, spec)
    _print_summary(Console(width=80), title, names, table)
    out = capsys.readouterr().out
    cg_highest = next(line for line in out.splitlines() if "highest" in line and " cg " in line)
    assert "1/3" in cg_highest.split() and cg_highest.split()[-2:] == ["1", "1"]
    exact_highest = next(line for line in out.splitlines() if "highest" in line and " exact " in line)
    assert "2/3" in exact_highest.split()
    assert f"{_valid_mean(expected, 'highest', [0, 1], 0):.2f}" in exact_highest.split()
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80


def test_figure_points_leave_out_the_same_cells(study):
    from jobs.figures import figure_data

    spec, store, expected, _ = study
    points = {(p["selection"], p["method"]): p for p in figure_data(connect(store, spec.experiment), "depth", "width")}
    assert points[("highest", "exact")]["mean"] == pytest.approx(_valid_mean(expected, "highest", [0, 1], 0))
    assert points[("highest", "cg")]["mean"] == pytest.approx(expected[(0, "highest")][0])
    assert points[("highest", "cg")]["collapsed"] >= 1 and points[("highest", "cg")]["diverged"] == 1


def test_per_configuration_line_says_what_was_left_out(study):
    _, _, _, lines = study
    assert lines[COLLAPSED_SEED]["collapsed"] == 1.0 and math.isnan(lines[COLLAPSED_SEED]["spearman_mean"])
    assert lines[DIVERGED_SEED]["diverged"] == 1.0 and math.isnan(lines[DIVERGED_SEED]["spearman/cg/highest"])
    assert lines[0]["collapsed"] == 0.0 and lines[0]["diverged"] == 0.0


def test_flags_alone_and_rows_of_older_stores_leave_cells_out(tmp_path):
    """The summaries do not rely on the NaNs StatsBook writes: a row flagged collapsed with a finite Spearman,
    and a row of a store written before the flags existed (flags null, the reason set), are left out too."""
    spec = _spec(tmp_path)
    store = open_store(str(tmp_path / "store"))
    configs = spec.configurations()
    write_configs(store, spec, configs, version="test")
    rows = {0: (0.5, None, None, None), 1: (0.9, None, None, "every training point gets the same prediction"),
            2: (0.99, True, False, "every training point gets the same prediction")}
    for cfg in configs:
        rho, collapsed, diverged, reason = rows[cfg.seed]
        tables.write_part(store, spec.experiment, "stats", cfg.config_id, "final", {
            "method": ["exact", "cg"], "test_idx": [0, 0], "snapshot": [1, 1], "selection": ["highest"] * 2,
            "spearman": [rho, -0.7 if cfg.seed == 0 else rho], "pearson": [rho, rho], "final": [True, True],
            "collapsed": [collapsed, collapsed], "diverged": [diverged, None],
            "degenerate_reason": [reason, "the cg solve diverged for this test point" if cfg.seed == 0 else reason]})
    got = {r["method"]: r for r in summary(connect(store, spec.experiment), []).to_pylist()}
    assert got["exact"]["spearman"] == pytest.approx(0.5)
    assert (got["exact"]["seeds_used"], got["exact"]["collapsed"], got["exact"]["diverged"]) == (1, 2, 0)
    assert got["cg"]["spearman"] is None  # seed 0's cg solve diverged (an old row: only its reason says so)
    assert (got["cg"]["seeds_used"], got["cg"]["collapsed"], got["cg"]["diverged"]) == (0, 2, 1)
