"""A retrain task with ``ground_truth.checkpoint_every`` keeps its progress in the store and, rerun after it was
killed, continues from there: its rows equal those of a task that was never interrupted.

The kill is real: the task runs in a child process that SIGKILLs itself right after a chosen save of its
progress (so the kill falls at a known step, inside the second of the part's runs), leaving the files as a
preempted worker would. Files that do not belong to the run (another run's progress, a torn file) are set aside
and the run starts from its beginning.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pyarrow.fs import FileType

from jobs import tasks
from jobs.spec import parse_spec
from storage import tables
from storage.checkpoints import PROGRESS, progress_path, save_state
from storage.uri import list_files, open_store, write_atomic

ROOT = Path(__file__).resolve().parents[1]
REMOVED, TEST_IDX = [0, 3, 9], [0, 1]
PART = "retrain-00000"
EVERY, STEPS = 30, 200  # 50 epochs of 4 minibatches of 32 (of Iris's 120 training points)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(checkpoint_every: int | None = EVERY):
    ground_truth = {"epochs": 50, "controls": 2, "chunk": 8} | (
        {"checkpoint_every": checkpoint_every} if checkpoint_every else {})
    return parse_spec({"experiment": "resume", "train": {"batch_size": 32, "epochs": 100},
                       "ground_truth": ground_truth}).configurations()[0]


def _retrain(store, cfg):
    """The part's task, from a fixed θ (any θ will do: the point is the steps)."""
    data = tasks.load_data(cfg)
    theta = tasks.model_for(cfg, data).init(0, dtype=torch.float64)
    return tasks.retrain_task(store, cfg, data, theta, 0, REMOVED, TEST_IDX)


def child(root: str, kill_after: int) -> None:
    """Run the task and SIGKILL this process right after save number `kill_after` of its progress."""
    save, saves = tasks.StoredProgress.save, []

    def save_then_die(self, state):
        save(self, state)
        saves.append(state["step"])
        if len(saves) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    tasks.StoredProgress.save = save_then_die
    torch.set_num_threads(1)
    _retrain(open_store(root), _cfg())


def _rows(store, path) -> dict:
    rows = tables.read_part(store, path).to_pydict()
    del rows["seconds"]  # wall time, the one column that may differ
    return rows


def _progress_files(store) -> list[str]:
    return [f.path for f in list_files(store, store.path("resume", PROGRESS)) if f.type == FileType.File]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The rows of the part retrained without saving any progress."""
    store = open_store(str(tmp_path_factory.mktemp("clean")))
    return _rows(store, _retrain(store, _cfg(checkpoint_every=None)))


def test_the_key_leaves_the_configuration_and_its_rows_alone(tmp_path, clean):
    assert _cfg().config_id == _cfg(checkpoint_every=None).config_id
    store = open_store(str(tmp_path))
    assert _rows(store, _retrain(store, _cfg())) == clean
    assert _progress_files(store) == []  # deleted once the part landed


def test_a_killed_retrain_resumes_from_its_saved_progress(tmp_path, clean, capfd):
    store = open_store(str(tmp_path))
    cfg = _cfg()
    # Run 0 (the removals and control 0) saves at 30, ..., 180 and at its end, 200: seven saves. Run 1 (control
    # 1, its own order) then saves at 30 and 60, and the process dies.
    proc = subprocess.run([sys.executable, "-c", f"from tests.test_retrain_progress import child; "
                                                 f"child({str(tmp_path)!r}, 9)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(Path(p).name for p in _progress_files(store)) == ["retrain-00000-r0.pt", "retrain-00000-r1.pt"]
    assert not tables.part_exists(store, "resume", "retrain", cfg.config_id, PART)
    capfd.readouterr()

    rows = _rows(store, _retrain(store, cfg))
    out = capfd.readouterr().out
    assert f"retrain/{cfg.config_id}/{PART} run 0: resumed at step {STEPS}/{STEPS}" in out
    assert f"retrain/{cfg.config_id}/{PART} run 1: resumed at step 60/{STEPS}" in out
    assert rows == clean
    assert _progress_files(store) == []


def test_progress_that_is_not_the_runs_own_is_set_aside(store, clean, capfd):
    cfg = _cfg()
    # Run 0's file saved by another run (its identity differs), run 1's file torn.
    other = {"identity": {"config_id": cfg.config_id, "part": PART, "run": 0, "steps": 7}, "state": {"step": 3}}
    save_state(store, progress_path(store, "resume", cfg.config_id, f"{PART}-r0"), other, "test")
    write_atomic(store, progress_path(store, "resume", cfg.config_id, f"{PART}-r1"), b"not a torch file")
    assert _rows(store, _retrain(store, cfg)) == clean
    out = capfd.readouterr().out
    assert "run 0: set aside" in out and "progress of another run" in out
    assert "run 1: set aside" in out and "not a loadable checkpoint" in out
    assert "resumed" not in out
    assert _progress_files(store) == []
    kept = [f.path for f in list_files(store, store.path("resume", tables.SET_ASIDE)) if f.type == FileType.File]
    assert len(kept) == 2
