"""Result tables and the ledger: round trips, validation messages, atomic and idempotent part writes.

Every test taking ``store`` runs twice (conftest): on a local folder and on a fresh prefix of a real S3
server; the assertions are the same on both.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from storage.ledger import Ledger
from storage.tables import (
    TABLES, dataset, delete_part, part_exists, part_path, read_part, read_table, table_dir, table_schema, write_part,
)
from storage.uri import StoreError, open_store

EXP = "iris"


def _files(store, folder: str) -> list[str]:
    infos = store.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True, recursive=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def _influence(n: int = 3, offset: float = 0.0) -> dict[str, list]:
    return {"method": ["cg"] * n, "test_idx": [7] * n, "train_idx": list(range(n)),
            "estimate": [offset + i for i in range(n)], "diverged": [False] * n}


def test_every_table_has_its_contract_columns():
    assert set(TABLES) == {"configs", "models", "test_points", "influence", "retrain", "stats", "subsets"}
    for table, schema in TABLES.items():
        assert "config_id" not in schema.names, table
        assert table_schema(table).names[0] == "config_id"
        assert table_schema(table).field("config_id").type == pa.string()
    assert TABLES["retrain"].field("removed").type == pa.int64()
    assert TABLES["stats"].field("final").type == pa.bool_()
    assert TABLES["subsets"].field("left_out").type == pa.list_(pa.int64())


def test_layout_and_part_names(store):
    path = part_path(store, EXP, "retrain", "0123456789ab", "retrain-00003")
    assert path == f"{store.root}/{EXP}/retrain/config_id=0123456789ab/retrain-00003.parquet"
    assert table_dir(store, EXP, "retrain") == f"{store.root}/{EXP}/retrain"
    for bad in ["a/b", ".hidden", "_meta", "", "x.parquet"]:
        with pytest.raises(StoreError, match="part"):
            part_path(store, EXP, "retrain", "abc", bad)
    with pytest.raises(StoreError, match="config_id"):
        part_path(store, EXP, "retrain", "../x", "p")
    with pytest.raises(StoreError, match="unknown table 'retrains'"):
        part_path(store, EXP, "retrains", "abc", "p")


def test_write_then_read_round_trips_and_adds_config_id(store):
    path = write_part(store, EXP, "influence", "000123", "influence-cg-0000", _influence())
    write_part(store, EXP, "influence", "0123456789ab", "influence-cg-0000", _influence(offset=10))
    assert part_exists(store, EXP, "influence", "000123", "influence-cg-0000")
    assert not part_exists(store, EXP, "influence", "000123", "influence-cg-0001")

    table = read_table(store, EXP, "influence")
    assert table.schema.names == table_schema("influence").names
    assert table.schema.field("config_id").type == pa.string()  # never inferred as an integer
    assert sorted(set(table.column("config_id").to_pylist())) == ["000123", "0123456789ab"]
    rows = read_table(store, EXP, "influence", config_ids=["000123"]).to_pylist()
    assert [r["estimate"] for r in rows] == [0.0, 1.0, 2.0]
    assert rows[0]["config_id"] == "000123" and rows[0]["method"] == "cg" and rows[0]["diverged"] is False
    assert rows[0]["residual"] is None  # absent nullable column -> nulls

    one = read_part(store, path)
    assert one.schema == read_table(store, EXP, "influence").schema
    assert one.column("config_id").to_pylist() == ["000123"] * 3


def test_parquet_files_do_not_store_config_id(store):
    import pyarrow.parquet as pq

    path = write_part(store, EXP, "test_points", "abc", "select", {"test_idx": [1], "loss": [0.5]})
    with store.fs.open_input_file(path) as src:
        assert "config_id" not in pq.read_schema(src).names


def test_arrow_numpy_and_read_back_tables_are_accepted(store):
    rows = pa.table({"test_idx": pa.array([1, 2], pa.int32()), "loss": np.array([0.5, 1.5])})
    write_part(store, EXP, "test_points", "abc", "a", rows)
    # A table read back carries config_id; writing it again to the same id is allowed.
    again = read_table(store, EXP, "test_points")
    write_part(store, EXP, "test_points", "abc", "b", again)
    assert read_table(store, EXP, "test_points").num_rows == 4
    with pytest.raises(StoreError, match="config_id"):
        write_part(store, EXP, "test_points", "other", "c", again)


def test_unknown_column_and_wrong_type_are_named(store):
    with pytest.raises(StoreError, match=r"unknown column\(s\) \['estimat'\]"):
        write_part(store, EXP, "influence", "abc", "p", {**_influence(), "estimat": [1.0, 2.0, 3.0]})
    with pytest.raises(StoreError, match="column 'test_idx' must be int64"):
        write_part(store, EXP, "influence", "abc", "p", {**_influence(), "test_idx": ["a", "b", "c"]})
    with pytest.raises(StoreError, match="column 'train_idx' must be int64"):
        write_part(store, EXP, "influence", "abc", "p", {**_influence(), "train_idx": [0.5, 1.0, 2.0]})
    with pytest.raises(StoreError, match="column 'test_idx' must be int64: got string"):
        write_part(store, EXP, "influence", "abc", "p", {**_influence(), "test_idx": ["1", "2", "3"]})
    with pytest.raises(StoreError, match="column 'method' must be string: got int64"):
        write_part(store, EXP, "influence", "abc", "p", {**_influence(), "method": [1, 2, 3]})
    with pytest.raises(StoreError, match="column 'diverged' must be bool"):
        write_part(store, EXP, "influence", "abc", "p", {**_influence(), "diverged": [0, 1, 0]})
    with pytest.raises(StoreError, match="column 'estimate' must be a sequence"):
        write_part(store, EXP, "influence", "abc", "p", {**_influence(), "estimate": 1.0})
    with pytest.raises(StoreError, match="key column 'train_idx' has 1 null"):
        write_part(store, EXP, "influence", "abc", "p", {**_influence(), "train_idx": [0, None, 2]})
    with pytest.raises(StoreError, match="missing key column 'method'"):
        write_part(store, EXP, "influence", "abc", "p", {"test_idx": [1], "train_idx": [2]})
    with pytest.raises(StoreError, match="different lengths"):
        write_part(store, EXP, "influence", "abc", "p", {**_influence(), "estimate": [1.0]})
    # None of the failed writes left anything behind, not even a temporary file.
    assert _files(store, table_dir(store, EXP, "influence")) == []


def test_tensors_and_lossless_numbers_are_accepted(store):
    torch = pytest.importorskip("torch")
    write_part(store, EXP, "influence", "abc", "p", {
        "method": pa.array(["cg"] * 3).dictionary_encode(), "test_idx": np.array([7.0, 7.0, 7.0]),
        "train_idx": torch.arange(3), "estimate": torch.tensor([0.5, 1.5, 2.5], dtype=torch.float32),
    })
    rows = read_table(store, EXP, "influence").to_pylist()
    assert [(r["method"], r["test_idx"], r["train_idx"], r["estimate"]) for r in rows] == [
        ("cg", 7, 0, 0.5), ("cg", 7, 1, 1.5), ("cg", 7, 2, 2.5)]


def test_writing_a_part_twice_replaces_it(store):
    write_part(store, EXP, "influence", "abc", "p", _influence(3))
    write_part(store, EXP, "influence", "abc", "p", _influence(2, offset=5))
    assert _files(store, table_dir(store, EXP, "influence")) == ["p.parquet"]
    assert read_table(store, EXP, "influence").column("estimate").to_pylist() == [5.0, 6.0]


def test_delete_part_and_read_part_errors(store):
    path = write_part(store, EXP, "stats", "abc", "running", {"method": ["cg"], "test_idx": [1], "snapshot": [3]})
    assert delete_part(store, EXP, "stats", "abc", "running") is True
    assert delete_part(store, EXP, "stats", "abc", "running") is False
    with pytest.raises(StoreError, match="no part at"):
        read_part(store, path)
    with pytest.raises(StoreError, match="is not a part"):
        read_part(store, store.path(EXP, "checkpoints", "m.pt"))


def test_an_empty_part_records_a_task_with_no_rows(store):
    write_part(store, EXP, "retrain", "abc", "retrain-00000", {})
    assert read_table(store, EXP, "retrain").num_rows == 0
    assert Ledger(store, EXP).done("retrain", "abc", "retrain-00000")


def test_failure_while_moving_in_place_leaves_no_temp_file(tmp_path):
    # Local only: S3 has no move. A non-empty folder where the part should go makes the final move fail
    # after the temp file is written.
    store = open_store(str(tmp_path / "results"))
    path = part_path(store, EXP, "influence", "abc", "p")
    store.fs.create_dir(path + "/blocker", recursive=True)
    with store.fs.open_output_stream(path + "/blocker/x") as out:
        out.write(b"x")
    with pytest.raises(OSError) as info:
        write_part(store, EXP, "influence", "abc", "p", _influence())
    assert any(path in note for note in getattr(info.value, "__notes__", []))
    assert _files(store, path.rsplit("/", 1)[0]) == ["x"]  # only the blocker's own file


def test_absent_table_reads_empty_with_full_schema(store):
    table = read_table(store, "never-run", "stats")
    assert table.num_rows == 0 and table.schema == table_schema("stats")
    assert dataset(store, "never-run", "stats") is None
    assert read_table(store, EXP, "stats", config_ids=[]).num_rows == 0


def test_leftover_temp_files_are_ignored(store):
    write_part(store, EXP, "influence", "abc", "p", _influence())
    folder = part_path(store, EXP, "influence", "abc", "p").rsplit("/", 1)[0]
    # What a writer killed between write and move leaves behind: half a file under a hidden name.
    for name in [".p.tmp-0123.parquet", ".q.tmp-4567.parquet", "_SUCCESS"]:
        with store.fs.open_output_stream(f"{folder}/{name}") as out:
            out.write(b"PAR1 half a file")
    assert read_table(store, EXP, "influence").num_rows == 3
    ledger = Ledger(store, EXP)
    assert ledger.parts("influence", "abc") == ["p"]
    assert not ledger.done("influence", "abc", "q")


def test_ledger_lists_once_and_tracks_marks(store):
    write_part(store, EXP, "influence", "a1", "influence-cg-0000", _influence())
    write_part(store, EXP, "influence", "a2", "influence-cg-0001", _influence())
    write_part(store, EXP, "retrain", "a1", "retrain-00000", {"removed": [-1], "test_idx": [7]})
    ledger = Ledger(store, EXP)
    assert ledger.done("influence", "a1", "influence-cg-0000")
    assert not ledger.done("influence", "a1", "influence-cg-0001")
    assert ledger.parts("influence", "a1") == ["influence-cg-0000"]
    assert ledger.parts("influence") == ["influence-cg-0000", "influence-cg-0001"]
    assert ledger.config_ids("influence") == ["a1", "a2"]
    assert ledger.parts("stats") == [] and len(ledger) == 3

    # A part written elsewhere is seen after refresh; one written here can be marked without listing.
    write_part(store, EXP, "retrain", "a1", "retrain-00001", {"removed": [3], "test_idx": [7]})
    assert not ledger.done("retrain", "a1", "retrain-00001")
    ledger.mark("stats", "a1", "snapshot-0001")
    assert ledger.done("stats", "a1", "snapshot-0001")
    ledger.refresh()
    assert ledger.done("retrain", "a1", "retrain-00001")
    with pytest.raises(StoreError, match="unknown table"):
        ledger.done("retrains", "a1", "retrain-00001")


def test_ledger_uses_one_listing(store, monkeypatch):
    write_part(store, EXP, "influence", "a1", "p", _influence())
    calls = []

    class CountingFs:  # pyarrow filesystems cannot be monkeypatched, so wrap the one the store holds
        def get_file_info(self, what):
            calls.append(what)
            return store.fs.get_file_info(what)

    ledger = Ledger(type(store)(uri=store.uri, fs=CountingFs(), root=store.root), EXP)
    for i in range(50):
        ledger.done("influence", "a1", f"p{i}")
    assert len(calls) == 1 and calls[0].recursive


def test_ledger_of_absent_experiment_is_empty(store):
    ledger = Ledger(store, "nothing-here")
    assert ledger.parts("configs") == [] and len(ledger) == 0
    assert not ledger.done("models", "abc", "train")


class RecordingFs:
    """The store's filesystem, recording calls and failing some with an error pyarrow would raise on S3.

    (pyarrow filesystems cannot be monkeypatched, so the test wraps the one the store holds.)
    """

    def __init__(self, fs, fail: dict[str, int] | None = None,
                 error: str = "AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."):
        self.fs, self.calls, self.fail, self.error = fs, [], dict(fail or {}), error

    def __getattr__(self, name):
        target = getattr(self.fs, name)
        if not callable(target):
            return target  # type_name: the backend decides how write_atomic writes

        def call(*args, **kwargs):
            self.calls.append((name, args[0] if args else None))
            if self.fail.get(name):
                self.fail[name] -= 1
                raise OSError(f"When writing to '{args[0]}': {self.error}")
            return target(*args, **kwargs)
        return call


def _recorded(store, **kwargs):
    fs = RecordingFs(store.fs, **kwargs)
    return type(store)(uri=store.uri, fs=fs, root=store.root), fs


def test_a_part_is_put_whole_on_s3_and_renamed_into_place_locally(store):
    recording, fs = _recorded(store)
    path = write_part(recording, EXP, "influence", "abc", "p", _influence())
    if store.fs.type_name == "s3":
        # One PUT of the finished bytes to the final key: no temporary object, no copy, no folder marker.
        assert fs.calls == [("open_output_stream", path)]
    else:
        names = [name for name, _ in fs.calls]
        assert names == ["create_dir", "open_output_stream", "move"]
        temp = fs.calls[1][1]
        assert temp.rsplit("/", 1)[1].startswith(".p.tmp-") and fs.calls[2][1] == temp
    assert read_part(store, path).num_rows == 3
    assert _files(store, table_dir(store, EXP, "influence")) == ["p.parquet"]


def test_transient_errors_are_retried_by_part_writes_and_reads(store):
    recording, fs = _recorded(store, fail={"open_output_stream": 2, "open_input_stream": 2})
    path = write_part(recording, EXP, "influence", "abc", "p", _influence())
    assert read_part(recording, path).column("estimate").to_pylist() == [0.0, 1.0, 2.0]
    names = [name for name, _ in fs.calls]
    assert names.count("open_output_stream") == 3 and names.count("open_input_stream") == 3
    assert _files(store, table_dir(store, EXP, "influence")) == ["p.parquet"]  # no temp file left by a failure


def test_permanent_errors_are_not_retried(store):
    recording, fs = _recorded(store, fail={"open_output_stream": 1},
                              error="AWS Error ACCESS_DENIED during PutObject operation: Access Denied")
    with pytest.raises(OSError, match="ACCESS_DENIED") as info:
        write_part(recording, EXP, "influence", "abc", "p", _influence())
    assert [name for name, _ in fs.calls].count("open_output_stream") == 1
    assert any("while writing" in note and "p.parquet" in note for note in info.value.__notes__)
