"""SQL over the result tables: one view per table, known aggregates, empty tables, helpful errors.

Each test runs on a local folder and on S3 (the ``store`` fixture of conftest): DuckDB reads both through
pyarrow datasets, so the answers must be identical.
"""
from __future__ import annotations

import pytest

from storage.query import QueryError, connect, experiments, query
from storage.tables import TABLES, table_schema, write_part
from storage.uri import open_store

EXP = "iris"


@pytest.fixture
def filled(store):
    # Two configurations, each with two influence parts: estimates chosen so the sums are known.
    for config_id, depth in [("000001", 1), ("000002", 2)]:
        write_part(store, EXP, "configs", config_id, "config",
                   {"spec_hash": ["h"], "config": ['{"depth": %d}' % depth], "depth": [depth]})
        for chunk in range(2):
            write_part(store, EXP, "influence", config_id, f"influence-cg-{chunk:04d}", {
                "method": ["cg", "exact"], "test_idx": [chunk, chunk], "train_idx": [0, 0],
                "estimate": [depth * 1.0, depth * 10.0],
            })
    return store


def test_one_view_per_table_with_the_full_schema(filled):
    con = connect(filled, EXP)
    for table in TABLES:
        result = con.sql(f"select * from {table} limit 0").to_arrow_table()
        assert result.schema.names == table_schema(table).names, table
    con.close()


def test_group_by_gives_known_sums_and_averages(filled):
    result = query(
        "select c.depth, i.method, sum(i.estimate) as total, avg(i.estimate) as mean, count(*) as n "
        "from influence i join configs c using (config_id) group by all order by all", filled, EXP)
    assert result.to_pylist() == [
        {"depth": 1, "method": "cg", "total": 2.0, "mean": 1.0, "n": 2},
        {"depth": 1, "method": "exact", "total": 20.0, "mean": 10.0, "n": 2},
        {"depth": 2, "method": "cg", "total": 4.0, "mean": 2.0, "n": 2},
        {"depth": 2, "method": "exact", "total": 40.0, "mean": 20.0, "n": 2},
    ]


def test_config_ids_stay_strings_in_sql(filled):
    result = query("select distinct config_id from influence where config_id = '000001'", filled, EXP)
    assert result.column("config_id").to_pylist() == ["000001"]


def test_absent_table_gives_zero_rows(filled):
    assert query("select method, avg(spearman) from stats group by all", filled, EXP).num_rows == 0
    assert query("select count(*) as n from retrain", filled, "never-run").to_pylist() == [{"n": 0}]


def test_bad_sql_names_the_tables_and_columns(filled):
    with pytest.raises(QueryError) as info:
        query("select spearmann from stats", filled, EXP)
    message = str(info.value)
    assert "spearmann" in message and "select spearmann from stats" in message
    for table in TABLES:
        assert f"  {table} (" in message
    assert "influence (4 part(s)): config_id, method, test_idx" in message
    with pytest.raises(QueryError, match="Parser"):
        query("selec 1", filled, EXP)


def test_experiments_lists_folders(filled):
    write_part(filled, "digits", "stats", "x", "s", {"method": ["cg"], "test_idx": [1], "snapshot": [0]})
    filled.fs.create_dir(filled.path(".hidden"))  # on S3: an empty ".hidden/" marker object
    assert experiments(filled) == ["digits", "iris"]
    assert experiments(open_store(filled.uri + "-absent", create=False)) == []
