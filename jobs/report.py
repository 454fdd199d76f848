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
