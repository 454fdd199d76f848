"""`fragile run --recompute-stale`: find the configurations whose stored parts were written by another version of
the science code (jobs/science.py), and set their parts aside so that the run computes them again.

Finding them reads the `science` column of every part of a configuration that is not finished, and the final
statistics (which record the stamps of everything they were computed from) of one that is: one read per part,
which is why a plain run only reports what it meets on its way instead. A configuration with any stale part is
recomputed whole: its influence estimates depend on θ̂, its removals on the estimates, its statistics on all.
Nothing is deleted: the parts and the checkpoint move to `<experiment>/_set_aside/`.
"""
from __future__ import annotations

from jobs.coordinator import final_sources
from jobs.protocol import FINAL_PART
from jobs.science import SCIENCE, stamp_of
from jobs.spec import Configuration
from storage import tables
from storage.checkpoints import checkpoint_exists, checkpoint_path, load_checkpoint
from storage.ledger import Ledger
from storage.uri import Store

# Tables written per configuration by the pipeline (configs is rewritten by every run).
PIPELINE_TABLES = ("models", "test_points", "influence", "retrain", "stats")


def find_stale(store: Store, experiment: str, configs: list[Configuration],
               ledger: Ledger | None = None) -> dict[str, dict[str, set[str]]]:
    """config_id -> table -> the stamps other than this code's among that configuration's parts."""
    ledger = ledger or Ledger(store, experiment)
    out: dict[str, dict[str, set[str]]] = {}
    for cfg in configs:
        cid = cfg.config_id
        found: dict[str, set[str]] = {}
        if ledger.done("stats", cid, FINAL_PART):
            rows = _read(store, experiment, "stats", cid, FINAL_PART)
            if rows is not None:
                found = final_sources(rows.to_pydict())
        else:
            for table in PIPELINE_TABLES:
                for part in ledger.parts(table, cid):
                    rows = _read(store, experiment, table, cid, part)
                    if rows is not None:
                        found.setdefault(table, set()).update(stamp_of(v) for v in rows["science"].to_pylist())
        if "models" not in found and checkpoint_exists(store, experiment, cfg.model_key):
            # θ̂ trained but its models part not written yet: the checkpoint says which code trained it
            state = _checkpoint(store, experiment, cfg.model_key)
            if state is not None:
                found["models"] = {stamp_of(state.get("science"))}
        others = {t: v - {SCIENCE} for t, v in found.items() if v - {SCIENCE}}
        if others:
            out[cid] = others
    return out


def _checkpoint(store: Store, experiment: str, model_key: str):
    try:
        return load_checkpoint(store, experiment, model_key)
    except tables.CorruptPart:
        return None


def _read(store: Store, experiment: str, table: str, cid: str, part: str):
    try:
        return tables.read_part(store, tables.part_path(store, experiment, table, cid, part))
    except tables.CorruptPart:
        return None  # the run sets it aside when it meets it


def set_aside_stale(store: Store, experiment: str, configs: list[Configuration],
                    stale: dict[str, dict[str, set[str]]], ledger: Ledger | None = None) -> int:
    """Move every part (and, when θ̂ is stale, the checkpoint) of the stale configurations to `_set_aside/`; returns how many
    files moved."""
    ledger = ledger or Ledger(store, experiment)
    moved = 0
    for cfg in configs:
        if cfg.config_id not in stale:
            continue
        stamps = sorted(set().union(*stale[cfg.config_id].values()))
        reason = f"written by science version {', '.join(stamps)}, this is {SCIENCE}"
        for table in PIPELINE_TABLES:
            for part in ledger.parts(table, cfg.config_id):
                tables.set_aside(store, experiment, tables.part_path(store, experiment, table, cfg.config_id, part),
                                 reason)
                moved += 1
        # The checkpoint only when θ̂ itself is stale (it may be shared with configurations that are not).
        if "models" in stale[cfg.config_id] and checkpoint_exists(store, experiment, cfg.model_key):
            tables.set_aside(store, experiment, checkpoint_path(store, experiment, cfg.model_key), reason)
            moved += 1
    return moved


def describe(stale: dict[str, dict[str, set[str]] | dict[str, list[str]]]) -> str:
    """One line: how many configurations, which tables, which stamps."""
    by_table: dict[str, int] = {}
    stamps: set[str] = set()
    for per_table in stale.values():
        for table, found in per_table.items():
            by_table[table] = by_table.get(table, 0) + 1
            stamps.update(found)
    tables_text = ", ".join(f"{t} ({n})" for t, n in sorted(by_table.items()))
    return (f"{len(stale)} configuration(s) hold parts written by another version of the science code "
            f"({', '.join(sorted(stamps))}; this is {SCIENCE}); tables (configurations): {tables_text}")
