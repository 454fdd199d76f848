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
