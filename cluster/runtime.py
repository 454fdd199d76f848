"""Connecting to Ray: an embedded local instance by default, or a running cluster by address.

Everything that touches `ray.init` lives here so that the CLI, the sweep and the tests agree on the
settings workers inherit (no usage stats, quiet logs, an explicit authentication mode, loopback only).

An embedded Ray is a single machine's private cluster, so nothing of it should be reachable from the network:
with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` Ray takes 127.0.0.1 as the node's address and every one of its
servers (GCS, raylet, workers, agents, metrics) binds to loopback (Ray's own single-node mode, the default on
macOS and Windows). It also runs with token authentication and a token made for this run only, kept in the
environment of the run's own processes, unless the user chose `RAY_AUTH_MODE` themselves. Ray reads both
settings when it is imported, so `prepare_embedded()` must run before the first `import ray` of the process;
the CLI calls it first thing.
"""
from __future__ import annotations

import logging
import os
import secrets
import sys
from dataclasses import dataclass

_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Tune's CSV/JSON/TensorBoard loggers write a file set per trial that nobody reads: our results
    # are the Parquet tables.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "100",
}
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a single-node Ray on 127.0.0.1


class ConnectError(Exception):
    """The Ray cluster at an address cannot be used (unreachable, or it wants a token we do not have)."""


def apply_env_defaults() -> None:
    """Set the environment the driver and (through inheritance) local workers run with."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def prepare_embedded() -> None:
    """The environment of an embedded Ray: loopback listeners, and token authentication with a fresh token
    unless RAY_AUTH_MODE is set. Call it before Ray is imported; after, only the loopback part still takes
    effect, and authentication stays as the environment says (disabled when it says nothing)."""
    apply_env_defaults()
    os.environ.setdefault(LOOPBACK_ENV, "0")
    if "ray" not in sys.modules:
        if "RAY_AUTH_MODE" not in os.environ:
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray._private.ray_constants as constants  # read at call time by Ray's node-address lookup

    constants.ENABLE_RAY_CLUSTER = os.environ[LOOPBACK_ENV] != "0"


@dataclass(frozen=True)
class RayRuntime:
    """What `connect` started or joined; `close` undoes exactly that."""

    address: str | None
    started_here: bool

    def close(self) -> None:
        import ray

        if self.started_here and ray.is_initialized():
            ray.shutdown()


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> RayRuntime:
    """Join the cluster at `address`, or start an embedded Ray using all local CPUs (or `num_cpus`).

    Reuses an already initialised Ray in this process (the test fixture's, for instance).
    """
    if address:
        apply_env_defaults()
    else:
        prepare_embedded()
    import ray

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
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, AuthenticationError, ...
            raise ConnectError(_connect_failure(address, exc)) from None
        return RayRuntime(address=address, started_here=True)
    # address="local" always starts a new instance: without it Ray joins whatever cluster
    # /tmp/ray/ray_current_cluster names, even one that has since been killed.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **kwargs)
    return RayRuntime(address=None, started_here=True)


def _connect_failure(address: str, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "AuthenticationError" in type(exc).__name__ or "token" in str(exc).lower():
        return (f"the Ray cluster at {address} refused this client: it requires a token. For a cluster from "
                f"`fragile cluster up`, run `eval \"$(fragile cluster env)\"` first; otherwise set RAY_AUTH_MODE=token "
                f"and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN). Ray said: {text}")
    return f"cannot connect to the Ray cluster at {address}: {type(exc).__name__}: {text}"
