"""Faults a cluster has, injected for real: a killed worker, a killed coordinator, a killed driver, the S3 server
frozen or killed and restarted, bad files in the store. Each run must complete (or resume) with every retrain
row exactly once and the same final statistics as a clean run."""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import ipaddress

from harness import EXPERIMENT, assert_same_as_clean, aws_env, listeners, report, wait_for

pytestmark = pytest.mark.faults


def _parts(store_dir: Path, table: str) -> list[Path]:
    return sorted((store_dir / EXPERIMENT / table).glob("config_id=*/*.parquet"))


def _s3_parts(server, bucket: str, table: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix=f"x/{EXPERIMENT}/{table}/")
    return [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".parquet")]


def test_a_killed_retrain_worker_is_retried(clean, runs, tmp_path):
    store = tmp_path / "store"
    run = runs(str(store))
    victim = wait_for(lambda: run.pids("ray::retrain"), 180, "a worker running a retrain task")[0]
    # While it runs, the embedded Ray (GCS, raylet, agents, workers) listens on loopback only.
    sockets = listeners(set(run.pids()))
    assert len(sockets) >= 5 and all(ipaddress.ip_address(a).is_loopback for a, _, _ in sockets), sockets
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    assert run.wait() == 0, run.output()[-4000:]
    rows = assert_same_as_clean(str(store), clean["results"])
    report(f"retrain worker SIGKILLed: run completed in {run.seconds:.1f} s (clean {clean['seconds']:.1f} s), "
           f"{time.monotonic() - killed:.1f} s after the kill; {rows}")


def test_a_killed_coordinator_is_replaced_and_rebuilds_its_statistics(clean, runs, tmp_path):
    store = tmp_path / "store"
    run = runs(str(store))
    wait_for(lambda: _parts(store, "retrain"), 180, "the first retrain part")
    victim = wait_for(lambda: run.pids("ray::MeteredCoordinator"), 30, "the coordinator's process")[0]
    os.kill(victim, signal.SIGKILL)
    assert run.wait() == 0, run.output()[-4000:]
    assert "the coordinator was restarted" in run.output()
    rows = assert_same_as_clean(str(store), clean["results"])
    report(f"coordinator SIGKILLed after {len(_parts(store, 'retrain'))} retrain parts in all: run completed in "
           f"{run.seconds:.1f} s (clean {clean['seconds']:.1f} s); {rows}")


def test_a_killed_driver_resumes_with_only_the_missing_tasks(clean, runs, tmp_path):
    store = tmp_path / "store"
    first = runs(str(store), name="first")
    wait_for(lambda: len(_parts(store, "retrain")) >= 3, 180, "three retrain parts")
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    time.sleep(1)
    first.kill()  # what the driver's death left of its embedded Ray
    landed = len(_parts(store, "retrain")) + len(_parts(store, "influence"))
    began = time.monotonic()
    second = runs(str(store), name="second")
    assert second.wait() == 0, second.output()[-4000:]
    out = " ".join(second.output().split())
    assert "is no longer running; taking over its lease" in out  # the dead driver's lease does not block
    skipped = int(out.split(" skipped (already in the store)")[0].rsplit(",", 1)[1].split()[0])
    assert skipped >= landed
    rows = assert_same_as_clean(str(store), clean["results"])
    report(f"driver SIGKILLed with {landed} influence/retrain parts landed: rerun skipped {skipped} tasks and "
           f"finished in {time.monotonic() - began:.1f} s; {rows}")


@pytest.mark.parametrize("outage", ["frozen", "killed"])
def test_an_s3_outage_of_20_seconds_loses_nothing(clean, runs, tmp_path, use_s3, outage):
    """SIGSTOP the S3 server for 20 s, or SIGKILL it and start it again on the same port and data after 20 s."""
    from cluster import s3server

    server = s3server.start(tmp_path / "s3", buckets=["faults"])
    try:
        run = runs("s3://faults/x", env=aws_env(server))
        wait_for(lambda: _s3_parts(server, "faults", "retrain"), 180, "the first retrain part on S3", every=0.5)
        began = time.monotonic()
        if outage == "frozen":
            os.kill(server.process.pid, signal.SIGSTOP)
            time.sleep(20)
            os.kill(server.process.pid, signal.SIGCONT)
            back = 0.0
        else:
            server.process.kill()
            server.process.wait()
            time.sleep(20)
            back = server.restart()
        assert run.wait() == 0, run.output()[-4000:]
        use_s3(server)
        rows = assert_same_as_clean("s3://faults/x", clean["results"])
        report(f"S3 server {outage} for 20 s{f' (answered {back:.1f} s after the restart)' if back else ''}: run "
               f"completed {time.monotonic() - began:.1f} s after the outage began, {run.seconds:.1f} s in all; {rows}")
    finally:
        server.stop()


def test_bad_files_are_set_aside_and_recomputed(clean, runs, tmp_path):
    """A truncated retrain part, an influence part with another table's schema and a checkpoint of another
    model, in a store whose run was interrupted before its final statistics: each is named, moved aside (kept)
    and computed again, and the results equal the clean run's."""
    from storage.checkpoints import checkpoint_path
    from storage.uri import open_store

    store_dir = tmp_path / "store"
    shutil.copytree(clean["store"], store_dir)
    for final in _parts(store_dir, "stats"):
        final.unlink()  # interrupted before the end: nothing is skipped as finished
    a, b = sorted(p.name for p in (store_dir / EXPERIMENT / "models").iterdir())
    truncated = sorted((store_dir / EXPERIMENT / "retrain" / a).glob("*.parquet"))[1]
    truncated.write_bytes(truncated.read_bytes()[:200])
    foreign = sorted((store_dir / EXPERIMENT / "influence" / a).glob("*.parquet"))[0]
    shutil.copyfile(sorted((store_dir / EXPERIMENT / "test_points" / a).glob("*.parquet"))[0], foreign)
    store = open_store(str(store_dir))
    import pyarrow.parquet as pq

    keys = {cid: pq.read_table(store_dir / EXPERIMENT / "models" / cid / "model.parquet")["model_key"][0].as_py()
            for cid in (a, b)}
    theirs = Path(checkpoint_path(store, EXPERIMENT, keys[a]))
    mine = Path(checkpoint_path(store, EXPERIMENT, keys[b]))
    shutil.copyfile(theirs, mine)  # b's checkpoint now holds a's model

    run = runs(str(store_dir))
    assert run.wait() == 0, run.output()[-4000:]
    out = " ".join(run.output().split())
    for bad, why in ((truncated, "not a readable Parquet file"), (foreign, "does not match the schema"),
                     (mine, "not the base model of configuration")):
        assert f"set aside {bad}" in out and why in out, (bad, out[-3000:])
    kept = sorted((store_dir / EXPERIMENT / "_set_aside").rglob("*.*"))
    assert len(kept) == 3
    rows = assert_same_as_clean(str(store_dir), clean["results"])
    report(f"truncated part, foreign-schema part, mismatched checkpoint: each set aside and recomputed, run "
           f"{run.seconds:.1f} s; {rows}")
