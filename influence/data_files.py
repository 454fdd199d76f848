"""The file-based data sets on disk: where their files must be, reading them, and writing tiny real ones.

MNIST, CIFAR-10 and ImageNet are read by torchvision's own readers, in torchvision's own layouts, so a copy
that any torchvision user already has works as it is, and nothing is ever downloaded at run time (cluster
workers may have no network, and a download per task would be a denial-of-service on the mirrors)::

    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]   torchvision.datasets.MNIST
    <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}  torchvision.datasets.CIFAR10
    <root>/{train,val}/<wnid>/*.JPEG                                       torchvision.datasets.ImageFolder

A missing file is reported before torchvision is asked (its own message suggests ``download=True``), naming
the folder and the layout. :func:`write_tiny` writes small files in these very formats, with a learnable class
signal, so that the readers, the pipeline and the tests run on real formats without the real data.

Reading goes in two steps so that a small run of a large set stays cheap: :func:`read_splits` gives every
point's label (for ImageNet only the file list is scanned), and ``Split.images(idx)`` decodes just the chosen
points, as uint8 [n, C, H, W] that :mod:`influence.data` standardises.
"""

from __future__ import annotations

import colorsys
import gzip
import math
import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import DEFAULT_IMAGE_SIZE, DatasetNotFound

__all__ = ["Split", "read_splits", "check_fits_in_memory", "write_tiny", "TINY_DATASETS"]

TINY_DATASETS: tuple[str, ...] = ("mnist", "cifar10", "imagenet")

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch", "batches.meta")
# The standard evaluation transform scales the shorter side to 256 for a 224 crop: the ratio 256/224 ≈ 1.14.
_RESIZE_RATIO = 256 / 224

_LAYOUTS = {
    "mnist": ("MNIST/raw/ with " + ", ".join(f"{f}[.gz]" for f in _MNIST_FILES)
              + " as torchvision.datasets.MNIST lays them out"),
    "cifar10": (f"{_CIFAR_FOLDER}/ with {', '.join(_CIFAR_FILES)} (the python version of CIFAR-10, "
                f"cifar-10-python.tar.gz unpacked) as torchvision.datasets.CIFAR10 lays them out"),
    "imagenet": ("train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, one folder per class in both, as "
                 "torchvision.datasets.ImageFolder reads them (the official val images sorted into class folders)"),
}


def _not_found(name: str, root: str | None, problem: str) -> DatasetNotFound:
    return DatasetNotFound(name, (
        f"{name}: {problem} (expected {_LAYOUTS[name]}; nothing is downloaded at run time: copy them there, or "
        f"write tiny test files with `fragile data tiny {name} {root if root is not None else 'ROOT'}`)"
    ))


@dataclass(frozen=True)
class Split:
    """One official split: every point's label, and its images decoded on demand.

    ``images(idx)`` returns uint8 [len(idx), *image_shape] for the points ``idx`` (ascending indices).
    """

    labels: np.ndarray  # [N] int64
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    images: Callable[[np.ndarray], np.ndarray]


def read_splits(name: str, root: str | None, *, classes: int | Sequence[str] | None = None,
                per_class: int | None = None, image_size: int | None = None) -> tuple[Split, Split]:
    """The (train, test) splits of ``name`` from the local folder ``root``; ``DatasetNotFound`` if absent.

    ``classes``, ``per_class`` and ``image_size`` apply to imagenet only (see ``influence.data.load_dataset``).
    """
    if root is None:
        raise _not_found(name, None, "no data root given (root=None): pass the folder that holds the files")
    root = os.path.expanduser(str(root))
    if name == "mnist":
        return _read_mnist(root)
    if name == "cifar10":
        return _read_cifar10(root)
    if name == "imagenet":
        return _read_imagenet(root, classes, per_class, DEFAULT_IMAGE_SIZE if image_size is None else image_size)
    raise ValueError(f"{name!r} is not read from files; file-based sets are {', '.join(TINY_DATASETS)}")


def check_fits_in_memory(name: str, n_points: int, image_shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """``ValueError`` before decoding anything when ``n_points`` images of ``dtype`` exceed this machine's memory."""
    needed = n_points * math.prod(image_shape) * (torch.empty((), dtype=dtype, device="cpu").element_size() + 1)  # + uint8
    try:
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (not POSIX): nothing to compare against
        return
    if needed > available:
        raise ValueError(
            f"{name}: {n_points} images of shape {tuple(image_shape)} need {needed / 2**30:.1f} GiB in memory as "
            f"{dtype}, more than this machine's {available / 2**30:.1f} GiB: choose fewer with classes, "
            f"per_class, subset or test_subset, or a smaller image_size"
        )


# ---- MNIST ----------------------------------------------------------------------------------------------------

def _read_mnist(root: str) -> tuple[Split, Split]:
    raw = os.path.join(root, "MNIST", "raw")
    missing = [f for f in _MNIST_FILES if not _unpacked(os.path.join(raw, f), root)]
    if len(missing) == len(_MNIST_FILES):
        raise _not_found("mnist", root, f"no MNIST files under {raw}")
    if missing:
        raise _not_found("mnist", root, f"missing {', '.join(f + '[.gz]' for f in missing)} under {raw}")
    from torchvision.datasets import MNIST  # after the checks: a missing file is reported without the import

    splits = []
    for train in (True, False):
        try:
            data = MNIST(root, train=train, download=False)
        except (AssertionError, RuntimeError, ValueError, OSError) as exc:  # its parser asserts on bad headers
            raise ValueError(f"mnist: the files under {raw} are not valid idx files: {exc!r}") from exc
        images = data.data.numpy()[:, None]  # [N, 1, 28, 28]
        splits.append((images, data.targets.numpy().astype(np.int64)))
    num_classes = int(max(labels.max() for _, labels in splits)) + 1  # the idx format carries no class list
    return tuple(_in_memory(images, labels, num_classes) for images, labels in splits)  # type: ignore[return-value]


def _unpacked(path: str, root: str) -> bool:
    """Whether the uncompressed ``path`` exists, unpacking ``path.gz`` beside it first if only that is there.

    torchvision reads only the uncompressed idx files (its download step unpacks them, leaving the .gz beside
    them); a copy of just the .gz files is unpacked here once, the same way. Unpacking goes to a temporary
    file and a rename, so tasks that start together on one node never see half a file.
    """
    if os.path.isfile(path):
        return True
    if not os.path.isfile(path + ".gz"):
        return False
    temp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with gzip.open(path + ".gz", "rb") as src, open(temp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(temp, path)
    except OSError as exc:
        if os.path.exists(temp):
            os.remove(temp)
        raise _not_found("mnist", root, f"found {os.path.basename(path)}.gz but cannot unpack it beside itself "
                                        f"({exc}); torchvision reads the uncompressed files: gunzip them") from exc
    return True


# ---- CIFAR-10 -------------------------------------------------------------------------------------------------

def _cifar10_class() -> type:  # built on first use: torchvision is imported lazily
    from torchvision.datasets import CIFAR10

    class CIFAR10Unchecked(CIFAR10):
        """torchvision's CIFAR-10 reader with its md5 checks switched off (``check_integrity(path, None)``
        then checks only that each file exists).

        Why: ``_check_integrity`` and ``_load_meta`` compare every file with the md5 of the official release,
        so tiny test files (:func:`write_tiny`) or a re-pickled copy are refused as "not found or corrupted,
        use download=True", a message that points the wrong way here. We check that the files are present
        ourselves beforehand, with a message naming the layout; a damaged file still fails to unpickle. The
        reading itself (the pickles, the reshape to 32x32x3) stays torchvision's.
        """

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return CIFAR10Unchecked


def _read_cifar10(root: str) -> tuple[Split, Split]:
    folder = os.path.join(root, _CIFAR_FOLDER)
    missing = [f for f in _CIFAR_FILES if not os.path.isfile(os.path.join(folder, f))]
    if len(missing) == len(_CIFAR_FILES):
        raise _not_found("cifar10", root, f"no CIFAR-10 files under {folder}")
    if missing:
        raise _not_found("cifar10", root, f"missing {', '.join(missing)} under {folder}")
    reader = _cifar10_class()
    splits = []
    for train in (True, False):
        try:
            data = reader(root, train=train, download=False)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(f"cifar10: the files under {folder} are not CIFAR-10 python pickles: {exc!r}") from exc
        images = np.ascontiguousarray(data.data.transpose(0, 3, 1, 2))  # torchvision keeps HWC; we use CHW
        splits.append((images, np.asarray(data.targets, dtype=np.int64), len(data.classes)))
    return tuple(_in_memory(images, labels, k) for images, labels, k in splits)  # type: ignore[return-value]


def _in_memory(images: np.ndarray, labels: np.ndarray, num_classes: int) -> Split:
    return Split(labels=labels, num_classes=num_classes, image_shape=tuple(images.shape[1:]),
                 images=lambda idx: images[idx])


# ---- ImageNet -------------------------------------------------------------------------------------------------

def _read_imagenet(root: str, classes: int | Sequence[str] | None, per_class: int | None,
                   image_size: int) -> tuple[Split, Split]:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer (pixels of the square crop)")
    if per_class is not None and (not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1):
        raise ValueError(f"per_class={per_class!r} must be a positive integer (training images per class)")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    for folder in (train_dir, val_dir):
        if not os.path.isdir(folder):
            raise _not_found("imagenet", root, f"no folder {folder}")
    available = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    if not available:
        raise _not_found("imagenet", root, f"no class folders under {train_dir}")
    chosen = _choose_classes(classes, available, root)
    absent = [c for c in chosen if not os.path.isdir(os.path.join(val_dir, c))]
    if absent:
        raise _not_found("imagenet", root, f"{len(absent)} class folder(s) missing under {val_dir}: "
                                           f"{', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}")
    return (_image_folder(train_dir, chosen, per_class, image_size, root),
            _image_folder(val_dir, chosen, None, image_size, root))


def _choose_classes(classes: int | Sequence[str] | None, available: list[str], root: str) -> list[str]:
    if classes is None:
        return available
    if isinstance(classes, int) and not isinstance(classes, bool):
        if not 1 <= classes <= len(available):
            raise ValueError(f"classes={classes} must lie in [1, {len(available)}] (class folders found)")
        return available[:classes]
    if (isinstance(classes, str) or not isinstance(classes, Sequence) or not classes
            or not all(isinstance(c, str) for c in classes)):
        raise ValueError(f"classes={classes!r} must be a count or a non-empty list of class folder names")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes={list(classes)!r} names a class twice")
    absent = sorted(set(classes) - set(available))
    if absent:
        raise _not_found("imagenet", root, f"no class folder {', '.join(absent)} under "
                                           f"{os.path.join(root, 'train')}")
    # Sorted like ImageFolder's own classes: label k is the k-th name in sorted order, however the list is written.
    return sorted(classes)


def _image_folder(folder: str, chosen: list[str], per_class: int | None, image_size: int, root: str) -> Split:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    class ChosenFolders(ImageFolder):
        """ImageFolder over the chosen class folders only: the others are not even listed."""

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return list(chosen), {name: k for k, name in enumerate(chosen)}

    try:
        dataset = ChosenFolders(folder)
    except FileNotFoundError as exc:  # a class folder without a single image
        raise _not_found("imagenet", root, f"{exc}".rstrip(".") + f" under {folder}") from exc
    samples = dataset.samples  # sorted by class, then by path (ImageFolder sorts both)
    if per_class is not None:
        seen: dict[int, int] = {}
        kept = []
        for path, label in samples:
            seen[label] = seen.get(label, 0) + 1
            if seen[label] <= per_class:
                kept.append((path, label))
        samples = kept
    transform = transforms.Compose([
        transforms.Resize(round(image_size * _RESIZE_RATIO)),  # the shorter side
        transforms.CenterCrop(image_size),
        transforms.PILToTensor(),  # uint8 [3, S, S]; the statistics are the training set's (influence.data)
    ])

    def decode(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), 3, image_size, image_size), dtype=np.uint8)
        for row, i in enumerate(idx):
            out[row] = transform(dataset.loader(samples[i][0])).numpy()
        return out

    return Split(labels=np.array([label for _, label in samples], dtype=np.int64), num_classes=len(chosen),
                 image_shape=(3, image_size, image_size), images=decode)


# ---- tiny files in the real formats ---------------------------------------------------------------------------

# Default sizes: a few hundred points, enough for a small model to learn the class signal in seconds.
_TINY_DEFAULTS = {  # name: (n_train, n_test, num_classes, image_size); imagenet counts are per class
    "mnist": (200, 50, 10, 28),
    "cifar10": (200, 50, 10, 32),
    "imagenet": (20, 5, 3, 48),
}


def write_tiny(name: str, root: str | os.PathLike[str], *, n_train: int | None = None, n_test: int | None = None,
               seed: int = 0, num_classes: int | None = None, image_size: int | None = None) -> str:
    """Write a tiny ``name`` data set in its real file format under ``root``; returns ``root`` (a string).

    Defaults: mnist 200 train / 50 test at 28x28, cifar10 200/50 at 32x32 (the only size the format has),
    imagenet 3 classes with 20 train / 5 val images *per class* at 48x48 JPEG. Every class draws a bright blob
    at its own place (and, in colour, in its own hue) with jitter and noise, so a small model learns it; the
    same ``seed`` writes the same files. Existing files of the same names are replaced.
    """
    if name not in _TINY_DEFAULTS:
        raise ValueError(f"no tiny files for {name!r}: choose one of {', '.join(TINY_DATASETS)} (the other sets "
                         f"are bundled and need no files)")
    d_train, d_test, d_classes, d_size = _TINY_DEFAULTS[name]
    n_train = d_train if n_train is None else n_train
    n_test = d_test if n_test is None else n_test
    num_classes = d_classes if num_classes is None else num_classes
    image_size = d_size if image_size is None else image_size
    if name == "cifar10" and image_size != 32:
        raise ValueError(f"image_size={image_size}: CIFAR-10 pickles hold 32x32 images only")
    if num_classes < 2 or n_train < 1 or n_test < 1 or image_size < 8:
        raise ValueError(f"need num_classes >= 2, n_train and n_test >= 1 and image_size >= 8; got {num_classes}, "
                         f"{n_train}, {n_test}, {image_size}")
    root = str(Path(root).expanduser())
    writer = {"mnist": _write_mnist, "cifar10": _write_cifar10, "imagenet": _write_imagenet}[name]
    writer(root, n_train, n_test, seed, num_classes, image_size)
    return root


def _blobs(labels: np.ndarray, num_classes: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, size, size, channels]: class k is a Gaussian blob on a circle at angle 2πk/K, in hue k/K."""
    n = len(labels)
    angle = 2 * np.pi * labels / num_classes
    centre = size / 2 + (size / 4) * np.stack([np.sin(angle), np.cos(angle)], 1) + rng.normal(0, size / 20, (n, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    sigma = size / 8
    blob = np.exp(-((yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2)
                  / (2 * sigma**2))  # [n, H, W]
    if channels == 1:
        colour = np.ones((n, 1))
    else:
        colour = np.array([colorsys.hsv_to_rgb(k / num_classes, 0.8, 1.0) for k in range(num_classes)])[labels]
    amplitude = rng.uniform(150, 210, (n, 1, 1, 1))
    image = 30 + amplitude * blob[..., None] * colour[:, None, None, :] + rng.normal(0, 20, (n, size, size, channels))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes)  # balanced classes, in a shuffled order


def _write_mnist(root: str, n_train: int, n_test: int, seed: int, num_classes: int, size: int) -> None:
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n, stream in (("train", n_train, 0), ("t10k", n_test, 1)):
        rng = np.random.default_rng([seed, stream])
        labels = _labels(n, num_classes, rng)
        images = _blobs(labels, num_classes, size, 1, rng)[..., 0]
        # idx format: big-endian int32 magic (0x0000 08 <ndim>: uint8 data), then each dimension, then the bytes.
        # Uncompressed, which is what torchvision reads (the reader here also accepts gzipped copies).
        with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as out:
            out.write(np.array([2051, n, size, size], dtype=">i4").tobytes() + images.tobytes())
        with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as out:
            out.write(np.array([2049, n], dtype=">i4").tobytes() + labels.astype(np.uint8).tobytes())


def _write_cifar10(root: str, n_train: int, n_test: int, seed: int, num_classes: int, size: int) -> None:
    folder = os.path.join(root, _CIFAR_FOLDER)
    os.makedirs(folder, exist_ok=True)

    def dump(file: str, entry: dict) -> None:
        # The official files are Python 2 pickles whose str keys load as str under encoding="latin1", the way
        # torchvision reads them (entry["data"]); protocol 2 str keys load as str too, whatever the encoding.
        with open(os.path.join(folder, file), "wb") as out:
            pickle.dump(entry, out, protocol=2)

    for stream, n, files in ((0, n_train, _CIFAR_TRAIN), (1, n_test, ("test_batch",))):
        rng = np.random.default_rng([seed, stream])
        labels = _labels(n, num_classes, rng)
        # Rows of 3072 bytes: the 1024 red pixels, then green, then blue (row-major each), as in the real files.
        data = _blobs(labels, num_classes, size, 3, rng).transpose(0, 3, 1, 2).reshape(n, 3 * size * size)
        for k, (file, part) in enumerate(zip(files, np.array_split(np.arange(n), len(files)))):
            dump(file, {"batch_label": f"tiny batch {k + 1} of {len(files)}", "data": data[part],
                        "labels": labels[part].tolist(), "filenames": [f"tiny_{i:05d}.png" for i in part]})
    dump("batches.meta", {"label_names": [f"class{k}" for k in range(num_classes)],
                          "num_cases_per_batch": -(-n_train // len(_CIFAR_TRAIN)), "num_vis": 3 * size * size})


def _write_imagenet(root: str, n_train: int, n_test: int, seed: int, num_classes: int, size: int) -> None:
    from PIL import Image

    wnids = [f"n{k:08d}" for k in range(num_classes)]  # shaped like WordNet ids (n01440764, ...)
    for stream, split, n in ((0, "train", n_train), (1, "val", n_test)):
        rng = np.random.default_rng([seed, stream])
        labels = np.repeat(np.arange(num_classes), n)
        images = _blobs(labels, num_classes, size, 3, rng)
        for i, (label, image) in enumerate(zip(labels, images)):
            folder = os.path.join(root, split, wnids[label])
            os.makedirs(folder, exist_ok=True)
            file = f"{wnids[label]}_{i % n:04d}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            Image.fromarray(image).save(os.path.join(folder, file), quality=90)
