"""The `fragile` command: run, validate and query.

Mistakes a user can make (a bad spec, a bad store, a bad query) end with one message on stderr and exit
code 2, before anything is written. Failures inside the run end with exit code 1 and name the failing
configuration and task.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from importlib.metadata import PackageNotFoundError, version as _dist_version

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jobs.spec import SpecError, load_spec
from storage.query import QueryError, experiments, query
from storage.uri import StoreError, open_store

USER_ERRORS = (SpecError, StoreError, QueryError)
DEFAULT_STORE = "./results"


class UsageError(Exception):
    """A user mistake found by the CLI itself (for example an ambiguous experiment)."""


def project_version() -> str:
    try:
        return _dist_version("fragile")
    except PackageNotFoundError:
        return "0+unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fragile", description="How far can influence functions be trusted?")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run an experiment spec (embedded Ray unless --address is given)")
    r.add_argument("spec", help="experiment spec (YAML), e.g. jobs/specs/iris.yaml")
    r.add_argument("--store", default=DEFAULT_STORE, help=f"results folder (default {DEFAULT_STORE})")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start an embedded Ray)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")

    v = sub.add_parser("validate", help="check a spec, print its configurations and task counts")
    v.add_argument("spec")

    q = sub.add_parser("query", help="SQL over the result tables (views: configs, models, test_points, "
                                     "influence, retrain, stats)")
    q.add_argument("sql")
    q.add_argument("--store", default=DEFAULT_STORE)
    q.add_argument("--experiment", default=None, help="experiment folder (default: the only one in the store)")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        return {"run": cmd_run, "validate": cmd_validate, "query": cmd_query}[args.command](args)
    except USER_ERRORS + (UsageError,) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        return 2


def _n_train_of(cfg) -> int:
    from influence.data import load_dataset

    return load_dataset(cfg.dataset, split_seed=cfg.split_seed, test_fraction=cfg.test_fraction).n_train


def cmd_validate(args) -> int:
    spec = load_spec(args.spec)
    console = Console()
    configs = spec.configurations()
    table = Table(title=f"{spec.experiment}: {len(configs)} configurations (spec {spec.spec_hash})")
    table.add_column("config_id")
    table.add_column("configuration")
    for c in configs:
        table.add_row(c.config_id, c.label())
    console.print(table)
    from jobs.plan import task_counts

    counts = task_counts(configs, _n_train_of)
    console.print("tasks: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_run(args) -> int:
    spec = load_spec(args.spec)
    store = open_store(args.store)
    console = Console(width=None if sys.stdout.isatty() else 120)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cluster.runtime import connect
    from cluster.sweep import run_sweep
    from jobs.report import summary_tables

    configs = spec.configurations()
    console.print(f"[bold]{spec.experiment}[/]: {len(configs)} configurations -> {store.uri}/{spec.experiment}")
    runtime = connect(args.address, num_cpus=args.num_cpus)
    progress = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)
    bars = {k: progress.add_task(k, total=None, note="") for k in ("configurations", "train", "influence", "retrain")}

    def on_progress(p: dict) -> None:
        progress.update(bars["configurations"], completed=p["configs_done"], total=p["configs_total"])
        for kind in ("train", "influence", "retrain"):
            skipped = p["skipped"][kind]
            progress.update(bars[kind], completed=p["done"][kind] + skipped, total=p["totals"][kind],
                            note=f"({skipped} skipped)" if skipped else "")

    def on_config_done(cfg, result: dict) -> None:
        parts = [f"{k.split('/', 1)[1]} {v:+.2f}" for k, v in sorted(result.items())
                 if k.startswith("spearman/") and isinstance(v, float) and not math.isnan(v)]
        tag = " (already in the store)" if result.get("skipped") else ""
        progress.console.print(f"{cfg.label()}: Spearman {', '.join(parts) or 'undefined'}{tag}", markup=False)

    try:
        with progress:
            res = run_sweep(spec, store, version=project_version(), n_train_of=_n_train_of,
                            on_progress=on_progress, on_config_done=on_config_done)
    finally:
        runtime.close()
    p = res.progress
    ran, skipped = sum(p["done"].values()), sum(p["skipped"].values())
    console.print(f"{ran} tasks run, {skipped} skipped (already in the store), {res.seconds:.0f} s")
    if res.errors:
        for e in res.errors:
            console.print(f"[red]failed:[/] {escape(e)}", highlight=False)
        console.print(f"{len(res.errors)} configuration(s) failed; fix the cause and rerun the same command: "
                      "parts that landed are kept and only missing ones are computed")
        return 1
    for title, tbl in summary_tables(store, spec):
        _print_table(console, tbl, title=f"Spearman and Pearson {title} (mean over seeds)")
    console.print(f"results: {store.uri}/{spec.experiment}  (try: fragile query \"select * from stats\" "
                  f"--store {args.store} --experiment {spec.experiment})")
    return 0


def cmd_query(args) -> int:
    store = open_store(args.store, create=False)
    experiment = args.experiment
    if experiment is None:
        found = experiments(store)
        if len(found) != 1:
            raise UsageError(f"store {store.uri} holds {len(found)} experiments ({', '.join(found) or 'none'}): "
                             "choose one with --experiment NAME")
        experiment = found[0]
    result = query(args.sql, store, experiment)
    if args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(result, sys.stdout.buffer)
    elif args.format == "json":
        print(json.dumps(result.to_pylist(), default=str, indent=1))
    else:
        _print_table(Console(), result)
    return 0


def _print_table(console: Console, tbl, title: str | None = None) -> None:
    t = Table(title=title)
    for name in tbl.column_names:
        t.add_column(name, justify="right")
    for row in tbl.to_pylist():
        t.add_row(*[_fmt(v) for v in row.values()])
    console.print(t)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
