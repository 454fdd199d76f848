"""Configuration -> task graph: train -> influence chunks -> retrain chunks.

Pure functions: which tasks a configuration needs, under which part names, and which of them the
ledger already holds. The sweep (cluster/sweep.py) walks this plan and schedules only what is missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from jobs.coordinator import FINAL_PART
from jobs.spec import Configuration
from jobs.tasks import influence_part_name, retrain_part_name
from storage.ledger import Ledger

def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)] or []


@dataclass(frozen=True)
class InfluenceTask:
    method: str
    chunk: int
    test_idx: list[int]

    @property
    def part(self) -> str:
        return influence_part_name(self.method, self.chunk)


@dataclass(frozen=True)
class RetrainTask:
    chunk: int
    removed: list[int]

    @property
    def part(self) -> str:
        return retrain_part_name(self.chunk)


def influence_tasks(cfg: Configuration, test_idx: list[int]) -> list[InfluenceTask]:
    # Exact solves factor the Hessian once per task, so on small models one task per method is cheapest; on a
    # cluster the chunks (influence.test_chunk test points each) spread the test points over workers.
    return [InfluenceTask(m, k, c) for m in cfg.methods for k, c in enumerate(chunks(test_idx, cfg.test_chunk))]


def retrain_tasks(cfg: Configuration, removed: list[int]) -> list[RetrainTask]:
    return [RetrainTask(k, c) for k, c in enumerate(chunks(sorted(removed), cfg.retrain_chunk))]


def n_test_points(cfg: Configuration) -> int:
    """Test points the rules ask for (an upper bound: a point picked by two rules is studied once)."""
    return sum(r.k for r in cfg.test_points)


def removal_count(cfg: Configuration, n_train: int) -> int:
    """Retrains (single points or groups) the removal rules ask for: an upper bound where rules overlap, and
    planned before the test points are known (a rule per test point counts as one test point's worth; the
    trial corrects the total once it knows the real set)."""
    if cfg.removals[0].kind == "group":  # group removal stands alone: one rule
        return cfg.removals[0].count(n_train, n_test_points(cfg))
    return min(n_train, sum(r.count(n_train) for r in cfg.removals))


def task_counts(configs: list[Configuration], n_train_of: Callable[[Configuration], int]) -> dict[str, int]:
    """Tasks per kind for a set of configurations: one train task each (it reuses a stored checkpoint of an
    identical base model), one influence task per method and chunk of test points, one retrain task per
    chunk of removals."""
    return {
        "train": len(configs),
        "influence": sum(len(c.methods) * math.ceil(n_test_points(c) / c.test_chunk) for c in configs),
        "retrain": sum(math.ceil(removal_count(c, n_train_of(c)) / c.retrain_chunk) for c in configs),
    }


def is_finished(ledger: Ledger, cfg: Configuration) -> bool:
    return ledger.done("stats", cfg.config_id, FINAL_PART)


def is_trained(ledger: Ledger, cfg: Configuration, checkpoint_present: bool) -> bool:
    cid = cfg.config_id
    return checkpoint_present and ledger.done("models", cid, "model") and ledger.done("test_points", cid, "test_points")


def landed_task_counts(ledger: Ledger, cfg: Configuration) -> dict[str, int]:
    """How many tasks of each kind a finished configuration holds, counted from its parts."""
    cid = cfg.config_id
    return {"train": 1, "influence": len(ledger.parts("influence", cid)), "retrain": len(ledger.parts("retrain", cid))}
