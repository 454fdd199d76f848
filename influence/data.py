"""Classification data sets as tensors, split and standardised the way the study needs.

A loaded data set is whole in memory: the experiments retrain hundreds of models on the same training set, so
a task that holds the tensors ships them to its device once. What plans the work needs only the sizes and
shapes (:func:`describe_dataset`, a :class:`DatasetInfo`), which for the file sets come from the labels and the
file list, without decoding a single image: a driver never holds the images. Two kinds of sets:

- bundled (``iris``, ``digits``, ``synthetic``): no files; split here, stratified by class and seeded by
  ``split_seed`` with ``test_fraction``, so that a ``(name, split_seed)`` pair always names the same points.
- read from files under ``root`` (``mnist``, ``cifar10``, ``imagenet``, see :mod:`influence.data_files`):
  their official train/test split is kept, since that is what published numbers refer to; ``split_seed`` then
  only picks the optional ``subset`` / ``test_subset`` (Koh & Liang's small MNIST is ``subset=0.1``).

Either way the points keep a fixed order, which is what lets results from different tasks (training,
influence, retraining) be joined by ``train_idx`` / ``test_idx``.

Standardisation uses the *training* statistics only: the test points must not leak into the features the model
is trained on, or the held-out losses would be optimistic. Flat features are standardised per feature; images
(``[n, C, H, W]``, digits included) per channel, with one mean and one standard deviation over all of a
channel's training pixels, as image models expect (a per-pixel scaling would blow up pixels that are almost
always dark). Models flatten images themselves, so an MLP takes either.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DATASETS: tuple[str, ...] = ("iris", "digits", "synthetic", "mnist", "cifar10", "imagenet")
# Sets that live in files under a root and come with an official train/test split.
FILE_DATASETS: tuple[str, ...] = ("mnist", "cifar10", "imagenet")
# Sets that take subset / test_subset: the image sets (digits as a small stand-in for them).
_SUBSET_DATASETS: tuple[str, ...] = ("digits", *FILE_DATASETS)

# Three overlapping Gaussian blobs in 4-d: small enough for exact leave-one-out by Newton's method in tests, and
# overlapping enough that some test points are misclassified (high-loss test points are where the study looks).
_SYNTHETIC_DIM = 4
_SYNTHETIC_CLASSES = 3
_SYNTHETIC_SPREAD = 1.6
_SYNTHETIC_DEFAULT_N = 150

_DEFAULT_TEST_FRACTION = 0.2
DEFAULT_IMAGE_SIZE = 224  # imagenet: the standard ResNet input


class UnknownDataset(ValueError):
    """Raised when a data set name is not one of :data:`DATASETS`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
        self.name = name


class DatasetNotFound(ValueError):
    """A file-based data set whose files are not where they must be; the message names the place and layout."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


# eq=False: the generated __eq__/__hash__ would compare tensors elementwise and fail; identity is right.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split: features ``x`` of shape [n, *input_shape] (floating), labels ``y`` of shape [n] (int64).

    ``input_shape`` is ``(d,)`` for flat features and ``(C, H, W)`` for images.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.x_train.ndim < 2 or self.x_test.ndim < 2:
            raise ValueError(f"features must be [n, *input_shape]; got {tuple(self.x_train.shape)} / "
                             f"{tuple(self.x_test.shape)}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"train and test features have different shapes: {tuple(self.x_train.shape[1:])} vs "
                             f"{tuple(self.x_test.shape[1:])}")
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError("features and labels differ in length")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def in_features(self) -> int:
        """The number of inputs once flattened (``prod(input_shape)``): the width of an MLP's first layer."""
        return math.prod(self.input_shape)

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def info(self) -> DatasetInfo:
        return DatasetInfo(name=self.name, n_train=self.n_train, n_test=self.n_test, num_classes=self.num_classes,
                           input_shape=self.input_shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_train.dtype

    def train_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) as the training, curvature and retraining functions take them: the training split's tensors
        (a streamed set gives itself and None, which they read by chunks and batches)."""
        return self.x_train, self.y_train

    def take(self, split: str, idx, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the points ``idx`` of ``split`` ("train" or "test"), on ``device`` (default: the data's)."""
        x, y = self._split(split)
        idx = torch.as_tensor(idx, dtype=torch.int64, device="cpu").to(x.device)
        return x[idx].to(device or x.device), y[idx].to(device or x.device)

    def chunks(self, split: str, size: int, device: torch.device | str | None = None, *, start: int = 0,
               stop: int | None = None):
        """(x, y) of consecutive chunks of ``size`` points of ``split`` from ``start`` to ``stop`` (the end)."""
        x, y = self._split(split)
        stop = x.shape[0] if stop is None else stop
        for a in range(start, stop, size):
            b = min(a + size, stop)
            yield x[a:b].to(device or x.device), y[a:b].to(device or x.device)

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")

    def to(self, device: torch.device | str) -> Dataset:
        """The same split with every tensor on ``device`` (tensors already there are shared, not copied)."""
        return Dataset(
            name=self.name,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            num_classes=self.num_classes,
        )


@dataclass(frozen=True)
class DatasetInfo:
    """What planning needs of a data set: its sizes, classes and input shape, and nothing of the points."""

    name: str
    n_train: int
    n_test: int
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def in_features(self) -> int:
        return math.prod(self.input_shape)


def describe_dataset(name: str, *, held: bool = True, **options) -> DatasetInfo:
    """The :class:`DatasetInfo` of what ``load_dataset(name, **options)`` would load, with the same checks and
    errors. File sets: read from their labels (MNIST's label files, CIFAR-10's batches, ImageNet's file list)
    and the subset rules, decoding no image. Bundled sets are small: loaded, and described. ``held=False`` says
    the set will only be streamed (:func:`stream_dataset`), so the check that it fits in memory is skipped."""
    return _load(name, decode=False, held=held, **options)


def load_dataset(
    name: str,
    *,
    split_seed: int = 0,
    test_fraction: float = _DEFAULT_TEST_FRACTION,
    dtype: torch.dtype = torch.float64,
    n: int | None = None,
    root: str | None = None,
    subset: float | int | None = None,
    test_subset: float | int | None = None,
    classes: int | Sequence[str] | None = None,
    per_class: int | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Load ``name`` as an in-memory :class:`Dataset` on the CPU, standardised with the training statistics.

    Bundled sets: split stratified by class with ``test_fraction`` and ``split_seed`` (Iris at 0.2 gives the
    paper's 120/30 split; digits 1437/360). ``n`` is the total number of synthetic points (default 150).
    Digits also takes ``subset`` / ``test_subset`` (below), applied to the two splits. ``root`` is ignored:
    these sets have no files.

    File sets (``mnist``, ``cifar10``, ``imagenet``): read from the local folder ``root`` (layouts in
    :mod:`influence.data_files`; an ``s3://`` store is made local first by ``storage.datacache``). The official
    split is kept, so ``test_fraction`` must stay at its default. ``subset`` keeps part of the training split:
    a fraction in (0, 1] or a count, chosen by ``split_seed`` and stratified by class; ``test_subset`` does the
    same for the test split. For a fixed seed a smaller subset is contained in a larger one. Imagenet only:
    ``classes`` (the first k class folders in sorted order, or a list of folder names), ``per_class`` (the
    first m training images of each class by file name) and ``image_size`` (default 224).

    Raises :class:`UnknownDataset` for an unknown name, :class:`DatasetNotFound` when the files are missing,
    and ``ValueError`` naming the option for an option that does not apply or is out of range.
    """
    return _load(name, decode=True, split_seed=split_seed, test_fraction=test_fraction, dtype=dtype, n=n, root=root,
                 subset=subset, test_subset=test_subset, classes=classes, per_class=per_class, image_size=image_size)


def stream_dataset(name: str, **options):
    """A file set (``mnist``, ``cifar10``, ``imagenet``) opened for streaming: the same points, labels and
    standardisation as ``load_dataset(name, **options)``, with the images decoded a batch at a time by
    ``torch.utils.data.DataLoader`` workers (:class:`influence.streaming.StreamedSet`); only the labels, and
    for MNIST and CIFAR-10 the uint8 file contents torchvision reads, are held. Same options and errors."""
    if name in DATASETS and name not in FILE_DATASETS:
        raise ValueError(f"{name} is bundled and small: it is loaded whole (load_dataset), not streamed; "
                         f"streamed sets are {', '.join(FILE_DATASETS)}")
    return _load(name, decode=True, stream=True, **options)


def _load(name: str, *, decode: bool, stream: bool = False, held: bool = True, split_seed: int = 0,
          test_fraction: float = _DEFAULT_TEST_FRACTION,
          dtype: torch.dtype = torch.float64, n: int | None = None, root: str | None = None,
          subset: float | int | None = None, test_subset: float | int | None = None,
          classes: int | Sequence[str] | None = None, per_class: int | None = None,
          image_size: int | None = None):
    """:func:`load_dataset` (``decode``), :func:`describe_dataset` or :func:`stream_dataset` (``stream``),
    through the same checks."""
    if name not in DATASETS:
        raise UnknownDataset(name)
    if n is not None and name != "synthetic":
        raise ValueError(f"n={n} only applies to the synthetic dataset; {name!r} has a fixed size")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction}")
    if name in FILE_DATASETS:
        if test_fraction != _DEFAULT_TEST_FRACTION:
            raise ValueError(f"test_fraction={test_fraction} does not apply to {name}, which keeps its official "
                             f"train/test split; use test_subset to evaluate on fewer test points")
        return _load_files(name, root=root, split_seed=split_seed, dtype=dtype, subset=subset,
                           test_subset=test_subset, classes=classes, per_class=per_class, image_size=image_size,
                           decode=decode, stream=stream, held=held)
    if name != "digits":
        size = "its size is set by n" if name == "synthetic" else "it is used whole, as in the paper"
        for option, value in (("subset", subset), ("test_subset", test_subset)):
            if value is not None:
                raise ValueError(f"{option}={value!r} only applies to {', '.join(_SUBSET_DATASETS)}; for {name} "
                                 f"{size}")
    _only_for_imagenet(name, classes=classes, per_class=per_class, image_size=image_size)
    data = _load_bundled(name, split_seed=split_seed, test_fraction=test_fraction, dtype=dtype, n=n,
                         subset=subset, test_subset=test_subset)
    return data if decode else data.info()


# ---- bundled sets ---------------------------------------------------------------------------------------------

def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points from three isotropic Gaussian blobs (class sizes as equal as possible), fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, _SYNTHETIC_SPREAD, size=(_SYNTHETIC_CLASSES, _SYNTHETIC_DIM))
    y = np.arange(n) % _SYNTHETIC_CLASSES
    x = centres[y] + rng.normal(size=(n, _SYNTHETIC_DIM))
    return x, y


def _raw(name: str, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Imported lazily: scikit-learn is only needed for the two bundled data sets.
    if name == "iris":
        from sklearn.datasets import load_iris

        bunch = load_iris()
        return bunch.data.astype(np.float64), bunch.target
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # 8x8 grey images with 17 levels; as [n, 1, 8, 8] they are images like every other image set.
        return bunch.images.astype(np.float64)[:, None] / 16.0, bunch.target
    if name == "synthetic":
        return _synthetic(_SYNTHETIC_DEFAULT_N if n is None else n, seed)
    raise UnknownDataset(name)


def _load_bundled(name: str, *, split_seed: int, test_fraction: float, dtype: torch.dtype, n: int | None,
                  subset: float | int | None, test_subset: float | int | None) -> Dataset:
    from sklearn.model_selection import train_test_split

    x, y = _raw(name, n, split_seed)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    # Digits only (the caller checks): parts of the two splits, drawn as for the file sets.
    keep_tr = choose_subset(y_tr, subset, seed=split_seed, stream=0, option="subset", name=name)
    keep_te = choose_subset(y_te, test_subset, seed=split_seed, stream=1, option="test_subset", name=name)
    x_tr, y_tr, x_te, y_te = x_tr[keep_tr], y_tr[keep_tr], x_te[keep_te], y_te[keep_te]
    # Flat features: one statistic per feature. Images: one per channel, over all of its pixels.
    axes = 0 if x.ndim == 2 else (0, *range(2, x.ndim))
    keep = dict(axis=axes, keepdims=True)
    mean, std = x_tr.mean(**keep), x_tr.std(**keep)
    # A constant column or channel would give 0/0; merely centred it stays constant, all a model can use anyway.
    std = np.where(std > 0.0, std, 1.0)

    # Loaded on the CPU (and shipped to workers from there); a task moves it with Dataset.to(device).
    def as_x(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((a - mean) / std, dtype=dtype, device="cpu")

    return Dataset(name=name, x_train=as_x(x_tr), y_train=_as_y(y_tr), x_test=as_x(x_te), y_test=_as_y(y_te),
                   num_classes=int(y.max()) + 1)


def _as_y(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.int64, device="cpu")


# ---- sets read from files -------------------------------------------------------------------------------------

def _only_for_imagenet(name: str, **options: object) -> None:
    for option, value in options.items():
        if value is not None:
            raise ValueError(f"{option}={value!r} only applies to imagenet (class folders of JPEG files); "
                             f"{name} has a fixed set of classes and image size")


def _load_files(name: str, *, root: str | None, split_seed: int, dtype: torch.dtype,
                subset: float | int | None, test_subset: float | int | None, classes: int | Sequence[str] | None,
                per_class: int | None, image_size: int | None, decode: bool, stream: bool = False,
                held: bool = True):
    # Imported here: torchvision and PIL are loaded only by the processes that read files.
    from . import data_files

    if name != "imagenet":
        _only_for_imagenet(name, classes=classes, per_class=per_class, image_size=image_size)
    elif image_size is None:
        image_size = DEFAULT_IMAGE_SIZE
    train, test = data_files.read_splits(name, root, classes=classes, per_class=per_class, image_size=image_size)
    # Separate streams for the two splits, so that changing test_subset never changes the training points.
    train_idx = choose_subset(train.labels, subset, seed=split_seed, stream=0, option="subset", name=name)
    test_idx = choose_subset(test.labels, test_subset, seed=split_seed, stream=1, option="test_subset", name=name)
    if stream:  # nothing is held but the labels: no memory guard
        from .streaming import StreamedSet

        # How a loader process opens the splits itself (it is started fresh, not forked: see influence.streaming).
        opener = functools.partial(data_files.read_splits, name, root, classes=classes, per_class=per_class,
                                   image_size=image_size)
        return StreamedSet(name, train, test, train_idx, test_idx, dtype, opener=opener)
    if name == "imagenet" and held:  # (planning too: a set too large for a task is refused before anything runs)
        data_files.check_fits_in_memory(name, len(train_idx) + len(test_idx), train.image_shape, dtype)
    if not decode:
        return DatasetInfo(name=name, n_train=len(train_idx), n_test=len(test_idx), num_classes=train.num_classes,
                           input_shape=tuple(train.image_shape))
    x_train, x_test = standardise_images(train.images(train_idx), test.images(test_idx), dtype)
    return Dataset(name=name, x_train=x_train, y_train=_as_y(train.labels[train_idx]), x_test=x_test,
                   y_test=_as_y(test.labels[test_idx]), num_classes=train.num_classes)


def choose_subset(labels: np.ndarray, subset: float | int | None, *, seed: int, stream: int = 0,
                  option: str = "subset", name: str = "dataset") -> np.ndarray:
    """Indices (ascending) of a class-stratified subset of ``labels``; all of them when ``subset`` is None.

    ``subset`` is a fraction in (0, 1] (of ``len(labels)``, rounded, at least one) or an integer count. Each
    class gets its share of the count (largest remainders round up, ties to the lower class), and within a
    class the points come from one permutation drawn from ``(seed, stream)`` per class in turn, so for a fixed
    seed a smaller subset is always contained in a larger one.
    """
    n = len(labels)
    if subset is None:
        return np.arange(n)
    count = _subset_count(subset, n, option, name)
    _, inverse = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inverse)
    quota = count * sizes / n
    take = np.floor(quota).astype(np.int64)
    largest_remainders = np.argsort(-(quota - take), kind="stable")
    take[largest_remainders[: count - int(take.sum())]] += 1
    rng = np.random.default_rng([seed, stream])
    chosen = [rng.permutation(np.flatnonzero(inverse == k))[: take[k]] for k in range(len(sizes))]
    return np.sort(np.concatenate(chosen))


def _subset_count(subset: float | int, n: int, option: str, name: str) -> int:
    # bool is an int to Python, but `subset: true` in a config is a mistake, not a count of one.
    if isinstance(subset, numbers.Integral) and not isinstance(subset, bool):
        if not 1 <= subset <= n:
            raise ValueError(f"{option}={subset} must be a count in [1, {n}] ({name} has {n} points in that split) "
                             f"or a fraction in (0, 1]")
        return int(subset)
    if isinstance(subset, numbers.Real) and not isinstance(subset, bool):
        if not 0.0 < subset <= 1.0:
            raise ValueError(f"{option}={subset} must be a fraction in (0, 1] or an integer count of points")
        return max(1, round(float(subset) * n))
    raise ValueError(f"{option}={subset!r} must be a fraction in (0, 1] or an integer count of points")


def standardise_images(train: np.ndarray, test: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [n, C, H, W] → tensors of ``dtype``, each channel standardised with the training statistics.

    The pixels are scaled to [0, 1] first (so the statistics read as usual), but the result does not depend on
    it. Because a channel holds only 256 values, its mean and standard deviation come exactly from a histogram,
    and the standardised value of each level from a 256-entry table: no float64 copy of a whole split is ever
    made, so a CIFAR-10 task holds its result and the uint8 source, not three times that.
    """
    table = level_table(channel_counts(train), dtype)
    return apply_table(table, train), apply_table(table, test)


def channel_counts(images: np.ndarray) -> np.ndarray:
    """How often each of the 256 levels occurs in each channel of uint8 images [n, C, H, W]: int64 [C, 256].
    Counts of disjoint batches add up exactly, so a streamed pass over the training set gets the same table."""
    return np.stack([np.bincount(images[:, c].ravel(), minlength=256) for c in range(images.shape[1])])


def level_table(counts: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """[C, 256] of ``dtype``: the standardised value of each level of each channel, from the training counts."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean = counts @ levels / counts.sum(1)
    var = (counts * (levels[None, :] - mean[:, None]) ** 2).sum(1) / counts.sum(1)
    std = np.sqrt(var)
    std = np.where(std > 0.0, std, 1.0)  # a constant channel: centred only, as for flat features
    return torch.as_tensor((levels[None, :] - mean[:, None]) / std[:, None], dtype=dtype, device="cpu")


def apply_table(table: torch.Tensor, images: np.ndarray) -> torch.Tensor:
    """uint8 images [n, C, H, W] → their standardised values, a tensor of the table's dtype."""
    out = torch.empty(images.shape, dtype=table.dtype, device="cpu")
    for c in range(images.shape[1]):
        # int32 indices: a quarter of the memory of int64 ones, and indexing accepts them.
        out[:, c] = table[c][torch.from_numpy(np.ascontiguousarray(images[:, c])).to(torch.int32)]
    return out
