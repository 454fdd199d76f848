"""Paper-style summary tables from the stored tables (every number traceable to `stats` rows).

One table per sweep grid of the spec, grouped by the axes that grid varies (seeds are averaged), by test-point
selection and by method: mean Spearman and Pearson over seeds, the Spearman of predicted vs retrained ‖Δθ‖, and
the mean noise ratio (the spread of the actual effects over the spread of the control retrains) so a
correlation can be read against its noise floor.
"""
from __future__ import annotations

import pyarrow as pa

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


def summary_tables(store: Store, spec: Spec) -> list[tuple[str, pa.Table]]:
    """(title, table) per grid, over the final statistics of this spec's configurations."""
    configs = spec.configurations()
    con = connect(store, spec.experiment)
    out = []
    for axes, ids in grid_members(spec, configs):
        if not ids:
            continue
        group = [f"c.{a}" for a in axes] + ["s.selection", "s.method"]
        cols = ", ".join(f"{g} as \"{_LABELS.get(g.split('.')[1], g.split('.')[1])}\"" for g in group)
        id_list = ", ".join(f"'{i}'" for i in ids)
        sql = f"""
            select {cols},
                   round(avg(nullif(s.spearman, 'NaN'::double)), 3) as spearman,
                   round(avg(nullif(s.pearson, 'NaN'::double)), 3) as pearson,
                   round(avg(nullif(s.dtheta_spearman, 'NaN'::double)), 3) as "‖Δθ‖ spearman",
                   avg(nullif(s.actual_std / nullif(s.noise_floor, 0), 'NaN'::double)) as "actual/noise",
                   count(distinct c.seed) as seeds,
                   count(*) filter (where s.degenerate_reason is not null) as degenerate
            from stats s join configs c using (config_id)
            where s.final and s.config_id in ({id_list})
            group by all order by all
        """
        title = "by " + " × ".join(a.replace("_", " ") for a in axes) if axes else "all configurations"
        out.append((title, con.sql(sql).to_arrow_table()))
    return out


# ---- `fragile report`: tables and figures from a store alone ------------------------------------------------

# Configuration columns a sweep may vary; the report groups by those that take more than one value.
_AXES = ("model", "depth", "width", "activation", "weight_decay", "lr", "epochs", "retrain_epochs", "damping")


def varying_axes(con) -> list[str]:
    counts = con.sql("select " + ", ".join(f"count(distinct {a}) as {a}" for a in _AXES) + " from configs").fetchall()[0]
    return [a for a, n in zip(_AXES, counts) if n and n > 1]


def summary(con, axes: list[str]) -> pa.Table:
    """Mean Spearman / Pearson over seeds of the final statistics, by the varying axes, test point and method."""
    group = ", ".join([f"c.{a}" for a in axes] + ["s.selection", "s.method"])
    return con.sql(f"""
        select {group},
               avg(nullif(s.spearman, 'NaN'::double)) as spearman,
               avg(nullif(s.pearson, 'NaN'::double)) as pearson,
               avg(nullif(s.dtheta_spearman, 'NaN'::double)) as dtheta_spearman,
               avg(nullif(s.actual_std / nullif(s.noise_floor, 0), 'NaN'::double)) as actual_over_noise,
               count(distinct c.seed) as seeds,
               count(*) filter (where s.degenerate_reason is not null) as degenerate
        from stats s join configs c using (config_id)
        where s.final group by all order by all""").to_arrow_table()


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
            files.append(_figure(con, experiment, axis, other, out / f"spearman_by_{axis}.png"))
    return files


def _markdown(table: pa.Table, title: str) -> str:
    rows = table.to_pylist()
    cols = table.column_names

    def fmt(v):
        return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _figure(con, experiment: str, axis: str, other: str, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = con.sql(f"select {other} from configs group by {other} order by count(*) desc, {other} limit 1").fetchall()[0][0]
    data = con.sql(f"""
        select c.{axis} as x, c.weight_decay as wd, s.method, s.selection,
               avg(nullif(s.spearman, 'NaN'::double)) as spearman
        from stats s join configs c using (config_id)
        where s.final and c.{other} = {mode!r} group by all order by all""").to_arrow_table().to_pylist()
    selections = sorted({r["selection"] for r in data})
    fig, panels = plt.subplots(1, len(selections), figsize=(5 * len(selections), 3.8), squeeze=False, sharey=True)
    for ax, sel in zip(panels[0], selections):
        lines = sorted({(r["wd"], r["method"]) for r in data if r["selection"] == sel})
        for wd, method in lines:
            pts = [(r["x"], r["spearman"]) for r in data if (r["selection"], r["wd"], r["method"]) == (sel, wd, method)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method}, wd {wd:g}")
        ax.set(title=f"{sel}-loss test point", xlabel=f"{axis} ({other} {mode})", ylim=(-1.05, 1.05))
        ax.axhline(0, color="grey", lw=0.5)
    panels[0][0].set_ylabel("Spearman (estimate vs actual)")
    panels[0][-1].legend(fontsize=7)
    fig.suptitle(f"{experiment}: influence estimates vs leave-one-out retraining")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
