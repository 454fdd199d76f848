"""`fragile cluster up | down | status`: a real Ray head and a real S3 server (SeaweedFS) on loopback.

`up` starts both as background processes in their own sessions, remembers their process ids in a state
file, and prints how to use them; with ``workers`` it also joins that many Ray worker nodes to the head, each a
`ray start --address` on this machine with its own CPUs and ports, so one machine exercises cross-node
scheduling, object transfer and the loss of a node. `down` stops the jobs still running on the cluster
(through the Jobs API), then exactly the processes `up` started (their process groups), then any process the
cluster started that left those groups (a job's driver runs in a session of its own); it never touches anything
else of Ray's on the machine. Every process of the cluster carries FRAGILE_CLUSTER_ID=<id> in its environment,
inherited from the head, which is how `down` recognises them.

Exposure and secrets:
- every listener of the Ray head (GCS, raylet, client server, dashboard and its agents, metrics) and of
  SeaweedFS binds to 127.0.0.1, unless `host` names another address (then `up` warns that it is reachable);
- Ray runs with token authentication: a random token per cluster in `<dir>/ray_auth_token`, read by the head
  through RAY_AUTH_TOKEN_PATH; clients use it through `fragile cluster env`. `auth="disabled"` is an explicit
  choice, with a warning;
- the S3 credentials are made up per cluster; they and the token live in files of mode 600 inside a folder
  of mode 700, created so from their first byte. The Ray head gets the S3 settings in its environment, so
  jobs and workers read S3 with their own environment and no secret travels in a job's runtime environment.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cluster import s3server

DEFAULT_DIR = Path(os.environ.get("FRAGILE_CLUSTER_DIR", "~/.fragile/cluster")).expanduser()
STATE_FILE = "state.json"
TOKEN_FILE = "ray_auth_token"
CLUSTER_ID_ENV = "FRAGILE_CLUSTER_ID"
AUTH_MODES = ("token", "disabled")
# Custom resources: the head carries HEAD_RESOURCE (runs keep their trials and coordinator there), worker node k
# carries WORKER_RESOURCE_<k>.
HEAD_RESOURCE = "fragile_head"
HEAD_RESOURCE_UNITS = 10_000
WORKER_RESOURCE = "fragile_worker_node"
NODE_NAME_ENV = "FRAGILE_NODE_NAME"  # worker-<k> in every process of worker node k
# The node agents' ports: their defaults (52365, ...) are fixed, so every node of this machine gets drawn ones.
_AGENT_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                     "metrics-export-port")
# Variables of the calling process that must not leak into the head: another Ray's address, token or mode.
_NOT_INHERITED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                  "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", CLUSTER_ID_ENV)


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
    host: str = "127.0.0.1"
    auth: str = "token"
    cluster_id: str = ""
    worker_pids: list[int] = field(default_factory=list)  # `ray start --address` of each worker node

    @property
    def address(self) -> str:
        return f"http://{_client_host(self.host)}:{self.dashboard_port}"

    @property
    def store(self) -> str:
        return f"s3://{self.bucket}/results"

    @property
    def token_file(self) -> Path | None:
        return Path(self.dir) / TOKEN_FILE if self.auth == "token" else None

    def env(self) -> dict[str, str]:
        """What a shell needs to use this cluster: `fragile submit`, `fragile query` and boto3 alike."""
        env = {"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
               "FRAGILE_ADDRESS": self.address, "FRAGILE_STORE": self.store, "RAY_AUTH_MODE": self.auth}
        if self.token_file is not None:
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        if is_loopback(self.host):  # a driver joining from this shell (`fragile run --address`) must use
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the head's loopback address too
        return env


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_state(state_dir: Path = DEFAULT_DIR) -> ClusterState | None:
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    known = {f.name for f in fields(ClusterState)}
    return ClusterState(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def _private_dir(path: Path) -> None:
    """`path` and its missing parents as folders of mode 700 (an existing one is tightened to 700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` through a file that has mode 600 from its creation, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_state(state: ClusterState) -> None:
    _write_private(Path(state.dir) / STATE_FILE, json.dumps(asdict(state), indent=1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone, only not yet reaped
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _reachable(url: str, token: str | None = None) -> bool:
    request = urllib.request.Request(url, headers=_auth(token))
    try:
        with urllib.request.urlopen(request, timeout=2) as answer:
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


def warnings_for(host: str, auth: str) -> list[str]:
    out = []
    if not is_loopback(host):
        out.append(f"the Ray head and the S3 server listen on {host}: they are reachable from the network, "
                   f"not only from this machine")
    if auth == "disabled":
        out.append("Ray token authentication is off: anyone who can reach the Ray head can run code as you and "
                   "read the S3 key from the workers' environment")
    return out


def up(state_dir: Path = DEFAULT_DIR, *, ray_port: int = 6379, dashboard_port: int = 8265, s3_port: int = 8333,
       num_cpus: int | None = None, bucket: str = "fragile", timeout: float = 90.0, host: str = "127.0.0.1",
       auth: str = "token", workers: int = 0, worker_cpus: int = 1) -> ClusterState:
    """Start the S3 server, then the Ray head with the S3 settings (and the token's path) in its environment,
    then ``workers`` Ray worker nodes of ``worker_cpus`` CPUs each joined to it (see :func:`_start_worker`)."""
    if workers < 0 or worker_cpus < 1:
        raise ClusterError(f"--workers must be >= 0 and --worker-cpus >= 1; got {workers} and {worker_cpus}")
    if auth not in AUTH_MODES:
        raise ClusterError(f"--auth must be one of {', '.join(AUTH_MODES)}, not {auth!r}")
    state_dir = Path(state_dir)
    old = load_state(state_dir)
    if old is not None and (_alive(old.ray_pid) or _alive(old.s3_pid)):
        raise ClusterError(f"a cluster from {state_dir} is already running (dashboard {old.address}); "
                           "stop it with `fragile cluster down` first")
    _private_dir(state_dir)
    access, secret = f"fragile-{secrets.token_hex(4)}", secrets.token_hex(20)
    cluster_id = secrets.token_hex(8)
    try:
        s3 = s3server.start(state_dir / "s3", buckets=[bucket], s3_port=s3_port, detach=True,
                            access_key=access, secret_key=secret, timeout=timeout, host=host)
    except s3server.ServerError as exc:
        raise ClusterError(f"the S3 server did not start: {exc}") from None

    inherited = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env = {**inherited, **s3.env(), "RAY_AUTH_MODE": auth, "RAY_USAGE_STATS_ENABLED": "0", CLUSTER_ID_ENV: cluster_id}
    if auth == "token":
        _write_private(state_dir / TOKEN_FILE, secrets.token_hex(32))
        env["RAY_AUTH_TOKEN_PATH"] = str(state_dir / TOKEN_FILE)
    ports = [p for p in s3server.free_ports(7) if p not in (ray_port, dashboard_port)][:5]
    args = ["ray", "start", "--head", "--block", f"--port={ray_port}", f"--dashboard-host={host}",
            f"--dashboard-port={dashboard_port}", "--include-dashboard=true", "--disable-usage-stats",
            f"--ray-client-server-port={ports.pop()}"]
    if is_loopback(host):
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's single-node mode: every server on 127.0.0.1
    elif host not in ("0.0.0.0", "::"):
        args.append(f"--node-ip-address={host}")
    # The node's agents get free ports too: their defaults (52365, ...) may belong to another Ray on this
    # machine (an embedded one included), and a head whose job agent cannot bind accepts no job.
    for flag in _AGENT_PORT_FLAGS:
        args.append(f"--{flag}={ports.pop()}")
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    # The head says it is the head, so a run can keep its drivers' actors (trials, coordinator) there: a
    # worker node may be lost, the head never without the run.
    args.append(f"--resources={json.dumps({HEAD_RESOURCE: HEAD_RESOURCE_UNITS})}")
    fd = os.open(state_dir / "ray.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as log:
        ray = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    state = ClusterState(dir=str(state_dir), ray_pid=ray.pid, ray_port=ray_port, dashboard_port=dashboard_port,
                         s3_pid=s3.process.pid, s3_endpoint=s3.endpoint, bucket=bucket, access_key=access,
                         secret_key=secret, region=s3.region, host=host, auth=auth, cluster_id=cluster_id)
    _save_state(state)  # saved before waiting: a failed start can still be cleaned up with `down`
    deadline = time.monotonic() + timeout
    while not _reachable(f"{state.address}/api/version", _token(state)):
        if ray.poll() is not None or time.monotonic() > deadline:
            down(state_dir)
            tail = "\n".join((state_dir / "ray.out").read_text(errors="replace").splitlines()[-20:])
            raise ClusterError(f"the Ray head did not start (ports {ray_port}/{dashboard_port} taken?); "
                               f"{state_dir / 'ray.out'} ends with:\n{tail}")
        time.sleep(0.5)
    if workers:
        # All the worker nodes' ports in one draw: drawn per node, two nodes could be handed the same free port.
        n = len(_AGENT_PORT_FLAGS)
        ports = s3server.free_ports(n * workers)
        # One node at a time: nodes on one machine share the session folder, and two starting together
        # would name their sockets and logs alike.
        for k in range(workers):
            pid = _start_worker(state, env, k, worker_cpus, ports[n * k:n * (k + 1)])
            state = ClusterState(**{**asdict(state), "worker_pids": [*state.worker_pids, pid]})
            _save_state(state)
            _wait_for_nodes(state, 2 + k, deadline)
    return state


def _start_worker(state: ClusterState, env: dict[str, str], k: int, cpus: int, ports: list[int]) -> int:
    """Worker node k: `ray start --address` on this machine with its own ports, `cpus` CPUs, no GPU, and the
    resource `fragile_worker_node_<k>` (so a test can place work on it); the same environment as the head
    (token, S3 settings, cluster id) and FRAGILE_NODE_NAME=worker-<k>. Its log is `<dir>/worker-<k>.out`.
    Returns its process id."""
    # Ray's `ray start`, through cluster.worker_node, which keeps the loopback bootstrap address as given.
    args = [sys.executable, "-m", "cluster.worker_node", "start", "--block",
            f"--address={_client_host(state.host)}:{state.ray_port}",
            "--disable-usage-stats", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--resources={json.dumps({f'{WORKER_RESOURCE}_{k}': 1})}"]
    env = {**env, NODE_NAME_ENV: f"worker-{k}"}  # inherited by its raylet and workers: they can be found
    if is_loopback(state.host):
        # The head's address, 127.0.0.1: Ray binds a node's servers to loopback only when its address is that
        # one (another loopback address, 127.0.0.2, would make its raylet listen on every interface); the
        # nodes differ by id and ports. Joining a head needs Ray's multi-node mode, which the head's
        # single-node setting (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) would refuse.
        env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        args.append("--node-ip-address=127.0.0.1")
    elif state.host not in ("0.0.0.0", "::"):
        args.append(f"--node-ip-address={state.host}")
    # The raylet's own servers bind free ports themselves (Ray's default for a worker node); a port drawn here
    # for them could be taken by an outgoing connection before the raylet binds it. The agents get drawn ones.
    args += [f"--{flag}={port}" for flag, port in zip(_AGENT_PORT_FLAGS, ports)]
    fd = os.open(Path(state.dir) / f"worker-{k}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    return proc.pid


def alive_nodes(state: ClusterState) -> list[dict]:
    """The cluster's live nodes as the head's state API lists them (node_id, node_ip, is_head_node, resources)."""
    url = f"{state.address}/api/v0/nodes?limit=100&detail=1"
    with urllib.request.urlopen(urllib.request.Request(url, headers=_auth(_token(state))), timeout=5) as response:
        body = json.loads(response.read())
    nodes = body.get("data", {}).get("result", {}).get("result", [])
    return [n for n in nodes if n.get("state") == "ALIVE"]


def _wait_for_nodes(state: ClusterState, count: int, deadline: float) -> None:
    while True:
        try:
            if len(alive_nodes(state)) >= count:
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline or not all(_alive(p) for p in state.worker_pids):
            logs = Path(state.dir)
            tails = {k: "\n".join((logs / f"worker-{k}.out").read_text(errors="replace").splitlines()[-10:])
                     for k in range(len(state.worker_pids))}
            down(Path(state.dir))
            raise ClusterError("the worker nodes did not join the head: " + "; ".join(
                f"worker-{k}.out ends with:\n{tail}" for k, tail in tails.items()))
        time.sleep(0.5)


@dataclass(frozen=True)
class Stopped:
    state: ClusterState
    jobs: list[str]  # jobs that were still running and were stopped through the Jobs API
    stragglers: list[str]  # "pid command" of processes of the cluster that outlived the head and were killed


def down(state_dir: Path = DEFAULT_DIR, *, grace: float = 15.0) -> Stopped | None:
    """Stop the cluster's running jobs, then exactly the processes `up` started, then any process of the
    cluster left behind; the S3 data stays in the state folder."""
    state = load_state(state_dir)
    if state is None:
        return None
    jobs = _stop_jobs(state, grace) if _alive(state.ray_pid) else []
    for pid in state.worker_pids:
        _stop_group(pid, grace)
    _stop_group(state.ray_pid, grace)
    _stop_group(state.s3_pid, grace)
    stragglers = _kill_cluster_processes(state.cluster_id, grace) if state.cluster_id else []
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    (Path(state_dir) / TOKEN_FILE).unlink(missing_ok=True)
    return Stopped(state=state, jobs=jobs, stragglers=stragglers)


def _stop_jobs(state: ClusterState, grace: float) -> list[str]:
    """Ask the head to stop every job that has not ended, and wait (up to `grace` s) until they have."""
    from cluster import submit

    try:
        c = submit.client(state.address, token=_token(state))
        running = [j for j in c.list_jobs() if str(getattr(j.status, "value", j.status)) not in submit.TERMINAL]
        ids = [j.submission_id or j.job_id for j in running]
        for job_id in ids:
            c.stop_job(job_id)
        deadline = time.monotonic() + grace
        while ids and time.monotonic() < deadline:
            states = {str(getattr(status, "value", status)) for status in map(c.get_job_status, ids)}
            if states <= set(submit.TERMINAL):
                break
            time.sleep(0.5)
        return ids
    except Exception:  # noqa: BLE001 - a head that does not answer is stopped by signal below anyway
        return []


def _token(state: ClusterState) -> str | None:
    if state.token_file is None or not state.token_file.is_file():
        return None
    return state.token_file.read_text().strip()


def cluster_processes(cluster_id: str) -> list[int]:
    """Process ids of this user's processes whose environment carries FRAGILE_CLUSTER_ID=`cluster_id`."""
    marker = f"{CLUSTER_ID_ENV}={cluster_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return found


def _kill_cluster_processes(cluster_id: str, grace: float) -> list[str]:
    pids = cluster_processes(cluster_id)
    described = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            os.kill(pid, signal.SIGTERM)
            described.append(f"{pid} {cmd[:120]}")
        except (ProcessLookupError, OSError):
            continue
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return described


def status(state_dir: Path = DEFAULT_DIR) -> dict | None:
    state = load_state(state_dir)
    if state is None:
        return None
    report = {"ray head": (_alive(state.ray_pid), _reachable(f"{state.address}/api/version", _token(state)),
                           state.address),
              "s3 server": (_alive(state.s3_pid), _reachable(f"{state.s3_endpoint}/healthz"), state.s3_endpoint)}
    try:
        joined = len(alive_nodes(state)) - 1
    except (OSError, ValueError):
        joined = 0
    for k, pid in enumerate(state.worker_pids):
        report[f"worker {k}"] = (_alive(pid), k < joined, f"pid {pid}, {joined} worker node(s) joined")
    return report
