"""One self-contained HTML report of an experiment: the findings and the paper's figures, in a single file.

Self-contained means it opens offline and can be mailed: the style sheet is inline, there is no script, no
font, no link to anything, and every figure is a PNG inside the page (``<img src="data:image/png;base64,...">``),
drawn with matplotlib's Agg backend at a moderate resolution (``DPI``) so that the file stays small (a
48-configuration report is about 0.5 MB).

Sections: what the store holds (configurations, cells, what was left out and why); the findings of
``jobs.findings`` (a table, one sentence each); the paper's main figure (estimate against retrained effect,
one panel per configuration × test point of the first method, the effect the replicate mean with its standard
error); Spearman against depth and width with 95% bands, the noise ceiling and the chance level; the spread of
Spearman across test points per configuration; Spearman against each test-point covariate; the methods side by
side. A figure that does not apply (no width variation, no covariates) is replaced by a line saying why.

Cells are final ``stats`` rows; collapsed, diverged and undefined cells are left out of every figure and mean
(``jobs.report.VALID``), and counted.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from jobs.findings import COVARIATE_TABLES, COVARIATES, Finding
from jobs.findings import findings as compute_findings
from jobs.findings_text import finding_sentence, omitted, table_rows

__all__ = ["DPI", "MAX_PANELS", "cell_rows", "config_label", "embedded_images", "scatter_panels", "trend_points",
           "write_html"]

DPI = 90
MAX_PANELS = 24  # panels of the main figure; the rest are counted in its caption
MAX_CONFIGS = 60  # configurations in the spread figure
_PNG = b"\x89PNG\r\n\x1a\n"
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #ccc;padding:.2em .5em;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}.holds{color:#1a7f37}.fails{color:#b42318}
.skip{color:#777;font-style:italic}.caption{font-size:.85em;color:#444}img{max-width:100%;height:auto}
li{margin:.3em 0}code{font-size:.9em}
"""


# ---- data -----------------------------------------------------------------------------------------------------

def config_label(row: dict) -> str:
    """A configuration in a few characters: "mlp d2 w5 wd0.005 s1" (image networks: "cnn wd0.001 s0")."""
    def num(v):
        return "?" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    model = row.get("model") or "?"
    shape = f" d{num(row.get('depth'))} w{num(row.get('width'))}" if model == "mlp" else ""
    return f"{model}{shape} wd{num(row.get('weight_decay'))} s{num(row.get('seed'))}"


def _configs(con) -> dict[str, dict]:
    rows = con.sql("select config_id, model, dataset, depth, width, weight_decay, seed, methods from configs")
    return {r[0]: dict(zip(rows.columns, r)) for r in rows.fetchall()}


def _valid():
    from jobs.report import COLLAPSED, DIVERGED, VALID

    return COLLAPSED, DIVERGED, VALID


def cell_rows(con) -> list[dict]:
    """Every final stats cell with its configuration's columns and ``valid`` (not left out)."""
    _, _, valid = _valid()
    rel = con.sql(f"""
        select s.config_id, s.method, s.test_idx, s.selection, s.spearman, s.ceiling, s.spearman_null95,
               s.spearman_corrected, s.chance, s.unreliable, {valid} as valid,
               c.model, c.dataset, c.depth, c.width, c.weight_decay, c.seed
        from stats s join configs c on c.config_id = s.config_id where s.final
        order by s.config_id, s.method, s.test_idx""")
    return [dict(zip(rel.columns, r)) for r in rel.fetchall()]


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def scatter_panels(con, method: str, limit: int = MAX_PANELS) -> tuple[list[dict], dict[str, int]]:
    """The panels of the main figure for ``method``: one per valid cell with retrained pairs, ordered by
    configuration label and test point, at most ``limit``. Each: ``label``, ``selection``, ``test_idx``,
    ``spearman``, ``ceiling``, ``estimate``, ``actual`` (replicate mean), ``se`` (standard error over replicates,
    NaN with one) and ``replicates`` (per pair). Also the counts of what is not shown: ``over_limit``,
    ``no_pairs`` (valid cells without retrained pairs), ``left_out`` (collapsed, diverged or undefined)."""
    _, _, valid = _valid()
    configs = _configs(con)
    cells = con.execute(f"""select s.config_id, s.test_idx, s.selection, s.spearman, s.ceiling, {valid} as valid
                            from stats s where s.final and s.method = $m""", {"m": method}).fetchall()
    pairs = con.execute("""
        with truth as (
            select config_id, test_idx, removed, avg(actual) as actual, count(*) as reps,
                   stddev_samp(actual) / sqrt(count(*)) as se
            from retrain
            where removed >= 0 and coalesce(mode, '') not in ('control', 'group', 'random_group')
                  and actual is not null and not isnan(actual)
            group by all)
        select i.config_id, i.test_idx, i.estimate, t.actual, t.se, t.reps
        from influence i join truth t
             on t.config_id = i.config_id and t.test_idx = i.test_idx and t.removed = i.train_idx
        where i.method = $m and i.estimate is not null and not isnan(i.estimate)
        order by i.config_id, i.test_idx, i.train_idx""", {"m": method}).fetchall()
    by_cell = defaultdict(list)
    for cid, t, e, a, se, reps in pairs:
        by_cell[(cid, t)].append((e, a, se if se is not None else math.nan, reps))
    panels, counts = [], {"over_limit": 0, "no_pairs": 0, "left_out": 0}
    for cid, t, selection, rho, ceiling, ok in cells:
        if not ok:
            counts["left_out"] += 1
            continue
        if not by_cell.get((cid, t)):
            counts["no_pairs"] += 1
            continue
        e, a, se, reps = (list(v) for v in zip(*by_cell[(cid, t)]))
        panels.append({"config_id": cid, "label": config_label(configs.get(cid, {})), "selection": selection,
                       "test_idx": t, "spearman": rho, "ceiling": ceiling, "estimate": e, "actual": a, "se": se,
                       "replicates": reps})
    # One test point per configuration first (highest-loss first), then a second, ...: with more cells than
    # panels every configuration is shown before any shows two.
    order = {"highest": 0, "median": 1}
    panels.sort(key=lambda p: (p["label"], p["config_id"], order.get(p["selection"], 2), str(p["selection"]),
                               p["test_idx"]))
    turn: dict[str, int] = defaultdict(int)
    for p in panels:
        p["turn"] = turn[p["config_id"]]
        turn[p["config_id"]] += 1
    chosen = sorted(sorted(panels, key=lambda p: p["turn"])[:limit],
                    key=lambda p: (p["label"], p["config_id"], p["turn"]))
    counts["over_limit"] = len(panels) - len(chosen)
    return chosen, counts


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    from scipy import stats as st

    k = len(values)
    mean = float(np.mean(values))
    if k < 2:
        return mean, math.nan, math.nan
    half = float(st.t.ppf(0.975, k - 1)) * float(np.std(values, ddof=1)) / math.sqrt(k)
    return mean, mean - half, mean + half


def trend_points(cells: list[dict], axis: str, other: str) -> list[dict]:
    """Spearman against ``axis`` over valid MLP cells at the most common value of ``other``: one point per
    (method, weight decay, x) with ``mean``, ``lo``, ``hi`` (95% t-interval over seeds of the per-seed means, or
    over test points with one seed), ``interval``, ``ceiling`` and ``null95`` (means over the cells)."""
    mlp = [c for c in cells if c["model"] == "mlp" and c[axis] is not None]
    values = [c[other] for c in mlp]
    if not values:
        return []
    mode = max(sorted(set(values), key=lambda v: (v is None, v or 0)), key=values.count)
    groups = defaultdict(list)
    for c in mlp:
        if c[other] == mode and c["valid"]:
            groups[(c["method"], c["weight_decay"], c[axis])].append(c)
    out = []
    for (method, wd, x), cs in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0][:2]) + (kv[0][2],)):
        per_seed = defaultdict(list)
        for c in cs:
            per_seed[c["seed"]].append(c["spearman"])
        if len(per_seed) >= 2:
            mean, lo, hi = _mean_ci([float(np.mean(v)) for v in per_seed.values()])
            interval = f"t over {len(per_seed)} seeds"
        else:
            mean, lo, hi = _mean_ci([c["spearman"] for c in cs])
            interval = f"t over {len(cs)} test points (one seed)"
        ceil = [c["ceiling"] for c in cs if _finite(c["ceiling"])]
        null = [c["spearman_null95"] for c in cs if _finite(c["spearman_null95"])]
        out.append({"method": method, "wd": wd, "x": x, "other": other, "other_value": mode, "mean": mean, "lo": lo,
                    "hi": hi, "interval": interval, "n_cells": len(cs),
                    "ceiling": float(np.mean(ceil)) if ceil else math.nan,
                    "null95": float(np.mean(null)) if null else math.nan})
    return out


# ---- figures ----------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _scatter_figure(panels: list[dict]) -> bytes:
    plt = _plt()
    cols = min(6, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, p in zip(axes.flat, panels):
        se = np.asarray(p["se"], dtype=float)
        has_bars = bool(np.isfinite(se).any()) and max(p["replicates"]) > 1
        ax.errorbar(p["estimate"], p["actual"], yerr=np.nan_to_num(se) if has_bars else None, fmt="o",
                    markersize=2.5, elinewidth=0.6, capsize=0, color="#1f77b4", alpha=0.8)
        ax.axhline(0, color="grey", lw=0.4)
        ax.axvline(0, color="grey", lw=0.4)
        ceiling = f", ceil {p['ceiling']:.2f}" if _finite(p["ceiling"]) else ""
        rho = f"{p['spearman']:.2f}" if _finite(p["spearman"]) else "n/a"
        ax.set_title(f"{p['label']}\n{p['selection']} #{p['test_idx']}: ρ {rho}{ceiling}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.ticklabel_format(style="sci", scilimits=(-2, 3), axis="both")
        ax.xaxis.get_offset_text().set_fontsize(6)
        ax.yaxis.get_offset_text().set_fontsize(6)
    fig.supxlabel("influence estimate (predicted test-loss change)", fontsize=9)
    fig.supylabel("actual (retrained) test-loss change", fontsize=9)
    # Fixed spacing rather than tight_layout: with 24 panels its extra measuring passes cost seconds.
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.08 if rows > 1 else 0.2, top=0.92 if rows > 1 else 0.78,
                        hspace=0.75, wspace=0.35)
    return _png(fig)


def _trend_figure(points: list[dict], axis: str, methods: list[str]) -> bytes:
    from jobs.figures import style_of

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = sorted({p["x"] for p in points})
    wds = sorted({p["wd"] for p in points}, key=lambda w: (w is None, w or 0.0))
    colours = plt.get_cmap("tab10")
    for i, wd in enumerate(wds):
        for method in methods:
            line = sorted((p for p in points if p["wd"] == wd and p["method"] == method), key=lambda p: p["x"])
            if not line:
                continue
            dash, marker, size = style_of(method, methods)
            x = [p["x"] for p in line]
            ax.plot(x, [p["mean"] for p in line], color=colours(i % 10), linestyle=dash, marker=marker,
                    markersize=size * 0.7, markerfacecolor="none", label=f"{method}, wd {wd:g}" if wd is not None
                    else method)
            # a correlation's interval ends at ±1 (a t-interval over two seeds can reach far beyond)
            lo = np.clip(np.asarray([p["lo"] for p in line], dtype=float), -1, 1)
            hi = np.clip(np.asarray([p["hi"] for p in line], dtype=float), -1, 1)
            if np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, color=colours(i % 10), alpha=0.15, linewidth=0)
    by_x = defaultdict(lambda: ([], []))
    for p in points:
        if _finite(p["ceiling"]):
            by_x[p["x"]][0].append(p["ceiling"])
        if _finite(p["null95"]):
            by_x[p["x"]][1].append(p["null95"])
    cx = [x for x in xs if by_x[x][0]]
    if cx:
        ceiling = [float(np.mean(by_x[x][0])) for x in cx]
        ax.fill_between(cx, ceiling, [1.05] * len(cx), color="grey", alpha=0.18, linewidth=0,
                        label="above the noise ceiling")
        ax.plot(cx, ceiling, color="grey", lw=1)
    nx = [x for x in xs if by_x[x][1]]
    if nx:
        ax.plot(nx, [float(np.mean(by_x[x][1])) for x in nx], color="black", linestyle="--", lw=1,
                label="chance |ρ| (95%)")
    ax.axhline(0, color="grey", lw=0.5)
    other = points[0]
    ax.set(xlabel=f"{axis} ({other['other']} {other['other_value']})", ylabel="Spearman (estimate vs actual)",
           ylim=(-1.05, 1.05))
    ax.set_xticks(xs)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _png(fig)


def _spread_figure(cells: list[dict], methods: list[str], configs: dict) -> tuple[bytes, int]:
    plt = _plt()
    valid = [c for c in cells if c["valid"]]
    ids = sorted({c["config_id"] for c in valid}, key=lambda i: (config_label(configs.get(i, {})), i))
    dropped = max(0, len(ids) - MAX_CONFIGS)
    ids = ids[:MAX_CONFIGS]
    shown = methods[:4]
    fig, axes = plt.subplots(len(shown), 1, figsize=(max(6.0, 0.3 * len(ids) + 1.5), 2.6 * len(shown)),
                             squeeze=False, sharex=True)
    selections = sorted({str(c["selection"]) for c in valid})
    colours = plt.get_cmap("tab10")
    rng = np.random.default_rng(0)  # jitter only
    for ax, method in zip(axes[:, 0], shown):
        data = [[c["spearman"] for c in valid if c["config_id"] == i and c["method"] == method] for i in ids]
        ax.boxplot([d if d else [math.nan] for d in data], positions=range(len(ids)), widths=0.6,
                   showfliers=False, medianprops={"color": "black"})
        for k, sel in enumerate(selections):
            for j, i in enumerate(ids):
                ys = [c["spearman"] for c in valid
                      if c["config_id"] == i and c["method"] == method and str(c["selection"]) == sel]
                if ys:
                    ax.scatter(j + rng.uniform(-0.15, 0.15, len(ys)), ys, s=8, color=colours(k % 10),
                               label=sel if j == 0 or not ax.get_legend_handles_labels()[1].count(sel) else None,
                               zorder=3)
        ax.set_ylabel(f"{method}\nSpearman", fontsize=8)
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="grey", lw=0.5)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, title="test point", title_fontsize=7,
                  loc="lower left")
    axes[-1, 0].set_xticks(range(len(ids)), [config_label(configs.get(i, {})) for i in ids], rotation=90,
                           fontsize=7)
    fig.tight_layout()
    return _png(fig), dropped


def _covariate_data(con) -> dict[str, list[tuple[str, float, float]]]:
    """covariate -> [(method, covariate value, Spearman)] over valid cells."""
    _, _, valid = _valid()
    rel = con.sql(f"""
        {COVARIATE_TABLES}
        select s.method, s.spearman, tp.loss, tp.margin, tp.grad_norm, tp.misclassified, inf.self_influence
        from stats s left join tp on tp.config_id = s.config_id and tp.test_idx = s.test_idx
             left join inf on inf.config_id = s.config_id and inf.method = s.method and inf.test_idx = s.test_idx
        where s.final and {valid}""")
    names = rel.columns
    out = defaultdict(list)
    for row in rel.fetchall():
        r = dict(zip(names, row))
        for cov in COVARIATES:
            if _finite(r[cov]):
                out[cov].append((r["method"], float(r[cov]), float(r["spearman"])))
    return dict(out)


def _covariate_figure(data: dict, methods: list[str], found: list[Finding]) -> bytes:
    from jobs.figures import style_of

    plt = _plt()
    covs = [c for c in COVARIATES if c in data]
    fig, axes = plt.subplots(1, len(covs), figsize=(2.8 * len(covs), 2.8), squeeze=False, sharey=True)
    rng = np.random.default_rng(0)
    colours = plt.get_cmap("tab10")
    corr = {(f.method, f.name): f for f in found}
    for ax, cov in zip(axes[0], covs):
        for k, method in enumerate(methods):
            pts = [(x, y) for m, x, y in data[cov] if m == method]
            if not pts:
                continue
            x, y = (np.asarray(v) for v in zip(*pts))
            if cov == "misclassified":
                x = x + rng.uniform(-0.1, 0.1, len(x))
            _, marker, _ = style_of(method, methods)
            ax.scatter(x, y, s=8, marker=marker, facecolors="none", edgecolors=colours(k % 10), linewidths=0.7,
                       label=method)
        positive = [x for _, x, _ in data[cov]]
        if cov != "misclassified" and min(positive) > 0 and max(positive) / min(positive) > 100:
            ax.set_xscale("log")
        if cov == "misclassified":
            ax.set_xticks([0, 1], ["no", "yes"])
        f = corr.get((methods[0], f"covariate_{cov}"))
        note = f"\nwithin-config ρ {f.effect:.2f} [{f.lo:.2f}, {f.hi:.2f}]" if f and _finite(f.lo) else ""
        ax.set_title(f"{cov}{note}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(-1.05, 1.05)
    axes[0][0].set_ylabel("Spearman (estimate vs actual)", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


# ---- HTML ------------------------------------------------------------------------------------------------------

def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    th = "".join(f'<th{" class=l" if i < left else ""}>{html.escape(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=l" if i < left else ""}>{html.escape(str(v))}</td>'
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _skip(text: str) -> str:
    return f'<p class="skip">{html.escape(text)}</p>'


def _p(text: str, cls: str = "caption") -> str:
    return f'<p class="{cls}">{html.escape(text)}</p>'


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _methods(cells: list[dict], configs: dict) -> list[str]:
    listed = [m for c in configs.values() for m in (c.get("methods") or "").split(",") if m]
    seen = {c["method"] for c in cells}
    return [m for m in dict.fromkeys(listed) if m in seen] + sorted(seen - set(listed))


def _methods_table(cells: list[dict], methods: list[str]) -> str:
    rows = []
    for m in methods:
        mine = [c for c in cells if c["method"] == m]
        ok = [c for c in mine if c["valid"]]

        def mean(key, of=ok):
            v = [float(c[key]) for c in of if _finite(c[key])]
            return float(np.mean(v)) if v else math.nan

        rows.append([m, str(len(ok)), str(len(mine) - len(ok)), _fmt(mean("spearman")),
                     _fmt(mean("spearman_corrected")), _fmt(mean("ceiling")), _fmt(mean("spearman_null95")),
                     _fmt(mean("chance", [c for c in ok if c["chance"] is not None])),
                     _fmt(mean("unreliable", [c for c in ok if c["unreliable"] is not None]))])
    return _table(["method", "cells", "left out", "mean Spearman", "mean corrected Spearman", "mean ceiling",
                   "chance |ρ|", "share at chance", "share unreliable"], rows)


def write_html(con, experiment: str, path, findings: list[Finding] | None = None) -> Path:
    """Write the report of ``experiment`` (tables behind ``con``, from ``storage.query.connect``) to ``path``, one
    self-contained HTML file, and return its path. ``findings``: those of ``jobs.findings.findings(con)``
    when not given."""
    path = Path(path)
    found = compute_findings(con) if findings is None else list(findings)
    configs = _configs(con)
    cells = cell_rows(con)
    methods = _methods(cells, configs)
    collapsed, diverged, _ = _valid()
    left = dict(zip(("collapsed", "diverged", "undefined"), con.sql(f"""
        select count(*) filter (where {collapsed}),
               count(*) filter (where {diverged} and not {collapsed}),
               count(*) filter (where not {collapsed} and not {diverged}
                                and isnan(coalesce(s.spearman, 'NaN'::double)))
        from stats s where s.final""").fetchall()[0]))
    n_left = sum(left.values())
    why = ", ".join(f"{n} {k}" for k, n in left.items() if n) or "none"
    parts = [f"<h1>{html.escape(experiment)}: influence estimates against leave-one-out retraining</h1>",
             _p(f"{len(configs)} configuration(s), {len(cells)} cell(s) (configuration × method × test point) with "
                f"final statistics, method(s) {', '.join(methods) or 'none'}. Left out of every figure and mean: "
                f"{n_left} cell(s) ({why}; collapsed: the network became a constant predictor; diverged: the "
                f"method's solve diverged; undefined: the Spearman is NaN).", "lead")]
    images = 0

    def figure(png: bytes, alt: str, caption: str) -> None:
        nonlocal images
        images += 1
        parts.append(_img(png, alt))
        parts.append(_p(caption))

    parts.append("<h2>Findings</h2>")
    if found:
        header, rows = table_rows(found)
        parts.append(_table(header, rows, left=2))
        items = "".join(f'<li><span class="{"holds" if f.holds else "fails" if f.holds is False else ""}">'
                        f"{html.escape(finding_sentence(f))}</span><br><span class=caption>"
                        f"{html.escape(f.detail)}</span></li>" for f in found)
        parts.append(f"<ul>{items}</ul>")
    else:
        parts.append(_skip("No finding could be computed (no final statistics, or no axis that varies)."))
    for line in omitted(found):
        parts.append(_skip(line))

    parts.append("<h2>Estimate against actual effect</h2>")
    if methods:
        panels, counts = scatter_panels(con, methods[0])
        if panels:
            notes = [f"{counts['over_limit']} more cell(s) not shown (at most {MAX_PANELS} panels)"
                     if counts["over_limit"] else "",
                     f"{counts['no_pairs']} cell(s) without retrained pairs" if counts["no_pairs"] else "",
                     f"{counts['left_out']} cell(s) left out (collapsed, diverged or undefined)"
                     if counts["left_out"] else ""]
            figure(_scatter_figure(panels), "estimate vs actual",
                   f"Method {methods[0]}: one panel per configuration × test point; a dot is one removed training "
                   f"point, its actual effect the mean over replicates, the bar its standard error (only where "
                   f"there are several replicates). Titles: configuration, test-point selection and index, "
                   f"Spearman and noise ceiling of the cell. " + "; ".join(n for n in notes if n))
        else:
            parts.append(_skip(f"No panel: no valid {methods[0]} cell has both influence and retrain rows."))
    else:
        parts.append(_skip("No final statistics yet."))

    parts.append("<h2>Spearman against depth and width</h2>")
    for axis, other in (("depth", "width"), ("width", "depth")):
        points = trend_points(cells, axis, other)
        if len({p["x"] for p in points}) < 2:
            parts.append(_skip(f"No {axis} figure: {axis} takes fewer than two values among the valid MLP cells "
                               f"at one {other}."))
            continue
        figure(_trend_figure(points, axis, methods), f"Spearman vs {axis}",
               f"Spearman against {axis} at {other} {points[0]['other_value']} (MLP), one line per method and "
               f"weight decay, test points pooled; band: 95% t-interval over seeds of the per-seed means (over test "
               f"points where there is one seed). Grey: above the mean noise ceiling √reliability (unreachable by a "
               f"perfect estimator); dashed: the mean 95% chance level of |ρ|.")

    parts.append("<h2>Spread across test points</h2>")
    if any(c["valid"] for c in cells):
        png, dropped = _spread_figure(cells, methods, configs)
        figure(png, "Spearman per configuration",
               "Spearman of each test point (dots, coloured by the rule that chose it) and its box per "
               "configuration" + (f"; {dropped} configuration(s) beyond the first {MAX_CONFIGS} not shown"
                                  if dropped else "") + ("; methods beyond the first 4 not shown"
                                                         if len(methods) > 4 else "") + ".")
    else:
        parts.append(_skip("No valid cell to show."))

    parts.append("<h2>Quality against test-point covariates</h2>")
    data = _covariate_data(con)
    if data:
        missing = [c for c in COVARIATES if c not in data]
        figure(_covariate_figure(data, methods, found), "Spearman vs covariates",
               "Spearman of each valid cell against its test point's covariates at θ̂ (self-influence: "
               "∇Lᵀ(H+δI)⁻¹∇L of that method); titles: the within-configuration rank correlation of the first "
               "method with its 95% CI (jobs/findings.py)."
               + (f" Not shown, no values: {', '.join(missing)}." if missing else ""))
    else:
        parts.append(_skip("No figure: the test_points and influence rows carry no covariates (written before "
                           "margin, grad_norm, misclassified and self_influence existed)."))

    parts.append("<h2>Methods side by side</h2>")
    if methods:
        if len(methods) == 1:
            parts.append(_skip(f"One method ({methods[0]}): nothing to compare; its summary:"))
        parts.append(_methods_table(cells, methods))
    else:
        parts.append(_skip("No method has final statistics."))

    body = "\n".join(parts)
    size = len(body.encode("utf-8"))
    foot = _p(f"Self-contained: {images} embedded PNG figure(s) at {DPI} dpi, about {size / 1024:.0f} kB in all; "
              f"no external resources.")
    text = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(experiment)} report"
            f"</title><style>{_CSS}</style></head><body>\n{body}\n{foot}\n</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[bytes] = []

    def handle_starttag(self, tag, attrs):
        if tag != "img":
            return
        src = dict(attrs).get("src") or ""
        head, sep, data = src.partition(",")
        if src.startswith("data:") and sep and head.endswith(";base64"):
            self.found.append(base64.b64decode(data, validate=True))


def embedded_images(html_text: str) -> list[bytes]:
    """The decoded bytes of every ``<img src="data:...;base64,...">`` of ``html_text``, in document order."""
    parser = _Images()
    parser.feed(html_text)
    parser.close()
    return parser.found
