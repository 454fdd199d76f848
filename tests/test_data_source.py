"""File data sets reach the tasks as a DataSource: the driver plans from sizes read off the labels and file list,
never decoding an image, and every task opens its node's copy, once per worker process, getting exactly the
tensors the in-memory path gives. A run through DataSources writes the rows of a run with the sets in memory.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from influence.data import Dataset, describe_dataset, load_dataset
from influence.data_files import write_tiny
from jobs import tasks
from jobs.pipeline import run_inline
from jobs.spec import Configuration, load_spec
from storage.tables import TABLES
from storage.uri import open_store
from tests.test_run_e2e import _rows, _same

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTIONS = {  # name: options of a subset, as a spec would ask
    "mnist": {"subset": 0.5, "test_subset": 20, "split_seed": 3},
    "cifar10": {"subset": 60},
    "imagenet": {"classes": 2, "per_class": 7, "image_size": 16, "test_subset": 5},
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {name: write_tiny(name, str(base / name)) for name in OPTIONS}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_file_set_is_described_as_it_would_load(name, roots):
    info = describe_dataset(name, root=roots[name], **OPTIONS[name])
    assert info == load_dataset(name, root=roots[name], **OPTIONS[name]).info()
    assert info.n_train > 0 and info.n_test > 0


def test_bundled_sets_are_described_too():
    assert describe_dataset("iris").n_train == 120
    assert describe_dataset("digits", subset=100).input_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="subset=5 only applies to digits"):
        describe_dataset("iris", subset=5)  # the same checks as loading


def test_planning_an_imagenet_run_decodes_no_image(roots, tmp_path):
    """A damaged JPEG is found by the task that decodes it, not by the planning, which reads file names only."""
    root = write_tiny("imagenet", str(tmp_path / "imagenet"))
    victim = sorted((Path(root) / "train").rglob("*.JPEG"))[0]
    victim.write_bytes(b"not a JPEG")
    info = describe_dataset("imagenet", root=root)
    assert (info.n_train, info.n_test, info.num_classes, info.input_shape) == (60, 15, 3, (3, 224, 224))
    with pytest.raises(Exception, match="cannot identify image file"):
        load_dataset("imagenet", root=root, image_size=16)


def _cfg(name: str, root: str, **data) -> Configuration:
    return Configuration("e", dataset=name, data_root=root, model="small_cnn", batch_size=10, **data)


def test_the_driver_ships_a_few_hundred_bytes_and_a_task_gets_the_loaded_tensors(roots):
    tasks._LOADED.clear()
    cfg = _cfg("mnist", roots["mnist"], **OPTIONS["mnist"])
    sources = tasks.datasets_for([cfg, Configuration("e")])
    source, iris = sources[tasks.dataset_key(cfg)], sources[tasks.dataset_key(Configuration("e"))]
    assert isinstance(source, tasks.DataSource) and isinstance(iris, Dataset)  # small sets stay in memory
    assert len(pickle.dumps(source)) < 4096
    assert tasks._LOADED == {}  # the driver loaded nothing of it
    data, whole = source.to("cpu"), tasks.load_data(cfg)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(data, field), getattr(whole, field))
    assert source.to("cpu").x_train is data.x_train  # loaded once per process
    assert (source.n_train, source.input_shape, source.num_classes) == (data.n_train, data.input_shape, 10)


def test_a_worker_keeps_the_last_set_it_used(roots):
    tasks._LOADED.clear()
    sources = [tasks.datasets_for([_cfg("mnist", roots["mnist"], subset=k)])[tasks.dataset_key(
        _cfg("mnist", roots["mnist"], subset=k))] for k in (10, 20, 30)]
    first = sources[0].to("cpu")
    for source in sources[1:]:
        source.to("cpu")
    assert list(tasks._LOADED) == [sources[2].key]
    assert sources[0].to("cpu").x_train is not first.x_train  # loaded again
    assert torch.equal(sources[0].to("cpu").x_train, first.x_train)


def test_files_changed_after_planning_fail_the_task_by_name(roots, tmp_path):
    tasks._LOADED.clear()
    root = write_tiny("mnist", str(tmp_path / "mnist"))
    cfg = _cfg("mnist", root)
    source = tasks.datasets_for([cfg])[tasks.dataset_key(cfg)]
    write_tiny("mnist", root, n_train=120)
    with pytest.raises(ValueError, match=r"the run was planned for .*n_train=200.*the files now hold .*n_train=120"):
        source.to("cpu")


SPEC = """
experiment: src
data: {{name: mnist, root: {root}, subset: 80, test_subset: 20}}
model: {{family: small_cnn}}
train: {{optimizer: sgd, lr: 0.05, batch_size: 20, epochs: 3, weight_decay: 0.001}}
influence: {{methods: [cg], cg: {{curvature: ggn}}, damping: 0.01, damping_policy: always}}
test_points: [{{highest: 1}}]
ground_truth: {{removals: {{top_k: 4}}, epochs: 1, controls: 2, chunk: 2}}
"""


def test_a_run_through_data_sources_writes_the_rows_of_the_in_memory_run(roots, tmp_path):
    tasks._LOADED.clear()
    (tmp_path / "src.yaml").write_text(SPEC.format(root=roots["mnist"]))
    spec = load_spec(tmp_path / "src.yaml")
    cfg = spec.configurations()[0]
    stores = {}
    for way, loaded in (("source", None), ("memory", {tasks.dataset_key(cfg): tasks.load_data(cfg)})):
        stores[way] = open_store(str(tmp_path / way))
        result = run_inline(spec, stores[way], version="test", loaded=loaded)
        assert result.errors == []
    for table in TABLES:
        if table == "configs":
            continue
        a, b = (_rows(stores[w], "src", table) for w in ("source", "memory"))
        assert _same(a, b), table
    assert len(_rows(stores["source"], "src", "retrain")) > 0


def test_data_tiny_writes_the_images_asked_for(tmp_path, capsys):
    from fragile.cli import main

    assert main(["data", "tiny", "imagenet", str(tmp_path / "in"), "--images", "7", "--classes", "2"]) == 0
    assert "8 training and 10 test images of 2 classes" in capsys.readouterr().out  # 4 per class, rounded up
    assert len(list((tmp_path / "in" / "train").rglob("*.JPEG"))) == 8
    assert main(["data", "tiny", "mnist", str(tmp_path / "mn"), "--images", "30"]) == 0
    assert describe_dataset("mnist", root=str(tmp_path / "mn")).n_train == 30
    assert main(["data", "tiny", "mnist", str(tmp_path / "mn"), "--images", "0"]) == 2
    assert "--images 0: give a count of training images >= 1" in capsys.readouterr().err
    assert main(["data", "tiny", "mnist", str(tmp_path / "mn"), "--classes", "1"]) == 2
    assert "--classes 1: give 2 or more classes" in capsys.readouterr().err
