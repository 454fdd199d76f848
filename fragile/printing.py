"""How the CLI prints results: tables that fit the terminal (else one block per row), and the fragility summary
with its caption."""
from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.table import Table


def _table() -> Table:
    """A rich table that fits a narrow terminal: light borders, one space (the border) between columns. Cells
    wrap at spaces, never with an ellipsis; `print_rows` prints rows as blocks where the columns cannot fit."""
    return Table(box=box.SIMPLE_HEAD, padding=(0, 0, 0, 0), pad_edge=False, collapse_padding=True)


def _column(t: Table, name: str, values: list[str], justify: str = "right") -> None:
    """A column whose cells never break inside a word: its minimum width is its longest value (ids, numbers) or
    the longest word of its header, which may wrap at spaces."""
    widest = max([len(v) for v in values] + [len(w) for w in name.split()] + [1])
    t.add_column(name, justify=justify, overflow="fold", min_width=widest)


def print_rows(console: Console, headers: list[str], rows: list[list[str]], title: str | None = None,
                left: int = 0, wrap: tuple[str, ...] = ()) -> None:
    """Print `rows` (strings) under `headers` as a table if every column fits the terminal, else one block per
    row, `column  value` per line (rich would drop the columns that do not fit). The first `left` columns are
    left-justified, the rest right-justified; `wrap` columns (free text) fold instead of holding their width."""
    if title:  # above the table rather than in it: a table narrower than its title would fold the title
        console.print(title, highlight=False, markup=False, soft_wrap=True)
    t = _table()
    for k, name in enumerate(headers):
        justify = "left" if k < left else "right"
        if name in wrap:
            t.add_column(name, justify=justify, overflow="fold")
        else:
            _column(t, name, [r[k] for r in rows], justify=justify)
    for r in rows:
        t.add_row(*r)
    if t.__rich_measure__(console, console.options).minimum <= console.width:
        console.print(t)
        return
    width = max(len(h) for h in headers)
    for k, row in enumerate(rows):
        console.print(f"-- row {k + 1} --", highlight=False, markup=False)
        for h, v in zip(headers, row):
            console.print(f"{h:<{width}}  {v}", highlight=False, markup=False, soft_wrap=True)


def print_table(console: Console, tbl, title: str | None = None) -> None:
    print_rows(console, tbl.column_names, [[_fmt(v) for v in row.values()] for row in tbl.to_pylist()], title)


SUMMARY_CAPTION = ("ρ, r: Spearman and Pearson of estimate vs actual, means over the seeds used (seeds with a "
                   "defined correlation); ‖Δθ‖ ρ: Spearman of predicted vs retrained parameter change; seeds: "
                   "used/run; coll.: seeds whose network collapsed to a constant predictor, div.: seeds whose "
                   "solve diverged (their cells are left out of the means); min snr: the smallest spread of the "
                   "actual effects over the spread of the control retrains (inf: the controls agree exactly; "
                   "<= 1: the ground truth is noise); ceil.: the noise ceiling, the Spearman a perfect estimator "
                   "could expect against the replicated ground truth (shown where replicates measured it); "
                   "chance: the share of cells whose Spearman a permutation test cannot tell from chance (shown "
                   "where there are some)")


def print_summary(console: Console, title: str, names: list[str], tbl) -> None:
    """The end-of-run table of one grid, the numbers that matter in columns that fit 80 characters."""
    from jobs.report import label

    cols = [(n, label(n)) for n in names] + [("spearman", "ρ"), ("pearson", "r"), ("dtheta_spearman", "‖Δθ‖ ρ"),
                                      ("min_snr", "min snr")]
    records = tbl.to_pylist()
    # The ceiling where replicates measured it, the share at chance where some cell is: 80 characters hold
    # the rest, and a column of blanks or zeros says nothing.
    if any(r.get("ceiling") is not None for r in records):
        cols.append(("ceiling", "ceil."))
    if any(r.get("chance_share") for r in records):
        cols.append(("chance_share", "chance"))
    rows = []
    for r in records:
        # an axis at null (batch_size: full batch, subset: every point) is shown as the spec spells it
        cells = [("null" if r[k] is None else _fmt(r[k])) if k in names else _fmt2(r[k]) for k, _ in cols]
        cells += [f"{r['seeds_used']}/{r['seeds_run']}", str(r["collapsed"]), str(r["diverged"])]
        rows.append(cells)
    headers = [h for _, h in cols] + ["seeds", "coll.", "div."]
    print_rows(console, headers, rows, title, left=len(names))


def _fmt2(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.3g}"
    return str(v)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)
