"""SQL over the result tables with DuckDB, reading the Parquet parts as Arrow datasets.

Each table is registered as a view from a ``pyarrow.dataset`` built on the store's filesystem, so the same
code works for a local folder and for S3 (pyarrow reads the objects) without DuckDB's httpfs extension,
which is not available offline. A table with no parts yet is registered as an empty Arrow table with its
full schema: SQL over it returns 0 rows instead of failing with "table does not exist".

The connection is a sandbox: it reads the registered tables and nothing else. DuckDB's file system access
(``read_text``, ``read_csv('/etc/passwd')``, ``COPY ... TO``, ``ATTACH``, ``EXPORT``), extension installs and
loads are switched off and the configuration is locked, so a query cannot switch them on again. Such a
query raises ``QueryRefused``.
"""
from __future__ import annotations

import difflib
import re

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs

from .tables import TABLES, dataset, table_schema
from .uri import Store, check_name, list_files

__all__ = ["QueryError", "QueryRefused", "connect", "query", "experiments", "describe"]

# Set when the connection is made, then locked: nothing a query says can change them.
_SANDBOX = {"enable_external_access": False, "autoinstall_known_extensions": False,
            "autoload_known_extensions": False, "allow_community_extensions": False,
            "allow_unsigned_extensions": False, "lock_configuration": True}


class QueryError(Exception):
    """A query that DuckDB refused, with the SQL and the tables (and their columns) one can query."""


class QueryRefused(QueryError):
    """A query that tried to reach outside the experiment's tables (files, extensions, settings)."""


def connect(store: Store, experiment: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table of ``experiment`` (named as in ``TABLES``).

    The views see the parts present when ``connect`` is called; connect again to see newer parts. DuckDB
    pushes filters such as ``config_id = '...'`` into the datasets, so unused partitions are not read.
    """
    check_name("experiment", experiment)
    con = duckdb.connect(database=":memory:", config=dict(_SANDBOX))
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
    except (duckdb.PermissionException, duckdb.InvalidInputException) as exc:
        if isinstance(exc, duckdb.InvalidInputException) and "configuration has been locked" not in str(exc):
            raise _query_error(exc, sql, store, experiment) from None
        raise QueryRefused(
            f"query refused: fragile query reads the tables of experiment {experiment!r} and nothing else (no "
            f"files, no COPY/EXPORT/ATTACH, no extensions, no settings). DuckDB said: {exc}\n\nSQL:\n  "
            f"{sql.strip()}") from None
    except duckdb.CatalogException as exc:
        missing = _MISSING_TABLE.search(str(exc))
        if missing is None:
            raise _query_error(exc, sql, store, experiment) from None
        raise _unknown_table(missing.group(1), _session_tables(con), sql, store, experiment) from None
    except duckdb.Error as exc:
        raise _query_error(exc, sql, store, experiment) from None
    finally:
        con.close()


def _query_error(exc: Exception, sql: str, store: Store, experiment: str) -> QueryError:
    # Raised "from None" by the caller: the DuckDB traceback adds nothing to this message.
    return QueryError(f"{type(exc).__name__}: {exc}\n\nSQL:\n  {sql.strip()}\n\n"
                      f"Tables of experiment {experiment!r} in {store.uri}:\n{describe(store, experiment)}")


# DuckDB's wording for a table it cannot find; its own "Did you mean" then names its internal catalog
# (duckdb_tables, sqlite_schema, pg_sequences), which is no help here: replaced by the experiment's tables.
_MISSING_TABLE = re.compile(r"Table with name (.+?) does not exist")


def _session_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The experiment's tables, then any table or view the statement itself created (``create temp table``)."""
    names = list(TABLES)
    try:
        rows = con.sql("select table_name from duckdb_tables() where not internal union all "
                       "select view_name from duckdb_views() where not internal").fetchall()
    except duckdb.Error:
        rows = []
    names += sorted({name for (name,) in rows} - set(names))
    return names


def _unknown_table(name: str, available: list[str], sql: str, store: Store, experiment: str) -> QueryError:
    found = difflib.get_close_matches(name, available, n=1) or difflib.get_close_matches(
        name.lower(), available, n=1)
    guess = f"; did you mean {found[0]!r}?" if found else ""
    return QueryError(f"unknown table: {name!r} does not exist; the tables of experiment {experiment!r} are "
                      f"{', '.join(available)}{guess}\n\nSQL:\n  {sql.strip()}\n\n"
                      f"Tables of experiment {experiment!r} in {store.uri}:\n{describe(store, experiment)}")


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
    names = (info.base_name for info in list_files(store, store.root, recursive=False)
             if info.type == pafs.FileType.Directory)
    return sorted(name for name in names if not name.startswith((".", "_")))
