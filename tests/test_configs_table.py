"""The `configs` table carries every field of Configuration, and the report groups by any swept axis.

The schema has a column per field, of the field's type; `write_configs` fills them all (a row read back equals
the configuration's `to_dict()` through the one conversion); a sweep over an axis that is not one of the first
stores' columns (`split_seed`, `batch_size`) is reported by it, in the end-of-run tables, in `fragile report`'s
summary.csv and in SQL; and a store written before these columns existed still reads and reports. Stores are
built as tests/test_summaries.py builds them: `write_configs`, then `stats` rows written directly."""
from __future__ import annotations

import json
from dataclasses import fields

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from jobs.records import column_value, write_configs
from jobs.report import summary_tables, varying_axes, write_report
from jobs.spec import Configuration, parse_spec
from storage import tables
from storage.query import connect, query
from storage.uri import open_store, write_atomic

# The columns of the first stores, names and types exactly (old parts have these and no others).
FIRST_COLUMNS = {
    "spec_hash": pa.string(), "version": pa.string(), "experiment": pa.string(), "config": pa.string(),
    "dataset": pa.string(), "model": pa.string(), "depth": pa.int64(), "width": pa.int64(),
    "activation": pa.string(), "weight_decay": pa.float64(), "lr": pa.float64(), "epochs": pa.int64(),
    "seed": pa.int64(), "retrain_epochs": pa.int64(), "damping": pa.float64(), "methods": pa.string(),
    "science": pa.string(),
}
# A field's annotation (without "| None") -> its column type; any other annotation (rules, settings, classes)
# is stored as canonical JSON, a string.
_TYPES = {"int": pa.int64(), "float": pa.float64(), "float | int": pa.float64(), "bool": pa.bool_(),
          "str": pa.string()}


def _column_type(annotation: str) -> pa.DataType:
    return _TYPES.get(annotation.replace(" | None", ""), pa.string())


# ---- (a) the schema --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", fields(Configuration), ids=lambda f: f.name)
def test_every_configuration_field_has_its_column(field):
    schema = tables.TABLES["configs"]
    assert field.name in schema.names, (
        f"Configuration.{field.name} has no column in TABLES['configs'] (storage/tables.py): add "
        f"({field.name!r}, {_column_type(str(field.type))})")
    assert schema.field(field.name).type == _column_type(str(field.type)), field.name


def test_the_first_columns_keep_their_names_and_types():
    schema = tables.TABLES["configs"]
    assert {name: schema.field(name).type for name in FIRST_COLUMNS} == FIRST_COLUMNS
    assert not schema.field("spec_hash").nullable
    extra = set(schema.names) - {f.name for f in fields(Configuration)}
    assert extra == {"spec_hash", "version", "config", "science"}  # bookkeeping only


# ---- (b) write_configs round-trips every field -----------------------------------------------------------------

EVERYTHING = {
    "experiment": "everything",
    "data": {"name": "imagenet", "test_fraction": 0.25, "split_seed": 3, "root": "/nowhere/imagenet",
             "test_subset": 20, "per_class": 5, "image_size": 32},
    "model": {"family": "resnet18"},
    "train": {"optimizer": "sgd", "lr": 0.1, "epochs": 10, "weight_decay": 0.001, "seed": 2, "momentum": 0.5,
              "batch_size": 64, "schedule": "cosine", "mixed_precision": True, "dtype": "float32"},
    "influence": {"methods": ["exact", "cg", "lissa"], "damping": 0.1, "damping_policy": "always",
                  "test_chunk": 8, "grad_chunk": 256, "lissa": {"scale": 10}},
    "test_points": [{"highest": 2}, {"explicit": [1, 4]}],
    "ground_truth": {"removals": [{"top_k": 5}, {"random": 3}], "start": "scratch", "lr": 0.05, "controls": 2,
                     "perturbation": 0.0, "chunk": 32},
    # classes as a count and as names, subset as a fraction and as a count
    "sweep": {"classes": [3, ["n01", "n02"]], "subset": [0.5, 100]},
}


@pytest.mark.parametrize("doc", [EVERYTHING, {"experiment": "defaults"}], ids=["every-field-set", "defaults"])
def test_write_configs_round_trips_every_field(tmp_path, doc):
    spec = parse_spec(doc)
    store = open_store(str(tmp_path))
    configs = spec.configurations()
    write_configs(store, spec, configs, version="1.2.3")
    rows = {r["config_id"]: r for r in tables.read_table(store, spec.experiment, "configs").to_pylist()}
    assert set(rows) == {c.config_id for c in configs}
    for cfg in configs:
        row, d = rows[cfg.config_id], cfg.to_dict()
        for f in fields(Configuration):
            if f.name == "ground_truth":  # the name rows record (loo_warm, loo_scratch, ...), not the field's "loo"
                assert row[f.name] == cfg.truth and d[f.name] == "loo"
                continue
            assert row[f.name] == column_value(f.name, d[f.name]), f.name
            if isinstance(d[f.name], (dict, list)) and f.name != "methods" and d[f.name] != {}:
                assert json.loads(row[f.name]) == d[f.name] == json.loads(row["config"])[f.name], f.name
        # the columns of the first stores, as they always were
        assert row["methods"] == ",".join(cfg.methods) and row["config"] == cfg.canonical_json()
        assert (row["spec_hash"], row["version"], row["experiment"]) == (spec.spec_hash, "1.2.3", spec.experiment)
        assert row["retrain_epochs"] == cfg.retrain_epochs and row["retrain_lr"] == cfg.retrain_lr
    if doc is EVERYTHING:
        assert {r["subset"] for r in rows.values()} == {0.5, 100.0}
        assert {r["classes"] for r in rows.values()} == {"3", '["n01","n02"]'}
        assert {r["mixed_precision"] for r in rows.values()} == {True}
    else:
        assert all(rows[c.config_id][name] is None for c in configs for name in ("subset", "batch_size", "classes"))


# ---- (c) the report groups by any swept axis -------------------------------------------------------------------

def _study(tmp_path, name: str, sweep: dict, rho) -> tuple:
    """A store of the configurations of `sweep` (seeds 0 and 1 added), each with one final stats row per method
    and test point whose Spearman is rho(cfg)."""
    spec = parse_spec({"experiment": name, "influence": {"methods": ["exact", "cg"]},
                       "sweep": sweep | {"seed": [0, 1]}})
    store = open_store(str(tmp_path / "store"))
    write_configs(store, spec, spec.configurations(), version="test")
    for cfg in spec.configurations():
        _stats(store, spec.experiment, cfg.config_id, rho(cfg))
    return spec, store


def _stats(store, experiment: str, config_id: str, rho: float) -> None:
    tables.write_part(store, experiment, "stats", config_id, "final", {
        "method": ["exact", "cg", "exact", "cg"], "test_idx": [0, 0, 1, 1], "snapshot": [1] * 4,
        "selection": ["highest", "highest", "median", "median"], "spearman": [rho, rho, -rho, -rho],
        "pearson": [rho] * 4, "final": [True] * 4, "collapsed": [False] * 4, "diverged": [False] * 4})


AXES = {
    "split_seed": ([0, 1], "split seed", lambda c: 0.1 + 0.5 * c.split_seed + 0.01 * c.seed),
    "batch_size": ([None, 32], "batch size", lambda c: (0.2 if c.batch_size is None else 0.7) + 0.01 * c.seed),
}


@pytest.mark.parametrize("axis", AXES)
def test_report_by_a_swept_axis(tmp_path, axis):
    values, _, rho = AXES[axis]
    spec, store = _study(tmp_path, f"by-{axis.replace('_', '-')}", {axis: values}, rho)
    mean = {v: rho(Configuration(spec.experiment, **{axis: v})) + 0.005 for v in values}  # seeds 0, 1 averaged

    [(title, names, table)] = summary_tables(store, spec)
    assert names == [axis, "selection", "method"] and title == f"by {axis.replace('_', ' ')}"
    got = {(r[axis], r["selection"], r["method"]): r for r in table.to_pylist()}
    assert set(got) == {(v, sel, m) for v in values for sel in ("highest", "median") for m in ("exact", "cg")}
    for v in values:
        assert got[(v, "highest", "exact")]["spearman"] == pytest.approx(mean[v])
        assert got[(v, "median", "cg")]["spearman"] == pytest.approx(-mean[v])
        assert (got[(v, "highest", "cg")]["seeds_used"], got[(v, "highest", "cg")]["seeds_run"]) == (2, 2)

    assert varying_axes(connect(store, spec.experiment)) == [axis]
    files = write_report(store, spec.experiment, tmp_path / "report")
    csv = pacsv.read_csv(tmp_path / "report" / "summary.csv")
    assert csv.column_names == table.column_names  # the same summary, the same labels
    assert csv.num_rows == table.num_rows == 2 * 2 * 2
    by_value = {r[axis]: r["spearman"] for r in csv.to_pylist()
                if (r["selection"], r["method"]) == ("highest", "exact")}
    assert by_value == pytest.approx(mean)
    assert f"| {axis} | selection | method |" in (tmp_path / "report" / "summary.md").read_text()
    # no depth or width figure: they do not vary
    assert [p.name for p in files] == ["summary.csv", "summary.md", "findings.csv", "findings.md", "report.html"]

    sql = (f"select {axis}, avg(spearman) as rho from stats join configs using (config_id) "
           f"where method = 'exact' and selection = 'highest' group by all")
    got = {r[axis]: r["rho"] for r in query(sql, store, spec.experiment).to_pylist()}
    assert got == pytest.approx(mean)


@pytest.mark.parametrize("sweep, axes", [
    ({"epochs": [100, 200]}, ["epochs"]),              # retrain_epochs 6 and 12 follow epochs
    ({"lr": [0.01, 0.1]}, ["lr"]),                     # retrain_lr follows lr
    ({"retrain_epochs": [3, 9]}, ["retrain_epochs"]),  # swept at one value of epochs: an axis
    ({"epochs": [100, 200], "retrain_epochs": [3, 9]}, ["epochs", "retrain_epochs"]),
    ({"depth": [1, 2], "width": [4, 8]}, ["depth", "width"]),
])
def test_derived_axes_that_follow_their_source_are_not_grouped_by(tmp_path, sweep, axes):
    spec, store = _study(tmp_path, "derived", sweep, lambda c: 0.5)
    assert varying_axes(connect(store, spec.experiment)) == axes
    csv = pacsv.read_csv(write_report(store, spec.experiment, tmp_path / "report")[0])
    assert csv.column_names[:len(axes) + 2] == list(axes) + ["selection", "method"]


# ---- (d) a store written before the configs table had every field ----------------------------------------------

def _first_shape_part(store, spec, cfg) -> None:
    """The configs part of `cfg` as the first stores wrote it: the first columns only."""
    d = cfg.to_dict()
    row = {"spec_hash": spec.spec_hash, "version": "0.1", "experiment": spec.experiment,
           "config": cfg.canonical_json(), "methods": ",".join(d["methods"]), "science": "old"}
    row |= {name: d[name] for name in FIRST_COLUMNS if name not in row}
    table = pa.table({name: pa.array([row[name]], FIRST_COLUMNS[name]) for name in FIRST_COLUMNS})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = tables.part_path(store, spec.experiment, "configs", cfg.config_id, "config")
    write_atomic(store, path, sink.getvalue().to_pybytes())


def test_an_old_shape_configs_part_reads_and_reports(tmp_path):
    spec = parse_spec({"experiment": "old", "influence": {"methods": ["exact", "cg"]},
                       "sweep": {"depth": [1, 2], "seed": [0, 1]}})
    store = open_store(str(tmp_path / "store"))
    configs = spec.configurations()
    old, new = configs[:3], configs[3:]
    for cfg in old:
        _first_shape_part(store, spec, cfg)
    write_configs(store, spec, new, version="test")  # a store that holds both shapes
    for cfg in configs:
        _stats(store, spec.experiment, cfg.config_id, 0.1 * cfg.depth)

    path = tables.part_path(store, spec.experiment, "configs", old[0].config_id, "config")
    part = tables.read_part(store, path).to_pylist()[0]
    assert part["depth"] == old[0].depth and part["split_seed"] is None and part["optimizer"] is None
    rows = {r["config_id"]: r for r in tables.read_table(store, spec.experiment, "configs").to_pylist()}
    assert rows[old[0].config_id]["batch_size"] is None and rows[new[0].config_id]["optimizer"] == "adam"

    # optimizer is null in the old rows and "adam" in the new ones: not an axis (a Configuration always has one)
    assert varying_axes(connect(store, spec.experiment)) == ["depth"]
    [(_, names, table)] = summary_tables(store, spec)
    assert names == ["depth", "selection", "method"] and table.num_rows == 2 * 2 * 2
    csv = pacsv.read_csv(write_report(store, spec.experiment, tmp_path / "report")[0])
    assert csv.column_names[:3] == ["depth", "selection", "method"] and csv.num_rows == 8
    got = query("select split_seed, count(*) as n from configs group by all order by n", store, spec.experiment)
    assert got.to_pylist() == [{"split_seed": 0, "n": 1}, {"split_seed": None, "n": 3}]
