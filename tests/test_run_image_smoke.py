"""The image smoke specs end to end through Ray: tiny MNIST, CIFAR-10 and ImageNet files in their real on-disk
formats, read by the real torchvision readers, trained, estimated, retrained and summarised.

Each test writes the tiny data set, points a copy of the shipped smoke spec at it, and checks what landed against
what the protocol says should be there: the removal sets recomputed from the stored estimates, the control rows,
the group rows, and statistics with their noise floor. Resume is checked on the MNIST run: after deleting a
retrain part and the final statistics, a rerun recomputes exactly those and leaves every other part untouched.

About three minutes on 2 cores, so marked slow: `pytest -m slow` runs them (CI does, after the main suite).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from influence.data_files import write_tiny
from influence.scores import select_groups, select_removals

pytestmark = pytest.mark.slow
from fragile.cli import main
from jobs.spec import load_spec
from storage import tables
from storage.uri import open_store

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "jobs" / "specs"


def _spec(name: str, tmp: Path) -> Path:
    """The shipped smoke spec of `name`, reading a freshly written tiny data set."""
    data = write_tiny(name, str(tmp / "data" / name))
    text = (SPECS / f"{name}-smoke.yaml").read_text().replace(f"data/tiny/{name}", data)
    path = tmp / f"{name}-smoke.yaml"
    path.write_text(text)
    return path


def _run(spec: Path, store_dir: Path) -> None:
    assert main(["run", str(spec), "--store", str(store_dir)]) == 0


def _estimates(store, experiment: str, cid: str, method: str, n: int) -> torch.Tensor:
    inf = tables.read_table(store, experiment, "influence", config_ids=[cid])
    rows = inf.filter(pc.equal(inf["method"], method)).sort_by([("test_idx", "ascending"), ("train_idx", "ascending")])
    return torch.tensor(rows["estimate"].to_numpy()).reshape(-1, n)


def _ranking_estimates(store, experiment, cfg, n) -> torch.Tensor:
    """The estimates the trial ranks by: the first method whose solves converged for every test point."""
    for method in cfg.methods:
        est = _estimates(store, experiment, cfg.config_id, method, n)
        if not torch.isnan(est).any():
            return est
    raise AssertionError("no method converged")


@pytest.fixture(scope="module")
def mnist_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mnist")
    spec = _spec("mnist", tmp)
    _run(spec, tmp / "store")
    return spec, tmp / "store"


def test_mnist_smoke_follows_the_protocol(mnist_run):
    spec_path, store_dir = mnist_run
    store, spec = open_store(str(store_dir)), load_spec(spec_path)
    configs = spec.configurations()
    models = tables.read_table(store, spec.experiment, "models").to_pandas()
    assert sorted(models.n_params) == [2616, 107786]  # small CNN and LeNet on 28x28, 10 classes
    # LeNet learns the tiny set in 40 epochs; the tanh small CNN barely starts to (it needs more steps)
    assert (models.n_train == 200).all() and models.train_accuracy.max() > 0.5
    for cfg in configs:
        retrain = tables.read_table(store, spec.experiment, "retrain", config_ids=[cfg.config_id]).to_pandas()
        tp = tables.read_table(store, spec.experiment, "test_points", config_ids=[cfg.config_id])
        assert sorted(tp["selection"].to_pylist()) == ["highest", "median"]
        # the top 5 by |estimate| and the 5 nearest the 30th percentile, per test point, as one union
        est = _ranking_estimates(store, spec.experiment, cfg, 200)
        expected = sorted(set(select_removals(est, "top_k", k=5)) | set(select_removals(est, "percentile", k=5, at=30)))
        assert sorted(retrain[retrain.removed >= 0].removed.unique()) == expected
        assert set(retrain["mode"]) == {"control", "warm"}
        controls = retrain[retrain["mode"] == "control"]
        assert sorted(controls.removed.unique()) == [-3, -2, -1]  # 3 replicates, differing in minibatch order
        assert controls.seed.nunique() == 1  # the seed column records the shared order of the batch
    stats = tables.read_table(store, spec.experiment, "stats").to_pandas()
    assert len(stats) == len(configs) * 2 * 2 and stats.final.all()
    lissa = stats[stats.method == "lissa"]
    assert lissa.spearman.notna().all() and (lissa.n >= 5).all()
    assert (lissa.noise_floor > 0).all()
    assert np.allclose(lissa.snr, lissa.actual_std / lissa.noise_floor)


def test_mnist_smoke_resume_recomputes_only_what_is_missing(mnist_run):
    spec_path, store_dir = mnist_run
    store, spec = open_store(str(store_dir)), load_spec(spec_path)
    cid = spec.configurations()[0].config_id
    before = {p: store.fs.get_file_info(p).mtime for p in _parts(store_dir)}
    lost = tables.part_path(store, spec.experiment, "retrain", cid, "retrain-00000")
    old = tables.read_part(store, lost).to_pandas()
    store.fs.delete_file(lost)
    store.fs.delete_file(tables.part_path(store, spec.experiment, "stats", cid, "final"))
    _run(spec_path, store_dir)
    after = {p: store.fs.get_file_info(p).mtime for p in _parts(store_dir)}
    assert set(after) == set(before)
    rewritten = {p for p in before if after[p] != before[p]}
    assert rewritten == {lost, tables.part_path(store, spec.experiment, "stats", cid, "final")}
    new = tables.read_part(store, lost).to_pandas()
    assert np.allclose(new.actual, old.actual, rtol=1e-6, atol=1e-12)


def _parts(store_dir: Path) -> list[str]:
    # configs rows are rewritten by every run (same content); the other tables are what resume must not redo
    return sorted(str(p) for p in Path(store_dir).rglob("*.parquet") if "_tune" not in p.parts and "configs" not in p.parts)


def test_cifar10_smoke_end_to_end(ray_cluster, tmp_path):
    spec_path = _spec("cifar10", tmp_path)
    _run(spec_path, tmp_path / "store")
    store, spec = open_store(str(tmp_path / "store")), load_spec(spec_path)
    models = tables.read_table(store, spec.experiment, "models").to_pandas()
    assert sorted(models.n_params) == [2760, 136886]  # 3 colour channels, 32x32
    stats = tables.read_table(store, spec.experiment, "stats").to_pandas()
    assert len(stats) == 2 * 2 * 2 and stats.final.all()
    for cfg in spec.configurations():
        retrain = tables.read_table(store, spec.experiment, "retrain", config_ids=[cfg.config_id]).to_pandas()
        est = _ranking_estimates(store, spec.experiment, cfg, 200)
        assert sorted(retrain[retrain.removed >= 0].removed.unique()) == select_removals(est, "top_k", k=8)


def test_imagenet_smoke_group_removal(ray_cluster, tmp_path):
    spec_path = _spec("imagenet", tmp_path)
    _run(spec_path, tmp_path / "store")
    store, spec = open_store(str(tmp_path / "store")), load_spec(spec_path)
    (cfg,) = spec.configurations()
    models = tables.read_table(store, spec.experiment, "models").to_pandas()
    assert models.n_train[0] == 3 * 12 and models.n_params[0] == 11_170_371  # ResNet-18 (GroupNorm), 3 classes
    retrain = tables.read_table(store, spec.experiment, "retrain").to_pandas()
    groups = retrain[retrain.removed >= 0].sort_values("removed")
    est = _ranking_estimates(store, spec.experiment, cfg, 36)
    expected = select_groups(est, k=6, groups=3, seed=cfg.seed)
    assert [list(m) for m in groups.members] == expected
    assert list(groups["mode"]) == ["group"] + ["random_group"] * 3 and (groups.group_size == 6).all()
    stats = tables.read_table(store, spec.experiment, "stats").to_pandas()
    (row,) = stats.itertuples()
    assert row.n == 4  # its own top group and the three random ones
    assert row.group_actual == pytest.approx(groups.actual.iloc[0])
    assert row.random_group_mean == pytest.approx(groups.actual.iloc[1:].mean())
    assert not math.isnan(row.noise_floor)
