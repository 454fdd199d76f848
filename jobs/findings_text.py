"""How the findings of ``jobs/findings.py`` read: one plain sentence each, the findings table (Arrow, and as
rows of text shared by the Markdown file and the HTML page), the questions a store cannot answer, and the
Markdown file ``fragile report`` writes."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, fields

import pyarrow as pa

from jobs.findings import QUESTIONS, Finding, _finite, _fmt

__all__ = ["finding_sentence", "findings_markdown", "findings_table", "omitted", "table_rows"]

_VERDICT = {True: "holds", False: "fails", None: "cannot tell"}
_COVARIATE_WORDS = {"grad_norm": "gradient norm ‖∇L‖", "self_influence": "self-influence ∇Lᵀ(H+δI)⁻¹∇L",
                    "misclassified": "being misclassified (0/1)"}
# name -> (words for a positive effect, words for a negative one); "{m}" is the method.
_PHRASES = {
    "depth": ("{m}: Spearman rises with depth by", "{m}: Spearman falls with depth by"),
    "width": ("{m}: Spearman rises with width by", "{m}: Spearman falls with width by"),
    "weight_decay": ("{m}: Spearman is higher with weight decay by", "{m}: Spearman is lower with weight decay by"),
    "highest_vs_median": ("{m}: highest-loss test points have a higher Spearman than median-loss ones by",
                          "{m}: highest-loss test points have a lower Spearman than median-loss ones by"),
    "group": ("{m}: removing the top group raises the test loss more than a random group by",
              "{m}: removing the top group raises the test loss less than a random group by"),
}


def finding_sentence(f: Finding) -> str:
    """One plain sentence: the effect in words, its 95% interval, the cells, the verdict and the trust levels."""
    if f.name in _PHRASES:
        up, down = _PHRASES[f.name]
        sign = -1.0 if f.effect < 0 else 1.0
        lo, hi = sorted((sign * f.lo, sign * f.hi))
        head = f"{(up if sign > 0 else down).format(m=f.method)} {_fmt(abs(f.effect))}"
        if f.within:
            head = head.replace(": ", f" ({f.within}): ", 1)
    else:
        lo, hi = f.lo, f.hi
        if f.name == "spread":
            head = f"{f.method}: the spread of Spearman across test points (median IQR) is {_fmt(f.effect)}"
        elif f.name == "spread_driver":
            head = f"{f.method}: {f.statement}, ρ = {_fmt(f.effect)}"
        else:
            cov = f.name.removeprefix("covariate_")
            head = (f"{f.method}: within a configuration, Spearman correlates with the test point's "
                    f"{_COVARIATE_WORDS.get(cov, cov)} at ρ = {_fmt(f.effect)}")
    unit = f" {f.unit}" if f.unit else ""
    ceiling = f"mean ceiling {_fmt(f.ceiling)}" if _finite(f.ceiling) else "ceiling unknown (one replicate)"
    return (f"{head}{unit} (95% CI {_fmt(lo)} to {_fmt(hi)}, {f.n_cells} cells, {f.left_out} left out): "
            f"{_VERDICT[f.holds]}; {ceiling}, chance |ρ| {_fmt(f.null95)}, {f.at_chance} at chance, "
            f"{f.unreliable} unreliable.")


def findings_table(found: Sequence[Finding]) -> pa.Table:
    """One row per finding: every field of ``Finding`` and its ``sentence``."""
    names = [f.name for f in fields(Finding)]
    columns = {n: [asdict(f)[n] for f in found] for n in names}
    columns["sentence"] = [finding_sentence(f) for f in found]
    schema = pa.schema([(n, pa.string()) if n in ("name", "statement", "method", "detail", "unit", "within",
                                                  "sentence")
                        else (n, pa.bool_()) if n == "holds"
                        else (n, pa.int64()) if n in ("n_cells", "left_out", "unreliable", "at_chance")
                        else (n, pa.float64()) for n in names + ["sentence"]])
    return pa.table(columns, schema=schema)


_MD_COLUMNS = (("finding", "name"), ("method", "method"), ("effect", "effect"), ("95% CI", None),
               ("cells", "n_cells"), ("left out", "left_out"), ("ceiling", "ceiling"), ("chance |ρ|", "null95"),
               ("share at chance", "chance_share"), ("unreliable", "unreliable"), ("verdict", "holds"))


def table_rows(found: Sequence[Finding]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of text) of the findings table, shared by the Markdown and the HTML report."""
    out = []
    for f in found:
        row = []
        for _, key in _MD_COLUMNS:
            if key is None:
                row.append(f"{_fmt(f.lo)} to {_fmt(f.hi)}")
            elif key == "name":
                row.append(f"{f.name} ({f.within})" if f.within else f.name)
            elif key == "holds":
                row.append(_VERDICT[f.holds])
            elif key == "chance_share":
                row.append(_fmt(f.chance_share) if _finite(f.chance_share) else "n/a")
            else:
                row.append(_fmt(getattr(f, key)))
        out.append(row)
    return [h for h, _ in _MD_COLUMNS], out


def omitted(found: Sequence[Finding]) -> list[str]:
    """One line per question of ``QUESTIONS`` that no finding answers, saying what it would need."""
    names = {f.name.split("_")[0] if f.name.startswith("covariate_") else f.name for f in found}
    return [f"{name}: not answered; it needs {needs}" for name, needs in QUESTIONS.items() if name not in names]


def findings_markdown(found: Sequence[Finding], title: str) -> str:
    """A Markdown table of the findings, then one sentence per finding and how it was computed, then the
    questions this store cannot answer."""
    header, rows = table_rows(found)
    lines = [f"# {title}", ""]
    if not found:
        lines.append("No finding could be computed from this store.")
    else:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += [""] + [f"- {finding_sentence(f)} ({f.detail})" for f in found]
    lines += [""] + [f"- {line}" for line in omitted(found)]
    return "\n".join(lines) + "\n"
