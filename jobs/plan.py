"""Configuration -> task graph: train -> influence chunks -> retrain chunks.

Which tasks a configuration needs, under which part names (`jobs/protocol.py` names them), how many tasks a
sweep has, and which of them the ledger already holds. The pipeline (jobs/pipeline.py) walks this plan and
schedules only what is missing. Pure: no torch, no Ray. Part of the science code (jobs/science.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from jobs.protocol import (FINAL_PART, MODEL_PART, TEST_POINTS_PART, influence_part, retrain_part, shard_part,
                           solve_of, solve_task_part, train_shards)
from jobs.spec import Configuration
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
        return influence_part(self.method, self.chunk)


@dataclass(frozen=True)
class ShardTask:
    """The estimates of one method's chunk of test points over the training points start..stop-1, from the
    solve named `solve` (stored once, shared by the chunk's shards)."""
    method: str
    chunk: int
    test_idx: list[int]
    shard: int
    start: int
    stop: int

    @property
    def part(self) -> str:
        return shard_part(self.method, self.chunk, self.shard)

    @property
    def solve(self) -> str:
        return influence_part(self.method, self.chunk)


@dataclass(frozen=True)
class RetrainTask:
    chunk: int
    removed: list[int]
    replicate: int = 0

    @property
    def part(self) -> str:
        return retrain_part(self.chunk, self.replicate)


def influence_tasks(cfg: Configuration, test_idx: list[int]) -> list[InfluenceTask]:
    # Exact solves factor the Hessian once per task, so on small models one task per method is cheapest; on a
    # cluster the chunks (influence.test_chunk test points each) spread the test points over workers.
    return [InfluenceTask(m, k, c) for m in cfg.methods for k, c in enumerate(chunks(test_idx, cfg.test_chunk))]


def shard_tasks(cfg: Configuration, test_idx: list[int], n_train: int) -> list[ShardTask]:
    """With `influence.train_shard` set: one task per (method, chunk of test points, shard of training points),
    chunk by chunk (so a chunk's shards follow its solve); [] when it is unset."""
    shards = train_shards(cfg, n_train)
    if shards is None:
        return []
    return [ShardTask(t.method, t.chunk, t.test_idx, k, start, stop)
            for t in influence_tasks(cfg, test_idx) for k, (start, stop) in enumerate(shards)]


def retrain_tasks(cfg: Configuration, removed: list[int]) -> list[RetrainTask]:
    """One task per (replicate, chunk of removals), replicate by replicate: every replicate is independent
    of the others, so a cluster spreads them, and a rerun with more replicates adds only the new ones."""
    parts = chunks(sorted(removed), cfg.retrain_chunk)
    return [RetrainTask(k, c, r) for r in range(cfg.replicates) for k, c in enumerate(parts)]


def n_test_points(cfg: Configuration) -> int:
    """Test points the rules ask for (an upper bound: a point picked by two rules is studied once)."""
    return sum(r.k for r in cfg.test_points)


def removal_count(cfg: Configuration, n_train: int) -> int:
    """Retrains (single points or groups) the removal rules ask for: an upper bound where rules overlap, and
    planned before the test points are known (a rule per test point counts as one test point's worth; the
    trial corrects the total once it knows the real set)."""
    if cfg.ground_truth == "lds":  # one retrain per subset
        return dict(cfg.truth_settings)["subsets"]
    if cfg.removals[0].kind == "group":  # group removal stands alone: one rule
        return cfg.removals[0].count(n_train, n_test_points(cfg))
    return min(n_train, sum(r.count(n_train) for r in cfg.removals))


def task_counts(configs: list[Configuration], n_train_of: Callable[[Configuration], int]) -> dict[str, int]:
    """Tasks per kind for a set of configurations: one train task each (it reuses a stored checkpoint of an
    identical base model), one influence task per method and chunk of test points (sharded: its solve and
    one task per shard of training points), one retrain task per chunk of removals and replicate."""
    def influence(c: Configuration) -> int:
        shards = train_shards(c, n_train_of(c))
        return len(c.methods) * math.ceil(n_test_points(c) / c.test_chunk) * (1 if shards is None else 1 + len(shards))

    return {
        "train": len(configs),
        "influence": sum(influence(c) for c in configs),
        "retrain": sum(c.replicates * math.ceil(removal_count(c, n_train_of(c)) / c.retrain_chunk)
                       for c in configs),
    }


def is_finished(ledger: Ledger, cfg: Configuration) -> bool:
    return ledger.done("stats", cfg.config_id, FINAL_PART)


def is_trained(ledger: Ledger, cfg: Configuration, checkpoint_present: bool) -> bool:
    cid = cfg.config_id
    return (checkpoint_present and ledger.done("models", cid, MODEL_PART)
            and ledger.done("test_points", cid, TEST_POINTS_PART))


def task_key(config_id: str, part: str | None = None) -> str:
    """The key a task is counted under: `config_id` for its train task, `config_id/part` for the others."""
    return config_id if part is None else f"{config_id}/{part}"


def landed_task_keys(ledger: Ledger, config_id: str) -> dict[str, list[str]]:
    """The tasks of each kind whose parts a configuration holds in the store, by key (a sharded chunk's solve
    counts as done once one of its shards landed: a shard is computed from the stored solve)."""
    parts = ledger.parts("influence", config_id)
    solves = sorted({solve_task_part(s) for s in map(solve_of, parts) if s is not None})
    return {"train": [task_key(config_id)] if ledger.done("models", config_id, MODEL_PART) else [],
            "influence": [task_key(config_id, p) for p in [*parts, *solves]],
            "retrain": [task_key(config_id, p) for p in ledger.parts("retrain", config_id)]}


def landed_keys(ledger: Ledger, config_ids: list[str]) -> dict[str, list[str]]:
    """`landed_task_keys` of several configurations together (what the store held when a run began)."""
    out: dict[str, list[str]] = {"train": [], "influence": [], "retrain": []}
    for config_id in config_ids:
        for kind, keys in landed_task_keys(ledger, config_id).items():
            out[kind] += keys
    return out


# The exact method holds the dense curvature matrix, its eigenvectors and eigh's workspace: about three P x P
# float64 matrices at once.
EXACT_MATRICES = 3


def exact_memory(n_params: int) -> int:
    """Bytes the exact method needs for a model of `n_params` parameters (float64 curvature)."""
    return EXACT_MATRICES * n_params * n_params * 8


def infeasible_methods(configs: list[Configuration], n_params_of: Callable[[Configuration], int],
                       task_memory: int, memory_source: str) -> str | None:
    """Why the spec asks for more memory than an influence task has (`task_memory` bytes, as `memory_source`
    says where that figure came from), or None. Checked before anything runs: a dense Hessian that cannot
    fit would otherwise fail (or swap the node to a halt) hours into a sweep."""
    worst = None
    for cfg in configs:
        if "exact" not in cfg.methods:
            continue
        p = n_params_of(cfg)
        need = exact_memory(p)
        if need > task_memory and (worst is None or p > worst[1]):
            worst = (cfg, p, need)
    if worst is None:
        return None
    cfg, p, need = worst
    others = ", ".join(m for m in ("cg", "lissa", "arnoldi", "ekfac"))
    return (f"influence.methods: exact forms the dense Hessian of {cfg.label()} ({p:,} parameters: about "
            f"{_size(need)} with its eigendecomposition), more than an influence task's memory ({_size(task_memory)}, "
            f"{memory_source}); use methods that never form it ({others}), or set resources.influence.memory "
            f"if the cluster's workers have more")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"
