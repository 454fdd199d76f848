"""Ray runs a task again when it failed because the store stayed away (TransientTaskError), and not when it
failed for a reason of its own (TaskError): the options every task of the sweep is submitted with."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobs.tasks import TaskError, TransientTaskError


def _flaky_task():
    """A task body that fails its first call (defined here so that Ray ships it by value to the worker)."""
    def flaky(counter: str, error: type) -> int:
        path = Path(counter)
        calls = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(calls))
        if calls == 1:
            raise error("retrain/c/retrain-00000", "s3://b/x.parquet", "OSError: AWS Error NETWORK_CONNECTION")
        return calls

    return flaky


@pytest.mark.parametrize("error, retried", [(TransientTaskError, True), (TaskError, False)])
def test_only_transient_task_errors_are_retried(ray_cluster, tmp_path, error, retried):
    from cluster.runner import task_options

    ray = ray_cluster
    counter = tmp_path / "calls"
    task = ray.remote(_flaky_task()).options(**task_options({"num_cpus": 0.1}, f"flaky {error.__name__}"))
    ref = task.remote(str(counter), error)
    if retried:
        assert ray.get(ref) == 2
    else:
        with pytest.raises(TaskError, match="retrain/c/retrain-00000"):
            ray.get(ref)
        assert counter.read_text() == "1"
