"""Nobody gets in, nothing leaks: a run to S3 with a distinctive secret leaves it in no object, no Ray session
file and no output; a second run of the same experiment is refused while the first completes untouched; a
`fragile cluster up` listens on loopback only and refuses a client without the token."""
from __future__ import annotations

import base64
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import ROOT, assert_same_as_clean, aws_env, listeners, marked, report, wait_for

pytestmark = pytest.mark.faults

CANARY_SECRET = "Canary" + "Sx7Qp2Vw9Kd4Lm6Nr3Ts8Hb1"  # split: the canary must not be in this file's own bytes


def _needles(secret: str) -> dict[str, bytes]:
    raw = secret.encode()
    out = {"raw": raw, "hex": raw.hex().encode(), "HEX": raw.hex().upper().encode()}
    for shift in range(3):  # base64 of the secret at each alignment within a longer value: its stable middle
        encoded = base64.b64encode(b"\0" * shift + raw)
        out[f"base64+{shift}"] = encoded[4:-4]
        out[f"urlsafe+{shift}"] = base64.urlsafe_b64encode(b"\0" * shift + raw)[4:-4]
    return out


def _hits(blob: bytes, needles: dict[str, bytes]) -> list[str]:
    return [name for name, needle in needles.items() if needle in blob]


@pytest.fixture(scope="module")
def s3_run(clean, tmp_path_factory):
    """A run to S3 under a distinctive secret, with a second run of the same experiment started beside it."""
    from cluster import s3server
    from harness import Run

    workdir = tmp_path_factory.mktemp("canary")
    server = s3server.start(workdir / "s3", buckets=["canary"], access_key="canary-access", secret_key=CANARY_SECRET)
    first = second = None
    try:
        first = Run("s3://canary/x", workdir, env=aws_env(server), name="first")
        lease = "x/faults/_lease.json"
        wait_for(lambda: server.client().list_objects_v2(Bucket="canary", Prefix=lease).get("KeyCount"), 120,
                 "the first run's lease", every=0.2)
        second = Run("s3://canary/x", workdir, env=aws_env(server), name="second")
        second_code = second.wait(120)
        assert first.wait() == 0, first.output()[-4000:]
        yield {"server": server, "first": first, "second": second, "second_code": second_code}
    finally:
        for run in (first, second):
            if run is not None:
                run.kill()
        server.stop()
        for run in (first, second):
            if run is not None:
                run.cleanup()


def test_a_second_run_of_the_experiment_is_refused_and_the_first_completes(s3_run, clean, use_s3):
    second, first = s3_run["second"], s3_run["first"]
    assert s3_run["second_code"] == 2
    err = " ".join(second.output().split())
    assert "is being written by another run" in err and f"pid {first.proc.pid}" in err and "--force" in err
    assert "configurations ->" not in err  # refused before it started anything
    use_s3(s3_run["server"])
    rows = assert_same_as_clean("s3://canary/x", clean["results"])
    report(f"second run of the same experiment refused (exit 2) while the first ran; the first completed "
           f"in {first.seconds:.1f} s; {rows}")


def test_the_secret_is_in_no_object_session_file_or_output(s3_run):
    server, first, second = s3_run["server"], s3_run["first"], s3_run["second"]
    needles = _needles(CANARY_SECRET)
    hits, scanned = [], 0
    client = server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="canary"):
        for obj in page.get("Contents", []):
            scanned += 1
            body = client.get_object(Bucket="canary", Key=obj["Key"])["Body"].read()
            hits += [f"s3://canary/{obj['Key']} ({h})" for h in _hits(body, needles)]
    for run in (first, second):  # Ray's session folders (logs, artifacts, Tune's driver files) and the output
        for path in run.ray_tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                scanned += 1
                try:
                    hits += [f"{path} ({h})" for h in _hits(path.read_bytes(), needles)]
                except OSError:
                    continue
        hits += [f"output of the {run.log.name} ({h})" for h in _hits(run.log.read_bytes(), needles)]
    assert scanned > 50 and not hits, hits
    report(f"secret canary: {scanned} objects and session files scanned (raw, hex, base64), no hit")


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_cluster_up_listens_on_loopback_only_and_wants_the_token(tmp_path):
    from cluster import local, s3server

    state_dir = tmp_path / "cluster"
    fragile = [sys.executable, "-m", "fragile"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "AWS_", "FRAGILE_"))}
    ports = [str(s3server.free_port()) for _ in range(2)]
    began = time.monotonic()
    up = subprocess.run([*fragile, "cluster", "up", "--dir", str(state_dir), "--ray-port", ports[0],
                         "--dashboard-port", ports[1], "--s3-port", str(s3server._port_pairs(1)[0]), "--num-cpus", "1"],
                        cwd=ROOT, env=base, capture_output=True, text=True, timeout=150)
    state = local.load_state(state_dir)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "warning" not in up.stderr  # loopback and a token: nothing to warn about
        # Secrets sit in files of mode 600 inside a folder of mode 700.
        assert (state_dir.stat().st_mode & 0o777) == 0o700
        for name in (local.STATE_FILE, local.TOKEN_FILE):
            assert ((state_dir / name).stat().st_mode & 0o777) == 0o600
        time.sleep(3)  # the agents bind a moment after the dashboard answers
        pids = set(marked(local.CLUSTER_ID_ENV, state.cluster_id)) | {state.s3_pid}
        sockets = listeners(pids)
        assert len(sockets) >= 10, sockets  # GCS, raylet, client server, dashboard, agents, SeaweedFS, ...
        exposed = [entry for entry in sockets if not ipaddress.ip_address(entry[0]).is_loopback]
        assert not exposed, exposed
        # A client without the token is refused with one clear message; with `cluster env` it gets in.
        refused = subprocess.run([*fragile, "status", "--address", state.address], cwd=ROOT, env=base,
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "requires a Ray token" in refused.stderr, refused.stderr
        no_token = {k: v for k, v in {**base, **state.env()}.items() if k != "RAY_AUTH_TOKEN_PATH"}
        driver = subprocess.run([*fragile, "run", str(ROOT / "jobs" / "specs" / "iris-smoke.yaml"), "--address",
                                 f"127.0.0.1:{ports[0]}", "--store", str(tmp_path / "store")], cwd=ROOT, env=no_token,
                                capture_output=True, text=True, timeout=120)
        assert driver.returncode == 2 and "requires a token" in driver.stderr, driver.stderr[-2000:]
        assert not (tmp_path / "store").exists()  # refused before anything was written
        allowed = subprocess.run([*fragile, "status"], cwd=ROOT, env={**base, **state.env()}, capture_output=True,
                                 text=True, timeout=60)
        assert allowed.returncode == 0, allowed.stderr
        # A job still running when the cluster goes down is stopped, and so is its driver.
        submitted = subprocess.run([*fragile, "submit", str(ROOT / "jobs" / "specs" / "iris.yaml")], cwd=ROOT,
                                   env={**base, **state.env()}, capture_output=True, text=True, timeout=90)
        assert submitted.returncode == 0, submitted.stderr
        wait_for(lambda: any("fragile run" in _cmd(p) for p in marked(local.CLUSTER_ID_ENV, state.cluster_id)),
                 90, "the job's driver", every=0.5)
    finally:
        down = subprocess.run([*fragile, "cluster", "down", "--dir", str(state_dir)], cwd=ROOT, env=base,
                              capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "stopped 1 running job(s)" in down.stdout, down.stdout
    time.sleep(0.5)
    assert not marked(local.CLUSTER_ID_ENV, state.cluster_id)  # nothing of the cluster is left running
    report(f"cluster up: {len(sockets)} listening sockets of the head and SeaweedFS, all on loopback; a client "
           f"without the token refused; `down` stopped the running job; up to down {time.monotonic() - began:.1f} s")
