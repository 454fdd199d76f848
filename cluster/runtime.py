"""Connecting to Ray: an embedded local instance by default, or a running cluster by address.

Everything that touches `ray.init` lives here so that the CLI, the sweep and the tests agree on the
settings workers inherit (no usage stats, quiet logs, an explicit authentication mode).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

# Ray 2.5x+ writes ~/.ray/auth_token on the first embedded start and then demands it from every later
# client. For an embedded instance we own both sides, so we say explicitly what we want rather than
# inherit whatever an earlier process left behind. A user who runs a token-protected cluster sets
# RAY_AUTH_MODE=token (and the token) in the environment; we never override what they set.
_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # Tune's CSV/JSON/TensorBoard loggers write a file set per trial that nobody reads: our results
    # are the Parquet tables.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "100",
}


def apply_env_defaults() -> None:
    """Set the environment the driver and (through inheritance) local workers run with."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class RayRuntime:
    """What `connect` started or joined; `close` undoes exactly that."""

    address: str | None
    started_here: bool

    def close(self) -> None:
        if self.started_here and ray.is_initialized():
            ray.shutdown()


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> RayRuntime:
    """Join the cluster at `address`, or start an embedded Ray using all local CPUs (or `num_cpus`).

    Reuses an already initialised Ray in this process (the test fixture's, for instance).
    """
    apply_env_defaults()
    if quiet:
        for name in ("ray", "ray.train", "ray.data", "ray.air"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # With the per-trial JSON/CSV loggers off (our results are the Parquet tables), Tune's result
        # analysis warns that it found no result files; that is expected, so only errors are shown.
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
    if ray.is_initialized():
        return RayRuntime(address=address, started_here=False)
    kwargs: dict = {"log_to_driver": not quiet, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
        return RayRuntime(address=address, started_here=True)
    # address="local" always starts a new instance: without it Ray joins whatever cluster
    # /tmp/ray/ray_current_cluster names, even one that has since been killed.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **kwargs)
    return RayRuntime(address=None, started_here=True)
