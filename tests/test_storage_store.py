"""Opening stores (URIs, errors, pickling) and checkpoints in the store (local and S3: ``store`` in conftest)."""
from __future__ import annotations

import pickle

import pyarrow.fs as pafs
import pytest
import torch

from storage.checkpoints import checkpoint_exists, checkpoint_path, load_checkpoint, save_checkpoint
from storage.ledger import Ledger
from storage.query import connect
from storage.tables import read_table
from storage.uri import Store, StoreError, open_store


def test_local_path_is_made_absolute_and_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store("results")
    assert store.uri == str(tmp_path / "results") == store.root
    assert isinstance(store.fs, pafs.LocalFileSystem)
    assert store.fs.get_file_info(store.root).type == pafs.FileType.Directory
    assert store.path("iris", "/stats/", "") == f"{store.root}/iris/stats"


def test_create_false_does_not_create(tmp_path):
    store = open_store(str(tmp_path / "absent"), create=False)
    assert store.fs.get_file_info(store.root).type == pafs.FileType.NotFound
    assert read_table(store, "x", "stats").num_rows == 0


def test_file_uri(tmp_path):
    store = open_store(f"file://{tmp_path}/with%20space")
    assert store.root == f"{tmp_path}/with space"
    assert store.uri == f"file://{tmp_path}/with space"
    assert store.fs.get_file_info(store.root).type == pafs.FileType.Directory
    with pytest.raises(StoreError, match="host"):
        open_store("file://somehost/data")


@pytest.mark.parametrize("uri,scheme", [("gs://b/p", "gs"), ("HDFS://x/y", "hdfs")])
def test_other_schemes_are_refused_by_name(uri, scheme):
    with pytest.raises(StoreError, match=f"{scheme}:// scheme.*s3://bucket/prefix"):
        open_store(uri)


def test_a_file_is_not_a_store(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        open_store(str(tmp_path / "file.txt"))
    with pytest.raises(StoreError, match="non-empty"):
        open_store("  ")


def test_store_pickles(tmp_path):
    store = open_store(f"file://{tmp_path}/r")
    again = pickle.loads(pickle.dumps(store))
    assert isinstance(again, Store) and again == store and again.path("a") == store.path("a")


def test_store_pickles_by_uri_on_both_backends(store):
    data = pickle.dumps(store)
    assert len(data) < 200 + len(store.uri)  # the URI and the name of the function that reopens it
    again = pickle.loads(data)
    assert again == store and again.fs.type_name == store.fs.type_name
    save_checkpoint(store, "iris", "m", {"epoch": 1})
    assert load_checkpoint(again, "iris", "m") == {"epoch": 1}


def test_checkpoint_round_trip(store):
    state = {"params": {"w": torch.randn(3, 2, dtype=torch.float64, requires_grad=True), "b": torch.zeros(2)},
             "config": {"depth": 2, "activation": "tanh", "lr": 0.1}, "epoch": 40, "history": [1.0, 0.5]}
    assert load_checkpoint(store, "iris", "m-abc") is None
    assert not checkpoint_exists(store, "iris", "m-abc")
    path = save_checkpoint(store, "iris", "m-abc", state)
    assert path == checkpoint_path(store, "iris", "m-abc") == f"{store.root}/iris/checkpoints/m-abc.pt"
    assert checkpoint_exists(store, "iris", "m-abc")
    loaded = load_checkpoint(store, "iris", "m-abc")
    assert torch.equal(loaded["params"]["w"], state["params"]["w"].detach())
    assert loaded["params"]["w"].dtype == torch.float64 and not loaded["params"]["w"].requires_grad
    assert loaded["config"] == state["config"] and loaded["epoch"] == 40 and loaded["history"] == [1.0, 0.5]
    # Saving again replaces, and leaves no temporary file behind.
    save_checkpoint(store, "iris", "m-abc", {"epoch": 41})
    assert load_checkpoint(store, "iris", "m-abc") == {"epoch": 41}
    listing = store.fs.get_file_info(pafs.FileSelector(store.path("iris", "checkpoints")))
    assert [i.base_name for i in listing] == ["m-abc.pt"]


def test_checkpoints_are_not_a_table(store):
    save_checkpoint(store, "iris", "m-abc", {"w": torch.ones(1)})
    assert len(Ledger(store, "iris")) == 0
    con = connect(store, "iris")
    names = {row[0] for row in con.sql("select view_name from duckdb_views()").fetchall()}
    assert "checkpoints" not in names


def test_bad_checkpoint_names_and_states(store):
    with pytest.raises(StoreError, match="model_key"):
        checkpoint_path(store, "iris", "../escape")
    with pytest.raises(StoreError, match="must be a dict"):
        save_checkpoint(store, "iris", "m", [torch.ones(1)])


def test_storage_never_imports_jobs_cluster_or_ray():
    # Read statically (no import side effects, no torch start-up): every import in every storage module.
    import ast
    from pathlib import Path

    forbidden = {"jobs", "cluster", "ray"}
    for source in sorted((Path(__file__).resolve().parents[1] / "storage").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not {name.split(".")[0] for name in names} & forbidden, f"{source.name}: {names}"
