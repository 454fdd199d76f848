"""File sets streamed through DataLoaders give what the in-memory path gives, value for value: the same
standardised points, the same minibatches, the same θ̂ and curvature products, the same train-task rows, while
the task never holds the decoded set. The known answer is the in-memory path itself (`load_dataset`)."""
from __future__ import annotations

import pytest
import torch

from influence.curvature import CurvatureOperator
from influence.data import load_dataset, stream_dataset
from influence.data_files import write_tiny
from influence.models import build_model
from influence.retrain import minibatches
from influence.streaming import StreamedCurvature, StreamedSet
from influence.train import train, train_streamed
from jobs import tasks
from jobs.runner import loader_workers, set_task_cpus
from jobs.spec import Configuration
from storage import tables
from storage.uri import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTIONS = {  # name: the options of a subset, as a spec would ask
    "mnist": {"subset": 50, "test_subset": 20, "split_seed": 1},
    "cifar10": {"subset": 40, "test_subset": 12, "dtype": torch.float32},
    "imagenet": {"classes": 2, "per_class": 9, "image_size": 16, "dtype": torch.float32},
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {name: write_tiny(name, str(base / name)) for name in OPTIONS}


def _both(name, roots, workers=0):
    options = {"root": roots[name], **OPTIONS[name]}
    return stream_dataset(name, **options).with_workers(workers), load_dataset(name, **options)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_streamed_set_gives_the_loaded_points_chunk_by_chunk_and_batch_by_batch(name, roots):
    stream, whole = _both(name, roots, workers=2 if name == "imagenet" else 0)  # forked loader processes too
    assert isinstance(stream, StreamedSet) and stream.info() == whole.info()
    assert torch.equal(stream.y_train, whole.y_train) and torch.equal(stream.y_test, whole.y_test)
    for split, x, y in (("train", whole.x_train, whole.y_train), ("test", whole.x_test, whole.y_test)):
        chunks = list(stream.chunks(split, 7))
        assert [len(c[0]) for c in chunks[:-1]] == [7] * (len(chunks) - 1)
        assert torch.equal(torch.cat([c[0] for c in chunks]), x) and torch.equal(torch.cat([c[1] for c in chunks]), y)
    for epoch in (0, 3):
        batches = list(stream.epoch_batches(8, seed=5, epoch=epoch))
        expected = minibatches(whole.n_train, 8, 5, epoch, torch.device("cpu"))
        assert len(batches) == len(expected)
        for (xb, yb), idx in zip(batches, expected):
            assert torch.equal(xb, whole.x_train[idx]) and torch.equal(yb, whole.y_train[idx])
    x, y = stream.take("test", [4, 0, 2])
    assert torch.equal(x, whole.x_test[[4, 0, 2]]) and torch.equal(y, whole.y_test[[4, 0, 2]])
    stream.close()


def test_materialised_it_is_the_loaded_set(roots):
    stream, whole = _both("cifar10", roots)
    data = stream.materialise()
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(data, field), getattr(whole, field))


def test_streamed_training_reaches_the_in_memory_theta_to_the_bit(roots):
    stream, whole = _both("mnist", roots, workers=1)
    model = build_model("small_cnn", input_shape=whole.input_shape, num_classes=whole.num_classes)
    options = dict(weight_decay=1e-3, lr=0.05, epochs=3, seed=2, optimizer="sgd", momentum=0.9, batch_size=16,
                   schedule="cosine")
    seen: list[list] = [[], []]
    a = train(model, whole.x_train, whole.y_train, progress=lambda e, v: seen[0].append((e, v)), **options)
    b = train_streamed(model, stream, progress=lambda e, v: seen[1].append((e, v)), **options)
    assert torch.equal(a.theta, b.theta)
    assert (a.objective, a.train_loss, a.grad_norm) == (b.objective, b.train_loss, b.grad_norm)
    assert seen[0] == seen[1] and len(seen[0]) == 3
    with pytest.raises(ValueError, match="minibatches smaller than the 50 training points"):
        train_streamed(model, stream, **{**options, "batch_size": 50})
    with pytest.raises(ValueError, match="optimizer 'lbfgs'"):
        train_streamed(model, stream, **{**options, "optimizer": "lbfgs"})


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_streamed_curvature_products_are_the_in_memory_ones(roots, curvature):
    stream, whole = _both("mnist", roots)
    model = build_model("small_cnn", input_shape=whole.input_shape, num_classes=whole.num_classes)
    theta = model.init(0, dtype=torch.float64)
    v = torch.randn(3, model.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = StreamedCurvature(model, theta, stream, 1e-3, curvature=curvature, chunk=16)
    theirs = CurvatureOperator(model, theta, whole.x_train, whole.y_train, 1e-3, curvature=curvature, chunk=16)
    assert torch.equal(ours.matvec(v), theirs.matvec(v))
    with pytest.raises(ValueError, match="full-set curvature products only"):
        ours.matvec(v, idx=torch.arange(4))


def test_bundled_sets_are_not_streamed():
    with pytest.raises(ValueError, match="iris is bundled and small"):
        stream_dataset("iris")


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_train_task_streams_a_file_set_and_writes_the_in_memory_rows(name, roots, tmp_path):
    data = {k: v for k, v in OPTIONS[name].items() if k != "dtype"}
    dtype = "float32" if "dtype" in OPTIONS[name] else "float64"
    cfg = Configuration("st", dataset=name, data_root=roots[name], model="small_cnn", batch_size=10, epochs=2,
                        optimizer="sgd", lr=0.05, dtype=dtype, weight_decay=1e-3, **data)
    tasks._LOADED.clear()
    tasks._STREAMED.clear()
    source = tasks.datasets_for([cfg])[tasks.dataset_key(cfg)]
    streamed, memory = open_store(str(tmp_path / "streamed")), open_store(str(tmp_path / "memory"))
    set_task_cpus(2)  # as a Ray task with 2 CPUs: one loader process
    try:
        assert loader_workers() == 1
        theta_s, out_s = tasks.train_task(streamed, cfg, source)
    finally:
        set_task_cpus(1)
    assert tasks._LOADED == {}  # nothing decoded whole
    assert list(tasks._STREAMED) == [source.key]
    theta_m, out_m = tasks.train_task(memory, cfg, tasks.load_data(cfg))
    assert torch.equal(theta_s, theta_m)
    for table, part in (("models", "model"), ("test_points", "test_points")):
        a, b = (tables.read_table(s, "st", table).drop_columns(["seconds"] if table == "models" else [])
                for s in (streamed, memory))
        a, b = (t.drop_columns([c for c in ("checkpoint", "node_id", "node_ip") if c in t.column_names]) for t in (a, b))
        assert a.to_pylist() == b.to_pylist(), table
