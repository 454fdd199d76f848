"""Paper-style summary tables from the stored tables (every number traceable to `stats` rows).

One summary (``summary``), shown two ways with the same columns (named after the configuration fields, as in
SQL; the console shows them under the labels of ``label``): at the end of a run one table per
sweep grid of the spec, grouped by the axes that grid varies (``summary_tables``), and by `fragile report` one
table over the whole store, grouped by every swept axis whose `configs` column takes more than one value
(``varying_axes``; a column that an old store's rows lack reads as null and so does not vary). Either way the
rows are grouped further by test-point selection and by method, and seeds are averaged: mean Spearman and
Pearson over seeds, the Spearman of predicted vs retrained ‖Δθ‖, the smallest and median noise ratio `snr`
(the spread of the actual effects over the spread of the control retrains), the mean noise ceiling of the
replicated ground truth and the share of cells at chance, so a correlation can be read against how high it
could be and how high chance alone goes. Means are over valid cells only: a seed whose network collapsed to a constant
predictor, or whose solve diverged, is counted in its own column and left out.
"""
from __future__ import annotations

from dataclasses import fields

import pyarrow as pa

from jobs.figures import spearman_figure
from jobs.spec import RESOLVED_FIELDS, SWEEPABLE, Configuration, Spec
from storage.query import connect
from storage.tables import TABLES
from storage.uri import Store

# The display name of a grouping column: the configuration field with spaces for underscores, except these.
_LABELS = {"weight_decay": "wd", "selection": "test point", "ground_truth": "truth"}


def label(column: str) -> str:
    """The display name of a configuration field (or `selection`) as a summary column: ``wd``, ``split seed``."""
    return _LABELS.get(column, column.replace("_", " "))


def grid_members(spec: Spec, configs: list[Configuration]) -> list[tuple[list[str], list[str]]]:
    """For every grid of the spec: (its varying axes without `seed`, config_ids that belong to it).
    A configuration belongs to a grid when every axis the grid names takes one of the grid's values."""
    out = []
    for grid, axes in zip(spec.grids, spec.swept_axes()):
        ids = [c.config_id for c in configs
               if all(getattr(c, a) in tuple(vals) for a, vals in grid.items())]
        out.append((list(axes), ids))
    return out


# A cell (configuration, method, test point) enters a mean only when its correlation is defined: not a network
# that collapsed to a constant predictor, not a diverged solve (their stats rows carry NaN correlations anyway).
# Parts written before stats had these columns read them as null: their reason says which it was.
COLLAPSED = ("coalesce(s.collapsed, s.degenerate_reason is not null "
             "and s.degenerate_reason not like '%solve diverged%')")
DIVERGED = "coalesce(s.diverged, coalesce(s.degenerate_reason like '%solve diverged%', false))"
VALID = f"not {COLLAPSED} and not {DIVERGED} and not isnan(coalesce(s.spearman, 'NaN'::double))"


def _summary_sql(group: list[str], where: str) -> str:
    """Means over seeds of the valid cells, with the counts that say what the means are over: seeds used (valid)
    and run, and the seeds left out because the network collapsed or the solve diverged."""
    cols = ", ".join(group)
    return f"""
        select {cols},
               avg(s.spearman) filter (where {VALID}) as spearman,
               avg(s.pearson) filter (where {VALID}) as pearson,
               avg(nullif(s.dtheta_spearman, 'NaN'::double)) filter (where {VALID}) as dtheta_spearman,
               min(nullif(s.snr, 'NaN'::double)) filter (where {VALID}) as min_snr,
               median(nullif(s.snr, 'NaN'::double)) filter (where {VALID}) as median_snr,
               avg(nullif(s.ceiling, 'NaN'::double)) filter (where {VALID}) as ceiling,
               avg(nullif(s.spearman_corrected, 'NaN'::double)) filter (where {VALID}) as spearman_corrected,
               avg(s.chance::int) filter (where {VALID}) as chance_share,
               avg(s.unreliable::int) filter (where {VALID}) as unreliable_share,
               count(distinct c.seed) filter (where {VALID}) as seeds_used,
               count(distinct c.seed) as seeds_run,
               count(distinct c.seed) filter (where {COLLAPSED}) as collapsed,
               count(distinct c.seed) filter (where {DIVERGED} and not {COLLAPSED}) as diverged
        from stats s join configs c using (config_id)
        where s.final and {where}
        group by all order by all"""


def summary_names(axes: list[str]) -> list[str]:
    """The grouping columns of ``summary(con, axes)``: the axes, selection (the test point's rule), method."""
    return list(axes) + ["selection", "method"]


def summary(con, axes: list[str], config_ids: list[str] | None = None) -> pa.Table:
    """The summary over the final statistics of ``config_ids`` (None: every configuration in the store), one row
    per value of the configuration columns ``axes``, test point and method; the grouping columns are named
    ``summary_names(axes)``, then spearman, pearson, dtheta_spearman, min_snr, median_snr, ceiling (the mean
    noise ceiling, null with one replicate), spearman_corrected, chance_share (the share of cells whose
    Spearman is indistinguishable from chance), unreliable_share (of cells whose ceiling is known, those
    whose ground truth is unreliable), seeds_used, seeds_run, collapsed, diverged."""
    unknown = [a for a in axes if a not in TABLES["configs"].names]
    if unknown:
        raise ValueError(f"{unknown} are not columns of configs; its columns are {', '.join(TABLES['configs'].names)}")
    group = [f'c."{a}"' for a in axes] + ["s.selection", "s.method"]
    if config_ids is None:
        where = "true"
    elif not config_ids:
        where = "false"
    else:
        where = "s.config_id in (" + ", ".join("'" + i.replace("'", "''") + "'" for i in config_ids) + ")"
    return con.sql(_summary_sql(group, where)).to_arrow_table()


def summary_tables(store: Store, spec: Spec) -> list[tuple[str, list[str], pa.Table]]:
    """(title, grouping columns, table) per grid, over the final statistics of this spec's configurations."""
    con = connect(store, spec.experiment)
    out = []
    for axes, ids in grid_members(spec, spec.configurations()):
        if not ids:
            continue
        title = "by " + " × ".join(a.replace("_", " ") for a in axes) if axes else "all configurations"
        out.append((title, summary_names(axes), summary(con, axes, ids)))
    return out


# ---- `fragile report`: tables and figures from a store alone ------------------------------------------------

# The axes a report may group by: every field a sweep can vary (jobs/spec.py says which), except the seed
# (seeds are averaged). Not the bookkeeping columns (spec_hash, version, config, science), and not the fields a
# sweep cannot vary (experiment, methods, solvers, test_points, removals): the method is a grouping column of
# its own, and the methods run alongside it do not change its numbers.
_CANDIDATES = tuple(a for a in SWEEPABLE if a != "seed") + ("ground_truth",)  # ground_truth.kind's list
# Fields derived from others unless a spec sets them (Configuration.__post_init__): retrain_epochs is
# round(0.06 · epochs) (all of them when retraining from scratch), retrain_lr is lr. Where such a column is a
# function of its sources among the stored configurations it merely follows them, and a column of its own would
# repeat theirs; where it takes several values at one value of its sources, it was swept, and is an axis.
# A solved ground truth (pbrf, last_layer) fixes the retraining fields (one control, no epochs, no perturbation),
# and its configs column names loo_warm / loo_scratch apart, so those follow ground_truth too.
_FOLLOWS = {"retrain_epochs": ("epochs", "retrain_start", "ground_truth"), "retrain_lr": ("lr", "ground_truth"),
            "retrain_start": ("ground_truth",), "controls": ("ground_truth",), "perturbation": ("ground_truth",)}
# Fields that a Configuration may hold as None (batch_size None: full batch): there null is a value, and a sweep
# over [null, 32] varies. In the columns of RESOLVED_FIELDS (resolved on construction) null only means
# "written before the column existed", and is not counted.
_NULLABLE = frozenset(f.name for f in fields(Configuration) if "None" in str(f.type)) - set(RESOLVED_FIELDS)


def _distinct(a: str) -> str:
    n = f'count(distinct "{a}")'
    return f'{n} + (count(*) > count("{a}"))::int' if a in _NULLABLE else n


def varying_axes(con) -> list[str]:
    """The swept axes of the store: the configuration columns that take more than one value (see _CANDIDATES),
    in field order, less those that merely follow another axis (see _FOLLOWS)."""
    counts = con.sql("select " + ", ".join(f'{_distinct(a)} as "{a}"' for a in _CANDIDATES)
                     + " from configs").fetchall()[0]
    axes = [a for a, n in zip(_CANDIDATES, counts) if n and n > 1]

    def combos(cols) -> int:
        listed = ", ".join(f'"{c}"' for c in cols)
        return con.sql(f"select count(*) from (select distinct {listed} from configs)").fetchall()[0][0]

    return [a for a in axes if a not in _FOLLOWS or combos(_FOLLOWS[a] + (a,)) > combos(_FOLLOWS[a])]


def write_report(store: Store, experiment: str, out) -> list:
    """summary.csv and summary.md (the summary grouped by ``varying_axes``), a figure of Spearman against
    depth and against width where they vary (each at the most common value of the other), one line per weight
    decay and method; findings.csv and findings.md (each of the paper's findings as a measured effect with
    its CI, noise ceiling and chance level: jobs/findings.py) and report.html, one self-contained page with
    the figures embedded (jobs/html_report.py). Returns the files."""
    from pathlib import Path

    import pyarrow.csv as pacsv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    con = connect(store, experiment)
    axes = varying_axes(con)
    table = summary(con, axes)
    pacsv.write_csv(table, out / "summary.csv")
    (out / "summary.md").write_text(_markdown(table, f"{experiment}: mean over seeds of the final statistics"))
    files = [out / "summary.csv", out / "summary.md"]
    for axis, other in (("depth", "width"), ("width", "depth")):
        if axis in axes:
            files.append(spearman_figure(con, experiment, axis, other, out / f"spearman_by_{axis}.png"))
    from jobs.findings import findings
    from jobs.findings_text import findings_markdown, findings_table
    from jobs.html_report import write_html

    found = findings(con)
    pacsv.write_csv(findings_table(found), out / "findings.csv")
    (out / "findings.md").write_text(findings_markdown(found, f"{experiment}: the paper's findings, measured"))
    files += [out / "findings.csv", out / "findings.md", write_html(con, experiment, out / "report.html", found)]
    return files


def _markdown(table: pa.Table, title: str) -> str:
    rows = table.to_pylist()
    cols = table.column_names

    def fmt(v):
        return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
