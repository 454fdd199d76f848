"""Shared fixtures: one Ray instance for every test that touches Ray (as Ray's own test-suite does)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded 2-CPU Ray for the whole session; stopped at the end (only what we started)."""
    import ray

    from cluster.runtime import connect

    runtime = connect(None, num_cpus=2)
    yield ray
    if runtime.started_here:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, and on a busy machine a lot of it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
