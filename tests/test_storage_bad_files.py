"""A stored file that is not what its name says (truncated, another table's schema, another model's checkpoint)
is named, set aside (kept, never deleted) and no longer listed, so its task runs again (local and S3)."""
from __future__ import annotations

import pyarrow.fs as pafs
import pytest
import torch

from storage.checkpoints import checkpoint_path, load_checkpoint, save_checkpoint
from storage.ledger import Ledger
from storage.tables import SET_ASIDE, CorruptPart, part_path, read_part, set_aside, write_part
from storage.uri import list_files, read_bytes, write_atomic

EXP = "iris"
ROWS = {"test_idx": [4, 9], "loss": [0.5, 2.5], "label": [0, 1], "selection": ["median", "highest"]}


def test_a_truncated_part_is_corrupt_and_set_aside(store):
    path = write_part(store, EXP, "test_points", "c1", "test_points", ROWS)
    write_atomic(store, path, read_bytes(store, path)[:40])
    with pytest.raises(CorruptPart, match="not a readable Parquet file") as info:
        read_part(store, path)
    assert info.value.path == store.uri_of(path)
    message = set_aside(store, EXP, path, info.value.reason)
    assert store.uri_of(path) in message and SET_ASIDE in message
    assert not Ledger(store, EXP).done("test_points", "c1", "test_points")
    kept = [i.path for i in list_files(store, store.path(EXP, SET_ASIDE)) if i.type == pafs.FileType.File]
    assert len(kept) == 1 and len(read_bytes(store, kept[0])) == 40  # kept as it was, for inspection


def test_a_part_with_another_tables_schema_is_corrupt(store):
    stats = write_part(store, EXP, "stats", "c1", "final", {"method": ["cg"], "test_idx": [1], "snapshot": [0]})
    target = part_path(store, EXP, "retrain", "c1", "retrain-00000")
    write_atomic(store, target, read_bytes(store, stats))
    with pytest.raises(CorruptPart, match="does not match the schema of the retrain table"):
        read_part(store, target)


def test_an_unloadable_checkpoint_is_corrupt(store):
    save_checkpoint(store, EXP, "m", {"theta": torch.ones(3)})
    path = checkpoint_path(store, EXP, "m")
    write_atomic(store, path, b"not a checkpoint")
    with pytest.raises(CorruptPart, match="not a loadable checkpoint"):
        load_checkpoint(store, EXP, "m")


def test_another_models_checkpoint_is_set_aside_and_trained_again(store):
    from jobs.spec import Configuration
    from jobs.tasks import load_base

    mine, theirs = Configuration(experiment=EXP), Configuration(experiment=EXP, weight_decay=0.0)
    assert mine.model_key != theirs.model_key
    good = {"theta": torch.zeros(43, dtype=torch.float64), "model_key": mine.model_key}
    save_checkpoint(store, EXP, mine.model_key, good)
    state, notice = load_base(store, mine, 43)
    assert notice is None and torch.equal(state["theta"], good["theta"])
    for bad, why in (({**good, "model_key": theirs.model_key}, "checkpoint of model"),
                     ({**good, "theta": torch.zeros(40, dtype=torch.float64)}, "shape (40,)"),
                     ({**good, "theta": torch.zeros(43, dtype=torch.float32)}, "float32"),
                     ({**good, "theta": torch.full((43,), float("nan"), dtype=torch.float64)}, "not all finite")):
        save_checkpoint(store, EXP, mine.model_key, bad)
        state, notice = load_base(store, mine, 43)
        assert state is None and why in notice and "set aside" in notice, notice
        assert load_checkpoint(store, EXP, mine.model_key) is None  # moved away: the train task trains again
