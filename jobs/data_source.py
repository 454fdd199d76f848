"""File and bundled data sets as the tasks get them: loaded whole (small sets) or as a DataSource that each task
opens where it runs, streaming it (influence.streaming) or, where a computation takes every point at once,
loading its node's copy once per worker process.

What a configuration's tasks will do with its set decides which: `streams` (training, retraining and influence
in minibatches read a streamed set) and `holds_whole` (what still decodes a set whole, which planning checks
against the node's memory).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from influence.data import Dataset, DatasetInfo
from influence.retrain import full_batch_or
from influence.streaming import StreamedSet
from jobs.spec import Configuration
from storage.checkpoints import levels_path, load_state, save_state
from storage.tables import CorruptPart
from storage.uri import Store

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _data_arguments(cfg: Configuration) -> tuple[str, dict]:
    """(name, keyword arguments) of `influence.data.load_dataset` for the configuration's data; an s3:// data
    root is copied to this node's cache first (once per node, see storage.datacache)."""
    from storage.datacache import local_data_root

    root = local_data_root(cfg.data_root) if cfg.data_root is not None else None
    extra = {"root": root} if root is not None else {}
    return cfg.dataset, {"dtype": DTYPES[cfg.dtype], **extra, **cfg.data_options()}


def load_data(cfg: Configuration) -> Dataset:
    """The configuration's data set, in its dtype, whole in memory."""
    from influence.data import load_dataset

    name, options = _data_arguments(cfg)
    return load_dataset(name, **options)


@dataclass(frozen=True)
class DataSource:
    """A file data set (MNIST, CIFAR-10, ImageNet) named, not loaded: what the driver plans with and ships to
    the tasks in place of the data. Its sizes and shapes come from the labels and file list alone
    (`influence.data.describe_dataset`), so the driver never decodes an image and nothing of the set goes into
    the object store; each task opens its node's local copy with `to(device)`, which loads the set once per
    worker process (the last set used is kept) and hands back the very tensors `load_data` gives."""

    key: str  # dataset_key of the configurations that share it
    cfg: Configuration  # one of them: its data fields say what to load
    info: DatasetInfo

    n_train = property(lambda self: self.info.n_train)
    n_test = property(lambda self: self.info.n_test)
    num_classes = property(lambda self: self.info.num_classes)
    input_shape = property(lambda self: self.info.input_shape)

    def to(self, device: torch.device | str) -> Dataset:
        return _node_local(self).to(device)

    def stream(self, store: Store | None = None, workers: int = 0) -> StreamedSet:
        """The set opened for streaming from this node's copy (nothing decoded until a batch asks), with
        `workers` DataLoader processes. Its level counts (what standardises it) are counted once per worker
        process, or with a `store` once per run: the first task to count them saves them under
        `<experiment>/data/`, and the others read them instead of a pass over the training images."""
        stream = _STREAMED.get(self.key)
        if stream is None:
            from influence.data import stream_dataset

            name, options = _data_arguments(self.cfg)
            stream = _as_planned(self, stream_dataset(name, **options))
            _STREAMED.clear()
            _STREAMED[self.key] = stream
        if store is not None and not stream.counted:
            _shared_counts(store, self, stream)
        return stream.with_workers(workers)


def _as_planned(source: DataSource, data):
    """`data` (loaded or streamed) as opened by a task, unless the files changed since the run was planned."""
    if data.info() != source.info:
        raise ValueError(f"{source.cfg.dataset} under {source.cfg.data_root}: the run was planned for "
                         f"{source.info}, the files now hold {data.info()}; rerun to plan again")
    return data


def _shared_counts(store: Store, source: DataSource, stream: StreamedSet) -> None:
    """Give `stream` the level counts saved for its set in this run, or count them and save them."""
    path = levels_path(store, source.cfg.experiment, hashlib.sha256(source.key.encode()).hexdigest()[:16])
    try:
        state = load_state(store, path)
    except CorruptPart:  # a torn or foreign file: counted again and replaced below
        state = None
    if state is not None and state.get("key") == source.key:
        try:
            stream.use_counts(state["counts"].numpy())
            return
        except (KeyError, ValueError):  # not this set's: counted again and replaced
            pass
    counts = stream.counts()
    save_state(store, path, {"key": source.key, "counts": torch.from_numpy(counts)},
               f"level counts of {source.cfg.dataset}")


_STREAMED: dict[str, StreamedSet] = {}  # per worker process: the last set streamed (its labels and table)


_LOADED: dict[str, Dataset] = {}  # per worker process: dataset_key -> the set it holds
_KEEP_LOADED = 1  # an idle worker process keeps what it decoded, unseen by Ray's memory accounting: one set


def _node_local(source: DataSource) -> Dataset:
    data = _LOADED.pop(source.key, None)
    if data is None:
        data = _as_planned(source, load_data(source.cfg))
    _LOADED[source.key] = data
    while len(_LOADED) > _KEEP_LOADED:
        del _LOADED[next(iter(_LOADED))]
    return data


def datasets_for(configs: list[Configuration]) -> dict[str, Dataset | DataSource]:
    """What the tasks of these configurations get as their data, keyed by `dataset_key` (one per data set): a
    bundled set (Iris, digits, synthetic) loaded whole, as it is small; a file set as its DataSource. Either way
    a missing data set or a bad option is found here, before anything runs."""
    from influence.data import FILE_DATASETS, describe_dataset

    from influence.data_files import check_fits_in_memory

    out: dict[str, Dataset | DataSource] = {}
    for cfg in configs:
        key = dataset_key(cfg)
        if key in out:
            continue
        if cfg.dataset in FILE_DATASETS:
            name, options = _data_arguments(cfg)
            info = describe_dataset(name, held=False, **options)
            sharing = [c for c in configs if dataset_key(c) == key]
            if name == "imagenet" and any(holds_whole(c, info.n_train) for c in sharing):
                # a task will decode it whole: refused now if it cannot fit, before anything runs
                check_fits_in_memory(name, info.n_train + info.n_test, info.input_shape, DTYPES[cfg.dtype])
            out[key] = DataSource(key, cfg, info)
        else:
            out[key] = load_data(cfg)
    return out


def dataset_key(cfg: Configuration) -> str:
    """Configurations with equal keys load the same data (so a sweep loads each data set once)."""
    parts = [cfg.dataset, cfg.split_seed, cfg.test_fraction, cfg.dtype, cfg.data_root, cfg.subset, cfg.test_subset,
             cfg.classes, cfg.per_class, cfg.image_size]
    return "/".join(str(p) for p in parts)


def holds_whole(cfg: Configuration, n_train: int) -> bool:
    """Whether some task of `cfg` decodes its file set of `n_train` points whole: training and retraining in one
    full batch or with L-BFGS, and an MLP's dense Hessian (the spectrum, the exact method). Every other use
    streams it, so a set larger than a node's memory is refused only for these."""
    return cfg.optimizer == "lbfgs" or full_batch_or(cfg.batch_size, n_train) is None or cfg.model == "mlp"


def streams(cfg: Configuration, data: Dataset | DataSource) -> bool:
    """Whether training streams its data (the train task, and data-parallel workers): a file set trained in
    minibatches smaller than the set (the full batch and L-BFGS take every point at once)."""
    return (isinstance(data, DataSource) and cfg.optimizer != "lbfgs"
            and full_batch_or(cfg.batch_size, data.n_train) is not None)
