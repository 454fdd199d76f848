"""Small classification data sets as tensors, split and standardised the way the study needs.

Every data set here is loaded whole into memory: the Iris-scale experiments retrain hundreds of models on the
full training set, so a ``DataLoader`` would only add overhead. Splits are stratified and seeded so that a
``(name, split_seed)`` pair always names the same train/test points, which is what lets results from different
tasks (training, influence, retraining) be joined by ``train_idx`` / ``test_idx``.

Standardisation uses the *training* mean and standard deviation only: the test points must not leak into the
features the model is trained on, or the held-out losses would be optimistic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DATASETS: tuple[str, ...] = ("iris", "digits", "synthetic")

# Three overlapping Gaussian blobs in 4-d: small enough for exact leave-one-out by Newton's method in tests, and
# overlapping enough that some test points are misclassified (high-loss test points are where the study looks).
_SYNTHETIC_DIM = 4
_SYNTHETIC_CLASSES = 3
_SYNTHETIC_SPREAD = 1.6
_SYNTHETIC_DEFAULT_N = 150


class UnknownDataset(ValueError):
    """Raised when a data set name is not one of :data:`DATASETS`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
        self.name = name


# eq=False: the generated __eq__/__hash__ would compare tensors elementwise and fail; identity is right.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split: features ``x`` of shape [n, d] (floating), labels ``y`` of shape [n] (int64)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.x_train.ndim != 2 or self.x_test.ndim != 2:
            raise ValueError(f"features must be [n, d]; got {tuple(self.x_train.shape)} / {tuple(self.x_test.shape)}")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError("train and test features have different widths")
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError("features and labels differ in length")

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

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
        return bunch.data.astype(np.float64) / 16.0, bunch.target
    if name == "synthetic":
        return _synthetic(_SYNTHETIC_DEFAULT_N if n is None else n, seed)
    raise UnknownDataset(name)


def load_dataset(
    name: str,
    *,
    split_seed: int = 0,
    test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float64,
    n: int | None = None,
) -> Dataset:
    """Load ``name``, split it stratified by class, and standardise with the training statistics.

    ``split_seed`` fixes the split (and, for ``synthetic``, the points themselves); ``n`` is the total number of
    synthetic points (default 150) and is rejected for the bundled data sets, whose size is fixed.
    Iris at the default ``test_fraction`` 0.2 gives the paper's 120/30 split.
    """
    if name not in DATASETS:
        raise UnknownDataset(name)
    if n is not None and name != "synthetic":
        raise ValueError(f"n={n} only applies to the synthetic dataset; {name!r} has a fixed size")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction}")

    from sklearn.model_selection import train_test_split

    x, y = _raw(name, n, split_seed)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    # Digits has pixels that are constant (always 0) in the training set; dividing by their zero std would make
    # NaNs. Leaving such a column merely centred keeps it constant, which is all the model can use from it anyway.
    std = np.where(std > 0.0, std, 1.0)

    # Loaded on the CPU (and shipped to workers from there); a task moves it with Dataset.to(device).
    def as_x(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((a - mean) / std, dtype=dtype, device="cpu")

    def as_y(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.int64, device="cpu")

    return Dataset(
        name=name,
        x_train=as_x(x_tr),
        y_train=as_y(y_tr),
        x_test=as_x(x_te),
        y_test=as_y(y_te),
        num_classes=int(y.max()) + 1,
    )
