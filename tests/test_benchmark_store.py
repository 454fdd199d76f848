"""benchmarks/store.py at toy size: its synthetic run is shaped like the tasks' output, and every phase reads
back what it wrote, on a local folder and on S3 (the ``store`` fixture)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from storage import tables

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "store.py"
_spec = importlib.util.spec_from_file_location("benchmark_store", _PATH)
bench = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look the module up
_spec.loader.exec_module(bench)

SHAPE = bench.Shape(configs=2, n_train=20, test_points=17, methods=("exact", "cg"), chunk=8, controls=3)


@pytest.fixture(scope="module")
def run():
    return [bench.make_config(SHAPE, i, "bench") for i in range(SHAPE.configs)]


def test_chunk_sizes_are_those_of_the_tasks():
    from dataclasses import fields

    from jobs.spec import Configuration

    defaults = {f.name: f.default for f in fields(Configuration)}
    assert bench.TEST_CHUNK == defaults["test_chunk"]
    assert bench.make_parser().get_default("chunk") == defaults["retrain_chunk"]


def test_the_synthetic_run_is_cut_as_the_tasks_cut_it(run):
    cfg = run[0]
    assert [p.name for p in cfg.retrain] == ["retrain-00000", "retrain-00001", "retrain-00002"]  # 8 + 8 + 4
    assert [p.name for p in cfg.influence] == ["exact-000", "exact-001", "cg-000", "cg-001"]  # 16 + 1 test points
    first, last = cfg.retrain[0].rows, cfg.retrain[-1].rows
    assert len(first["removed"]) == (3 + 8) * 17  # one row per (removal or control, test point)
    assert sorted(set(first["removed"])) == [-3, -2, -1, *range(8)]
    assert sorted(set(last["removed"])) == list(range(16, 20))
    assert first["mode"].count("control") == 3 * 17
    stats = cfg.stats.rows
    assert set(stats["n"]) == {SHAPE.n_train} and all(stats["final"])
    assert len(stats["method"]) == len(SHAPE.methods) * SHAPE.test_points
    for part in cfg.parts():  # every part conforms to its table's schema
        tables._conform(part.table, part.rows, part.config_id)


def test_every_phase_reads_back_what_was_written(store, run):
    phases = bench.table_phases(store, "bench", run, threads=2)
    for phase in phases.values():
        phase()  # each raises AssertionError when what it read differs from what was written
    files = bench.phase_files(store, "bench", list(phases))
    assert files["write"][0] == sum(len(cfg.parts()) for cfg in run)


def test_landings_on_both_stores(s3_env, tmp_path, run, capsys):
    import uuid

    from storage.uri import open_store

    backends = {"local": open_store(str(tmp_path / "local")),
                "S3": open_store(f"s3://{s3_env.bucket}/{uuid.uuid4().hex[:12]}/landings")}
    bench.bench_landings(backends, run, landings=4)
    out = capsys.readouterr().out
    assert "write start → ingest returned" in out
