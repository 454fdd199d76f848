"""Model weights in the store: ``<root>/<experiment>/checkpoints/<model_key>.pt``; and beside them the solved
inverse-HVP vectors of sharded influence, ``<root>/<experiment>/ihvp/<config_id>/<part>.pt``, and the saved
progress of long retrains, ``<root>/<experiment>/progress/<config_id>/<name>.pt`` (deleted once their part lands).

A checkpoint is a dict (tensors plus metadata such as the configuration) serialised with ``torch.save``
into memory and written atomically through ``pyarrow.fs``, like a table part: a reader never loads half a
file, and retraining the same model writes the same file. The ``checkpoints`` folder sits next to the
tables but is not one (it is not in ``TABLES``), so table reads and the ledger never see it.
"""
from __future__ import annotations

import io
from typing import Any

import torch

from .tables import TABLES, CorruptPart
from .uri import Store, StoreError, check_name, is_file, read_bytes, write_atomic

__all__ = ["CHECKPOINTS", "IHVP", "checkpoint_path", "save_checkpoint", "load_checkpoint", "checkpoint_exists",
           "ihvp_path", "progress_path", "save_state", "load_state"]

CHECKPOINTS = "checkpoints"
IHVP = "ihvp"
PROGRESS = "progress"
DATA = "data"
assert not {CHECKPOINTS, IHVP, PROGRESS, DATA} & set(TABLES)  # the folders would otherwise be read as tables

_SUFFIX = ".pt"


def checkpoint_path(store: Store, experiment: str, model_key: str) -> str:
    """``<root>/<experiment>/checkpoints/<model_key>.pt``."""
    check_name("experiment", experiment)
    check_name("model_key", model_key)
    return store.path(experiment, CHECKPOINTS, model_key + _SUFFIX)


def ihvp_path(store: Store, experiment: str, config_id: str, part: str) -> str:
    """``<root>/<experiment>/ihvp/<config_id>/<part>.pt``: the s_t of one influence part's test points."""
    for what, name in (("experiment", experiment), ("config_id", config_id), ("part", part)):
        check_name(what, name)
    return store.path(experiment, IHVP, config_id, part + _SUFFIX)


def progress_path(store: Store, experiment: str, config_id: str, name: str) -> str:
    """``<root>/<experiment>/progress/<config_id>/<name>.pt``: where a retrain run keeps its state meanwhile."""
    for what, value in (("experiment", experiment), ("config_id", config_id), ("progress name", name)):
        check_name(what, value)
    return store.path(experiment, PROGRESS, config_id, name + _SUFFIX)


def levels_path(store: Store, experiment: str, data_digest: str) -> str:
    """``<root>/<experiment>/data/<data_digest>.pt``: the level counts that standardise a streamed file set."""
    for what, value in (("experiment", experiment), ("data digest", data_digest)):
        check_name(what, value)
    return store.path(experiment, DATA, data_digest + _SUFFIX)


def save_checkpoint(store: Store, experiment: str, model_key: str, state: dict[str, Any]) -> str:
    """Save ``state`` (e.g. ``{"params": {...tensors}, "config": {...}}``) atomically; return its path.

    Tensors are moved to the CPU first so that a checkpoint written on a GPU worker loads anywhere.
    """
    return save_state(store, checkpoint_path(store, experiment, model_key), state, f"checkpoint {model_key!r}")


def save_state(store: Store, path: str, state: dict[str, Any], what: str) -> str:
    """``state`` (tensors and plain values) saved atomically at ``path``, its tensors on the CPU; returns the path."""
    if not isinstance(state, dict):
        raise StoreError(f"{what}: state must be a dict, got {type(state).__name__}")
    buffer = io.BytesIO()
    torch.save(_to_cpu(state), buffer)
    return write_atomic(store, path, buffer.getvalue())


def load_checkpoint(store: Store, experiment: str, model_key: str, *,
                    map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state saved under ``model_key``, or None when there is none.

    Loaded with ``weights_only=True``: a store may be shared, and a checkpoint should hold tensors and
    plain Python values only (dicts, lists, str, numbers), never pickled objects. A file that cannot be
    loaded raises ``CorruptPart`` (the caller sets it aside and trains again).
    """
    return load_state(store, checkpoint_path(store, experiment, model_key), map_location=map_location)


def load_state(store: Store, path: str, *, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """What :func:`save_state` wrote at ``path`` (None when nothing is there), as :func:`load_checkpoint` loads."""
    data = read_bytes(store, path)
    if data is None:
        return None
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, ...)
        raise CorruptPart(store.uri_of(path), f"not a loadable checkpoint ({len(data)} bytes; checkpoints hold "
                                              f"tensors and plain Python values only): {type(exc).__name__}: "
                                              f"{str(exc).splitlines()[0] if str(exc) else ''}", path) from None
    if not isinstance(state, dict):
        raise CorruptPart(store.uri_of(path), f"holds a {type(state).__name__}, not a checkpoint's dict", path)
    return state


def checkpoint_exists(store: Store, experiment: str, model_key: str) -> bool:
    """Whether a checkpoint has been saved under ``model_key``."""
    return is_file(store, checkpoint_path(store, experiment, model_key))


def _to_cpu(value: Any) -> Any:
    # Recursive over the containers torch.load(weights_only=True) accepts back.
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # exact types: a namedtuple would not rebuild from a generator
        return type(value)(_to_cpu(v) for v in value)
    return value
