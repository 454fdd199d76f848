"""Fixtures of the fault-injection suite (its tools are in harness.py): runs that are always cleaned up, a test
process pointed at an S3 server, and the clean reference run."""
from __future__ import annotations

import os

import pytest

from harness import EXPERIMENT, Run, aws_env, report, results  # noqa: F401


@pytest.fixture
def runs(tmp_path):
    """Start runs with `runs(store, ...)`; every one is killed and cleaned up when the test ends."""
    started: list[Run] = []

    def start(store: str, **kwargs) -> Run:
        run = Run(store, tmp_path, **kwargs)
        started.append(run)
        return run

    yield start
    for run in started:
        run.cleanup()


@pytest.fixture
def use_s3(monkeypatch):
    """Point this test process at an S3 server (to read a run's results back)."""
    def point(server) -> None:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        for name, value in aws_env(server).items():
            monkeypatch.setenv(name, value)

    return point


@pytest.fixture(scope="session")
def clean(tmp_path_factory):
    """A clean run of the suite's spec on a local store: the reference every faulted run is compared with."""
    workdir = tmp_path_factory.mktemp("clean")
    store = str(workdir / "store")
    run = Run(store, workdir, name="clean")
    try:
        assert run.wait() == 0, run.output()[-4000:]
    finally:
        run.cleanup()
    report(f"clean run: {run.seconds:.1f} s")
    return {"store": store, "seconds": run.seconds, "results": results(store)}
