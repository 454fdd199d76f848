"""The report figure's points, from a real (tiny) store: collapsed, diverged and undefined cells are left out
of every mean and counted, a point is the mean over seeds with a t-interval (one seed: its Fisher-z
interval), and the configurations are those at the most common value of the other axis."""
from __future__ import annotations

import math

import pytest
from scipy import stats as st

from jobs.figures import figure_data, spearman_figure
from storage.query import connect
from storage.tables import write_part
from storage.uri import open_store

EXP = "fig"
SEEDS = (0, 1, 2)
TESTS = {0: "highest", 1: "median"}


def _rho(depth, seed, method, test_idx):
    return 0.1 * depth + 0.05 * seed + (0.02 if method == "cg" else 0.0) - 0.3 * test_idx


# (depth, seed, method, test_idx) -> overrides of that cell's stats row
SPECIAL = {
    (1, 2, "exact", 0): {"spearman": -0.99, "collapsed": True},  # absurd value of a collapsed network
    (2, 1, "cg", 1): {"spearman": -0.5, "diverged": True},       # a diverged solve
    (2, 1, "exact", 1): {"spearman": float("nan")},              # undefined (e.g. constant estimates)
    (2, 2, "exact", 1): {"spearman": None},
    (2, 0, "exact", 1): {"spearman_lo": 0.05, "spearman_hi": 0.6},  # the only seed left: its own interval
}


def _config(store, cid, depth, width, seed, wd=0.0):
    write_part(store, EXP, "configs", cid, "config",
               {"spec_hash": ["h"], "experiment": [EXP], "dataset": ["iris"], "model": ["mlp"],
                "depth": [depth], "width": [width], "weight_decay": [wd], "seed": [seed]})


def _stats(store, cid, rows):
    columns = {name: [r.get(name) for r in rows] for name in
               ("method", "test_idx", "snapshot", "selection", "spearman", "spearman_lo", "spearman_hi", "final",
                "collapsed", "diverged")}
    write_part(store, EXP, "stats", cid, "stats", columns)


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    store = open_store(str(tmp_path_factory.mktemp("figstore")))
    for depth in (1, 2):
        for seed in SEEDS:
            cid = f"d{depth}s{seed}"
            _config(store, cid, depth, 8, seed)
            rows = []
            for method in ("exact", "cg"):
                for test_idx, selection in TESTS.items():
                    rho = _rho(depth, seed, method, test_idx)
                    row = {"method": method, "test_idx": test_idx, "snapshot": 1, "selection": selection,
                           "spearman": rho, "spearman_lo": rho - 0.2, "spearman_hi": rho + 0.2, "final": True,
                           "collapsed": False, "diverged": False}
                    row |= SPECIAL.get((depth, seed, method, test_idx), {})
                    rows.append(row)
                    # a running snapshot, not final: never plotted
                    rows.append(row | {"snapshot": 0, "final": False, "spearman": 0.99, "collapsed": None})
            _stats(store, cid, rows)
    # One configuration at another width (not the most common one): left out of the depth figure.
    _config(store, "d1w14", 1, 14, 0)
    _stats(store, "d1w14", [{"method": "exact", "test_idx": 0, "snapshot": 1, "selection": "highest",
                             "spearman": -0.9, "final": True}])
    connection = connect(store, EXP)
    yield connection
    connection.close()


def _point(points, selection, method, x):
    (found,) = [p for p in points if (p["selection"], p["method"], p["x"]) == (selection, method, x)]
    return found


def _t(values):
    k = len(values)
    mean = sum(values) / k
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    half = st.t.ppf(0.975, k - 1) * sd / math.sqrt(k)
    return mean, mean - half, mean + half


def test_points_are_means_over_seeds_with_t_intervals(con):
    points = figure_data(con, "depth", "width")
    assert {p["other_value"] for p in points} == {8} and {p["wd"] for p in points} == {0.0}
    assert len(points) == 2 * 2 * 2  # selection x method x depth
    p = _point(points, "highest", "cg", 2)
    mean, lo, hi = _t([_rho(2, s, "cg", 0) for s in SEEDS])
    assert (p["n_seeds"], p["interval"]) == (3, "t over seeds")
    assert p["mean"] == pytest.approx(mean) and p["lo"] == pytest.approx(lo) and p["hi"] == pytest.approx(hi)
    assert (p["collapsed"], p["diverged"], p["undefined"]) == (0, 0, 0)


def test_collapsed_and_diverged_cells_are_left_out_and_counted(con):
    points = figure_data(con, "depth", "width")
    collapsed = _point(points, "highest", "exact", 1)  # seed 2 collapsed with -0.99
    mean, lo, hi = _t([_rho(1, 0, "exact", 0), _rho(1, 1, "exact", 0)])
    assert mean == pytest.approx(0.125)
    assert collapsed["mean"] == pytest.approx(mean) and collapsed["n_seeds"] == 2
    assert (collapsed["lo"], collapsed["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert (collapsed["collapsed"], collapsed["diverged"]) == (1, 0)

    diverged = _point(points, "median", "cg", 2)  # seed 1 diverged with -0.5
    assert diverged["mean"] == pytest.approx((_rho(2, 0, "cg", 1) + _rho(2, 2, "cg", 1)) / 2)
    assert (diverged["n_seeds"], diverged["collapsed"], diverged["diverged"]) == (2, 0, 1)
    # The other width's -0.9 and the running snapshots' 0.99 are in no mean.
    assert all(p["mean"] is None or p["hi"] < 0.99 for p in points)


def test_a_single_seed_shows_its_own_fisher_interval(con):
    p = _point(figure_data(con, "depth", "width"), "median", "exact", 2)  # seeds 1 and 2 undefined
    assert (p["n_seeds"], p["n_cells"], p["undefined"]) == (1, 1, 2)
    assert p["mean"] == pytest.approx(_rho(2, 0, "exact", 1))
    assert (p["lo"], p["hi"], p["interval"]) == (0.05, 0.6, "fisher-z (one seed)")


def test_the_figure_is_written_as_png(con, tmp_path):
    path = tmp_path / "spearman_by_depth.png"
    assert spearman_figure(con, EXP, "depth", "width", path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_axis_that_is_no_column_is_refused(con):
    with pytest.raises(ValueError, match="not a column of configs"):
        figure_data(con, "depth; drop table stats", "width")
