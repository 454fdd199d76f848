"""The coordinator's dashboard metrics appear on the node's metrics endpoint (what the dashboard scrapes)."""
from __future__ import annotations

import time
import urllib.request

import pyarrow as pa

from cluster.metrics import MeteredCoordinator
from storage import tables
from storage.uri import open_store


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _landed(store, cid: str) -> tuple[str, str]:
    """One landed retrain part (2 removals, 1 test point, 1 control) and its estimates."""
    inf = tables.write_part(store, "m", "influence", cid, "exact-000", {
        "method": ["exact"] * 2, "test_idx": [5, 5], "train_idx": [0, 1], "estimate": [0.1, 0.2],
        "predicted_dtheta": [0.01, 0.02]})
    rt = tables.write_part(store, "m", "retrain", cid, "retrain-00000", pa.table({
        "removed": [-1, 0, 1], "test_idx": [5, 5, 5], "loss_retrained": [1.0, 1.1, 1.3],
        "loss_control": [1.0] * 3, "actual": [0.0, 0.1, 0.3], "dtheta": [0.0, 0.01, 0.02]}))
    return inf, rt


def test_metrics_reach_the_metrics_endpoint(ray_cluster, tmp_path):
    ray = ray_cluster
    store = open_store(str(tmp_path / "store"))
    inf, rt = _landed(store, "c1")
    actor = ray.remote(num_cpus=0)(MeteredCoordinator).options(name="fragile-coordinator-metrics-test").remote(
        store, "m")
    ray.get(actor.register.remote("c1", ["exact"], [(5, "highest")]))
    ray.get(actor.task_done.remote("retrain"))
    ray.get(actor.task_failed.remote("influence"))
    ray.get(actor.ingest.remote("influence", "c1", inf))
    ray.get(actor.ingest.remote("retrain", "c1", rt))
    assert ray.get(actor.progress.remote())["failed"]["influence"] == 1
    # a configuration whose network collapsed: no Spearman, one cell count left out
    inf2, rt2 = _landed(store, "c2")
    ray.get(actor.register.remote("c2", ["exact"], [(5, "highest")], "a constant predictor"))
    ray.get(actor.ingest.remote("influence", "c2", inf2))
    assert ray.get(actor.ingest.remote("retrain", "c2", rt2))["collapsed"] == 1.0

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ("ray_fragile_tasks", "ray_fragile_retrains", "ray_fragile_retrains_per_second", "ray_fragile_left_out")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = _scrape(port)
        if all(w in text for w in wanted) and 'outcome="failed"' in text:
            break
        time.sleep(2)
    for w in wanted:
        assert w in text, w
    assert 'kind="influence"' in text and 'outcome="failed"' in text
    left_out = [line for line in text.splitlines() if line.startswith("ray_fragile_left_out{")]
    assert any('config="c2"' in line and 'reason="collapsed"' in line for line in left_out), left_out
    assert not any('config="c2"' in line for line in text.splitlines() if line.startswith("ray_fragile_spearman{"))
    ray.kill(actor)
