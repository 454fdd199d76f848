"""File data sets streamed through ``torch.utils.data.DataLoader``: images decoded a batch at a time, never held.

A :class:`StreamedSet` (from :func:`influence.data.stream_dataset`) names the chosen points of a file set's two
splits and holds their labels; images are decoded when a batch asks for them, by ``workers`` DataLoader
processes (none: in this process), standardised per batch in the worker and, for a CUDA device, handed over in
pinned memory. It gives what ``load_dataset`` gives, value for value:

- the standardisation table comes from one streamed pass that counts each channel's 256 levels over the
  training images; counts of batches add up exactly, so the table is the in-memory one bit for bit;
- training batches follow :func:`~influence.order.epoch_order` (``epoch_batches``), so streamed training
  visits the very minibatches in-memory training does, and reaches the same θ;
- evaluation runs over consecutive chunks (``chunks``), as the in-memory passes slice them;
- a few chosen points (test points) are decoded directly (``take``).

MNIST and CIFAR-10 are read by torchvision as whole uint8 arrays (47 MB and 150 MB: an eighth of the float64
copy this avoids); ImageNet JPEGs are opened, resized and cropped one by one, only when a batch needs them.
A StreamedSet answers ``take`` and ``chunks`` as an in-memory :class:`~influence.data.Dataset` does, so the curvature
operator, the test-point solves and the estimates over a shard of training points read either.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Iterator

import numpy as np
import torch
import torch.utils.data

from influence.data import Dataset, DatasetInfo, apply_table, channel_counts, level_table
from influence.data_files import Split
from influence.order import epoch_order

__all__ = ["StreamedSet"]

SPLITS = ("train", "test")
_COUNT_CHUNK = 256  # training images per batch of the counting pass


class _Points(torch.utils.data.Dataset):
    """The chosen points of one split for a DataLoader: ``__getitems__`` gets a whole batch of positions (the
    loader's batch sampler gives them) and returns (x standardised, y), or with ``table`` None the level counts
    of the batch's images. Pickled into a loader process it leaves the opened reader behind and opens the
    split there with ``opener`` (``read_splits`` with the set's arguments), once per process."""

    def __init__(self, split: Split, idx: np.ndarray, labels: torch.Tensor, table: torch.Tensor | None, opener=None,
                 which: str = "train") -> None:
        self.images, self.idx, self.labels, self.table = split.images, idx, labels, table
        self.opener, self.which = opener, which

    def __getstate__(self) -> dict:
        if self.opener is None:
            raise TypeError("this set's points cannot be opened in another process (no opener): use workers=0")
        return {**self.__dict__, "images": None}

    def __len__(self) -> int:
        return len(self.idx)

    def __getitems__(self, positions: list[int]):
        if self.images is None:  # in a loader process: open the split here
            train, test = self.opener()
            self.images = (train if self.which == "train" else test).images
        pos = np.asarray(positions, dtype=np.int64)
        source = self.idx[pos]
        order = np.argsort(source, kind="stable")  # decoded in file order; handed back in the batch's order
        decoded = self.images(source[order])
        images = np.empty_like(decoded)
        images[order] = decoded
        if self.table is None:
            return torch.from_numpy(channel_counts(images))
        return apply_table(self.table, images), self.labels[torch.from_numpy(pos)]

    def __getitem__(self, position: int):
        return self.__getitems__([position])


def _as_is(batch):  # the batch is made whole by __getitems__: nothing to collate
    return batch


class _Batches(torch.utils.data.Sampler):
    """Positions of each batch: consecutive chunks of ``size`` from ``start`` to ``stop``, or with ``seed`` epoch ``epoch``'s order of
    :func:`~influence.order.epoch_order` split into batches of ``size``, from batch ``skip`` on, and with
    ``piece`` (rank, world) only piece ``rank`` of each batch cut into ``world`` (set these before each pass)."""

    def __init__(self, n: int, size: int, seed: int | None = None) -> None:
        self.n, self.size, self.seed = n, size, seed
        self.epoch, self.skip, self.piece = 0, 0, None
        self.start, self.stop = 0, n

    def __iter__(self) -> Iterator[list[int]]:
        if self.seed is None:
            return (list(range(a, min(a + self.size, self.stop))) for a in range(self.start, self.stop, self.size))
        batches = epoch_order(self.n, self.seed, self.epoch).split(self.size)[self.skip:]
        if self.piece is not None:
            rank, world = self.piece
            batches = [b.tensor_split(world)[rank] for b in batches]
        return (b.tolist() for b in batches)

    def __len__(self) -> int:
        return -(-self.n // self.size)


class StreamedSet:
    """A file set's train/test split, streamed (see the module docstring). ``workers``: DataLoader worker
    processes (0: decode in this process); ``dtype``: that of the standardised images."""

    def __init__(self, name: str, train: Split, test: Split, train_idx: np.ndarray, test_idx: np.ndarray,
                 dtype: torch.dtype, workers: int = 0, opener=None) -> None:
        self.name, self.dtype, self.workers, self.opener = name, dtype, int(workers), opener
        if self.workers > 0 and opener is None:
            raise ValueError("loader processes open the splits themselves: give an opener, or workers=0")
        self._splits = {"train": (train, np.asarray(train_idx, dtype=np.int64)),
                        "test": (test, np.asarray(test_idx, dtype=np.int64))}
        self.num_classes = train.num_classes
        self.input_shape = tuple(int(s) for s in train.image_shape)
        self.y_train = torch.as_tensor(train.labels[train_idx], dtype=torch.int64, device="cpu")
        self.y_test = torch.as_tensor(test.labels[test_idx], dtype=torch.int64, device="cpu")
        self._counts: np.ndarray | None = None
        self._table: torch.Tensor | None = None
        self._loaders: dict[tuple, tuple[torch.utils.data.DataLoader, _Batches]] = {}

    n_train = property(lambda self: len(self.y_train))
    n_test = property(lambda self: len(self.y_test))

    def info(self) -> DatasetInfo:
        return DatasetInfo(name=self.name, n_train=self.n_train, n_test=self.n_test, num_classes=self.num_classes,
                           input_shape=self.input_shape)

    def train_inputs(self) -> tuple[StreamedSet, None]:
        """(x, y) as the training, curvature and retraining functions take a streamed set: itself, and None."""
        return self, None

    def with_workers(self, workers: int) -> StreamedSet:
        """The same set read by ``workers`` DataLoader processes (the counts, once known, are shared)."""
        (train, train_idx), (test, test_idx) = self._splits["train"], self._splits["test"]
        other = StreamedSet(self.name, train, test, train_idx, test_idx, self.dtype, workers, self.opener)
        other._counts, other._table = self._counts, self._table
        return other

    @property
    def counted(self) -> bool:
        """Whether the level counts are known (the table is then at hand without a pass)."""
        return self._counts is not None

    def counts(self) -> np.ndarray:
        """int64 [C, 256]: how often each level occurs in each channel of the training images (one streamed pass
        over them on first use)."""
        if self._counts is None:
            split, idx = self._splits["train"]
            counts = np.zeros((self.input_shape[0], 256), dtype=np.int64)
            loader = self._loader(self._points("train", None), _Batches(len(idx), _COUNT_CHUNK), pin=False)
            for batch in loader:
                counts += batch.numpy()
            self._counts = counts
        return self._counts

    def use_counts(self, counts: np.ndarray) -> None:
        """Take level counts counted before (by another process over the same points) instead of a pass;
        ``ValueError`` when they cannot be this set's (shape, or a total other than its pixels per channel)."""
        counts = np.asarray(counts, dtype=np.int64)
        pixels = self.n_train * int(np.prod(self.input_shape[1:]))
        if counts.shape != (self.input_shape[0], 256) or (counts.sum(1) != pixels).any():
            raise ValueError(f"{self.name}: level counts of shape {counts.shape} totalling {counts.sum(1).tolist()} "
                             f"are not those of {self.n_train} training images of shape {self.input_shape}")
        self._counts, self._table = counts, None

    @property
    def table(self) -> torch.Tensor:
        """[C, 256]: the standardised value of each level of each channel, from the training counts."""
        if self._table is None:
            self._table = level_table(self.counts(), self.dtype)
        return self._table

    def epoch_batches(self, batch_size: int, seed: int, epoch: int, device: torch.device | str = "cpu", *,
                      skip: int = 0, piece: tuple[int, int] | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of each minibatch of training epoch ``epoch``, in :func:`epoch_order` ``(n, seed, epoch)``,
        from batch ``skip`` on (a resumed epoch); with ``piece`` = (rank, world) only worker ``rank``'s piece of
        each batch, as ``batch.tensor_split(world)[rank]`` cuts it (data-parallel training)."""
        key = ("epochs", batch_size, seed, str(device), piece)
        loader, batches = self._cached(key, "train", batch_size, seed, device)
        batches.epoch, batches.skip, batches.piece = epoch, skip, piece
        return _moved(loader, device)

    def chunks(self, split: str, size: int, device: torch.device | str | None = None, *, start: int = 0,
               stop: int | None = None):
        """(x, y) of consecutive chunks of ``size`` points of ``split`` ("train" or "test") from ``start`` to
        ``stop`` (the end), in order."""
        device = "cpu" if device is None else device
        stop = len(self._split(split)[1]) if stop is None else stop
        loader, batches = self._cached(("chunks", split, size, str(device)), split, size, None, device)
        batches.start, batches.stop = start, stop
        return _moved(loader, device)

    def take(self, split: str, idx, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the points ``idx`` (positions in ``split``), decoded here."""
        idx = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        x, y = self._points(split, self.table).__getitems__(idx)
        device = "cpu" if device is None else device
        return x.to(device), y.to(device)

    def materialise(self) -> Dataset:
        """The whole set in memory: what ``load_dataset`` gives (for the few uses that need every point at once)."""
        train, test = (self._points(s, self.table) for s in SPLITS)
        (x_train, y_train), (x_test, y_test) = (p.__getitems__(list(range(len(p)))) for p in (train, test))
        return Dataset(name=self.name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                       num_classes=self.num_classes)

    def close(self) -> None:
        """Stop the worker processes of this set's loaders."""
        self._loaders.clear()

    def _split(self, split: str) -> tuple[Split, np.ndarray]:
        if split not in self._splits:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        return self._splits[split]

    def _cached(self, key: tuple, split: str, size: int, seed: int | None, device):
        if key not in self._loaders:
            source, idx = self._split(split)
            batches = _Batches(len(idx), size, seed)
            pin = torch.device(device).type == "cuda"
            for other in list(self._loaders):  # one pool of loader processes at a time: passes run one by one
                del self._loaders[other]
            self._loaders[key] = (self._loader(self._points(split, self.table), batches, pin), batches)
        return self._loaders[key]

    def _points(self, split: str, table: torch.Tensor | None) -> _Points:
        source, idx = self._split(split)
        return _Points(source, idx, self.y_train if split == "train" else self.y_test, table, self.opener, split)

    def _loader(self, points: _Points, batches: _Batches, pin: bool) -> torch.utils.data.DataLoader:
        workers = min(self.workers, len(batches))
        extra = {}
        if workers > 0:
            extra = {"multiprocessing_context": _loader_context(), "persistent_workers": True, "prefetch_factor": 2}
        return torch.utils.data.DataLoader(points, batch_sampler=batches, num_workers=workers, collate_fn=_as_is,
                                           pin_memory=pin, **extra)


def _loader_context():
    """Loader processes start from a fork server, not by forking the task: a task's process has threads (Ray's,
    the store client's, CUDA's) that a fork copies in whatever state they hold, and a forked child crashes on
    them now and then. The server imports this module (and torch) once; each loader process forks from it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["influence.streaming"])
    return context


def _moved(loader, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    for x, y in loader:
        yield x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
