"""influence.registry, the one declaration of every vocabulary and method setting: the solvers accept what it
declares, with the same defaults; the spec layer, scores and the README read it; the damping rule's known
answers, and ExactIHVP following that same rule."""
from __future__ import annotations

import inspect
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from influence import registry
from influence.registry import (
    DAMPING_POLICIES, METHODS, SOLVER_SETTINGS, Setting, damping_to_add, settings_table_markdown, solver_defaults,
    spec_settings,
)

ROOT = Path(__file__).resolve().parents[1]
# Settings make_solver takes that a spec does not set per method: damping and damping_policy are decided once
# per configuration from the influence section, chunk_size comes from influence.grad_chunk.
SOLVER_ONLY = {"exact": {"damping", "damping_policy"}, "cg": {"damping"}, "lissa": {"damping"},
               "arnoldi": {"damping"}, "ekfac": {"damping", "chunk_size"}}


def test_registry_imports_nothing_heavy():
    code = "import sys, influence.registry; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_setting_is_declared_with_help_and_a_valid_default():
    assert tuple(SOLVER_SETTINGS) == METHODS
    for method, settings in SOLVER_SETTINGS.items():
        names = [s.name for s in settings]
        assert len(names) == len(set(names)) and names[0] == "damping", method
        assert {s.name for s in settings if not s.spec} == SOLVER_ONLY[method], method
        for s in settings:
            assert len(s.help) >= 20 and "\n" not in s.help, (method, s.name)  # says what it means
    from jobs.spec_checks import METHOD_SETTINGS

    for method in METHODS:
        checks = METHOD_SETTINGS[method]
        assert list(checks) == [s.name for s in spec_settings(method)], method
        for name, (default, check) in checks.items():
            assert check(f"influence.{method}.{name}", default) == default, (method, name)


def test_ihvp_settings_are_the_registry_defaults():
    from influence import ihvp

    assert ihvp.METHODS is METHODS and ihvp.DAMPING_POLICIES is DAMPING_POLICIES
    assert ihvp.SETTINGS == {m: solver_defaults(m) for m in METHODS}
    assert ihvp.SETTINGS["ekfac"]["chunk_size"] == 256 and ihvp.SETTINGS["exact"]["damping_policy"] == "if_indefinite"


def test_every_vocabulary_is_the_registry():
    from influence import curvature, ihvp_ekfac, scores
    from jobs import spec, spec_checks

    for name in ("METHODS", "CURVATURES", "EKFAC_LABELS", "DAMPING_POLICIES", "TEST_POINT_KINDS", "REMOVAL_KINDS"):
        assert getattr(spec_checks, name) is getattr(registry, name), name
    for name in ("METHODS", "DAMPING_POLICIES", "TEST_POINT_KINDS", "REMOVAL_KINDS"):  # jobs.spec re-exports these
        assert getattr(spec, name) is getattr(registry, name), name
    assert curvature.CURVATURES is registry.CURVATURES and ihvp_ekfac.LABELS is registry.EKFAC_LABELS
    assert scores.TEST_SELECTIONS is registry.TEST_POINT_KINDS and scores.REMOVAL_RULES is registry.REMOVAL_KINDS
    assert DAMPING_POLICIES == ("if_indefinite", "always", "never")  # the order spec errors list them in


def _solver_classes():
    from influence.ihvp import ExactIHVP
    from influence.ihvp_ekfac import EkfacIHVP
    from influence.ihvp_krylov import ArnoldiIHVP, ConjugateGradientIHVP
    from influence.ihvp_lissa import LissaIHVP

    return {"exact": ExactIHVP, "cg": ConjugateGradientIHVP, "lissa": LissaIHVP, "arnoldi": ArnoldiIHVP,
            "ekfac": EkfacIHVP}


def test_solver_classes_take_exactly_the_registered_settings_with_their_defaults():
    classes = _solver_classes()
    assert set(classes) == set(METHODS)
    for method, cls in classes.items():
        keywords = {name: p.default for name, p in inspect.signature(cls).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
        # curvature is make_solver's: it picks the matrix or operator the class is given
        registered = {k: v for k, v in solver_defaults(method).items() if k != "curvature"}
        assert keywords == registered, method


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method", METHODS)
def test_make_solver_accepts_every_registered_setting_with_its_default(iris, method):
    from influence.ihvp import InverseHVP, make_solver
    from iris_models import WEIGHT_DECAY, trained_iris

    model, theta = trained_iris(iris, "logistic", 0)
    solver = make_solver(method, model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY, **solver_defaults(method))
    assert isinstance(solver, InverseHVP) and solver.name == method
    assert solver.diagnostics["damping_used"] == 0.0
    for s in SOLVER_SETTINGS[method]:  # and each one alone
        make_solver(method, model, theta, iris.x_train, iris.y_train, WEIGHT_DECAY, **{s.name: s.default})


@pytest.mark.parametrize("policy, min_eigenvalue, top_eigenvalue, expected", [
    ("if_indefinite", 0.1, 2.0, 0.0),  # convex: the textbook influence function, undamped
    ("if_indefinite", 1e-6, 1.0, 0.0),  # small but clearly positive
    ("if_indefinite", -0.5, 2.0, 0.3),  # indefinite
    ("if_indefinite", 0.0, 2.0, 0.3),  # singular
    ("if_indefinite", 1e-18, 1.0, 0.3),  # a null space that eigh rounded up
    ("if_indefinite", -3.0, 1e-13, 0.3),  # relative to the largest |eigenvalue|, whichever end it is
    ("if_indefinite", math.nan, 2.0, 0.3),  # spectrum unknown: damping is the safe choice
    ("always", 0.1, 2.0, 0.3),
    ("always", math.nan, math.nan, 0.3),
    ("never", -0.5, 2.0, 0.0),
    ("never", math.nan, 2.0, 0.0),
])
def test_damping_to_add_known_answers(policy, min_eigenvalue, top_eigenvalue, expected):
    got = damping_to_add(policy, 0.3, min_eigenvalue, top_eigenvalue)
    assert got == expected and isinstance(got, float)


def test_damping_to_add_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match="unknown damping_policy 'sometimes'; choose one of if_indefinite, always"):
        damping_to_add("sometimes", 0.3, 1.0, 2.0)


@pytest.mark.parametrize("policy", DAMPING_POLICIES)
def test_exact_solver_damps_by_the_same_rule(policy):
    from influence.ihvp import ExactIHVP, SingularHessian

    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    spectra = {"convex": [0.01, 0.1, 0.5, 1.0, 2.0, 3.0], "indefinite": [-0.2, 0.1, 0.5, 1.0, 2.0, 3.0],
               "null space": [0.0, 0.1, 0.5, 1.0, 2.0, 3.0], "rounded-up zero": [1e-17, 0.1, 0.5, 1.0, 2.0, 3.0]}
    for name, values in spectra.items():
        h = q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T
        try:
            solver = ExactIHVP(h, damping=0.3, damping_policy=policy)
        except SingularHessian:
            assert policy == "never" and name in ("null space", "rounded-up zero")
            continue
        expected = damping_to_add(policy, 0.3, solver.min_eigenvalue, solver.top_eigenvalue)
        assert solver.damping_used == expected, (policy, name)
        assert (expected > 0) == (policy == "always" or (policy == "if_indefinite" and name != "convex")), name


def test_setting_rules_are_the_spec_messages():
    tol = next(s for s in SOLVER_SETTINGS["cg"] if s.name == "tol")
    assert tol.rule() == "a number strictly between 0 and 1"
    assert not tol.in_range(0) and tol.in_range(1e-8) and not tol.in_range(1)
    assert Setting("x", 0.5, "number", "a number in a half-open range", low=0, high=1, high_open=True).rule() == \
        "a number in [0, 1)"
    with pytest.raises(ValueError, match="unknown kind"):
        Setting("x", 1, "float", "a kind that does not exist")
    with pytest.raises(ValueError, match="one non-empty line"):
        Setting("x", 1, "int", "")


# ---- the README's table ----------------------------------------------------------------------------------------

def test_readme_table_of_method_settings_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\| (\w+) \| `(\w+)` \| `([^`]*)` \| (.+) \|$", readme, flags=re.M))
    declared = {(m, s.name, registry._show_default(s.default), s.help) for m in METHODS for s in spec_settings(m)}
    assert declared <= rows, f"the README lacks {sorted(declared - rows)}"
    assert settings_table_markdown() in readme, (
        "README.md's table of method settings differs from influence.registry: replace it by the output of "
        "python -c 'from influence.registry import settings_table_markdown as t; print(t(), end=\"\")'")


# ---- the kinds are what influence.scores implements --------------------------------------------------------------

def test_every_test_point_kind_is_implemented():
    from influence.scores import select_test_points

    loss = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1])
    args = {"highest": 1, "median": 1, "percentile": (90, 1), "random": 1, "explicit": [4]}
    assert set(args) == set(registry.TEST_POINT_KINDS)
    for kind, arg in args.items():
        assert select_test_points(loss, [(kind, arg)], seed=0), kind


def test_every_removal_kind_is_implemented():
    from influence.scores import select_groups, select_removals

    estimate = torch.tensor([[0.3, -1.0, 0.2, 0.0], [0.1, 0.0, -0.4, 2.0]])
    assert set(registry.REMOVAL_KINDS) == {"all", "top_k", "percentile", "random", "explicit", "group"}
    for kind in registry.REMOVAL_KINDS:
        if kind == "group":  # per test point its top k, then the random groups
            groups = select_groups(estimate, k=2, groups=1)
            assert groups[:2] == [[0, 2], [0, 3]] and len(groups[2]) == 2
        else:
            assert select_removals(estimate, kind, k=1, seed=0, indices=[2], at=50.0), kind
