"""Task graph of a configuration: task counts and chunking."""
from __future__ import annotations

from pathlib import Path

from jobs import plan
from jobs.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def test_task_counts_iris_smoke():
    configs = load_spec(ROOT / "jobs/specs/iris-smoke.yaml").configurations()
    assert plan.task_counts(configs, lambda c: 120) == {"train": 4, "influence": 4 * 5, "retrain": 8}


def test_task_counts_other_removals():
    configs = parse_spec({"experiment": "x", "ground_truth": {"removals": {"top_k": 40}, "chunk": 16},
                          "sweep": {"retrain_epochs": [10, 20]}}).configurations()
    assert plan.task_counts(configs, lambda c: 120) == {"train": 2, "influence": 2, "retrain": 6}
    assert plan.task_counts(configs, lambda c: 20)["retrain"] == 4  # no more removals than training points
    configs = parse_spec({"experiment": "x", "ground_truth": {"removals": {"explicit": [1, 2, 3]}, "chunk": 2},
                          "test_points": [{"random": 20}]}).configurations()
    counts = plan.task_counts(configs, lambda c: 120)
    assert counts["retrain"] == 2 and counts["influence"] == 2  # 20 test points in chunks of 16


def test_chunks_cover_every_removal_once():
    cfg = parse_spec({"experiment": "x", "ground_truth": {"chunk": 7}}).configurations()[0]
    tasks = plan.retrain_tasks(cfg, list(range(30))[::-1])
    assert [t.part for t in tasks] == [f"retrain-{k:05d}" for k in range(5)]
    assert sum((t.removed for t in tasks), []) == list(range(30))
    inf = plan.influence_tasks(cfg, list(range(20)))
    assert [(t.method, t.chunk, len(t.test_idx)) for t in inf] == [("exact", 0, 16), ("exact", 1, 4)]


def test_spec_vocabulary_is_what_influence_offers():
    """The spec validates names without importing torch; every name it accepts must exist in influence/."""
    from influence import data, ihvp, models
    from jobs import spec

    assert spec.DATASETS == data.DATASETS
    assert spec.MODELS == models.MODELS
    assert spec.ACTIVATIONS == models.ACTIVATIONS
    assert spec.METHODS == ihvp.METHODS
