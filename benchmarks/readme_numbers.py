"""Every number the README reports about a study, from one command: run the study (a finished one resumes in
seconds), then print the README's tables and claims as Markdown, with the code version that produced them.

    python -m benchmarks.readme_numbers iris   [--store results]   # jobs/specs/iris.yaml
    python -m benchmarks.readme_numbers digits [--store results]   # jobs/specs/digits.yaml
    python -m benchmarks.readme_numbers iris --no-run              # only the tables, from what is stored

Every mean is over valid cells only (a network that collapsed to a constant predictor, or a diverged solve, is
counted apart), exactly as `fragile run` and `fragile report` average.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS = {"iris": ROOT / "jobs" / "specs" / "iris.yaml", "digits": ROOT / "jobs" / "specs" / "digits.yaml"}
VALID = "not s.collapsed and not s.diverged and not isnan(coalesce(s.spearman, 'NaN'::double))"


def _f(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}f}".replace("-", "−")


def _run(spec: Path, store: str) -> str:
    """`fragile run` as a user runs it; returns the line that says how many tasks ran and how long it took."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fragile", "run", str(spec), "--store", store], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"fragile run {spec} failed with exit code {proc.returncode}")
    line = next((ln for ln in proc.stdout.splitlines() if re.search(r"\d+ tasks run, \d+ skipped", ln)), "")
    return f"{line.strip()} (wall {time.perf_counter() - start:.0f} s with Ray start and the summary)"


def _header(spec_path: Path, con, run_line: str | None) -> list[str]:
    from fragile.cli import project_version
    from jobs.plan import task_counts
    from jobs.science import SCIENCE
    from jobs.spec import load_spec
    from jobs.tasks import dataset_key, datasets_for

    spec = load_spec(spec_path)
    configs = spec.configurations()
    loaded = datasets_for(configs)
    counts = task_counts(configs, lambda c: loaded[dataset_key(c)].n_train)
    stamps = sorted({r[0] or "unstamped" for r in con.sql("select distinct science from stats").fetchall()})
    lines = [f"fragile {project_version()}, science code {SCIENCE}; stored statistics written by {', '.join(stamps)}",
             f"{spec_path.relative_to(ROOT)}: {len(configs)} configurations, {sum(counts.values())} tasks "
             f"({', '.join(f'{k} {v}' for k, v in counts.items())})"]
    if run_line:
        lines.append(f"this run: {run_line}")
    return lines


def iris(con) -> list[str]:
    out = []
    cell = lambda sel: f"avg(s.spearman) filter (where {VALID} and s.selection = '{sel}')"  # noqa: E731
    used = f"count(distinct c.seed) filter (where {VALID})"
    for axis, other, value in (("depth", "width", 5), ("width", "depth", 1)):
        rows = con.sql(f"""
            select c.{axis} as x, c.weight_decay as wd, {cell('highest')} as hi, {cell('median')} as med,
                   {cell('random')} as rnd, {used} as used, count(distinct c.seed) as run,
                   count(distinct c.seed) filter (where s.collapsed) as collapsed
            from stats s join configs c using (config_id)
            where s.final and s.method = 'exact' and c.{other} = {value}
            group by all order by x, wd desc""").fetchall()
        out += ["", f"exact, mean Spearman over seeds, highest / median / random test points, by {axis} "
                    f"({other} {value}):", "", f"| {axis} | wd 0.005 | wd 0 |", "|---|---|---|"]
        by_x: dict = {}
        for x, wd, hi, med, rnd, n_used, n_run, collapsed in rows:
            note = "" if n_used == n_run else f" ({n_used} of {n_run} seeds; {collapsed} collapsed)"
            by_x.setdefault(x, {})[wd] = f"{_f(hi)} / {_f(med)} / {_f(rnd)}{note}"
        for x, cells in by_x.items():
            out.append(f"| {x} | {cells.get(0.005, '')} | {cells.get(0.0, '')} |")
    collapsed = con.sql("select count(distinct config_id) from stats where final and collapsed").fetchall()[0][0]
    for wd in (0.005, 0.0):
        rows = con.sql(f"""
            select s.method, {cell('highest')} as hi, {cell('median')} as med, {cell('random')} as rnd,
                   avg(s.pearson) filter (where {VALID}) as pearson,
                   avg(s.ceiling) filter (where {VALID}) as ceiling,
                   avg(s.chance::int) filter (where {VALID}) as chance,
                   count(distinct s.config_id) as configs,
                   count(distinct s.config_id) filter (where s.diverged and not s.collapsed) as diverged,
                   count(*) filter (where s.diverged and not s.collapsed) as diverged_cells
            from stats s join configs c using (config_id)
            where s.final and c.weight_decay = {wd} group by all order by hi desc nulls last""").fetchall()
        out += ["", f"methods side by side, weight decay {wd:g}, means over the valid cells ({collapsed} "
                    f"configuration(s) of the study collapsed):", "",
                "| method | Spearman highest / median / random | Pearson (all) | ceiling | at chance | "
                "configurations | diverged (configurations / test points) |", "|---|---|---|---|---|---|---|"]
        out += [f"| {m} | {_f(hi)} / {_f(med)} / {_f(rnd)} | {_f(pe)} | {_f(ceil)} | {_f(ch)} | {n} | {d} / {dc} |"
                for m, hi, med, rnd, pe, ceil, ch, n, d, dc in rows]
    trust = con.sql(f"""
        select count(*), min(s.ceiling), median(s.ceiling), count(*) filter (where s.unreliable),
               count(*) filter (where s.chance), count(*) filter (where s.chance is not null)
        from stats s where s.final and {VALID}""").fetchall()[0]
    out += ["", f"ground truth over the {trust[0]} valid cells: noise ceiling (√ split-half reliability of the two "
                f"replicates) min {_f(trust[1], 4)}, median {_f(trust[2], 4)}; {trust[3]} unreliable (reliability "
                f"< 0.5); {trust[4]} of {trust[5]} at chance (permutation p >= 0.05)"]
    from jobs.findings import findings
    from jobs.findings_text import finding_sentence, table_rows

    every = findings(con)
    found = [f for f in every if f.method == "exact" and not f.name.startswith("covariate_")]
    header, rows = table_rows(found)
    out += ["", "the paper's findings, measured on exact (`fragile report` writes every method's):", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += [""] + [f"- {finding_sentence(f)} ({f.detail})" for f in found]
    covs = [f for f in every if f.name.startswith("covariate_")]
    for method in dict.fromkeys(f.method for f in covs):
        out.append(f"- {method}: within-configuration ρ of Spearman with " + ", ".join(
            f"{f.name.removeprefix('covariate_')} {_f(f.effect)} [{_f(f.lo)}, {_f(f.hi)}]"
            for f in covs if f.method == method))
    noise = con.sql(f"""
        select min(s.snr) filter (where isfinite(s.snr)), median(s.snr) filter (where isfinite(s.snr)),
               count(*) filter (where s.noise_floor = 0), count(*) filter (where s.below_noise_floor), count(*)
        from stats s where s.final and {VALID}""").fetchall()[0]
    worst = con.sql(f"""
        select c.depth, c.width, c.weight_decay, c.seed, s.method, s.selection, s.snr
        from stats s join configs c using (config_id)
        where s.final and {VALID} and isfinite(s.snr) order by s.snr limit 1""").fetchall()[0]
    out += ["", f"noise floor over the {noise[4]} valid cells: snr (spread of the actual effects over the spread of "
                f"the control retrains) min {noise[0]:.3g}, median {noise[1]:.3g}; {noise[2]} cells with identical "
                f"controls (noise floor 0, snr = inf); {noise[3]} cells at or below the noise floor (snr <= 1); "
                f"smallest: depth {worst[0]} width {worst[1]} wd {worst[2]:g} seed {worst[3]} {worst[4]} "
                f"{worst[5]} ({worst[6]:.3g})"]
    for row in con.sql("""select c.depth, c.width, c.weight_decay, c.seed, m.degenerate_reason
                          from models m join configs c using (config_id) where m.degenerate
                          order by all""").fetchall():
        out.append(f"collapsed: depth {row[0]} width {row[1]} wd {row[2]:g} seed {row[3]}: {row[4]}")
    return out


def digits(con) -> list[str]:
    rows = con.sql(f"""
        select c.model, c.weight_decay, s.selection,
               avg(s.spearman) filter (where {VALID} and s.method = 'cg') as cg_s,
               avg(s.pearson) filter (where {VALID} and s.method = 'cg') as cg_p,
               avg(s.spearman) filter (where {VALID} and s.method = 'lissa') as li_s,
               avg(s.pearson) filter (where {VALID} and s.method = 'lissa') as li_p,
               avg(s.spearman) filter (where {VALID} and s.method = 'arnoldi') as ar_s,
               avg(s.snr) filter (where s.method = 'cg') as snr,
               count(distinct c.seed) filter (where s.method = 'cg' and s.below_noise_floor) as below,
               count(distinct c.seed) as seeds,
               avg(nullif(s.ceiling, 'NaN'::double)) filter (where s.method = 'cg') as ceiling,
               avg(nullif(s.spearman_corrected, 'NaN'::double)) filter (where {VALID} and s.method = 'cg') as cg_c,
               count(*) filter (where s.method = 'cg' and s.unreliable) as unreliable,
               count(*) filter (where s.method = 'cg' and s.chance) as chance,
               max(s.replicates) as replicates
        from stats s join configs c using (config_id)
        where s.final group by all order by c.model desc, c.weight_decay desc, s.selection""").fetchall()
    out = ["", "| model | weight decay | test point | CG Spearman / Pearson | LiSSA Spearman / Pearson | "
               "Arnoldi (rank 20) Spearman | snr | below | ceiling | CG corrected | unreliable | CG at chance |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"small_cnn": "small CNN", "lenet": "LeNet"}
    for m, wd, sel, cs, cp, ls, lp, ars, snr, below, seeds, ceil, cc, unrel, chance, reps in rows:
        out.append(f"| {names.get(m, m)} | {wd:g} | {sel} | {_f(cs)} / {_f(cp)} | {_f(ls)} / {_f(lp)} | {_f(ars)} "
                   f"| {_f(snr)} | {below}/{seeds} | {_f(ceil)} | {_f(cc)} | {unrel}/{seeds} | {chance}/{seeds} |")
    out.append(f"Ground truth: the mean over {max(r[-1] for r in rows) if rows else 0} replicates (minibatch orders) "
               f"of every removal and its paired control.")
    for m, n_params, grad, acc in con.sql("""
            select c.model, any_value(m.n_params), avg(m.grad_norm), avg(m.test_accuracy)
            from models m join configs c using (config_id) group by all order by all""").fetchall():
        out.append(f"{names.get(m, m)}: {n_params:,} parameters, mean ‖∇R(θ̂)‖ {grad:.3g}, mean test accuracy "
                   f"{acc:.3f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme_numbers", description=__doc__.splitlines()[0])
    p.add_argument("study", choices=sorted(SPECS))
    p.add_argument("--store", default="results")
    p.add_argument("--no-run", action="store_true", help="only print the tables from what is stored")
    args = p.parse_args(argv)
    from storage.query import connect
    from storage.uri import open_store

    run_line = None if args.no_run else _run(SPECS[args.study], args.store)
    con = connect(open_store(args.store, create=False), args.study)
    lines = _header(SPECS[args.study], con, run_line) + (iris(con) if args.study == "iris" else digits(con))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
