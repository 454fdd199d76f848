"""The image data sets: digits as images, and MNIST, CIFAR-10 and ImageNet read by torchvision's own readers.

Every file-based set is tested on tiny files in its real format (``data_files.write_tiny``), so the code that
reads the real data is the code under test; nothing is downloaded.
"""
from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
import torch

from influence import data_files
from influence.data import (DATASETS, Dataset, DatasetNotFound, UnknownDataset, choose_subset, load_dataset,
                            standardise_images)
from influence.data_files import write_tiny

IMAGENET_SIZE = 32  # small crops keep decoding fast; the default 224 is checked once


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {name: write_tiny(name, base / name) for name in ("mnist", "cifar10", "imagenet")}


def _load(name: str, roots, **options) -> Dataset:
    if name == "imagenet":
        options.setdefault("image_size", IMAGENET_SIZE)
    return load_dataset(name, root=roots[name], **options)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    axes = (0, 2, 3)
    return x.mean(axes), x.std(axes, unbiased=False)


# name: (n_train, n_test, input_shape, num_classes) of the default tiny files
EXPECTED = {
    "mnist": (200, 50, (1, 28, 28), 10),
    "cifar10": (200, 50, (3, 32, 32), 10),
    "imagenet": (60, 15, (3, IMAGENET_SIZE, IMAGENET_SIZE), 3),
}


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagenet"])
def test_reads_tiny_real_files(name, roots):
    data = _load(name, roots)
    n_train, n_test, shape, classes = EXPECTED[name]
    assert (data.n_train, data.n_test, data.input_shape, data.num_classes) == (n_train, n_test, shape, classes)
    assert data.in_features == int(np.prod(shape))
    assert data.x_train.dtype == torch.float64 and data.y_train.dtype == torch.int64
    assert data.x_train.device.type == "cpu"
    for y in (data.y_train, data.y_test):
        assert int(y.min()) >= 0 and int(y.max()) < classes
    assert torch.bincount(data.y_train, minlength=classes).tolist() == [n_train // classes] * classes
    mean, std = _channel_stats(data.x_train)
    assert torch.allclose(mean, torch.zeros(shape[0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(std, torch.ones(shape[0], dtype=torch.float64), atol=1e-9)
    # The test split was standardised with the training statistics: close, but not exact.
    test_mean, _ = _channel_stats(data.x_test)
    assert not torch.allclose(test_mean, torch.zeros(shape[0], dtype=torch.float64), atol=1e-6)
    assert test_mean.abs().max() < 0.5


def test_dtype_and_determinism(roots):
    a = _load("cifar10", roots, dtype=torch.float32)
    b = _load("cifar10", roots, dtype=torch.float32)
    assert a.x_train.dtype == torch.float32 and torch.equal(a.x_train, b.x_train)
    exact = _load("cifar10", roots)
    assert torch.allclose(a.x_test.double(), exact.x_test, atol=1e-5)


def test_standardisation_is_exact_per_channel():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (7, 2, 3, 3), dtype=np.uint8)
    train[:, 1] = 9  # a constant channel is centred, not divided by zero
    x_tr, x_te = standardise_images(train, train[:2], torch.float64)
    pixels = torch.from_numpy(train).double() / 255
    mean = pixels.mean((0, 2, 3), keepdim=True)
    std = pixels.std((0, 2, 3), unbiased=False, keepdim=True).clamp_min(1e-300)
    std[:, 1] = 1.0
    assert torch.allclose(x_tr, (pixels - mean) / std, atol=1e-12)
    assert torch.equal(x_te, x_tr[:2]) and torch.equal(x_tr[:, 1], torch.zeros_like(x_tr[:, 1]))


def test_mnist_files_are_idx_and_gzipped_copies_are_read(roots, tmp_path):
    raw = os.path.join(roots["mnist"], "MNIST", "raw")
    with open(os.path.join(raw, "train-images-idx3-ubyte"), "rb") as f:
        assert np.frombuffer(f.read(16), dtype=">i4").tolist() == [2051, 200, 28, 28]
    with open(os.path.join(raw, "t10k-labels-idx1-ubyte"), "rb") as f:
        assert np.frombuffer(f.read(8), dtype=">i4").tolist() == [2049, 50]
    # A copy holding only the .gz files (as distributed) reads the same.
    gz_raw = tmp_path / "MNIST" / "raw"
    gz_raw.mkdir(parents=True)
    for name in os.listdir(raw):
        with open(os.path.join(raw, name), "rb") as src, gzip.open(gz_raw / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert torch.equal(load_dataset("mnist", root=str(tmp_path)).x_train, _load("mnist", roots).x_train)


def test_cifar_files_fail_torchvisions_md5_check_which_we_bypass(roots):
    from torchvision.datasets import CIFAR10

    with pytest.raises(RuntimeError, match="corrupted"):
        CIFAR10(roots["cifar10"], train=True, download=False)
    assert _load("cifar10", roots).n_train == 200


def test_write_tiny_is_deterministic_per_seed(tmp_path):
    def images(seed: int, where: str) -> bytes:
        write_tiny("mnist", tmp_path / where, seed=seed, n_train=20, n_test=10)
        with open(tmp_path / where / "MNIST" / "raw" / "train-images-idx3-ubyte", "rb") as f:
            return f.read()

    assert images(3, "a") == images(3, "b") != images(4, "c")
    with pytest.raises(ValueError, match="bundled"):
        write_tiny("iris", tmp_path / "iris")


def test_tiny_images_carry_a_learnable_class_signal(roots):
    # Nearest class mean on the training images classifies the test images well above chance.
    for name in ("mnist", "cifar10"):
        data = _load(name, roots)
        x_tr, x_te = data.x_train.flatten(1), data.x_test.flatten(1)
        means = torch.stack([x_tr[data.y_train == k].mean(0) for k in range(data.num_classes)])
        accuracy = (torch.cdist(x_te, means).argmin(1) == data.y_test).double().mean()
        assert accuracy > 0.5, name


# ---- subsets ----------------------------------------------------------------------------------------------------

def test_subset_is_stratified_seeded_and_leaves_test_alone(roots):
    full = _load("mnist", roots)
    small = _load("mnist", roots, subset=0.1, split_seed=1)
    assert small.n_train == 20 and torch.bincount(small.y_train).tolist() == [2] * 10
    assert torch.equal(small.y_test, full.y_test)  # the test split stays whole (restandardised, so x differs)
    again = _load("mnist", roots, subset=0.1, split_seed=1)
    other = _load("mnist", roots, subset=0.1, split_seed=2)
    assert torch.equal(small.x_train, again.x_train) and not torch.equal(small.x_train, other.x_train)
    counted = _load("mnist", roots, subset=30, test_subset=10, split_seed=1)
    assert (counted.n_train, counted.n_test) == (30, 10)
    assert torch.bincount(counted.y_test).tolist() == [1] * 10
    # test_subset draws from its own stream: the training points do not change with it.
    assert torch.equal(counted.y_train, _load("mnist", roots, subset=30, split_seed=1).y_train)


def test_choose_subset_quotas_nesting_and_errors():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    idx = choose_subset(labels, 0.25, seed=0)
    # 25 points: quotas 12.5, 7.5, 5 -> 12 + 7 + 5 = 24, and the one left goes to the largest remainder (tie: 0).
    assert np.bincount(labels[idx]).tolist() == [13, 7, 5] and (np.diff(idx) > 0).all()
    assert np.array_equal(choose_subset(labels, 0.25, seed=0), idx)
    assert set(choose_subset(labels, 10, seed=0)) <= set(idx) <= set(choose_subset(labels, 60, seed=0))
    assert np.array_equal(choose_subset(labels, None, seed=0), np.arange(100))
    assert np.array_equal(choose_subset(labels, 1.0, seed=5), np.arange(100))
    for bad, match in [(0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), (0, r"\[1, 100\]"), (101, r"\[1, 100\]"),
                       (True, "fraction"), ("10%", "fraction")]:
        with pytest.raises(ValueError, match=match):
            choose_subset(labels, bad, seed=0, option="subset", name="mnist")


# ---- imagenet options ------------------------------------------------------------------------------------------

def test_imagenet_classes_and_per_class(roots):
    two = _load("imagenet", roots, classes=2)
    assert two.num_classes == 2 and torch.bincount(two.y_train).tolist() == [20, 20]
    named = _load("imagenet", roots, classes=["n00000002", "n00000000"], per_class=4, test_subset=4)
    # Labels follow the sorted folder names, as ImageFolder numbers them, whatever order the list has.
    assert named.num_classes == 2 and torch.bincount(named.y_train).tolist() == [4, 4] and named.n_test == 4
    # per_class keeps the first images of each class by file name.
    root = roots["imagenet"]
    few, _ = data_files.read_splits("imagenet", root, per_class=3, image_size=16)
    every, _ = data_files.read_splits("imagenet", root, image_size=16)
    first = np.concatenate([np.flatnonzero(every.labels == k)[:3] for k in range(3)])
    assert np.array_equal(few.images(np.arange(9)), every.images(first))
    assert np.array_equal(few.labels, every.labels[first])


def test_imagenet_default_size_is_224(roots):
    data = load_dataset("imagenet", root=roots["imagenet"], classes=1, per_class=2, test_subset=1)
    assert data.input_shape == (3, 224, 224) and (data.n_train, data.n_test) == (2, 1)


def test_memory_guard_names_the_options():
    with pytest.raises(ValueError, match="per_class"):
        data_files.check_fits_in_memory("imagenet", 10**9, (3, 224, 224), torch.float64)
    data_files.check_fits_in_memory("imagenet", 10, (3, 224, 224), torch.float64)


# ---- missing files and wrong options -----------------------------------------------------------------------------

def _not_found(name: str, root, **options) -> str:
    with pytest.raises(DatasetNotFound) as info:
        load_dataset(name, root=None if root is None else str(root), **options)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and info.value.name == name
    assert "\n" not in message and message.startswith(f"{name}: ")
    assert f"fragile data tiny {name}" in message and "nothing is downloaded" in message
    return message


def test_dataset_not_found_says_where_and_how(tmp_path, roots):
    message = _not_found("mnist", tmp_path)
    assert f"no MNIST files under {tmp_path}/MNIST/raw" in message and "train-images-idx3-ubyte[.gz]" in message
    assert "torchvision.datasets.MNIST" in message
    assert "root=None" in _not_found("cifar10", None)

    partial = tmp_path / "partial"
    shutil.copytree(roots["cifar10"], partial)
    os.remove(partial / "cifar-10-batches-py" / "data_batch_3")
    message = _not_found("cifar10", partial)
    assert "missing data_batch_3 under" in message and "cifar-10-batches-py" in message

    assert "val/<wnid>/*.JPEG" in _not_found("imagenet", tmp_path)
    no_val = tmp_path / "no_val"
    shutil.copytree(roots["imagenet"], no_val)
    shutil.rmtree(no_val / "val" / "n00000001")
    assert "missing under" in _not_found("imagenet", no_val, image_size=16)
    assert "no class folder n00000009" in _not_found("imagenet", roots["imagenet"], classes=["n00000009"])


@pytest.mark.parametrize("name, options, match", [
    ("iris", dict(subset=0.5), "subset=0.5 only applies to digits, mnist, cifar10, imagenet; for iris"),
    ("synthetic", dict(test_subset=5), "test_subset=5 only applies.*set by n"),
    ("digits", dict(subset=2000), r"count in \[1, 1437\]"),
    ("mnist", dict(n=100), "only applies to the synthetic"),
    ("mnist", dict(subset=1.5), r"fraction in \(0, 1\]"),
    ("mnist", dict(subset=0), r"count in \[1, 200\]"),
    ("mnist", dict(test_fraction=0.3), "official train/test split"),
    ("cifar10", dict(classes=3), "classes=3 only applies to imagenet"),
    ("iris", dict(image_size=32), "image_size=32 only applies to imagenet"),
    ("imagenet", dict(classes=4), r"\[1, 3\]"),
    ("imagenet", dict(per_class=0), "per_class=0 must be a positive integer"),
    ("imagenet", dict(classes="n00000000"), "list of class folder names"),
])
def test_wrong_options(name, options, match, roots):
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(name, root=roots.get(name), **options)
    assert not isinstance(info.value, DatasetNotFound)


def test_unknown_name_lists_the_image_sets():
    with pytest.raises(UnknownDataset) as info:
        load_dataset("cifar100")
    assert all(name in str(info.value) for name in DATASETS) and "imagenet" in DATASETS


# ---- digits and the Dataset itself -------------------------------------------------------------------------------

def test_digits_are_8x8_images_standardised_per_channel():
    data = load_dataset("digits")
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.input_shape == (1, 8, 8) and data.in_features == 64 and data.num_classes == 10
    # One mean and one standard deviation over all training pixels, not one per pixel.
    assert abs(float(data.x_train.mean())) < 1e-12 and abs(float(data.x_train.std(unbiased=False)) - 1) < 1e-12
    corner = data.x_train[:, 0, 0, 0]  # always dark: it stays one value, merely shifted like every pixel
    assert torch.equal(corner, torch.full_like(corner, float(corner[0]))) and -1.0 < float(corner[0]) < 0.0
    # Stratified: every digit is in the test split in its share of 20%, up to rounding.
    share = 0.2 * torch.bincount(torch.cat([data.y_train, data.y_test]))
    assert (torch.bincount(data.y_test) - share).abs().max() < 1
    assert torch.equal(load_dataset("digits", split_seed=3).x_train, load_dataset("digits", split_seed=3).x_train)


def test_digits_subsets_come_from_the_split():
    small = load_dataset("digits", subset=0.1, test_subset=50, split_seed=2)
    assert (small.n_train, small.n_test) == (144, 50)
    assert torch.bincount(small.y_train).min() >= 14 and torch.bincount(small.y_test).min() >= 5
    assert abs(float(small.x_train.mean())) < 1e-12  # standardised with the subset's own statistics
    assert torch.equal(small.y_train, load_dataset("digits", subset=0.1, split_seed=2).y_train)


def test_dataset_shapes_are_checked():
    x = torch.zeros(4, 1, 2, 2)
    y = torch.zeros(4, dtype=torch.int64)
    data = Dataset("t", x, y, x[:2], y[:2], num_classes=2)
    assert data.input_shape == (1, 2, 2) and data.in_features == 4 and data.to("cpu").input_shape == (1, 2, 2)
    with pytest.raises(ValueError, match="different shapes"):
        Dataset("t", x, y, torch.zeros(2, 1, 2, 3), y[:2], num_classes=2)
    with pytest.raises(ValueError, match=r"\[n, \*input_shape\]"):
        Dataset("t", torch.zeros(4), y, torch.zeros(2), y[:2], num_classes=2)
