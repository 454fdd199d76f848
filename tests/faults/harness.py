"""The fault-injection suite's tools: `fragile run` in a process session of its own, the processes of that run
found by a marker in their environment (so a test kills only what it started), and the comparison of a
run's results with a clean run of the same spec.

Run it with `pytest -m faults tests/faults` (`.ci/run` does, after the main suite). Each test is bounded in
time; whatever a test started is SIGKILLed when it ends, whatever happened (fixtures in conftest.py).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = Path(__file__).resolve().parent / "faults.yaml"
EXPERIMENT = "faults"
MARKER = "FRAGILE_FAULT_RUN"
RUN_TIMEOUT = 300  # seconds a run may take, faults included
# Statistics that must come out the same whatever was killed on the way (snapshot counts updates, which a
# restarted coordinator numbers afresh).
STAT_COLUMNS = ["config_id", "method", "test_idx", "n", "pearson", "spearman", "pearson_lo", "pearson_hi",
                "spearman_lo", "spearman_hi", "sign_agreement", "top10_overlap", "dtheta_spearman", "noise_floor",
                "actual_std", "selection", "final", "snr"]

def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def marked(name: str, value: str) -> list[int]:
    """Live processes whose environment holds name=value (this user's; others' are unreadable)."""
    tag = f"{name}={value}".encode()
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and tag in _environ(int(p.name)) and alive(int(p.name))]


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Run:
    """`fragile run SPEC --store STORE` in its own session; every process it starts (the driver, its embedded
    Ray, the workers) inherits a marker, so the test can find and kill exactly those."""

    def __init__(self, store: str, workdir: Path, *, env: dict[str, str] | None = None, args: tuple = (),
                 spec: Path = SPEC, name: str = "run"):
        self.marker = uuid.uuid4().hex
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.log = workdir / f"{name}-{self.marker[:6]}.out"
        base = {k: v for k, v in os.environ.items()
                if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        full = {**base, **(env or {}), MARKER: self.marker, "RAY_TMPDIR": str(self.ray_tmp), "PYTHONUNBUFFERED": "1",
                "COLUMNS": "200"}
        self.started = time.monotonic()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "fragile", "run", str(spec), "--store", store, *args],
                                         cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.seconds: float | None = None

    def pids(self, title: str | None = None) -> list[int]:
        """This run's live processes; with `title`, those whose command line starts with it (Ray names a
        worker `ray::<task or actor name>` while it runs one)."""
        found = marked(MARKER, self.marker)
        return [p for p in found if title is None or _cmdline(p).startswith(title)]

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not finish in {timeout} s; its output:\n{self.output()[-4000:]}")
        self.seconds = time.monotonic() - self.started
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL every process of this run (what is left of it)."""
        for _ in range(3):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(0.3)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def aws_env(server) -> dict[str, str]:
    """The environment that points a process at `server` and nowhere else."""
    return {**server.env(), "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true"}


def results(store_uri: str):
    """(stats rows as comparable tuples, retrain rows keyed by (config_id, removed, test_idx) -> count, actual)."""
    from storage import tables
    from storage.uri import open_store

    store = open_store(store_uri, create=False)
    stats = tables.read_table(store, EXPERIMENT, "stats").to_pandas()
    retrain = tables.read_table(store, EXPERIMENT, "retrain").to_pandas()
    counts = retrain.groupby(["config_id", "removed", "test_idx"]).size()
    actual = retrain.set_index(["config_id", "removed", "test_idx"])["actual"]
    return stats[STAT_COLUMNS].sort_values(STAT_COLUMNS[:3]).reset_index(drop=True), counts, actual


def assert_same_as_clean(store_uri: str, clean) -> dict[str, int]:
    """Every retrain row exactly once, the same rows and values as the clean run, the same final statistics."""
    import pandas as pd

    stats, counts, actual = results(store_uri)
    ref_stats, ref_counts, ref_actual = clean
    assert (counts == 1).all(), counts[counts != 1]
    assert sorted(counts.index) == sorted(ref_counts.index)
    pd.testing.assert_series_equal(actual.sort_index(), ref_actual.sort_index(), rtol=1e-12, atol=0)
    assert stats["final"].all()
    pd.testing.assert_frame_equal(stats, ref_stats, rtol=1e-12, atol=0)
    return {"retrain rows": int(counts.sum()), "stats rows": len(stats)}


def report(line: str) -> None:
    """One line for the record (shown with -s; appended to $FRAGILE_FAULT_REPORT when set)."""
    print(f"\nFAULT {line}")
    target = os.environ.get("FRAGILE_FAULT_REPORT")
    if target:
        with open(target, "a") as out:
            out.write(line + "\n")


def listeners(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that one of `pids` holds."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word in host (little-endian) order
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(packed)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.append((str(address), int(hex_port, 16), inodes[fields[9]]))
    return found
