"""The `fragile` command: run, validate and query.

Mistakes a user can make (a bad spec, a bad store, a bad query) end with one message on stderr and exit
code 2, before anything is written. Failures inside the run end with exit code 1 and name the failing
configuration and task.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version as _dist_version

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cluster.submit import DEFAULT_ADDRESS as _DEFAULT_ADDRESS
from cluster.local import ClusterError
from cluster.runtime import ConnectError
from cluster.submit import SubmitError
from fragile.printing import SUMMARY_CAPTION, print_rows, print_summary, print_table
from jobs.spec import SpecError, load_spec
from storage.query import QueryError, experiments, query
from storage.retry import SettingError
from storage.uri import StoreError, open_store

USER_ERRORS = (SpecError, StoreError, QueryError, SettingError)
DEFAULT_STORE = "./results"
LARGE_SWEEP = 10_000  # configurations; a sweep larger than this runs only with --yes


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

    r = sub.add_parser("run", help="run an experiment spec (embedded Ray unless --address or --inline is given)")
    r.add_argument("spec", help="experiment spec (YAML), e.g. jobs/specs/iris.yaml")
    r.add_argument("--store", default=None,
                   help=f"results folder or s3://bucket/prefix (default: $FRAGILE_STORE, else {DEFAULT_STORE})")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start an embedded Ray)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    r.add_argument("--force", action="store_true",
                   help="take over the experiment's lease from another run that seems to hold it")
    r.add_argument("--yes", action="store_true", help=f"run a sweep of more than {LARGE_SWEEP:,} configurations")
    r.add_argument("--inline", action="store_true",
                   help="run every task in this process, one after another, without Ray (for debugging: a "
                        "breakpoint in a task body is hit; the same results as a Ray run)")
    r.add_argument("--recompute-stale", action="store_true",
                   help="set aside (keep, under _set_aside/) and compute again every configuration whose stored "
                        "parts were written by another version of the science code")

    v = sub.add_parser("validate", help="check a spec, print its configurations and task counts")
    v.add_argument("spec")
    v.add_argument("--yes", action="store_true", help=f"expand a sweep of more than {LARGE_SWEEP:,} configurations")

    q = sub.add_parser("query", help="SQL over the result tables (views: configs, models, test_points, "
                                     "influence, retrain, stats)")
    q.add_argument("sql")
    q.add_argument("--store", default=None, help=f"default: $FRAGILE_STORE, else {DEFAULT_STORE}")
    q.add_argument("--experiment", default=None, help="experiment folder (default: the only one in the store)")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    s = sub.add_parser("submit", help="submit `fragile run SPEC` as a Ray job to a cluster")
    s.add_argument("spec")
    s.add_argument("--address", default=None, help=f"Ray dashboard address (default {_DEFAULT_ADDRESS})")
    s.add_argument("--store", default=None, help="results store as the cluster sees it, e.g. s3://bucket/prefix "
                                                  "(default: the store `fragile cluster up` printed)")
    s.add_argument("--yes", action="store_true", help=f"submit a sweep of more than {LARGE_SWEEP:,} configurations")
    s.add_argument("--recompute-stale", action="store_true",
                   help="the job recomputes configurations whose parts another version of the science code wrote")
    st = sub.add_parser("status", help="status of one job, or of every job on the cluster")
    st.add_argument("job", nargs="?")
    st.add_argument("--address", default=None)
    st.add_argument("--format", choices=("table", "csv", "json"), default="table")
    lg = sub.add_parser("logs", help="a job's output")
    lg.add_argument("job")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    lg.add_argument("--address", default=None)
    sp = sub.add_parser("stop", help="stop a running job")
    sp.add_argument("job")
    sp.add_argument("--address", default=None)
    rp = sub.add_parser("report", help="paper-style tables (CSV, Markdown) and figures from a store")
    rp.add_argument("--store", default=None, help=f"default: $FRAGILE_STORE, else {DEFAULT_STORE}")
    rp.add_argument("--experiment", default=None, help="experiment folder (default: the only one in the store)")
    rp.add_argument("--out", default="report", help="output folder (default ./report)")
    c = sub.add_parser("cluster", help="a local Ray head + S3 server on loopback: up | down | status | env")
    c.add_argument("action", choices=("up", "down", "status", "env"))
    c.add_argument("--dir", default=None, help="state folder (default ~/.fragile/cluster or $FRAGILE_CLUSTER_DIR)")
    c.add_argument("--ray-port", type=int, default=6379)
    c.add_argument("--dashboard-port", type=int, default=8265)
    c.add_argument("--s3-port", type=int, default=8333)
    c.add_argument("--num-cpus", type=int, default=None, help="CPUs of the head node (default: all)")
    c.add_argument("--workers", type=int, default=0,
                   help="Ray worker nodes to join to the head on this machine (default 0)")
    c.add_argument("--worker-cpus", type=int, default=1, help="CPUs of each worker node (default 1)")
    c.add_argument("--bucket", default="fragile")
    c.add_argument("--host", default="127.0.0.1",
                   help="address every listener binds to (default 127.0.0.1: this machine only; another "
                        "address makes the cluster reachable from the network, with a warning)")
    c.add_argument("--auth", choices=("token", "disabled"), default="token",
                   help="Ray authentication (default token; disabled lets anyone who reaches the head run code)")
    d = sub.add_parser("data", help="tiny data sets in the real on-disk formats (for smoke runs and tests)")
    d.add_argument("action", choices=("tiny",))
    d.add_argument("dataset", choices=("mnist", "cifar10", "imagenet"))
    d.add_argument("root", help="folder to write into (the spec's data.root)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--images", type=int, metavar="N",
                   help="training images in all (imagenet: spread evenly over the classes, rounded up to a whole "
                        "number per class); default: a few hundred")
    d.add_argument("--classes", type=int, metavar="K", help="number of classes (default: mnist and cifar10 10, "
                                                            "imagenet 3)")
    return p


def _commands_text(parser: argparse.ArgumentParser) -> str:
    """`fragile` alone: what each command does, one line each."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = [f"usage: fragile COMMAND ...   ({parser.description})", "", "commands:"]
    width = max(len(c.dest) for c in sub._choices_actions)
    lines += [f"  {c.dest:<{width}}  {c.help}" for c in sub._choices_actions]
    lines += ["", "fragile COMMAND --help says more; start with: fragile run jobs/specs/iris-smoke.yaml"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(_commands_text(parser))
        return 2
    args = parser.parse_args(argv)
    if args.command == "run" and not args.address and not args.inline:
        from cluster.runtime import prepare_embedded

        prepare_embedded()  # before anything imports Ray: it reads these settings once
    if hasattr(args, "store") and args.command in ("run", "query", "report"):
        # `fragile cluster env` exports FRAGILE_STORE, so a shell set up for the cluster needs no --store
        args.store = args.store or os.environ.get("FRAGILE_STORE") or DEFAULT_STORE
    err = Console(stderr=True)
    try:
        from storage.lease import lease_ttl
        from storage.retry import retry_budget

        retry_budget(), lease_ttl()  # a mistyped FRAGILE_* duration is said before anything starts
        commands = {"run": cmd_run, "validate": cmd_validate, "query": cmd_query, "submit": cmd_submit,
                    "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "cluster": cmd_cluster,
                    "report": cmd_report, "data": cmd_data}
        return commands[args.command](args)
    except USER_ERRORS + (UsageError, SubmitError, ClusterError, ConnectError) + _data_errors() as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        return 2


def _data_errors() -> tuple[type[Exception], ...]:
    """A missing data set is a user's mistake; its class lives in influence.data, which imports torch, so it
    is looked up only once that module is loaded (it cannot have been raised before)."""
    module = sys.modules.get("influence.data")
    return (module.DatasetNotFound,) if module is not None and hasattr(module, "DatasetNotFound") else ()


def cmd_data(args) -> int:
    from influence.data_files import write_tiny

    options = {"num_classes": args.classes}
    if args.classes is not None and args.classes < 2:
        raise UsageError(f"--classes {args.classes}: give 2 or more classes")
    if args.images is not None:
        if args.images < 1:
            raise UsageError(f"--images {args.images}: give a count of training images >= 1")
        classes = args.classes or (3 if args.dataset == "imagenet" else 10)
        options["n_train"] = -(-args.images // classes) if args.dataset == "imagenet" else args.images
    try:
        root = write_tiny(args.dataset, args.root, seed=args.seed, **options)
    except ValueError as exc:
        raise UsageError(f"fragile data tiny {args.dataset}: {exc}") from None
    from influence.data import describe_dataset

    info = describe_dataset(args.dataset, root=root, held=False)  # counts only: no memory guard
    Console().print(f"wrote a tiny {args.dataset} in its real format under {root}: {info.n_train} training and "
                    f"{info.n_test} test images of {info.num_classes} classes", soft_wrap=True, markup=False,
                    highlight=False)
    return 0


def cmd_validate(args) -> int:
    spec = load_spec(args.spec, max_configurations=None if args.yes else LARGE_SWEEP)
    console = Console()
    configs = spec.configurations()
    table = Table(title=f"{spec.experiment}: {len(configs)} configurations (spec {spec.spec_hash})")
    table.add_column("config_id")
    table.add_column("configuration")
    for c in configs:
        table.add_row(c.config_id, c.label())
    console.print(table)
    from jobs.plan import task_counts
    from jobs.tasks import dataset_key, datasets_for

    loaded = datasets_for(configs)  # each data set once, not once per configuration
    _check_feasible(spec, configs, lambda cfg: loaded[dataset_key(cfg)])
    counts = task_counts(configs, lambda cfg: loaded[dataset_key(cfg)].n_train)
    console.print("tasks: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2 ** 62  # unknown: nothing is refused on this ground


def _check_feasible(spec, configs, data_of) -> None:
    """Refuse, before anything runs, a method whose memory an influence task cannot have."""
    from jobs.plan import infeasible_methods
    from jobs.tasks import model_for

    declared = spec.resources["influence"].memory
    memory, source = ((declared, "resources.influence.memory") if declared is not None else
                      (_machine_memory(), "this machine's memory"))
    n_params: dict[tuple, int] = {}

    def n_params_of(cfg) -> int:
        data = data_of(cfg)
        key = (id(data), cfg.model, cfg.depth, cfg.width)
        if key not in n_params:
            n_params[key] = model_for(cfg, data).n_params
        return n_params[key]

    problem = infeasible_methods(configs, n_params_of, memory, source)
    if problem:
        raise UsageError(f"spec {spec.source}: {problem}")


def cmd_run(args) -> int:
    if args.inline and (args.address or args.num_cpus):
        raise UsageError("--inline runs every task in this process, without Ray: --address and --num-cpus are for "
                         "a Ray cluster (each task kind's CPUs come from the spec's resources section)")
    spec = load_spec(args.spec, max_configurations=None if args.yes else LARGE_SWEEP)
    if args.inline and spec.resources["train"].workers > 1:
        raise UsageError(f"spec {spec.source}: resources.train.workers: {spec.resources['train'].workers} trains on "
                         f"Ray Train workers, and --inline runs without Ray: drop --inline, or set workers: 1")
    store = open_store(args.store, create=False)
    console = _console()
    from cluster.runtime import connect
    from jobs.tasks import dataset_key, datasets_for
    from storage.lease import acquire, check_free

    configs = spec.configurations()
    # Everything a user can get wrong is found before the first byte is written: the data, the memory the
    # methods need, the cluster (and its token), and whether another run holds the experiment.
    loaded = datasets_for(configs)
    _check_feasible(spec, configs, lambda cfg: loaded[dataset_key(cfg)])
    check_free(store, spec.experiment, force=args.force)
    runtime = None if args.inline else connect(args.address, num_cpus=args.num_cpus)
    try:
        store = open_store(args.store)
        lease = acquire(store, spec.experiment, force=args.force,
                        notice=lambda line: console.print(f"note: {line}", markup=False, highlight=False,
                                                          soft_wrap=True))
        try:
            if args.recompute_stale:
                _recompute_stale(spec, store, console)
            return _run(args, spec, store, loaded, console)
        finally:
            lease.release()
    finally:
        if runtime is not None:
            runtime.close()


def _recompute_stale(spec, store, console) -> None:
    from jobs.stale import describe, find_stale, set_aside_stale

    configs = spec.configurations()
    stale = find_stale(store, spec.experiment, configs)
    if not stale:
        console.print(f"every stored part of {spec.experiment} was written by this version of the science code",
                      highlight=False)
        return
    moved = set_aside_stale(store, spec.experiment, configs, stale)
    console.print(f"{describe(stale)}: {moved} files set aside under {store.uri}/{spec.experiment}/_set_aside/ "
                  f"and computed again", highlight=False, soft_wrap=True)


def _run(args, spec, store, loaded, console) -> int:
    """The run itself, once nothing stands in its way: the sweep with its progress, then the summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from jobs.report import summary_tables

    console.print(f"[bold]{spec.experiment}[/]: {len(spec.configurations())} configurations -> "
                  f"{store.uri}/{spec.experiment}")
    progress = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)
    bars = {k: progress.add_task(k, total=None, note="") for k in ("configurations", "train", "influence", "retrain")}

    shown: set[str] = set()  # notices printed so far (a restarted coordinator starts its list again)

    def on_progress(p: dict) -> None:
        for line in p.get("notices", []):
            if line not in shown:
                shown.add(line)
                progress.console.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)
        progress.update(bars["configurations"], completed=p["configs_done"], total=p["configs_total"])
        for kind in ("train", "influence", "retrain"):
            skipped = p["skipped"][kind]
            progress.update(bars[kind], completed=p["done"][kind] + skipped, total=p["totals"][kind],
                            note=f"({skipped} skipped)" if skipped else "")

    def on_config_done(cfg, result: dict) -> None:
        parts = [f"{k.split('/', 1)[1]} {v:+.2f}" for k, v in sorted(result.items())
                 if k.startswith("spearman/") and isinstance(v, float) and not math.isnan(v)]
        tag = " (already in the store)" if result.get("skipped") else ""
        if result.get("collapsed"):
            tag = f"; collapsed to a constant predictor, left out of the means{tag}"
        elif result.get("diverged"):
            tag = f"; {int(result['diverged'])} diverged solve(s), left out of the means{tag}"
        progress.console.print(f"{cfg.label()} [{cfg.config_id}]: Spearman {', '.join(parts) or 'undefined'}{tag}",
                               markup=False, highlight=False)

    if args.inline:
        from jobs.pipeline import run_inline as run
    else:
        from cluster.sweep import run_sweep as run
    with progress:
        res = run(spec, store, version=project_version(), on_progress=on_progress, on_config_done=on_config_done,
                  loaded=loaded)
    p = res.progress
    ran, skipped = sum(p["done"].values()), sum(p["skipped"].values())
    console.print(f"{ran} tasks run, {skipped} skipped (already in the store), {res.seconds:.0f} s")
    if res.stale:
        from jobs.stale import describe

        console.print(f"[bold yellow]warning:[/] {escape(describe(res.stale))}; their results mix versions. "
                      f"Recompute them with: {escape(f'fragile run {shlex.quote(args.spec)} --recompute-stale')}",
                      highlight=False, soft_wrap=True)
    if res.errors:
        for e in res.errors:
            console.print(f"[red]failed:[/] {escape(e)}", highlight=False)
        console.print(f"{len(res.errors)} configuration(s) failed; fix the cause and rerun the same command: "
                      "parts that landed are kept and only missing ones are computed")
        return 1
    for title, names, tbl in summary_tables(store, spec):
        print_summary(console, f"Spearman and Pearson {title}", names, tbl)
    console.print(SUMMARY_CAPTION, highlight=False, soft_wrap=False)
    console.print(f"results: {store.uri}/{spec.experiment}  (try: fragile query \"select * from stats\" "
                  f"--store {args.store} --experiment {spec.experiment})")
    return 0


def _console() -> Console:
    """The terminal's width, or $COLUMNS; 120 when the output goes to a file or a pipe (a log stays readable)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit():
        return Console()
    return Console(width=120)


def _experiment(args, store) -> str:
    if args.experiment is not None:
        return args.experiment
    found = experiments(store)
    if len(found) != 1:
        raise UsageError(f"store {store.uri} holds {len(found)} experiments ({', '.join(found) or 'none'}): "
                         "choose one with --experiment NAME")
    return found[0]


def cmd_report(args) -> int:
    from jobs.report import write_report

    store = open_store(args.store, create=False)
    experiment = _experiment(args, store)
    for path in write_report(store, experiment, args.out):
        print(path)
    return 0


def cmd_query(args) -> int:
    store = open_store(args.store, create=False)
    result = query(args.sql, store, _experiment(args, store))
    if args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(result, sys.stdout.buffer)
    elif args.format == "json":
        print(json.dumps(result.to_pylist(), default=str, indent=1))
    else:
        print_table(_console(), result)
    return 0


def _address(args) -> str:
    return args.address or os.environ.get("FRAGILE_ADDRESS") or _DEFAULT_ADDRESS


def cmd_submit(args) -> int:
    from cluster import submit

    # a bad spec fails here, before anything reaches the cluster
    spec = load_spec(args.spec, max_configurations=None if args.yes else LARGE_SWEEP)
    store = args.store or os.environ.get("FRAGILE_STORE")
    if not store:
        raise UsageError("say where the cluster should write results: --store s3://bucket/prefix "
                         "(or export FRAGILE_STORE as `fragile cluster up` prints it)")
    extra = (("--yes",) if args.yes else ()) + (("--recompute-stale",) if args.recompute_stale else ())
    job = submit.submit(args.spec, _address(args), store, extra_args=extra)
    console = Console()
    console.print(f"submitted {spec.experiment} as job [bold]{job.job_id}[/]")
    console.print(f"dashboard: {job.dashboard}", highlight=False)
    console.print(f"follow it: fragile logs {job.job_id} --follow --address {_address(args)}", highlight=False)
    return 0


def cmd_status(args) -> int:
    from cluster import submit

    rows = submit.status(_address(args), args.job)
    headers = ["job", "status", "started", "entrypoint", "message"]
    if args.format == "json":
        print(json.dumps(rows, indent=1))
        return 0
    if args.format == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=headers)
        writer.writeheader()
        writer.writerows(rows)
        return 0
    # ids and times whole on one line; the entrypoint and the message wrap
    print_rows(_console(), headers, [[r[h] for h in headers] for r in rows], f"jobs at {_address(args)}",
                left=len(headers), wrap=("entrypoint", "message"))
    return 0


def cmd_logs(args) -> int:
    from cluster import submit

    submit.logs(_address(args), args.job, follow=args.follow, out=lambda text, end="": print(text, end=end, flush=True))
    return 0


def cmd_stop(args) -> int:
    from cluster import submit

    stopped = submit.stop(_address(args), args.job)
    print(f"{args.job}: {'stop requested' if stopped else 'already finished'}")
    return 0


def cmd_cluster(args) -> int:
    from cluster import local

    state_dir = Path(args.dir).expanduser() if args.dir else local.DEFAULT_DIR
    console = Console()
    if args.action == "up":
        for warning in local.warnings_for(args.host, args.auth):
            Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
        state = local.up(state_dir, ray_port=args.ray_port, dashboard_port=args.dashboard_port,
                         s3_port=args.s3_port, num_cpus=args.num_cpus, bucket=args.bucket, host=args.host,
                         auth=args.auth, workers=args.workers, worker_cpus=args.worker_cpus)
        console.print(f"Ray head: {state.address} (dashboard), GCS port {state.ray_port}, listening on "
                      f"{state.host}, authentication: {state.auth}", highlight=False)
        if state.worker_pids:
            console.print(f"worker nodes: {len(state.worker_pids)} of {args.worker_cpus} CPU(s) each, joined "
                          f"(pids {', '.join(map(str, state.worker_pids))})", highlight=False)
        console.print(f"S3 server: {state.s3_endpoint}, results go to {state.store}", highlight=False)
        console.print(f"use it from this shell:  eval \"$(fragile cluster env{_dir_flag(args)})\"", highlight=False)
        console.print(f"then: fragile submit jobs/specs/iris-smoke.yaml   and   fragile query \"select * from stats\" "
                      f"--store {state.store}", highlight=False)
        return 0
    if args.action == "env":
        state = local.load_state(state_dir)
        if state is None:
            raise ClusterError(f"no cluster state in {state_dir}: start one with `fragile cluster up`")
        for key, value in state.env().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if args.action == "down":
        stopped = local.down(state_dir)
        if stopped is None:
            console.print("nothing to stop", highlight=False)
            return 0
        state = stopped.state
        if stopped.jobs:
            console.print(f"stopped {len(stopped.jobs)} running job(s): {', '.join(stopped.jobs)}", highlight=False)
        workers = f", {len(state.worker_pids)} worker node(s)" if state.worker_pids else ""
        console.print(f"stopped the Ray head (pid {state.ray_pid}){workers} and the S3 server (pid "
                      f"{state.s3_pid}); the S3 data stays in {state.dir}", highlight=False)
        for line in stopped.stragglers:
            console.print(f"killed a process of the cluster that outlived the head: {line}", highlight=False,
                          markup=False)
        return 0
    report = local.status(state_dir)
    if report is None:
        console.print(f"no cluster started from {state_dir}", highlight=False)
        return 1
    for name, (alive, reachable, where) in report.items():
        console.print(f"{name:10} {'running' if alive else 'not running':12} "
                      f"{'reachable' if reachable else 'unreachable':12} {where}", highlight=False)
    return 0 if all(a and r for a, r, _ in report.values()) else 1


def _dir_flag(args) -> str:
    return f" --dir {shlex.quote(args.dir)}" if args.dir else ""


if __name__ == "__main__":
    sys.exit(main())
