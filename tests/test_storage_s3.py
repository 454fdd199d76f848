"""S3 only: opening ``s3://bucket/prefix`` against a real SeaweedFS server, and every way it can fail.

Each failure must be a ``StoreError`` raised by ``open_store`` itself, before any work, with one message
that says what to fix, and fast. What works the same on both backends is tested in the other
``test_storage_*`` files through the parametrised ``store`` fixture.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from storage.checkpoints import load_checkpoint, save_checkpoint
from storage.ledger import Ledger
from storage.query import experiments
from storage.tables import part_path, read_table, write_part
from storage.uri import StoreError, open_store

FAST = 5.0  # seconds: a failing open_store must not keep the user waiting


def _fresh_uri(server) -> str:
    return f"s3://{server.bucket}/{uuid.uuid4().hex[:12]}/results"


def _refused(uri: str, match: str) -> str:
    began = time.monotonic()
    with pytest.raises(StoreError, match=match) as info:
        open_store(uri)
    assert time.monotonic() - began < FAST
    return str(info.value)


def test_open_normalises_and_creates_nothing(s3_env):
    prefix = uuid.uuid4().hex[:12]
    store = open_store(f"S3://{s3_env.bucket}//{prefix}/results/", create=True)
    assert store.uri == f"s3://{s3_env.bucket}/{prefix}/results" and store.root == f"{s3_env.bucket}/{prefix}/results"
    assert isinstance(store.fs, pafs.S3FileSystem)
    assert store.path("iris", "stats") == f"{s3_env.bucket}/{prefix}/results/iris/stats"
    listing = s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix=prefix)
    assert listing["KeyCount"] == 0  # create=True has no effect: prefixes are implicit on S3


def test_a_part_in_flight_is_invisible_until_it_is_whole(s3_env):
    store = open_store(_fresh_uri(s3_env))
    path = part_path(store, "iris", "stats", "abc", "p")
    out = store.fs.open_output_stream(path)
    out.write(b"PAR1 not yet a whole file")
    assert store.fs.get_file_info(path).type == pafs.FileType.NotFound  # nothing sent before close
    assert len(Ledger(store, "iris")) == 0
    out.close()
    assert store.fs.get_file_info(path).type == pafs.FileType.File


def test_a_large_checkpoint_round_trips(s3_env):
    # Past pyarrow's upload part size (10 MB): the upload path for big objects works on the server too.
    store = open_store(_fresh_uri(s3_env))
    weights = torch.arange(3_500_000, dtype=torch.float32)  # 14 MB
    save_checkpoint(store, "iris", "big", {"w": weights})
    assert torch.equal(load_checkpoint(store, "iris", "big")["w"], weights)


def test_a_bucket_root_store_lists_its_experiments(s3_env):
    bucket = f"root-{uuid.uuid4().hex[:8]}"
    s3_env.create_bucket(bucket)
    store = open_store(f"s3://{bucket}")
    assert store.root == bucket and experiments(store) == []
    for experiment in ["mnist", "iris"]:
        write_part(store, experiment, "stats", "c1", "s", {"method": ["cg"], "test_idx": [1], "snapshot": [0]})
    assert experiments(store) == ["iris", "mnist"]
    assert read_table(store, "iris", "stats").column("config_id").to_pylist() == ["c1"]


def test_wrong_credentials(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    message = _refused(_fresh_uri(s3_env), r"refused \(HTTP 403\)")
    assert s3_env.bucket in message and s3_env.endpoint in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "not-the-secret" not in message  # secrets are never printed
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    _refused(_fresh_uri(s3_env), r"refused \(HTTP 403\) for the access key 'nobody'")


def test_missing_bucket(s3_env):
    message = _refused("s3://no-such-bucket/results", "bucket 'no-such-bucket' does not exist")
    assert f"aws s3 mb s3://no-such-bucket --endpoint-url {s3_env.endpoint}" in message
    assert "never creates buckets" in message
    names = [b["Name"] for b in s3_env.client().list_buckets()["Buckets"]]
    assert "no-such-bucket" not in names


def test_unreachable_endpoint(s3_env, monkeypatch):
    from cluster import s3server

    endpoint = f"http://127.0.0.1:{s3server.free_port()}"  # nobody listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    message = _refused(_fresh_uri(s3_env), "cannot reach the S3 endpoint")
    assert f"{endpoint} (from AWS_ENDPOINT_URL)" in message and "Is the S3 server running" in message


def test_no_credentials_at_all(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = _refused(_fresh_uri(s3_env), "no AWS credentials found")
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.access_key)  # half a key pair
    _refused(_fresh_uri(s3_env), "cannot read the AWS credentials.*AWS_SECRET_ACCESS_KEY")


@pytest.mark.parametrize("uri,match", [
    ("s3://", "not a valid bucket name"),
    ("s3://Results/x", "not a valid bucket name"),
    ("s3://ab/x", "not a valid bucket name"),
    ("s3://bucket/a/../b", r"'\.\.' segment"),
    ("s3://bucket/p?endpoint_override=localhost:9000", "AWS_ENDPOINT_URL"),
])
def test_malformed_uris_are_refused_before_any_request(uri, match, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # would fail differently if contacted
    with pytest.raises(StoreError, match=match):
        open_store(uri)


def test_an_endpoint_without_scheme_is_refused(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:8333")
    with pytest.raises(StoreError, match=r"AWS_ENDPOINT_URL='127.0.0.1:8333' is not an S3 endpoint URL"):
        open_store("s3://bucket/results")


def test_pickles_carry_no_secret_and_reopen_with_the_receivers_environment(s3_env, monkeypatch):
    store = open_store(_fresh_uri(s3_env))
    data = pickle.dumps(store)
    assert s3_env.secret_key.encode() not in data and s3_env.access_key.encode() not in data
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")  # the receiver's environment counts
    # Reopening sends no request (a worker that starts while the store is briefly away must not fail for
    # good on it); the receiver's wrong key fails its first request, at once and without retries.
    reopened = pickle.loads(data)
    began = time.monotonic()
    with pytest.raises(OSError, match="AWS Error") as info:
        read_table(reopened, "iris", "stats")
    assert time.monotonic() - began < FAST and not isinstance(info.value, FileNotFoundError)


def test_a_worker_process_reopens_the_store_from_its_own_environment(s3_env, tmp_path):
    store = open_store(_fresh_uri(s3_env))
    write_part(store, "iris", "stats", "c1", "p", {"method": ["cg"], "test_idx": [3], "snapshot": [0]})
    (tmp_path / "store.pickle").write_bytes(pickle.dumps(store))
    code = ("import pickle, sys; from storage.tables import read_table; "
            "store = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(read_table(store, 'iris', 'stats').column('test_idx').to_pylist())")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store.pickle")], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[3]"
