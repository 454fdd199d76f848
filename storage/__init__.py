"""Where results live: result tables (Parquet parts), the ledger of done parts, checkpoints, SQL queries.

Modules: ``uri`` (open a store), ``tables``, ``ledger``, ``checkpoints``, ``query``. Nothing is re-exported
here, so importing one module does not pull in the others' dependencies (torch, duckdb).
Every file operation goes through ``pyarrow.fs``; this package never imports ``jobs``, ``cluster`` or ``ray``.
"""
