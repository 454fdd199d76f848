"""Which parts exist: the resume state of an experiment, derived from the files present and nothing else.

There is no separate "done" database to drift out of sync: a part is done when its file has landed (parts are
written atomically, so a present file is a complete file). One recursive listing of the experiment folder
answers every ``done`` question of a planning pass; on S3 that is a handful of LIST requests instead of one
HEAD request per task.
"""
from __future__ import annotations

import pyarrow.fs as pafs

from .tables import TABLES, parse_part_path
from .uri import Store, StoreError, check_name, list_files

__all__ = ["Ledger"]


class Ledger:
    """Which parts exist, from ONE listing of the experiment folder (resume needs nothing else).

    ``done(table, config_id, part)`` answers from memory. Parts written by this process are added with
    ``mark``; parts written elsewhere (other workers) become visible after ``refresh``. An experiment folder
    that does not exist yet is simply empty.
    """

    def __init__(self, store: Store, experiment: str) -> None:
        self.store = store
        self.experiment = check_name("experiment", experiment)
        # table -> config_id -> set of part names
        self._parts: dict[str, dict[str, set[str]]] = {}
        self.refresh()

    def refresh(self) -> None:
        """List the experiment folder again (one recursive listing) and forget the previous answer."""
        root = self.store.path(self.experiment)
        parts: dict[str, dict[str, set[str]]] = {}
        for info in list_files(self.store, root):
            if info.type != pafs.FileType.File:
                continue
            # parse_part_path rejects temporary/hidden files, checkpoints and anything off the layout.
            parsed = parse_part_path(info.path[len(root):])
            if parsed is not None:
                table, config_id, part = parsed
                parts.setdefault(table, {}).setdefault(config_id, set()).add(part)
        self._parts = parts

    def done(self, table: str, config_id: str, part: str) -> bool:
        """Whether ``part`` of ``table`` exists for ``config_id`` (as of the last listing or ``mark``)."""
        self._check_table(table)
        return part in self._parts.get(table, {}).get(config_id, ())

    def parts(self, table: str, config_id: str | None = None) -> list[str]:
        """Sorted part names of ``table`` under ``config_id``; under every configuration when it is None
        (each name once: use ``config_ids`` + ``parts`` to tell configurations apart)."""
        self._check_table(table)
        by_config = self._parts.get(table, {})
        if config_id is not None:
            return sorted(by_config.get(config_id, ()))
        return sorted(set().union(*by_config.values())) if by_config else []

    def config_ids(self, table: str) -> list[str]:
        """Sorted configuration ids that have at least one part of ``table``."""
        self._check_table(table)
        return sorted(cid for cid, names in self._parts.get(table, {}).items() if names)

    def mark(self, table: str, config_id: str, part: str) -> None:
        """Record a part written by this process, without listing again."""
        self._check_table(table)
        check_name("config_id", config_id)
        check_name("part", part)
        self._parts.setdefault(table, {}).setdefault(config_id, set()).add(part)

    def __len__(self) -> int:
        """Number of parts known, all tables together (handy for progress displays)."""
        return sum(len(names) for by_config in self._parts.values() for names in by_config.values())

    def __repr__(self) -> str:
        counts = {table: sum(map(len, by_config.values())) for table, by_config in self._parts.items()}
        return f"Ledger({self.store.uri!r}, {self.experiment!r}, parts={counts})"

    @staticmethod
    def _check_table(table: str) -> None:
        # A misspelt table would otherwise read as "nothing done" and silently redo the whole experiment.
        if table not in TABLES:
            raise StoreError(f"unknown table {table!r}; the tables are: {', '.join(TABLES)}")
