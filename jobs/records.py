"""The `configs` table: one row per configuration, every field of :class:`Configuration` in its own column.

The row is built from the configuration's fields, not from a list of them: each field of
``dataclasses.fields(Configuration)`` becomes the column of the same name through ``column_value``, so a field
added to Configuration needs no edit here, only its column in ``storage/tables.py`` (a test checks that every
field has one). Next to them, the bookkeeping columns: ``spec_hash`` and ``version`` (what made the row),
``config`` (the canonical JSON of the whole configuration, the source of truth) and ``science`` (the stamp of
the science code, jobs/science.py).
"""
from __future__ import annotations


import pyarrow as pa

from jobs.science import SCIENCE
from jobs.protocol import CONFIG_PART
from jobs.spec import FIELDS, Configuration, Spec, _canonical
from storage import tables
from storage.uri import Store

__all__ = ["CONFIG_FIELDS", "column_value", "config_row", "write_configs"]

CONFIG_FIELDS = FIELDS  # every field of Configuration, in order
# Flat forms kept from before every field had a column, so old and new rows agree: methods as "exact,cg".
_JOINED = ("methods",)


def column_value(name: str, value: object) -> object:
    """A field's ``Configuration.to_dict()`` value as its ``configs`` column stores it: None stays null;
    ``methods`` is comma-joined; a value that is not a string but goes to a string column (``classes``, the
    per-method ``solvers`` settings, the ``test_points`` and ``removals`` rules) is its canonical JSON (the
    JSON that config_id hashes, so the column holds that field's fragment of the ``config`` column); any
    other value is stored as it is (the table's schema casts it, e.g. a ``subset`` count to float64)."""
    schema = tables.TABLES["configs"]
    if schema.get_field_index(name) < 0:
        raise RuntimeError(f"Configuration field {name!r} has no column in the configs table: add "
                           f"({name!r}, <type>) to TABLES['configs'] in storage/tables.py (ints int64, floats "
                           f"float64, bools bool, anything else string)")
    if value is None:
        return None
    if name in _JOINED:
        return ",".join(value)
    if pa.types.is_string(schema.field(name).type) and not isinstance(value, str):
        return _canonical(value)
    return value


def config_row(cfg: Configuration) -> dict[str, object]:
    """Every field of ``cfg`` -> its column value (the row of ``configs`` without the bookkeeping columns)."""
    d = cfg.to_dict() | {"ground_truth": cfg.truth}  # loo_warm / loo_scratch rather than loo: what rows record
    return {name: column_value(name, d[name]) for name in CONFIG_FIELDS}


def write_configs(store: Store, spec: Spec, configs: list[Configuration], version: str) -> None:
    """One `configs` row per configuration, with the spec hash and project version it was made with."""
    for cfg in configs:
        row = config_row(cfg) | {"spec_hash": spec.spec_hash, "version": version, "experiment": spec.experiment,
                                 "config": cfg.canonical_json(), "science": SCIENCE}
        tables.write_part(store, spec.experiment, "configs", cfg.config_id, CONFIG_PART,
                          {name: [value] for name, value in row.items()})
