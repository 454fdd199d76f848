"""A data root on S3 made local once per node (``storage.datacache``), against the real SeaweedFS server."""
from __future__ import annotations

import os
import threading
import uuid

import pyarrow.fs as pafs
import pytest
import torch

from influence.data import load_dataset
from influence.data_files import write_tiny
from storage import datacache
from storage.datacache import MARKER, cache_folder, local_data_root
from storage.uri import StoreError, open_store

_upload = pafs.copy_files  # taken before the ``copies`` fixture counts the calls of datacache's copy_files


@pytest.fixture
def copies(monkeypatch):
    """Counts the copies made from S3 (each is one pyarrow ``copy_files``)."""
    calls = []
    real = pafs.copy_files

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(datacache.pafs, "copy_files", counting)
    return calls


def _upload_tiny(server, tmp_path, name: str = "mnist") -> tuple[str, str]:
    """Tiny files written locally and uploaded under a fresh prefix: (local root, s3 URI)."""
    local = write_tiny(name, tmp_path / "local" / name, n_train=40, n_test=20)
    uri = f"s3://{server.bucket}/{uuid.uuid4().hex[:12]}/data/{name}"
    store = open_store(uri)
    _upload(local, store.root, destination_filesystem=store.fs)
    return local, uri


def test_local_roots_pass_through(tmp_path):
    assert local_data_root(None) is None
    assert local_data_root("~/data/mnist") == os.path.expanduser("~/data/mnist")
    assert local_data_root(str(tmp_path)) == str(tmp_path)
    assert local_data_root(f"file://{tmp_path}") == str(tmp_path)
    with pytest.raises(StoreError, match="gs:// scheme"):
        local_data_root("gs://bucket/data")


def test_cache_folder_from_argument_environment_or_home(monkeypatch, tmp_path):
    assert cache_folder("s3://b-1/x/y/", str(tmp_path)) == str(tmp_path / "b-1" / "x" / "y")
    monkeypatch.setenv(datacache.CACHE_ENV, str(tmp_path / "env"))
    assert cache_folder("s3://b-1") == str(tmp_path / "env" / "b-1")
    monkeypatch.delenv(datacache.CACHE_ENV)
    assert cache_folder("s3://b-1/p") == os.path.expanduser("~/.cache/fragile/data/b-1/p")


def test_copied_once_then_reused_without_s3(s3_env, tmp_path, copies, monkeypatch):
    local, uri = _upload_tiny(s3_env, tmp_path)
    cache = str(tmp_path / "cache")
    first = local_data_root(uri, cache_dir=cache)
    assert first == cache_folder(uri, cache) and os.path.isfile(os.path.join(first, MARKER)) and len(copies) == 1
    assert torch.equal(load_dataset("mnist", root=first).x_train, load_dataset("mnist", root=local).x_train)
    # The second call copies nothing and does not even ask S3: the endpoint may as well be gone.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert local_data_root(uri, cache_dir=cache) == first and len(copies) == 1
    # A prefix inside a cached one is served from that copy.
    assert local_data_root(f"{uri}/MNIST/raw", cache_dir=cache) == os.path.join(first, "MNIST", "raw")
    assert len(copies) == 1


def test_callers_at_once_share_one_copy(s3_env, tmp_path, copies):
    _, uri = _upload_tiny(s3_env, tmp_path, "cifar10")
    cache = str(tmp_path / "cache")
    # A copier that died half-way left a temporary folder: it is cleared, and never taken for the data.
    stale = os.path.join(os.path.dirname(cache_folder(uri, cache)), ".cifar10.tmp-dead")
    os.makedirs(stale)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(local_data_root(uri, cache_dir=cache)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1 and len(copies) == 1
    assert not os.path.exists(stale)
    assert load_dataset("cifar10", root=results[0]).n_train == 40


def test_errors_are_store_errors(s3_env, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    with pytest.raises(StoreError, match="no files under s3://.*upload the data set"):
        local_data_root(f"s3://{s3_env.bucket}/{uuid.uuid4().hex[:12]}/nothing", cache_dir=cache)
    with pytest.raises(StoreError, match="does not exist"):
        local_data_root("s3://no-such-bucket-here/mnist", cache_dir=cache)
    # Nothing half-made is left behind (only the hidden lock files beside the would-be copies).
    left = [name for _, folders, files in os.walk(cache) for name in folders + files]
    assert all(name.endswith(".lock") or not name.startswith(".") for name in left)
    assert not any(name in ("nothing", "mnist") or ".tmp-" in name for name in left)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="no AWS credentials"):
        local_data_root(f"s3://{s3_env.bucket}/other", cache_dir=cache)


def test_a_folder_in_the_way_is_reported(tmp_path):
    # Found before S3 is asked: a folder at the cache place that no completed copy made.
    cache = str(tmp_path / "cache")
    os.makedirs(cache_folder("s3://some-bucket/mnist", cache))
    with pytest.raises(StoreError, match=f"holds no completed copy.*no {MARKER}.*remove it"):
        local_data_root("s3://some-bucket/mnist", cache_dir=cache)
