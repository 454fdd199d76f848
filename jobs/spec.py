"""Experiment specs: YAML -> frozen dataclasses, validation, grid expansion, configuration ids.

A spec names one experiment: base values for every setting (sections ``data``, ``model``, ``train``,
``influence``, ``test_points``, ``ground_truth``, ``resources``) and a ``sweep``: one grid (axis -> list of
values) or a list of grids whose union, de-duplicated, is the set of configurations. See
``jobs/specs/iris.yaml`` for the full format.

Each :class:`Configuration` is flat and hashed: ``config_id`` is the first 12 hex digits of the sha256 of its
canonical JSON, so it names the same configuration in every run, whatever order the sweep lists were written
in. ``model_key`` hashes only the fields that define the trained base model θ̂, so configurations that differ
only in influence or ground-truth settings share one checkpoint.

Every user mistake raises :class:`SpecError`, one line naming the key path, the bad value and what is allowed.

This module must stay cheap to import (the CLI loads it before anything heavy): no torch, no ray.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Callable

import yaml

from jobs.spec_checks import (  # noqa: F401 (the vocabulary is part of this module's interface)
    ACTIVATIONS, DAMPING_POLICIES, DATASETS, METHODS, MODELS, OPTIMIZERS, REMOVAL_KINDS, RESOURCE_KINDS,
    TEST_POINT_KINDS, METHOD_SETTINGS, SpecError, _choice, _closest, _experiment, _indices, _int, _leaf, _methods, _number,
    _one_of, _optional, _show, _size,
)
from jobs.spec_yaml import SpecLoader

SPECS_DIR = Path(__file__).resolve().parent / "specs"
RETRAIN_FRACTION = 0.06  # warm-start retraining for 6% of the training epochs (Koh & Liang's code)


def _rules(key: str, value: object) -> tuple[TestPointRule, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(r, TestPointRule) for r in value):
        raise SpecError(key, value, "test_points must be a non-empty list of rules, e.g. - highest: 1")
    return tuple(value)


def _removal(key: str, value: object) -> RemovalRule:
    if not isinstance(value, RemovalRule):
        raise SpecError(key, value, _REMOVALS_FORMS)
    return value


_POSITIVE, _NON_NEGATIVE = "a number > 0", "a number >= 0"
# One check per Configuration field, in field order (checks of later fields may rely on earlier ones).
_CHECKS: dict[str, Callable[[str, object], object]] = {
    "experiment": _experiment,
    "dataset": lambda k, v: _choice(k, v, DATASETS),
    "test_fraction": lambda k, v: _number(k, v, lambda x: 0 < x < 1, "a number strictly between 0 and 1"),
    "split_seed": lambda k, v: _int(k, v, 0),
    "model": lambda k, v: _choice(k, v, MODELS),
    "depth": _size,
    "width": _size,
    "activation": lambda k, v: _choice(k, v, ACTIVATIONS),
    "optimizer": lambda k, v: _choice(k, v, OPTIMIZERS),
    "lr": lambda k, v: _number(k, v, lambda x: x > 0, _POSITIVE),
    "epochs": lambda k, v: _int(k, v, 1),
    "weight_decay": lambda k, v: _number(k, v, lambda x: x >= 0, _NON_NEGATIVE),
    "seed": lambda k, v: _int(k, v, 0),
    "methods": _methods,
    "solvers": lambda k, v: v,  # checked against the methods in __post_init__
    "test_chunk": lambda k, v: _int(k, v, 1),
    "grad_chunk": lambda k, v: _int(k, v, 1),
    "damping": lambda k, v: _number(k, v, lambda x: x >= 0, _NON_NEGATIVE),
    "damping_policy": lambda k, v: _choice(k, v, DAMPING_POLICIES),
    "test_points": _rules,
    "removals": _removal,
    "retrain_epochs": _optional(lambda k, v: _int(k, v, 0)),
    "retrain_lr": _optional(lambda k, v: _number(k, v, lambda x: x > 0, _POSITIVE)),
    "controls": lambda k, v: _int(k, v, 1),
    "perturbation": lambda k, v: _number(k, v, lambda x: x >= 0, _NON_NEGATIVE),
    "retrain_chunk": lambda k, v: _int(k, v, 1),
}


# ---- the dataclasses --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TestPointRule:
    """Which test points to study: the ``k`` highest-loss ones, the ``k`` nearest the median loss, ``k`` at
    random, or ``explicit`` indices (then ``k`` = their count)."""
    __test__ = False  # not a pytest test class, despite its name

    kind: str
    k: int = 1
    indices: tuple[int, ...] = ()

    def __post_init__(self):
        _choice("kind", self.kind, TEST_POINT_KINDS)
        if self.kind == "explicit":
            object.__setattr__(self, "indices", _indices("indices", self.indices))
            object.__setattr__(self, "k", len(self.indices))
        else:
            _int("k", self.k, 1)
            if self.indices:
                raise SpecError("indices", self.indices, f"only explicit rules take indices, not {self.kind}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "k": self.k, "indices": list(self.indices)}


@dataclass(frozen=True)
class RemovalRule:
    """Which training points to retrain without: ``all`` of them, the ``top_k`` by |estimate|, ``k`` at
    ``random``, or ``explicit`` indices (then ``k`` = their count; for ``all``, k = 0)."""
    kind: str
    k: int = 0
    indices: tuple[int, ...] = ()

    def __post_init__(self):
        _choice("kind", self.kind, REMOVAL_KINDS)
        if self.kind == "explicit":
            object.__setattr__(self, "indices", _indices("indices", self.indices))
            object.__setattr__(self, "k", len(self.indices))
        else:
            if self.kind == "all":
                object.__setattr__(self, "k", 0)
            else:
                _int("k", self.k, 1)
            if self.indices:
                raise SpecError("indices", self.indices, f"only explicit removals take indices, not {self.kind}")

    def count(self, n_train: int | None = None) -> int | None:
        """How many removals (single-point retrains) this rule asks for; None if it needs n_train unknown."""
        if self.kind == "all":
            return n_train
        if self.kind == "explicit":
            return len(self.indices)
        return self.k if n_train is None else min(self.k, n_train)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "k": self.k, "indices": list(self.indices)}


@dataclass(frozen=True)
class Resources:
    """Ray resources of one task kind (fractions are fine for small models)."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self):
        for name in ("num_cpus", "num_gpus"):
            object.__setattr__(self, name, _number(name, getattr(self, name), lambda x: x >= 0, _NON_NEGATIVE))

    def ray_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


_DEFAULT_TEST_POINTS = (TestPointRule("highest", 1), TestPointRule("median", 1))
# The fields that define the trained base model θ̂ (and so its checkpoint).
MODEL_FIELDS = ("dataset", "test_fraction", "split_seed", "model", "depth", "width", "activation",
                "optimizer", "lr", "epochs", "weight_decay", "seed")


def _hash(obj: object) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:12]


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True)
class Configuration:
    """One point of the sweep: everything needed to train θ̂, estimate influence and measure ground truth.

    Normalised on construction: ints given for floats become floats; a logistic model has depth 0 and
    width 0 (it has no hidden layers); ``retrain_epochs`` None becomes round(0.06 · epochs) and
    ``retrain_lr`` None becomes ``lr``. Raises :class:`SpecError` keyed by field name. (So
    ``dataclasses.replace(c, epochs=...)`` keeps c's resolved retrain_epochs: pass ``retrain_epochs=None``
    to re-derive it.)
    """
    experiment: str
    # data
    dataset: str = "iris"
    test_fraction: float = 0.2
    split_seed: int = 0
    # model
    model: str = "mlp"
    depth: int = 1
    width: int = 5
    activation: str = "tanh"
    # training of θ̂
    optimizer: str = "adam"
    lr: float = 0.01
    epochs: int = 4000
    weight_decay: float = 0.005
    seed: int = 0
    # influence estimation
    methods: tuple[str, ...] = ("exact",)
    damping: float = 0.01
    damping_policy: str = "if_indefinite"
    # per method its settings, named as in the papers: {method: {setting: value}} in, and after construction
    # ((method, ((setting, value), ...)), ...) with every default filled in, so the id covers them all
    solvers: object = ()
    test_chunk: int = 16  # test points per influence task
    grad_chunk: int = 1024  # training gradients held at once: peak memory is grad_chunk x parameters
    test_points: tuple[TestPointRule, ...] = _DEFAULT_TEST_POINTS
    # ground truth (warm-started retraining)
    removals: RemovalRule = RemovalRule("all")
    retrain_epochs: int | None = None  # an int after construction
    retrain_lr: float | None = None  # a float after construction
    controls: int = 3
    perturbation: float = 1e-12
    retrain_chunk: int = 128

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](f.name, getattr(self, f.name)))
        if self.model == "logistic":
            object.__setattr__(self, "depth", 0)
            object.__setattr__(self, "width", 0)
        else:
            for name in ("depth", "width"):
                if getattr(self, name) < 1:
                    raise SpecError(name, getattr(self, name), f"{name} must be an integer >= 1")
        object.__setattr__(self, "solvers", _resolve_solvers(self.methods, self.solvers))
        if self.retrain_epochs is None:
            object.__setattr__(self, "retrain_epochs", int(round(RETRAIN_FRACTION * self.epochs)))
        if self.retrain_lr is None:
            object.__setattr__(self, "retrain_lr", self.lr)

    def to_dict(self) -> dict:
        """Every field, JSON-able (rules as mappings, tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["methods"] = list(self.methods)
        out["solvers"] = {m: dict(settings) for m, settings in self.solvers}
        out["test_points"] = [r.to_dict() for r in self.test_points]
        out["removals"] = self.removals.to_dict()
        return out

    def canonical_json(self) -> str:
        """``to_dict()`` as JSON with sorted keys and no whitespace: the text ``config_id`` hashes."""
        return _canonical(self.to_dict())

    @cached_property
    def config_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]

    @cached_property
    def model_key(self) -> str:
        """12 hex of the fields in MODEL_FIELDS only: the identity of the trained checkpoint θ̂."""
        return _hash({name: getattr(self, name) for name in MODEL_FIELDS})

    def solver_settings(self, method: str) -> dict:
        """The settings of one method, every default filled in."""
        return dict(dict(self.solvers)[method])

    def label(self) -> str:
        """A short human name, e.g. ``mlp d3 w5 tanh wd0.005 s1``."""
        shape = "logistic" if self.model == "logistic" else f"mlp d{self.depth} w{self.width} {self.activation}"
        return f"{shape} wd{self.weight_decay:g} s{self.seed}"


def _resolve_solvers(methods: tuple[str, ...], given: object) -> tuple:
    """Settings of every method in `methods`, defaults filled in; settings for other methods are a mistake."""
    if isinstance(given, tuple):  # already resolved (a Configuration rebuilt from another one)
        given = {m: dict(settings) for m, settings in given}
    if not isinstance(given, dict):
        raise SpecError("solvers", given, "per-method settings are mappings, e.g. lissa: {scale: auto}")
    for method in given:
        if method not in methods:
            raise SpecError(f"influence.{method}", given[method], f"settings for {method}, which influence.methods does not "
                                                   f"run ({', '.join(methods)}); add it there or remove them")
    out = []
    for method in methods:
        allowed = METHOD_SETTINGS[method]
        body = given.get(method) or {}
        if not isinstance(body, dict):
            raise SpecError(f"influence.{method}", body, f"{method} settings are a mapping of {', '.join(allowed)}")
        for key in body:
            if key not in allowed:
                raise _unknown(f"influence.{method}", key, tuple(allowed))
        settings = tuple((k, check(f"influence.{method}.{k}", body.get(k, default))) for k, (default, check) in allowed.items())
        out.append((method, settings))
    return tuple(out)


FIELDS = tuple(f.name for f in fields(Configuration))
_NOT_SWEEPABLE = {
    "experiment": "one spec is one experiment",
    "methods": "set influence.methods; every configuration runs all of its methods",
    "solvers": "set each method's settings in the influence section, e.g. influence.lissa.scale",
    "test_points": "set test_points; every configuration studies the same rules",
    "removals": "set ground_truth.removals",
}
SWEEPABLE = tuple(name for name in FIELDS if name not in _NOT_SWEEPABLE)

# Spec file layout: section -> {key in the file: Configuration field}.
_SECTIONS = {
    "data": {"name": "dataset", "test_fraction": "test_fraction", "split_seed": "split_seed"},
    "model": {"family": "model", "depth": "depth", "width": "width", "activation": "activation"},
    "train": {"optimizer": "optimizer", "lr": "lr", "epochs": "epochs", "weight_decay": "weight_decay",
              "seed": "seed"},
    "influence": {"methods": "methods", "damping": "damping", "damping_policy": "damping_policy",
                  "test_chunk": "test_chunk", "grad_chunk": "grad_chunk"},
    "ground_truth": {"removals": "removals", "epochs": "retrain_epochs", "lr": "retrain_lr",
                     "controls": "controls", "perturbation": "perturbation", "chunk": "retrain_chunk"},
}
_TOP_KEYS = ("experiment", "data", "model", "train", "influence", "test_points", "ground_truth", "resources",
             "sweep")
_PATHS = {"experiment": "experiment", "test_points": "test_points"} | {
    flat: f"{section}.{key}" for section, keys in _SECTIONS.items() for key, flat in keys.items()}
# A sweep axis written the way the file spells it (`chunk`, `ground_truth.epochs`) -> its flat name.
_AXIS_HINTS = {key: flat for section, keys in _SECTIONS.items() for key, flat in keys.items()
               if key not in FIELDS and flat in SWEEPABLE}
_AXIS_HINTS |= {path: flat for flat, path in _PATHS.items() if flat in SWEEPABLE}
_REMOVALS_FORMS = "removals must be all, {top_k: K}, {random: K} or {explicit: [i, ...]}"
_RULE_FORMS = ("each test-point rule is a one-key mapping: highest: K, median: K, random: K or "
               "explicit: [i, ...], e.g. - highest: 1")


@dataclass(frozen=True)
class Spec:
    """A parsed spec: the base configuration, the sweep grids and the Ray resources per task kind.

    ``grids`` holds each grid's axes as written, their values checked, normalised and de-duplicated.
    ``spec_hash`` hashes what the spec computes (the experiment and its set of config_ids), so rewording the
    file, reordering sweep lists or changing resources leaves it unchanged."""
    experiment: str
    source: str
    base: Configuration
    grids: tuple[dict[str, tuple], ...]
    resources: dict[str, Resources]
    spec_hash: str
    _configurations: tuple[Configuration, ...] = field(default=(), repr=False, compare=False)

    def configurations(self) -> list[Configuration]:
        """Every configuration of the sweep, de-duplicated by config_id, in grid order (first axis outermost)."""
        if self._configurations:
            return list(self._configurations)
        # Built by hand rather than parsed: the base values are taken as given (nothing re-derived).
        values = {f.name: getattr(self.base, f.name) for f in fields(self.base)}
        return list(_expand(values, self.grids, tuple("sweep" for _ in self.grids)))

    def swept_axes(self) -> list[list[str]]:
        """Per grid, the axes with more than one value, except seed: the columns of a report table."""
        return [[axis for axis, values in grid.items() if len(values) > 1 and axis != "seed"]
                for grid in self.grids]


# ---- parsing ----------------------------------------------------------------------------------------------

def load_spec(path: str | os.PathLike) -> Spec:
    """Read and validate a spec file; every mistake is a :class:`SpecError` naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.name for p in SPECS_DIR.glob("*.yaml")))
        raise SpecError("", source, f"the specs shipped with fragile are in {SPECS_DIR}: {shipped}",
                        source, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError("", source, str(e), source, "cannot be read") from None
    try:
        data = yaml.load(text, Loader=SpecLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(where, None, problem, source, "invalid YAML") from None
    return parse_spec(data, source)


def parse_spec(data: object, source: str = "<spec>") -> Spec:
    """Validate spec data (as loaded from YAML) and expand its sweep."""
    try:
        return _parse(data, source)
    except SpecError as e:
        raise e.moved(source=source) from None


def _parse(data: object, source: str) -> Spec:
    if data is None:
        raise SpecError("", None, "a spec needs at least `experiment: NAME`", problem="the spec is empty")
    top = _mapping("", data, _TOP_KEYS)
    if "experiment" not in top:
        raise SpecError("experiment", None, "every spec names its experiment: the folder under the store, "
                                            "e.g. experiment: iris", problem="missing")
    values: dict[str, object] = {"experiment": top["experiment"]}
    for section, keys in _SECTIONS.items():
        allowed = tuple(keys) + (METHODS if section == "influence" else ())
        for key, raw in _mapping(section, top.get(section), allowed).items():
            if key in keys:
                values[keys[key]] = raw
            else:  # influence.<method>: that method's settings
                values.setdefault("solvers", {})[key] = raw
    if "removals" in values:
        values["removals"] = _removal_rule(_PATHS["removals"], values["removals"])
    if "test_points" in top:
        values["test_points"] = _test_point_rules("test_points", top["test_points"])
    resources = _resources(top.get("resources"))
    grids, grid_paths = _grids(top.get("sweep"))

    base = _configuration(values, _PATHS)
    configurations = _expand(values, grids, grid_paths)
    spec_hash = _hash({"experiment": base.experiment,
                       "configurations": sorted(c.config_id for c in configurations)})
    return Spec(base.experiment, source, base, grids, resources, spec_hash, configurations)


def _configuration(values: dict, paths: dict) -> Configuration:
    try:
        return Configuration(**values)
    except SpecError as e:
        raise e.moved(paths.get(e.key, e.key)) from None


def _expand(values: dict, grids: tuple[dict[str, tuple], ...], grid_paths: tuple[str, ...]) -> tuple:
    """The union of the grids' cartesian products over the base `values`, first occurrence of each id kept."""
    seen: dict[str, Configuration] = {}
    for grid, where in zip(grids, grid_paths):
        axes = list(grid)
        paths = _PATHS | {axis: f"{where}.{axis}" for axis in axes}
        for combo in itertools.product(*(grid[axis] for axis in axes)):
            config = _configuration(values | dict(zip(axes, combo)), paths)
            seen.setdefault(config.config_id, config)
    return tuple(seen.values())


def _mapping(path: str, value: object, allowed) -> dict:
    """A mapping whose keys are all in `allowed` (None, an empty section, counts as {})."""
    if value is None and path:
        return {}
    if not isinstance(value, dict):
        raise SpecError(path, value, f"{path or 'a spec'} must be a mapping with keys {', '.join(allowed)}")
    for key in value:
        if key not in allowed:
            raise _unknown(path, key, allowed)
    return value


def _unknown(path: str, key: object, allowed, hints: dict | None = None) -> SpecError:
    guess = (hints or {}).get(key) or _closest(key, allowed)
    return SpecError(f"{path}.{key}" if path else str(key), key,
                     f"allowed: {', '.join(allowed)}" + (f"; did you mean {guess!r}?" if guess else ""),
                     problem="unknown key")


def _one_key(path: str, value: object, kinds: tuple[str, ...], forms: str) -> tuple[str, object]:
    """``{kind: argument}`` -> (kind, argument), the kind checked against `kinds`."""
    if not isinstance(value, dict) or len(value) != 1:
        raise SpecError(path, value, forms)
    ((kind, argument),) = value.items()
    if kind not in kinds:
        raise SpecError(path, kind, f"{_leaf(path)} kind must be {_one_of(kinds, kind)}")
    return kind, argument


def _test_point_rules(path: str, value: object) -> tuple[TestPointRule, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError(path, value, "test_points must be a non-empty list of rules, e.g. - highest: 1")
    rules = []
    for i, item in enumerate(value):
        kind, argument = _one_key(f"{path}[{i}]", item, TEST_POINT_KINDS, _RULE_FORMS)
        try:
            rules.append(TestPointRule(kind, indices=argument) if kind == "explicit" else TestPointRule(kind, argument))
        except SpecError as e:
            raise e.moved(f"{path}[{i}].{kind}") from None
    return tuple(rules)


def _removal_rule(path: str, value: object) -> RemovalRule:
    if value == "all":
        return RemovalRule("all")
    if isinstance(value, str):
        raise SpecError(path, value, _REMOVALS_FORMS + ("; did you mean 'all'?" if _closest(value, ["all"]) else ""))
    kind, argument = _one_key(path, value, REMOVAL_KINDS[1:], _REMOVALS_FORMS)
    try:
        return RemovalRule(kind, indices=argument) if kind == "explicit" else RemovalRule(kind, argument)
    except SpecError as e:
        raise e.moved(f"{path}.{kind}") from None


def _resources(value: object) -> dict[str, Resources]:
    body = _mapping("resources", value, RESOURCE_KINDS)
    out = {}
    for kind in RESOURCE_KINDS:
        options = _mapping(f"resources.{kind}", body.get(kind), ("num_cpus", "num_gpus"))
        try:
            out[kind] = Resources(**options)
        except SpecError as e:
            raise e.moved(f"resources.{kind}.{e.key}") from None
    return out


_SWEEP_FORMS = "sweep must be a grid (axis: [values, ...]) or a non-empty list of grids; omit it for one configuration"


def _grids(value: object) -> tuple[tuple[dict[str, tuple], ...], tuple[str, ...]]:
    """The sweep as (grids, their key paths); each grid axis -> its values, checked and de-duplicated."""
    if value is None:
        return ({},), ("sweep",)
    if isinstance(value, dict):
        items = [(value, "sweep")]
    elif isinstance(value, list) and value:
        items = [(grid, f"sweep[{i}]") for i, grid in enumerate(value)]
    else:
        raise SpecError("sweep", value, _SWEEP_FORMS)
    grids = []
    for grid, where in items:
        if not isinstance(grid, dict):
            raise SpecError(where, grid, "each grid is a mapping axis: [values, ...], e.g. depth: [1, 2]")
        checked = {}
        for axis, values in grid.items():
            path = f"{where}.{axis}"
            if axis in _NOT_SWEEPABLE:
                raise SpecError(path, axis, _NOT_SWEEPABLE[axis], problem="not sweepable")
            if axis not in SWEEPABLE:
                raise _unknown(where, axis, SWEEPABLE, _AXIS_HINTS)
            if not isinstance(values, list):
                raise SpecError(path, values, f"sweep values must be a list, e.g. {axis}: [{_show(values)}]")
            if not values:
                raise SpecError(path, values, "a sweep list needs at least one value")
            checked[axis] = tuple(dict.fromkeys(_CHECKS[axis](path, v) for v in values))
        grids.append(checked)
    return tuple(grids), tuple(where for _, where in items)
