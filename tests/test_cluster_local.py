"""The local cluster's files and choices without starting it: secrets in private files from the first byte,
loopback as the default, a warning for anything else (the cluster itself: tests/faults and test_run_e2e)."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from cluster import local
from jobs.tasks import TaskError, TransientTaskError, task_error


def test_private_files_and_folders(tmp_path):
    old = os.umask(0)  # the most permissive umask: the modes must not depend on it
    try:
        folder = tmp_path / "a" / "b"
        local._private_dir(folder)
        local._write_private(folder / "secret", "s3cr3t")
    finally:
        os.umask(old)
    assert (folder.stat().st_mode & 0o777) == 0o700
    assert ((folder / "secret").stat().st_mode & 0o777) == 0o600 and (folder / "secret").read_text() == "s3cr3t"
    assert [p.name for p in folder.iterdir()] == ["secret"]  # no temporary file left behind


def test_loopback_is_the_default_and_anything_else_warns():
    assert local.is_loopback("127.0.0.1") and local.is_loopback("::1") and local.is_loopback("localhost")
    assert not local.is_loopback("0.0.0.0") and not local.is_loopback("10.0.0.5")
    assert local.warnings_for("127.0.0.1", "token") == []
    assert "reachable from the network" in local.warnings_for("0.0.0.0", "token")[0]
    assert "authentication is off" in local.warnings_for("127.0.0.1", "disabled")[0]
    with pytest.raises(local.ClusterError, match="--auth"):
        local.up(auth="none")


@pytest.mark.parametrize("workers,cpus", [(-1, 1), (2, 0)])
def test_a_bad_worker_count_is_one_message_before_anything_starts(tmp_path, workers, cpus):
    with pytest.raises(local.ClusterError, match=rf"--workers must be >= 0 and --worker-cpus >= 1; got {workers} "
                                                 rf"and {cpus}"):
        local.up(tmp_path / "cluster", workers=workers, worker_cpus=cpus)
    assert not (tmp_path / "cluster").exists()


def test_the_shell_environment_carries_the_token_path_not_the_token(tmp_path):
    state = local.ClusterState(dir=str(tmp_path), ray_pid=1, ray_port=1, dashboard_port=8265, s3_pid=2,
                               s3_endpoint="http://127.0.0.1:8333", bucket="b", access_key="a", secret_key="s",
                               region="us-east-1", cluster_id="c")
    env = state.env()
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / local.TOKEN_FILE)
    assert "RAY_AUTH_TOKEN" not in env
    off = local.ClusterState(**{**state.__dict__, "auth": "disabled"})
    assert off.env()["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN_PATH" not in off.env()


def test_a_state_file_from_an_older_version_still_loads(tmp_path):
    old = {"dir": str(tmp_path), "ray_pid": 1, "ray_port": 1, "dashboard_port": 2, "s3_pid": 3,
           "s3_endpoint": "http://127.0.0.1:8333", "bucket": "b", "access_key": "a", "secret_key": "s",
           "region": "us-east-1"}
    (tmp_path / local.STATE_FILE).write_text(json.dumps(old))
    state = local.load_state(tmp_path)
    assert state.host == "127.0.0.1" and state.cluster_id == "" and state.worker_pids == []


def test_task_errors_say_whether_another_attempt_may_help():
    refused = OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect")
    transient = task_error("retrain/c/retrain-00001", "s3://b/x.parquet", refused)
    assert isinstance(transient, TransientTaskError) and "retrain/c/retrain-00001" in str(transient)
    permanent = task_error("influence/c/exact-000", "x", ValueError("singular"))
    assert type(permanent) is TaskError
    for error in (transient, permanent):  # they cross from Ray workers to the trial intact
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
