"""Dashboard metrics: the coordinator actor, with Ray metrics (`ray.util.metrics`) named fragile_*.

Ray exports them with its own `ray_` prefix on every node's metrics endpoint, which the dashboard's
Prometheus/Grafana integration scrapes: tasks done, skipped and failed per kind, retrains landed and their
rate, configurations finished, and the running Spearman per configuration, method and test point.
"""
from __future__ import annotations

import math
import time

from jobs.coordinator import Coordinator
from storage.uri import Store


class MeteredCoordinator(Coordinator):
    """The coordinator as it runs on a cluster: every update also sets a dashboard metric."""

    def __init__(self, store: Store, experiment: str, *args, **kwargs) -> None:
        super().__init__(store, experiment, *args, **kwargs)
        from ray.util.metrics import Counter, Gauge

        tags = {"experiment": experiment}
        self._tasks = Counter("fragile_tasks", "tasks finished, by kind and outcome (done, skipped, failed)",
                              tag_keys=("experiment", "kind", "outcome"))
        self._retrains = Counter("fragile_retrains", "single-point retrains landed", tag_keys=("experiment",))
        self._rate = Gauge("fragile_retrains_per_second", "retrains landed per second since the first one",
                           tag_keys=("experiment",))
        self._configs = Gauge("fragile_configs_done", "configurations with final statistics",
                              tag_keys=("experiment",))
        self._spearman = Gauge("fragile_spearman", "running Spearman of estimate vs actual",
                               tag_keys=("experiment", "config", "method", "test_point"))
        # Cells whose correlation is undefined and left out of every mean, per configuration: 1 for a collapsed
        # network, and the number of (method, test point) solves that diverged.
        self._left_out = Gauge("fragile_left_out", "cells left out of the means: collapsed network, diverged solves",
                               tag_keys=("experiment", "config", "reason"))
        for metric in (self._tasks, self._retrains, self._rate, self._configs, self._spearman, self._left_out):
            metric.set_default_tags(tags)
        self._first_retrain: float | None = None

    def task_done(self, kind: str, n: int = 1, skipped: bool = False, key: str | None = None) -> int:
        counted = super().task_done(kind, n, skipped, key)  # 0 for a call Ray repeated after a restart
        if counted:
            self._tasks.inc(counted, tags={"kind": kind, "outcome": "skipped" if skipped else "done"})
        return counted

    def task_failed(self, kind: str) -> None:
        super().task_failed(kind)
        self._tasks.inc(1, tags={"kind": kind, "outcome": "failed"})

    def ingest(self, table: str, config_id: str, path: str) -> dict[str, float]:
        before = self.retrains_landed
        summary = super().ingest(table, config_id, path)
        if "set_aside" in summary:
            return summary
        landed = self.retrains_landed - before
        if landed:
            now = time.monotonic()
            self._first_retrain = self._first_retrain or now
            self._retrains.inc(landed)
            self._rate.set(self.retrains_landed / max(now - self._first_retrain, 1e-3))
        self._set_spearman(config_id, summary)
        return summary

    def finalize(self, config_id: str) -> dict[str, float]:
        summary = super().finalize(config_id)
        self._set_spearman(config_id, summary)
        self._configs.set(self.configs_done)
        return summary

    def config_skipped(self, config_id: str, tasks: dict[str, list[str]], replicates: int = 1) -> dict[str, float] | None:
        summary = super().config_skipped(config_id, tasks, replicates)
        if summary is not None:
            for kind, keys in tasks.items():
                if keys:
                    self._tasks.inc(len(keys), tags={"kind": kind, "outcome": "skipped"})
            self._configs.set(self.configs_done)
        return summary

    def _set_spearman(self, config_id: str, summary: dict[str, float]) -> None:
        for reason in ("collapsed", "diverged"):
            if summary.get(reason):
                self._left_out.set(summary[reason], tags={"config": config_id, "reason": reason})
        for key, value in summary.items():
            if key.startswith("spearman/") and value is not None and not math.isnan(value):
                _, method, selection = key.split("/", 2)
                self._spearman.set(value, tags={"config": config_id, "method": method, "test_point": selection})
