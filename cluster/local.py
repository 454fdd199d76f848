"""`fragile cluster up | down | status`: a real Ray head and a real S3 server (SeaweedFS) on loopback.

`up` starts both as background processes in their own sessions, remembers their process ids in a state
file, and prints how to use them. `down` stops exactly those processes (their process groups), never
anything else of Ray's on the machine. The S3 credentials are made up per cluster and kept in the state
file (mode 600); the Ray head gets them in its environment, so jobs and workers read S3 with their own
environment and no secret travels in a job's runtime environment.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster import s3server

DEFAULT_DIR = Path(os.environ.get("FRAGILE_CLUSTER_DIR", "~/.fragile/cluster")).expanduser()
STATE_FILE = "state.json"


class ClusterError(Exception):
    """A user-facing problem starting, finding or stopping the local cluster."""


@dataclass(frozen=True)
class ClusterState:
    dir: str
    ray_pid: int
    ray_port: int
    dashboard_port: int
    s3_pid: int
    s3_endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def store(self) -> str:
        return f"s3://{self.bucket}/results"

    def env(self) -> dict[str, str]:
        """What a shell needs to use this cluster: `fragile submit`, `fragile query` and boto3 alike."""
        return {"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
                "FRAGILE_ADDRESS": self.address, "FRAGILE_STORE": self.store, "RAY_AUTH_MODE": "disabled"}


def load_state(state_dir: Path = DEFAULT_DIR) -> ClusterState | None:
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    return ClusterState(**json.loads(path.read_text()))


def _save_state(state: ClusterState) -> None:
    path = Path(state.dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    tmp.chmod(0o600)  # it holds the S3 secret
    tmp.replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _stop_group(pid: int, grace: float) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL whatever is left after `grace` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def up(state_dir: Path = DEFAULT_DIR, *, ray_port: int = 6379, dashboard_port: int = 8265, s3_port: int = 8333,
       num_cpus: int | None = None, bucket: str = "fragile", timeout: float = 90.0) -> ClusterState:
    """Start the S3 server, then the Ray head with the S3 settings in its environment."""
    state_dir = Path(state_dir)
    old = load_state(state_dir)
    if old is not None and (_alive(old.ray_pid) or _alive(old.s3_pid)):
        raise ClusterError(f"a cluster from {state_dir} is already running (dashboard {old.address}); "
                           "stop it with `fragile cluster down` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    access, secret = f"fragile-{secrets.token_hex(4)}", secrets.token_hex(20)
    try:
        s3 = s3server.start(state_dir / "s3", buckets=[bucket], s3_port=s3_port, detach=True,
                            access_key=access, secret_key=secret, timeout=timeout)
    except s3server.ServerError as exc:
        raise ClusterError(f"the S3 server did not start: {exc}") from None

    # A Ray driver in this process (ray.init sets RAY_ADDRESS) must not make the new head think it joins it.
    inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env = {**inherited, **s3.env(), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    args = ["ray", "start", "--head", "--block", f"--port={ray_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}", "--include-dashboard=true", "--disable-usage-stats"]
    # The node's agents get free ports too: their defaults (52365, ...) may belong to another Ray on this
    # machine (an embedded one included), and a head whose job agent cannot bind accepts no job.
    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port"):
        args.append(f"--{flag}={s3server.free_port()}")
    if num_cpus:
        args.append(f"--num-cpus={num_cpus}")
    log = open(state_dir / "ray.out", "wb")
    ray = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                           start_new_session=True)
    log.close()
    state = ClusterState(dir=str(state_dir), ray_pid=ray.pid, ray_port=ray_port, dashboard_port=dashboard_port,
                         s3_pid=s3.process.pid, s3_endpoint=s3.endpoint, bucket=bucket, access_key=access,
                         secret_key=secret, region=s3.region)
    _save_state(state)  # saved before waiting: a failed start can still be cleaned up with `down`
    deadline = time.monotonic() + timeout
    while not _reachable(f"{state.address}/api/version"):
        if ray.poll() is not None or time.monotonic() > deadline:
            down(state_dir)
            tail = "\n".join((state_dir / "ray.out").read_text(errors="replace").splitlines()[-20:])
            raise ClusterError(f"the Ray head did not start (ports {ray_port}/{dashboard_port} taken?); "
                               f"{state_dir / 'ray.out'} ends with:\n{tail}")
        time.sleep(0.5)
    return state


def down(state_dir: Path = DEFAULT_DIR, *, grace: float = 15.0) -> ClusterState | None:
    """Stop exactly the processes `up` started; the S3 data stays in the state folder."""
    state = load_state(state_dir)
    if state is None:
        return None
    _stop_group(state.ray_pid, grace)
    _stop_group(state.s3_pid, grace)
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    return state


def status(state_dir: Path = DEFAULT_DIR) -> dict | None:
    state = load_state(state_dir)
    if state is None:
        return None
    return {"ray head": (_alive(state.ray_pid), _reachable(f"{state.address}/api/version"), state.address),
            "s3 server": (_alive(state.s3_pid), _reachable(f"{state.s3_endpoint}/healthz"), state.s3_endpoint)}
