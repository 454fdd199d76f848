"""Data-parallel training: W workers (Ray Train, gloo on CPUs) reach the θ̂ of one worker with the same global
batch and seed; a run resumed from its saved progress takes exactly the uninterrupted run's steps.

Without Ray: one worker of `train_data_parallel` against `train` (the same steps, to round-off) and its resume
(bit for bit). With Ray (the shared fixture): 2 workers of 1 CPU through `cluster.data_parallel.fit` against
`train`, within 1e-10 in float64.
"""
from __future__ import annotations

import pytest
import torch

from influence.data import load_dataset
from influence.data_parallel import train_data_parallel
from influence.models import build_model
from influence.train import train
from tests.test_retrain_resume import MemoryProgress, Preempted

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WD = 0.001
KW = dict(weight_decay=WD, lr=0.05, epochs=3, seed=4, optimizer="sgd", momentum=0.9, batch_size=25,
          schedule="cosine")


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", subset=120, test_subset=20)
    return data, build_model("small_cnn", input_shape=data.input_shape, num_classes=data.num_classes)


def _alone(**kw):
    return lambda model, x, y, **rest: train_data_parallel(model, x, y, rank=0, world=1, all_reduce=lambda t: None,
                                                           **rest, **kw)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_one_worker_takes_the_steps_of_train(digits, optimizer):
    data, model = digits
    kw = dict(KW, optimizer=optimizer)
    expected = train(model, data.x_train, data.y_train, **kw)
    got = _alone()(model, data.x_train, data.y_train, **kw)
    assert torch.allclose(got.theta, expected.theta, rtol=0, atol=1e-12)
    assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-9)
    assert not torch.allclose(got.theta, model.init(4, dtype=torch.float64), atol=1e-3)


def test_a_resumed_data_parallel_run_equals_the_uninterrupted_one(digits):
    data, model = digits
    whole = _alone()(model, data.x_train, data.y_train, **KW)  # 3 epochs of 5 batches: 15 steps
    progress = MemoryProgress(every=4, stop_after=2)  # stopped at step 8, in the middle of the second epoch
    with pytest.raises(Preempted):
        _alone()(model, data.x_train, data.y_train, progress=progress, **KW)
    progress.stop_after, progress.saved_steps = None, []
    resumed = _alone()(model, data.x_train, data.y_train, progress=progress, **KW)
    assert progress.saved_steps == [12, 15]
    assert torch.equal(resumed.theta, whole.theta)


def test_lbfgs_and_mixed_precision_on_a_cpu_are_refused(digits):
    data, model = digits
    with pytest.raises(ValueError, match="adam or sgd steps"):
        _alone()(model, data.x_train, data.y_train, **dict(KW, optimizer="lbfgs", batch_size=None,
                                                           schedule="constant"))
    with pytest.raises(ValueError, match="mixed_precision needs a CUDA device"):
        _alone()(model, data.x_train, data.y_train, mixed_precision=True, **KW)


# ---- through Ray Train: two workers of one CPU each, gloo ------------------------------------------------------

SPEC = """
experiment: ddp
data: {{name: digits, subset: 120, test_subset: 20}}
model: {{family: small_cnn}}
train: {{optimizer: sgd, lr: 0.05, momentum: 0.9, batch_size: 25, schedule: cosine, epochs: 3, weight_decay: 0.001,
        seed: 4{every}}}
influence: {{methods: [cg], cg: {{curvature: ggn}}}}
test_points: [{{highest: 1}}]
ground_truth: {{removals: {{top_k: 2}}, epochs: 1, controls: 1}}
resources: {{train: {{workers: {workers}, num_cpus: 1}}}}
"""


def _spec(tmp_path, workers: int, every: int | None = None):
    from jobs.spec import load_spec

    path = tmp_path / f"ddp-{workers}.yaml"
    path.write_text(SPEC.format(workers=workers, every="" if every is None else f", checkpoint_every: {every}"))
    return load_spec(path)


@pytest.mark.slow
def test_two_gloo_workers_reach_the_theta_of_one(ray_cluster, tmp_path, digits, capfd):
    from cluster import data_parallel
    from jobs import tasks
    from storage.uri import list_files, open_store

    spec = _spec(tmp_path, 2, every=6)
    cfg = spec.configurations()[0]
    data, model = digits
    assert tasks.model_for(cfg, data).n_params == model.n_params
    store = open_store(str(tmp_path / "store"))
    got, assessment = data_parallel.fit(store, cfg, data, data, model, None, workers=2, per_worker={"num_cpus": 1})
    expected = train(model, data.x_train, data.y_train, **KW)
    assert torch.allclose(got.theta, expected.theta, rtol=0, atol=1e-10)
    assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-8)
    _same_assessment(assessment, tasks.assess(cfg, model, expected.theta, data, torch.device("cpu")))
    saved = [f.path for f in list_files(store, store.path("ddp", "progress")) if f.path.endswith(".pt")]
    assert [p.rsplit("/", 2)[-2:] for p in saved] == [[cfg.config_id, "train.pt"]]  # the task deletes it later


@pytest.mark.slow
def test_two_gloo_workers_streaming_a_file_set_reach_the_theta_of_one(ray_cluster, tmp_path):
    """MNIST files as a DataSource: each Ray Train worker streams its pieces of the batches from the files and
    worker 0 sums R and ‖∇R‖ and assesses θ̂ over its own stream; θ̂ is that of one worker training on the set
    in memory, and the assessment what the train task would make of it."""
    from cluster import data_parallel
    from influence.data_files import write_tiny
    from jobs import tasks
    from jobs.spec import Configuration
    from storage.uri import open_store

    root = write_tiny("mnist", str(tmp_path / "mnist"))
    cfg = Configuration("ddps", dataset="mnist", data_root=root, subset=60, test_subset=10, model="small_cnn",
                        **{k: v for k, v in KW.items() if k not in ("weight_decay", "epochs")}, epochs=2,
                        weight_decay=WD)
    source = tasks.datasets_for([cfg])[tasks.dataset_key(cfg)]
    assert tasks.streams(cfg, source)
    whole = tasks.load_data(cfg)
    model = tasks.model_for(cfg, whole)
    got, assessment = data_parallel.fit(open_store(str(tmp_path / "store")), cfg, source, source.stream(), model,
                                        None, workers=2, per_worker={"num_cpus": 1})
    expected = train(model, whole.x_train, whole.y_train, **dict(KW, epochs=2))
    assert torch.allclose(got.theta, expected.theta, rtol=0, atol=1e-10)
    assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-8)
    _same_assessment(assessment, tasks.assess(cfg, model, expected.theta, whole, torch.device("cpu")))


def _same_assessment(got: dict, expected: dict) -> None:
    """What worker 0 made of θ̂ (passes over both splits, the spectrum) is what the train task would have."""
    assert set(got) == set(expected)
    assert torch.allclose(got["test_losses"], expected["test_losses"], rtol=0, atol=1e-9)
    for key in ("train_loss", "train_accuracy", "test_accuracy", "top_eigenvalue", "min_eigenvalue"):
        assert got[key] == pytest.approx(expected[key], rel=1e-8, nan_ok=True), key
    assert got["degenerate_reason"] == expected["degenerate_reason"]


@pytest.mark.slow
def test_a_run_with_two_training_workers_writes_the_rows_of_a_single_worker_run(ray_cluster, tmp_path, capfd):
    """`fragile run` with resources.train.workers: 2 (Tune trial -> a waiting train task -> Ray Train) against the
    same spec with one worker, inline: the same configuration, θ̂ within 1e-10, and its progress file gone."""
    from fragile.cli import main
    from storage.checkpoints import load_checkpoint
    from storage.uri import list_files, open_store

    two, one = _spec(tmp_path, 2), _spec(tmp_path, 1)
    cfg = two.configurations()[0]
    assert cfg.config_id == one.configurations()[0].config_id
    stores = {w: tmp_path / f"store-{w}" for w in (1, 2)}
    assert main(["run", str(tmp_path / "ddp-2.yaml"), "--store", str(stores[2]), "--address", "auto"]) == 0
    assert main(["run", str(tmp_path / "ddp-1.yaml"), "--store", str(stores[1]), "--inline"]) == 0
    theta = {w: load_checkpoint(open_store(str(s)), "ddp", cfg.model_key)["theta"] for w, s in stores.items()}
    assert torch.allclose(theta[2], theta[1], rtol=0, atol=1e-10)
    store = open_store(str(stores[2]))
    assert not [f for f in list_files(store, store.path("ddp", "progress")) if f.path.endswith(".pt")]


def test_data_parallel_training_is_refused_inline(tmp_path, capsys):
    from fragile.cli import main

    _spec(tmp_path, 2)
    assert main(["run", str(tmp_path / "ddp-2.yaml"), "--store", str(tmp_path / "store"), "--inline"]) == 2
    assert "resources.train.workers: 2 trains on Ray Train workers, and --inline runs without Ray" in (
        capsys.readouterr().err)
    assert not (tmp_path / "store").exists()


def test_a_recorded_failure_holds_only_while_the_run_would_resume_from_its_step(tmp_path):
    """A deterministic failure recorded at the saved step refuses the next attempt; once the run has saved a later
    step (or the record is another run's) the attempt goes ahead."""
    from cluster import data_parallel
    from jobs import tasks
    from storage.checkpoints import save_state
    from storage.uri import open_store

    cfg = _spec(tmp_path, 2).configurations()[0]
    store = open_store(str(tmp_path / "store"))
    progress = tasks.train_progress(store, cfg, 100, 15)
    path = data_parallel._failure_path(store, cfg)
    assert data_parallel._recorded_failure(store, path, progress) is None  # nothing recorded
    record = {"identity": progress.identity, "step": 0, "rank": 1, "error": "ValueError: bad"}
    save_state(store, path, record, "a training failure")
    assert data_parallel._recorded_failure(store, path, progress)["error"] == "ValueError: bad"
    other = tasks.train_progress(store, cfg, 100, 16)  # another run's identity (its steps)
    assert data_parallel._recorded_failure(store, path, other) is None
    progress.save({"step": 6, "theta": torch.zeros(100)})
    assert data_parallel._recorded_failure(store, path, progress) is None  # it would resume from step 6 now
    save_state(store, path, dict(record, step=6), "a training failure")
    assert data_parallel._recorded_failure(store, path, progress)["step"] == 6


@pytest.mark.slow
def test_a_deterministic_worker_error_fails_the_fit_once_with_its_message(ray_cluster, tmp_path):
    """Mixed precision asked of CPU workers (a spec refuses it; a configuration made in code need not) fails the
    same way on every attempt: the first records it, the restarted groups refuse at once, and fit raises the
    worker's own message (not Ray Train's wrapping)."""
    import dataclasses

    from cluster import data_parallel
    from jobs import tasks
    from storage.checkpoints import load_state
    from storage.uri import open_store

    cfg = dataclasses.replace(_spec(tmp_path, 2).configurations()[0], mixed_precision=True, dtype="float32")
    data = tasks.load_data(cfg)
    model = tasks.model_for(cfg, data)
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(data_parallel.DeterministicFailure, match="not retried from step 0.*mixed_precision needs a "
                                                                 "CUDA device"):
        data_parallel.fit(store, cfg, data, data, model, None, workers=2, per_worker={"num_cpus": 1})
    record = load_state(store, data_parallel._failure_path(store, cfg))
    assert record["step"] == 0 and record["rank"] in (0, 1) and record["error"].startswith("ValueError")
