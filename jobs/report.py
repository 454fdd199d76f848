"""Paper-style summary tables from the stored tables (every number traceable to `stats` rows).

One table per sweep grid of the spec, grouped by the axes that grid varies (seeds are averaged), by test-point
selection and by method: mean Spearman and Pearson over seeds, the Spearman of predicted vs retrained ‖Δθ‖, and
the smallest and median noise ratio `snr` (the spread of the actual effects over the spread of the control
retrains) so a correlation can be read against its noise floor. Means are over valid cells only: a seed whose
network collapsed to a constant predictor, or whose solve diverged, is counted in its own column and left out.
"""
from __future__ import annotations

import pyarrow as pa

from jobs.figures import spearman_figure
from jobs.spec import Configuration, Spec
from storage.query import connect
from storage.uri import Store

# A display column name per configuration field that a grid can vary.
_LABELS = {"weight_decay": "wd", "retrain_epochs": "retrain epochs", "split_seed": "split seed",
           "selection": "test point"}


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
               count(distinct c.seed) filter (where {VALID}) as seeds_used,
               count(distinct c.seed) as seeds_run,
               count(distinct c.seed) filter (where {COLLAPSED}) as collapsed,
               count(distinct c.seed) filter (where {DIVERGED} and not {COLLAPSED}) as diverged
        from stats s join configs c using (config_id)
        where s.final and {where}
        group by all order by all"""


def summary_tables(store: Store, spec: Spec) -> list[tuple[str, list[str], pa.Table]]:
    """(title, grouping columns, table) per grid, over the final statistics of this spec's configurations."""
    configs = spec.configurations()
    con = connect(store, spec.experiment)
    out = []
    for axes, ids in grid_members(spec, configs):
        if not ids:
            continue
        group = [f"c.{a} as \"{_LABELS.get(a, a)}\"" for a in axes] + ['s.selection as "test point"', "s.method"]
        id_list = ", ".join(f"'{i}'" for i in ids)
        title = "by " + " × ".join(a.replace("_", " ") for a in axes) if axes else "all configurations"
        names = [_LABELS.get(a, a) for a in axes] + ["test point", "method"]
        out.append((title, names, con.sql(_summary_sql(group, f"s.config_id in ({id_list})")).to_arrow_table()))
    return out


# ---- `fragile report`: tables and figures from a store alone ------------------------------------------------

# Configuration columns a sweep may vary; the report groups by those that take more than one value.
_AXES = ("model", "depth", "width", "activation", "weight_decay", "lr", "epochs", "retrain_epochs", "damping")


def varying_axes(con) -> list[str]:
    counts = con.sql("select " + ", ".join(f"count(distinct {a}) as {a}" for a in _AXES) + " from configs").fetchall()[0]
    return [a for a, n in zip(_AXES, counts) if n and n > 1]


def summary(con, axes: list[str]) -> pa.Table:
    """The same summary as the console's, for `fragile report`: by the varying axes, test point and method."""
    return con.sql(_summary_sql([f"c.{a}" for a in axes] + ["s.selection", "s.method"], "true")).to_arrow_table()


def write_report(store: Store, experiment: str, out) -> list:
    """summary.csv and summary.md, plus a figure of Spearman against depth and against width where they vary
    (each at the most common value of the other), one line per weight decay and method. Returns the files."""
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
    return files


def _markdown(table: pa.Table, title: str) -> str:
    rows = table.to_pylist()
    cols = table.column_names

    def fmt(v):
        return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
