"""Figures of the report: Spearman (estimate vs leave-one-out retraining) against depth or width.

Every plotted number comes from ``figure_data``, so a test (or a reader) can check the figure's points
without looking at pixels. The rules:

* a cell is one final ``stats`` row (a configuration, a method, a test point). Cells whose network collapsed
  to a constant predictor, whose solve diverged, or whose Spearman is NaN/null are left out of every mean;
  each panel says how many were left out and why;
* a point is one (test-point selection, weight decay, method, x). Its cells are first averaged per seed
  (a selection may hold several test points), then over seeds: the point is the mean over seeds, its bar a
  95% t-interval of that mean (``t.ppf(0.975, k - 1) * sd / sqrt(k)``). With a single seed there is no
  spread to use, so the bar is that seed's stored Fisher-z 95% interval of the correlation (the widest over
  its test points when it has several);
* configurations are those at the most common value of the other axis (width for a depth figure).
"""
from __future__ import annotations

import math
from collections import defaultdict

__all__ = ["METHOD_STYLES", "figure_data", "most_common", "spearman_figure", "style_of"]

# method -> (line style, marker, marker size). Sizes differ so that hollow markers of methods with the same
# value (cg is often exactly exact) nest inside each other instead of hiding one another.
METHOD_STYLES = {
    "exact": ("solid", "o", 9.0),
    "cg": ("dashed", "s", 6.0),
    "lissa": ("dotted", "^", 7.5),
    "arnoldi": ("dashdot", "D", 6.0),
    "ekfac": ((0, (3, 1, 1, 1)), "v", 7.5),
}
_EXTRA_STYLES = [((0, (5, 2)), "P", 7.0), ((0, (1, 1)), "X", 7.0), ((0, (5, 1, 1, 1, 1, 1)), "*", 8.0),
                 ((0, (2, 2)), "p", 7.0), ((0, (8, 2, 2, 2)), "h", 7.0)]
_AXES = ("depth", "width")
_NOTE = ("Each point: mean over seeds ± 95% CI (t-interval of the mean over seeds); a point from a single seed "
         "shows instead the Fisher-z 95% CI of that seed's correlation. Cells whose network collapsed, whose "
         "solve diverged or whose Spearman is undefined are left out. Methods are shifted slightly "
         "left/right of their x and drawn hollow, so coinciding methods stay visible.")


def _column(name: str) -> str:
    from storage.tables import TABLES

    if name not in TABLES["configs"].names:
        raise ValueError(f"{name!r} is not a column of configs; expected one of {', '.join(_AXES)}")
    return name


def most_common(con, other: str):
    """The most common value of ``other`` among the configurations (ties: the smallest; may be None)."""
    other = _column(other)
    rows = con.sql(f"select {other} from configs group by {other} "
                   f"order by count(*) desc, {other} nulls last limit 1").fetchall()
    return rows[0][0] if rows else None


def style_of(method: str, methods: list[str]) -> tuple:
    """(line style, marker, marker size) of ``method``; methods without a fixed style cycle in the order given."""
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    others = [m for m in methods if m not in METHOD_STYLES]
    return _EXTRA_STYLES[others.index(method) % len(_EXTRA_STYLES)] if method in others else _EXTRA_STYLES[0]


def figure_data(con, axis: str, other: str) -> list[dict]:
    """The points of the figure of Spearman against ``axis`` at the most common value of ``other``.

    One dict per (selection, wd, method, x), sorted by them: ``selection``, ``wd``, ``method``, ``x``,
    ``other`` (the column held fixed) and ``other_value``; ``mean`` (None when every cell was left out),
    ``lo``, ``hi``, ``interval`` ("t over seeds", "fisher-z (one seed)" or None), ``n_seeds`` (seeds with at
    least one usable cell), ``n_cells`` (usable cells), and the cells left out: ``collapsed``, ``diverged``
    (diverged and not collapsed), ``undefined`` (neither, but Spearman NaN/null)."""
    from scipy import stats as st

    axis, other = _column(axis), _column(other)
    mode = most_common(con, other)
    from jobs.report import COLLAPSED, DIVERGED  # report imports this module

    keep = f"s.final and not {COLLAPSED} and not {DIVERGED}"
    base = (f"from stats s join configs c using (config_id) "
            f"where c.{other} is not distinct from $mode")
    kept = con.execute(f"""
        select s.selection, c.weight_decay as wd, s.method, c.{axis} as x, c.seed,
               s.spearman, s.spearman_lo, s.spearman_hi
        {base} and {keep} and s.spearman is not null and not isnan(s.spearman)""", {"mode": mode}).fetchall()
    left = con.execute(f"""
        select s.selection, c.weight_decay as wd, s.method, c.{axis} as x,
               count(*) filter (where {COLLAPSED}) as collapsed,
               count(*) filter (where {DIVERGED} and not {COLLAPSED}) as diverged,
               count(*) filter (where not {COLLAPSED} and not {DIVERGED}
                                and (s.spearman is null or isnan(s.spearman))) as undefined
        {base} and s.final group by all""", {"mode": mode}).fetchall()

    per_seed: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for selection, wd, method, x, seed, rho, lo, hi in kept:
        per_seed[(selection, wd, method, x)][seed].append((rho, lo, hi))
    counts = {tuple(row[:4]): tuple(row[4:]) for row in left}

    points = []
    for key in sorted(set(per_seed) | set(counts), key=_sort_key):
        seeds = per_seed.get(key, {})
        means = [sum(r for r, _, _ in cells) / len(cells) for cells in seeds.values()]
        k = len(means)
        mean = lo = hi = interval = None
        if k >= 2:
            mean = sum(means) / k
            sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (k - 1))
            half = float(st.t.ppf(0.975, k - 1)) * sd / math.sqrt(k)
            lo, hi, interval = mean - half, mean + half, "t over seeds"
        elif k == 1:
            (cells,) = seeds.values()
            mean = means[0]
            los = [c[1] for c in cells if c[1] is not None and not math.isnan(c[1])]
            his = [c[2] for c in cells if c[2] is not None and not math.isnan(c[2])]
            if los and his:
                lo, hi, interval = min(los), max(his), "fisher-z (one seed)"
        collapsed, diverged, undefined = counts.get(key, (0, 0, 0))
        selection, wd, method, x = key
        points.append({"selection": selection, "wd": wd, "method": method, "x": x, "other": other,
                       "other_value": mode, "mean": mean, "lo": lo, "hi": hi, "interval": interval,
                       "n_seeds": k, "n_cells": sum(len(c) for c in seeds.values()),
                       "collapsed": collapsed, "diverged": diverged, "undefined": undefined})
    return points


def _sort_key(key: tuple) -> tuple:
    # None sorts first in every position (a missing weight decay or selection must not break the order).
    return tuple((v is not None, v if v is not None else 0) for v in key)


def _fmt(value) -> str:
    return "none" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def spearman_figure(con, experiment: str, axis: str, other: str, path):
    """Write the figure of ``figure_data(con, axis, other)`` to ``path`` (PNG) and return ``path``.

    One panel per test-point selection; colour = weight decay, line style and marker = method; bars are
    95% intervals (see the module docstring); the legend sits right of the last panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    points = figure_data(con, axis, other)
    mode = points[0]["other_value"] if points else most_common(con, other)
    selections = sorted({p["selection"] for p in points}, key=lambda s: (s is not None, s or ""))
    if not selections:
        selections = [None]
    methods = sorted({p["method"] for p in points}, key=lambda m: (m not in METHOD_STYLES,
                                                                   list(METHOD_STYLES).index(m)
                                                                   if m in METHOD_STYLES else 0, m))
    wds = sorted({p["wd"] for p in points}, key=lambda w: (w is not None, w or 0.0))
    xs = sorted({p["x"] for p in points}, key=lambda v: (v is not None, v or 0))
    position = {x: i for i, x in enumerate(xs)}
    colours = plt.get_cmap("tab10")
    colour = {wd: colours(i % 10) for i, wd in enumerate(wds)}
    series = [(wd, m) for wd in wds for m in methods]
    width = min(0.6 / max(len(series), 1), 0.12)
    offset = {s: (i - (len(series) - 1) / 2) * width for i, s in enumerate(series)}

    fig, panels = plt.subplots(1, len(selections), figsize=(5 * len(selections), 4.2), squeeze=False,
                               sharey=True)
    for ax, selection in zip(panels[0], selections):
        mine = [p for p in points if p["selection"] == selection]
        for wd, method in series:
            line = [p for p in mine if (p["wd"], p["method"]) == (wd, method) and p["mean"] is not None]
            if not line:
                continue
            dash, marker, size = style_of(method, methods)
            px = [position[p["x"]] + offset[(wd, method)] for p in line]
            py = [p["mean"] for p in line]
            below = [max(p["mean"] - p["lo"], 0.0) if p["lo"] is not None else 0.0 for p in line]
            above = [max(p["hi"] - p["mean"], 0.0) if p["hi"] is not None else 0.0 for p in line]
            ax.errorbar(px, py, yerr=[below, above], color=colour[wd], linestyle=dash, marker=marker,
                        markersize=size, markerfacecolor="none", markeredgewidth=1.3, linewidth=1.2,
                        elinewidth=0.9, capsize=2.5, alpha=0.9)
        collapsed = sum(p["collapsed"] for p in mine)
        diverged = sum(p["diverged"] for p in mine)
        undefined = sum(p["undefined"] for p in mine)
        title = f"{selection}-loss test point" if selection is not None else "test points"
        dropped = [f"{n} {what}" for n, what in ((collapsed, "collapsed"), (diverged, "diverged"),
                                                 (undefined, "undefined")) if n]
        if dropped:
            title += f"\nleft out: {', '.join(dropped)} cell(s)"
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs])
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set(xlabel=f"{axis} ({other} {_fmt(mode)})", ylim=(-1.05, 1.05))
        ax.axhline(0, color="grey", lw=0.5)
    panels[0][0].set_ylabel("Spearman (estimate vs actual)\nmean over seeds ± 95% CI")

    blank = Line2D([], [], linestyle="none", marker="none")
    handles, labels = [blank], ["method (line, marker)"]
    for method in methods:
        dash, marker, size = style_of(method, methods)
        handles.append(Line2D([], [], color="black", linestyle=dash, marker=marker, markersize=size,
                              markerfacecolor="none"))
        labels.append(method)
    handles.append(blank)
    labels.append("weight decay (colour)")
    for wd in wds:
        handles.append(Line2D([], [], color=colour[wd], linewidth=3))
        labels.append(f"wd {_fmt(wd)}")
    panels[0][-1].legend(handles, labels, bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8,
                         borderaxespad=0.0, handlelength=3.0)

    fig.suptitle(f"{experiment}: influence estimates vs leave-one-out retraining")
    fig.tight_layout()
    fig.text(0.01, -0.01, _NOTE, fontsize=7, va="top", ha="left", wrap=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

