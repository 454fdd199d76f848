"""`fragile query` reads the experiment's tables and nothing else: no local files, no writes, no extensions,
no settings. Each attempt is one message and exit code 2; ordinary SQL (on a local folder and on S3) works."""
from __future__ import annotations

import pytest

from fragile.cli import main
from storage.query import QueryRefused, query
from storage.tables import write_part

EXP = "iris"


@pytest.fixture
def filled(store):
    write_part(store, EXP, "test_points", "c1", "test_points",
               {"test_idx": [4, 9], "loss": [0.5, 2.5], "label": [0, 1], "selection": ["median", "highest"]})
    return store


def test_the_tables_can_still_be_queried(filled):
    result = query("select selection, loss from test_points order by loss", filled, EXP)
    assert result.to_pylist() == [{"selection": "median", "loss": 0.5}, {"selection": "highest", "loss": 2.5}]
    # In-memory scratch work is reading, not writing: temporary tables are fine.
    query("create temp table t as select 1 as x", filled, EXP)


@pytest.mark.parametrize("sql", [
    "select * from read_text('/etc/hostname')",
    "select * from read_csv('/etc/passwd')",
    "copy (select * from test_points) to '{out}'",
    "attach '{out}' as other",
    "install httpfs",
    "load httpfs",
    "set enable_external_access = true",
])
def test_reaching_outside_the_tables_is_refused(filled, tmp_path, capsys, sql):
    out = tmp_path / "leak.csv"
    with pytest.raises(QueryRefused, match="query refused"):
        query(sql.format(out=out), filled, EXP)
    assert main(["query", sql.format(out=out), "--store", filled.uri, "--experiment", EXP]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "reads the tables of experiment" in err
    assert not out.exists()


def test_a_file_named_as_a_table_is_not_read(filled, capsys):
    """DuckDB's "a quoted path is a table" shortcut is off with file access: it is just an unknown table."""
    assert main(["query", "select * from '/etc/hostname'", "--store", filled.uri, "--experiment", EXP]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "test_points" in err
