"""The vocabularies of ``influence/``, declared once: method names, curvatures, EK-FAC labels, damping policies,
test-point and removal kinds, and per method its settings with default, allowed values and meaning.

Pure data and pure functions (no torch, nothing heavy), so the spec layer validates against it at import cost
~0: ``jobs/spec_checks.py`` turns each :class:`Setting` into a spec check, :mod:`influence.ihvp` derives
``SETTINGS`` (what ``make_solver`` accepts) from :data:`SOLVER_SETTINGS`, and the README's table of method
settings is :func:`settings_table_markdown`. :func:`damping_to_add` is the one rule for when δ is added.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

METHODS: tuple[str, ...] = ("exact", "cg", "lissa", "arnoldi", "ekfac")
CURVATURES: tuple[str, ...] = ("hessian", "ggn")
EKFAC_LABELS: tuple[str, ...] = ("true", "sampled")
# The spec's order: the default first.
DAMPING_POLICIES: tuple[str, ...] = ("if_indefinite", "always", "never")
# What influence.scores.select_test_points and select_removals / select_groups implement.
TEST_POINT_KINDS: tuple[str, ...] = ("highest", "median", "percentile", "random", "explicit")
REMOVAL_KINDS: tuple[str, ...] = ("all", "top_k", "percentile", "random", "explicit", "group")

# An eigenvalue below this times the largest |eigenvalue| is a numerical zero.
ZERO_RTOL = 1e-12

SETTING_KINDS: tuple[str, ...] = ("choice", "number", "int", "int_or_derived", "scale")


@dataclass(frozen=True)
class Setting:
    """One keyword argument of an inverse-HVP method: ``name`` (as ``make_solver`` and a spec's
    ``influence.<method>`` spell it), ``default``, the values it takes, and ``help``, one line on what it means.

    ``kind``: ``"choice"`` (one of ``choices``); ``"number"`` (a finite number between ``low`` and ``high``,
    None = unbounded, each end excluded where ``low_open`` / ``high_open``); ``"int"`` (an integer >=
    ``minimum``); ``"int_or_derived"`` (the same, or None: derived as ``help`` says); ``"scale"`` (a number > 0,
    or ``"auto"``). ``spec`` is False for the settings a spec does not set per method: ``damping`` and
    ``damping_policy`` (decided once per configuration from the influence section) and ``chunk_size``
    (from ``influence.grad_chunk``).
    """

    name: str
    default: object
    kind: str
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    minimum: int = 0
    spec: bool = True

    def __post_init__(self) -> None:
        if self.kind not in SETTING_KINDS:
            raise ValueError(f"setting {self.name}: unknown kind {self.kind!r}; "
                             f"choose one of {', '.join(SETTING_KINDS)}")
        if (self.kind == "choice") != bool(self.choices):
            raise ValueError(f"setting {self.name}: choices go with kind 'choice' and only with it")
        if not self.help.strip() or "\n" in self.help or "|" in self.help:
            raise ValueError(f"setting {self.name}: help is one non-empty line without '|' (it is a table cell)")

    def in_range(self, x: float) -> bool:
        """Whether the number ``x`` lies in this ``"number"`` setting's range."""
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def rule(self) -> str:
        """The allowed values in words, as a spec error states them: ``a number strictly between 0 and 1``."""
        if self.kind == "choice":
            return f"one of {', '.join(self.choices)}"
        if self.kind == "int":
            return f"an integer >= {self.minimum}"
        if self.kind == "int_or_derived":
            return f"an integer >= {self.minimum}, or null (derived)"
        if self.kind == "scale":
            return "a number > 0, or auto"
        low, high = self.low, self.high
        if low is not None and high is not None:
            if self.low_open and self.high_open:
                return f"a number strictly between {low:g} and {high:g}"
            return f"a number in {'(' if self.low_open else '['}{low:g}, {high:g}{')' if self.high_open else ']'}"
        if low is not None:
            return f"a number {'>' if self.low_open else '>='} {low:g}"
        if high is not None:
            return f"a number {'<' if self.high_open else '<='} {high:g}"
        return "a number"


_DAMPING = Setting("damping", 0.0, "number", "δ added to C: every method solves (C + δI) x = v", low=0, spec=False)
_CURVATURE = Setting("curvature", "hessian", "choice",
                     "the matrix C inverted: hessian (H, the Hessian of the objective at θ̂) or ggn (the "
                     "Gauss-Newton matrix G, PSD)", choices=CURVATURES)

# Per method, every setting make_solver takes, in the order its error message lists them. Defaults follow the
# papers: CG tol 1e-8 and 100 iterations and LiSSA scale 10 from Koh & Liang's code; damping 0, so that every
# method solves the same system as exact.
SOLVER_SETTINGS: dict[str, tuple[Setting, ...]] = {
    "exact": (
        _DAMPING,
        Setting("damping_policy", "if_indefinite", "choice",
                "when δ is added: if_indefinite (only if C's minimum eigenvalue is <= 0), always, never",
                choices=DAMPING_POLICIES, spec=False),
        _CURVATURE,
    ),
    "cg": (
        _DAMPING,
        _CURVATURE,
        Setting("tol", 1e-8, "number", "relative residual ‖(C + δI) x − v‖ / ‖v‖ at which CG stops",
                low=0, high=1, low_open=True, high_open=True),
        Setting("max_iter", 100, "int", "most CG iterations (products with C) per right-hand side", minimum=1),
    ),
    "lissa": (
        _DAMPING,
        Setting("scale", 10.0, "scale",
                "the recursion converges when (C + δI) / scale has its eigenvalues in (0, 2); "
                "auto tries 10, 100, ..., 1e6 per right-hand side until it does"),
        Setting("depth", None, "int_or_derived",
                "recursion steps (minibatch products) per repeat; null = ⌈n / repeats⌉", minimum=1),
        Setting("repeats", 1, "int", "independent recursions, averaged", minimum=1),
        Setting("batch_size", 10, "int",
                "training examples per minibatch product, drawn afresh every step (>= n: the exact Neumann series)",
                minimum=1),
        Setting("seed", 0, "int", "seed of the minibatch draws (the same minibatches on every device)", minimum=0),
    ),
    "arnoldi": (
        _DAMPING,
        _CURVATURE,
        Setting("rank", 20, "int",
                "top eigenpairs (by magnitude) kept, capped at P; the part of v outside their span is dropped",
                minimum=1),
        Setting("iterations", None, "int_or_derived", "Krylov (Arnoldi) steps, >= rank, capped at P; null = 2·rank",
                minimum=1),
        Setting("seed", 0, "int", "seed of the random start vector (and of restarts after a breakdown)", minimum=0),
    ),
    "ekfac": (
        _DAMPING,
        Setting("labels", "true", "choice",
                "true: the training labels (empirical Fisher); sampled: one label per example drawn from the model "
                "(a one-sample estimate of the true Fisher, which equals the GGN)", choices=EKFAC_LABELS),
        Setting("seed", 0, "int", "seed of the sampled labels (labels: sampled only)", minimum=0),
        Setting("chunk_size", 256, "int",
                "examples per pass when fitting the factors (memory, not the result); a task sets it from grad_chunk",
                minimum=1, spec=False),
    ),
}


def spec_settings(method: str) -> tuple[Setting, ...]:
    """The settings a spec may give ``method`` under ``influence.<method>``, in declaration order."""
    return tuple(s for s in SOLVER_SETTINGS[method] if s.spec)


def solver_defaults(method: str) -> dict[str, object]:
    """``{name: default}`` of every setting ``make_solver`` takes for ``method``."""
    return {s.name: s.default for s in SOLVER_SETTINGS[method]}


def check_damping_policy(policy: object) -> str:
    """``policy`` if it is one of :data:`DAMPING_POLICIES`, else a ValueError naming them."""
    if policy not in DAMPING_POLICIES:
        raise ValueError(f"unknown damping_policy {policy!r}; choose one of {', '.join(DAMPING_POLICIES)}")
    return policy


def damping_to_add(policy: str, damping: float, min_eigenvalue: float, top_eigenvalue: float) -> float:
    """The δ of (C + δI) that ``policy`` adds, given C's smallest and largest eigenvalue.

    ``never``: 0. ``always``: ``damping``. ``if_indefinite``: ``damping`` when C has an eigenvalue <= 0, zero
    meaning <= ZERO_RTOL · max(|top|, |min|) (eigh rounds an exact null space up to +1e-18, say), or when the
    minimum eigenvalue is unknown (NaN: a model too large for an exact Hessian; damping is the safe choice);
    else 0, so the convex case stays undamped, exactly the textbook influence function.
    """
    check_damping_policy(policy)
    if policy == "never":
        return 0.0
    if policy == "always" or math.isnan(min_eigenvalue):
        return float(damping)
    indefinite = min_eigenvalue <= ZERO_RTOL * max(abs(top_eigenvalue), abs(min_eigenvalue))
    return float(damping) if indefinite else 0.0


def _show_default(value: object) -> str:
    """A default as a spec spells it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return re.sub(r"e([-+])0+(?=\d)", r"e\1", f"{value:g}")  # 1e-08 -> 1e-8
    return str(value)


def settings_table_markdown() -> str:
    """The README's table of the settings a spec may give each method: method, setting, default, meaning."""
    rows = ["| method | setting | default | meaning |", "|---|---|---|---|"]
    for method in METHODS:
        for s in spec_settings(method):
            rows.append(f"| {method} | `{s.name}` | `{_show_default(s.default)}` | {s.help} |")
    return "\n".join(rows) + "\n"
