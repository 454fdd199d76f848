"""A data-parallel training worker SIGKILLed mid-run, for real: Ray Train restarts the worker group and the new
workers continue from the progress worker 0 saved in the store, so θ̂ is still the one a single worker reaches
with the same global batch and seed (within 1e-10, float64), and the log says where training resumed."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from harness import report

pytestmark = pytest.mark.faults


def _train_workers() -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"RayTrainWorker" in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                continue
    return found


def test_a_killed_training_worker_resumes_from_the_saved_step(ray_cluster, tmp_path):
    from cluster import data_parallel
    from influence.data import load_dataset
    from influence.train import train
    from jobs import tasks
    from jobs.spec import Configuration
    from storage.checkpoints import progress_path
    from storage.uri import is_file, open_store

    cfg = Configuration("ddp", dataset="digits", subset=120, test_subset=20, model="small_cnn", optimizer="sgd",
                        lr=0.05, momentum=0.9, batch_size=25, schedule="cosine", epochs=300, weight_decay=0.001,
                        seed=4, train_checkpoint_every=100)  # 1,500 steps, saved every 100
    data = load_dataset("digits", subset=120, test_subset=20)
    model = tasks.model_for(cfg, data)
    store = open_store(str(tmp_path / "store"))
    path = progress_path(store, "ddp", cfg.config_id, "train")
    killed: list[int] = []

    def kill_a_worker_once_progress_is_saved() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not is_file(store, path):
            time.sleep(0.02)
        workers = _train_workers()
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])

    watcher = threading.Thread(target=kill_a_worker_once_progress_is_saved, daemon=True)
    watcher.start()
    start = time.perf_counter()
    got, _ = data_parallel.fit(store, cfg, data, data, model, None, workers=2, per_worker={"num_cpus": 1})
    seconds = time.perf_counter() - start
    watcher.join(timeout=5)
    assert killed, "no training worker was found to kill"
    expected = train(model, data.x_train, data.y_train, weight_decay=cfg.weight_decay, lr=cfg.lr, epochs=cfg.epochs,
                     seed=cfg.seed, optimizer="sgd", momentum=0.9, batch_size=25, schedule="cosine")
    assert torch.allclose(got.theta, expected.theta, rtol=0, atol=1e-10)
    # The restarted workers said where they went on from, in their logs (runs keep worker output out of the
    # console; the dashboard shows it).
    logs = Path(ray_cluster._private.worker._global_node.get_logs_dir_path())
    seen, deadline = "", time.monotonic() + 15
    while "resumed at step" not in seen and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = "".join(f.read_text(errors="replace") for f in logs.glob("worker-*.out"))
    line = next(ln for ln in seen.splitlines() if f"train/{cfg.config_id}: resumed at step" in ln)
    step = int(line.split("resumed at step ")[1].split("/")[0])
    assert 100 <= step < 1500 and step % 100 == 0, line
    report(f"DDP worker {killed[0]} killed; training resumed at step {step}/1500, {seconds:.0f} s in all")
