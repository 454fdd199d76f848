"""File sets streamed through DataLoaders give what the in-memory path gives, value for value: the same
standardised points, the same minibatches, the same θ̂ and curvature products, the same train-task rows, while
the task never holds the decoded set. The known answer is the in-memory path itself (`load_dataset`)."""
from __future__ import annotations

import threading

import pytest
import torch

from influence.curvature import CurvatureOperator
from influence.data import load_dataset, stream_dataset
from influence.data_files import write_tiny
from influence.models import build_model
from influence.retrain import minibatches
from influence.streaming import StreamedSet
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
    stream, whole = _both(name, roots, workers=2 if name == "imagenet" else 0)  # loader processes too
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
    ours = CurvatureOperator(model, theta, stream, None, 1e-3, curvature=curvature, chunk=16)
    theirs = CurvatureOperator(model, theta, whole.x_train, whole.y_train, 1e-3, curvature=curvature, chunk=16)
    assert torch.equal(ours.matvec(v), theirs.matvec(v))
    idx = torch.tensor([7, 3, 30, 3])  # a minibatch (LiSSA's), decoded directly
    assert torch.equal(ours.matvec(v, idx), theirs.matvec(v, idx))


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


# ---- data-parallel workers stream their pieces of each batch ----------------------------------------------------

def test_a_piece_of_a_streamed_batch_is_the_piece_tensor_split_cuts(roots):
    stream, whole = _both("mnist", roots)
    for rank in range(3):
        pieces = list(stream.epoch_batches(16, seed=1, epoch=2, piece=(rank, 3), skip=1))
        expected = [b.tensor_split(3)[rank] for b in minibatches(whole.n_train, 16, 1, 2, torch.device("cpu"))[1:]]
        assert len(pieces) == len(expected) == 3
        for (xb, yb), idx in zip(pieces, expected):
            assert torch.equal(xb, whole.x_train[idx]) and torch.equal(yb, whole.y_train[idx])


def _threads(world: int, run):
    """``run(rank, all_reduce)`` on ``world`` threads whose all_reduce sums over them; the results by rank."""
    barrier, slots, out, errors = threading.Barrier(world), [None] * world, [None] * world, []

    def all_reduce(tensor: torch.Tensor) -> None:
        rank = int(threading.current_thread().name)
        slots[rank] = tensor.clone()
        barrier.wait()
        total = sum(slots[1:], slots[0].clone())
        barrier.wait()  # every worker has read the sum before anyone writes the next one
        tensor.copy_(total)

    def body(rank: int) -> None:
        try:
            out[rank] = run(rank, all_reduce)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), name=str(r)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return out


def test_two_workers_streaming_their_pieces_reach_the_theta_of_one_in_memory(roots):
    from influence.data_parallel import train_data_parallel

    stream, whole = _both("mnist", roots)
    model = build_model("small_cnn", input_shape=whole.input_shape, num_classes=whole.num_classes)
    kw = dict(weight_decay=1e-3, lr=0.05, epochs=2, seed=3, optimizer="sgd", momentum=0.9, batch_size=15,
              schedule="cosine")  # 50 points: batches of 15, 15, 15 and 5, cut in two
    expected = train(model, whole.x_train, whole.y_train, **kw)
    # A model per worker, as in a process per worker (a forward swaps its module's parameters), and θ0 drawn
    # before (init seeds torch's global generator, which threads share).
    theta0 = model.init(3, dtype=torch.float64)
    got = _threads(2, lambda rank, reduce: train_data_parallel(
        build_model("small_cnn", input_shape=whole.input_shape, num_classes=whole.num_classes),
        stream.with_workers(0), None, rank=rank, world=2, all_reduce=reduce, theta0=theta0, **kw))
    for result in got:
        assert torch.allclose(result.theta, expected.theta, rtol=0, atol=1e-12)
        assert result.grad_norm == pytest.approx(expected.grad_norm, rel=1e-10)


def test_a_streamed_data_parallel_run_resumes_mid_epoch_to_the_bit(roots):
    from influence.data_parallel import train_data_parallel
    from tests.test_retrain_resume import MemoryProgress, Preempted

    stream, whole = _both("mnist", roots)
    model = build_model("small_cnn", input_shape=whole.input_shape, num_classes=whole.num_classes)
    kw = dict(weight_decay=1e-3, lr=0.05, epochs=2, seed=3, optimizer="adam", batch_size=15, rank=0, world=1,
              all_reduce=lambda t: None)
    whole_run = train_data_parallel(model, stream, None, **kw)  # 2 epochs of 4 batches
    progress = MemoryProgress(every=3, stop_after=2)  # stopped at step 6: batch 2 of the second epoch is next
    with pytest.raises(Preempted):
        train_data_parallel(model, stream, None, progress=progress, **kw)
    progress.stop_after, progress.saved_steps = None, []
    resumed = train_data_parallel(model, stream, None, progress=progress, **kw)
    assert progress.saved_steps == [8]
    assert torch.equal(resumed.theta, whole_run.theta)
    with pytest.raises(ValueError, match="minibatches smaller than its 50 points"):
        train_data_parallel(model, stream, None, **{**kw, "batch_size": None})


@pytest.mark.slow
def test_a_ray_train_task_with_two_cpus_streams_through_a_loader_process(ray_cluster, roots, tmp_path):
    """In a Ray worker process (2 CPUs: one loader process, from the fork server) the train task gives the in-memory θ̂."""
    import ray

    from cluster.runner import _remote

    cfg = Configuration("st", dataset="mnist", data_root=roots["mnist"], model="small_cnn", batch_size=10, epochs=2,
                        optimizer="sgd", lr=0.05, weight_decay=1e-3, **{k: v for k, v in OPTIONS["mnist"].items()})
    source = tasks.datasets_for([cfg])[tasks.dataset_key(cfg)]
    theta, _ = ray.get(_remote(tasks.train_task, 2).options(num_cpus=2).remote(
        open_store(str(tmp_path / "ray")), cfg, source))
    expected, _ = tasks.train_task(open_store(str(tmp_path / "memory")), cfg, tasks.load_data(cfg))
    assert torch.equal(theta, expected)


# ---- influence tasks read a streamed set -------------------------------------------------------------------------

SOLVERS = {  # method: (model, settings)
    "cg": ("small_cnn", {"curvature": "ggn", "damping": 0.01, "max_iter": 20}),
    "lissa": ("small_cnn", {"damping": 0.01, "scale": 50.0, "depth": 15, "batch_size": 6}),
    "arnoldi": ("small_cnn", {"curvature": "ggn", "damping": 0.01, "rank": 6}),
    "ekfac": ("small_cnn", {"damping": 0.01}),
    "exact": ("mlp", {"damping": 0.01, "damping_policy": "always"}),
}


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_estimates_over_a_streamed_set_are_the_in_memory_ones(roots, method):
    from influence.ihvp import make_solver
    from influence.scores import influence_estimates

    name, settings = SOLVERS[method]
    stream, whole = _both("mnist", roots)
    model = build_model(name, input_shape=whole.input_shape, num_classes=whole.num_classes, depth=1, width=2)
    theta = train(model, whole.x_train, whole.y_train, weight_decay=1e-3, lr=0.05, epochs=2, seed=0, optimizer="sgd",
                  batch_size=10).theta
    got = influence_estimates(model, theta, stream, [0, 5], make_solver(method, model, theta, stream, None, 1e-3,
                                                                       **settings), chunk_size=16)
    expected = influence_estimates(model, theta, whole, [0, 5], make_solver(method, model, theta, whole.x_train,
                                                                           whole.y_train, 1e-3, **settings),
                                   chunk_size=16)
    for field in ("estimate", "predicted_dtheta", "test_loss", "iterations", "residual", "diverged"):
        a, b = getattr(got, field), getattr(expected, field)
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), field


def test_a_shard_of_a_streamed_set_decodes_its_own_points_only(roots):
    import dataclasses

    from influence.scores import shard_estimates

    stream, whole = _both("mnist", roots)
    stream.counts()  # (the standardisation's pass is the only one over every point)
    decoded: list[int] = []
    split, idx = stream._splits["train"]
    spy = dataclasses.replace(split, images=lambda i: (decoded.extend(i.tolist()), split.images(i))[1])
    stream._splits["train"] = (spy, idx)
    model = build_model("small_cnn", input_shape=whole.input_shape, num_classes=whole.num_classes)
    theta = model.init(0, dtype=torch.float64)
    s_test = torch.randn(2, model.n_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got, _ = shard_estimates(model, theta, stream, s_test, 20, 33, chunk_size=5)
    expected, _ = shard_estimates(model, theta, whole, s_test, 20, 33, chunk_size=5)
    assert torch.equal(got, expected)
    assert sorted(decoded) == sorted(idx[20:33].tolist())


def test_the_level_counts_are_counted_once_per_run_and_a_wrong_file_is_replaced(roots, tmp_path):
    from storage.checkpoints import load_state, save_state

    cfg = Configuration("lv", dataset="mnist", data_root=roots["mnist"], model="small_cnn", batch_size=10,
                        **{k: v for k, v in OPTIONS["mnist"].items()})
    store = open_store(str(tmp_path / "store"))
    tasks._STREAMED.clear()
    source = tasks.datasets_for([cfg])[tasks.dataset_key(cfg)]
    first = source.stream(store)
    assert first.counted  # counted, and saved
    (path,) = [p for p in (tmp_path / "store" / "lv" / "data").iterdir()]
    tasks._STREAMED.clear()  # another worker process
    second = source.stream(store)
    assert second.counted and (second.counts() == first.counts()).all()  # read, not counted
    state = load_state(store, str(path))
    save_state(store, str(path), {**state, "counts": state["counts"] * 2}, "tampered")  # not this set's totals
    tasks._STREAMED.clear()
    third = source.stream(store)
    assert (third.counts() == first.counts()).all()
    assert (load_state(store, str(path))["counts"].numpy() == first.counts()).all()  # replaced
    with pytest.raises(ValueError, match="are not those of 50 training images"):
        second.use_counts(first.counts() * 2)


# ---- retraining streams too ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("way", ["batched", "loop"])
def test_a_streamed_retrain_takes_the_in_memory_steps(roots, way):
    from influence.retrain import objective_grad_norms, removal_weights, retrain_batched, retrain_loop

    stream, whole = _both("mnist", roots)
    model = build_model("small_cnn", input_shape=whole.input_shape, num_classes=whole.num_classes)
    theta = model.init(0, dtype=torch.float64)
    weights = removal_weights(whole.n_train, [3, 17], controls=1)
    run = retrain_batched if way == "batched" else retrain_loop
    kw = dict(weight_decay=1e-3, lr=0.01, epochs=2, optimizer="adam", batch_size=12, seed=7, schedule="cosine")
    got = run(model, theta, stream, None, weights, **kw)
    expected = run(model, theta, whole.x_train, whole.y_train, weights, **kw)
    assert torch.equal(got, expected)
    assert torch.equal(objective_grad_norms(model, got, stream, None, weights, 1e-3, batch_size=16),
                       objective_grad_norms(model, expected, whole.x_train, whole.y_train, weights, 1e-3,
                                            batch_size=16))
    with pytest.raises(ValueError, match="minibatches smaller than its 50 points"):
        run(model, theta, stream, None, weights, **{**kw, "batch_size": None})


def test_a_streamed_retrain_resumes_mid_epoch_to_the_bit(roots):
    from influence.retrain import removal_weights, retrain_batched
    from tests.test_retrain_resume import MemoryProgress, Preempted

    stream, whole = _both("mnist", roots)
    model = build_model("small_cnn", input_shape=whole.input_shape, num_classes=whole.num_classes)
    weights = removal_weights(whole.n_train, [3], controls=1)
    kw = dict(weight_decay=1e-3, lr=0.01, epochs=2, optimizer="sgd", batch_size=12, seed=7)  # 5 batches an epoch
    theta = model.init(0, dtype=torch.float64)
    whole_run = retrain_batched(model, theta, stream, None, weights, **kw)
    progress = MemoryProgress(every=3, stop_after=2)  # stopped after step 6: batch 1 of the second epoch is next
    with pytest.raises(Preempted):
        retrain_batched(model, theta, stream, None, weights, progress=progress, **kw)
    progress.stop_after, progress.saved_steps = None, []
    resumed = retrain_batched(model, theta, stream, None, weights, progress=progress, **kw)
    assert progress.saved_steps == [9, 10]
    assert torch.equal(resumed, whole_run)


def test_a_set_larger_than_memory_is_refused_only_where_a_task_would_hold_it(roots, monkeypatch):
    import os

    pages = {"SC_PHYS_PAGES": 2000, "SC_PAGE_SIZE": 4096}  # 8 MB "of memory": 28 images (18 and 10 test) at 224 px need 21 MB
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    base = dict(dataset="imagenet", data_root=roots["imagenet"], classes=2, per_class=9, model="small_cnn",
                dtype="float32")
    streamed = Configuration("big", batch_size=6, methods=("lissa", "ekfac"), **base)
    assert not tasks.holds_whole(streamed, 18)
    assert tasks.datasets_for([streamed])[tasks.dataset_key(streamed)].n_train == 18
    for held in (Configuration("big", batch_size=18, methods=("lissa",), **base),  # the full batch
                 Configuration("big", batch_size=6, methods=("lissa",), **{**base, "model": "mlp"})):
        assert tasks.holds_whole(held, 18)
        with pytest.raises(ValueError, match=r"imagenet: 28 images of shape \(3, 224, 224\) need"):
            tasks.datasets_for([held])


def test_a_split_that_is_not_train_or_test_is_named(roots):
    stream, whole = _both("mnist", roots)
    for data in (stream, whole):
        with pytest.raises(ValueError, match="split must be .*train.*test.*got 'val'"):
            list(data.chunks("val", 8))
    with pytest.raises(ValueError, match="loader processes open the splits themselves: give an opener"):
        StreamedSet("mnist", *stream._splits["train"][:1], *stream._splits["test"][:1],
                    stream._splits["train"][1], stream._splits["test"][1], torch.float64, workers=1)
