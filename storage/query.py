"""SQL over the result tables with DuckDB, reading the Parquet parts as Arrow datasets.

Each table is registered as a view from a ``pyarrow.dataset`` built on the store's filesystem, so the same
code works for a local folder and for S3 (pyarrow reads the objects) without DuckDB's httpfs extension,
which is not available offline. A table with no parts yet is registered as an empty Arrow table with its
full schema: SQL over it returns 0 rows instead of failing with "table does not exist".
"""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs

from .tables import TABLES, dataset, table_schema
from .uri import Store, check_name

__all__ = ["QueryError", "connect", "query", "experiments", "describe"]


class QueryError(Exception):
    """A query that DuckDB refused, with the SQL and the tables (and their columns) one can query."""


def connect(store: Store, experiment: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table of ``experiment`` (named as in ``TABLES``).

    The views see the parts present when ``connect`` is called; connect again to see newer parts. DuckDB
    pushes filters such as ``config_id = '...'`` into the datasets, so unused partitions are not read.
    """
    check_name("experiment", experiment)
    con = duckdb.connect(database=":memory:")
    for table in TABLES:
        found = dataset(store, experiment, table)
        con.register(table, found if found is not None else table_schema(table).empty_table())
    return con


def query(sql: str, store: Store, experiment: str) -> pa.Table:
    """Run ``sql`` over the tables of ``experiment`` and return the result as an Arrow table.

    A statement that returns no rows (e.g. ``CREATE TEMP TABLE``) gives an empty table. DuckDB errors are
    raised as ``QueryError`` naming the tables and their columns, which is usually the fix.
    """
    con = connect(store, experiment)
    try:
        relation = con.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as exc:
        raise QueryError(
            f"{type(exc).__name__}: {exc}\n\nSQL:\n  {sql.strip()}\n\n"
            f"Tables of experiment {experiment!r} in {store.uri}:\n{describe(store, experiment)}"
        ) from None  # the DuckDB traceback adds nothing to the message above
    finally:
        con.close()


def describe(store: Store, experiment: str) -> str:
    """One line per table: its name, whether it has parts yet, and its columns (for messages and the CLI)."""
    lines = []
    for table in TABLES:
        found = dataset(store, experiment, table)
        state = f"{len(found.files)} part(s)" if found is not None else "no parts yet"
        lines.append(f"  {table} ({state}): {', '.join(table_schema(table).names)}")
    return "\n".join(lines)


def experiments(store: Store) -> list[str]:
    """The experiment folders (S3: prefixes) present in ``store``, sorted (hidden ones excluded)."""
    selector = pafs.FileSelector(store.root, allow_not_found=True, recursive=False)
    names = (info.base_name for info in store.fs.get_file_info(selector)
             if info.type == pafs.FileType.Directory)
    return sorted(name for name in names if not name.startswith((".", "_")))
