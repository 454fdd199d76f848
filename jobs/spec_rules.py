"""The rules and resources a spec is made of: which test points, which removals, which Ray resources.

Frozen dataclasses validated on construction (each mistake a :class:`SpecError` keyed by field), and the
parsers that turn a spec's `test_points` and `ground_truth.removals` into them, used by :mod:`jobs.spec` for
every configuration. Kept apart from it so that the configuration module stays about the
configuration; cheap to import (no torch, no ray).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from jobs.spec_checks import (
    REMOVAL_KINDS, TEST_POINT_KINDS, SpecError, _choice, _closest, _indices, _int, _leaf, _number, _one_of,
    _percent,
)

_NON_NEGATIVE = "a number >= 0"


@dataclass(frozen=True)
class TestPointRule:
    """Which test points to study: the ``k`` highest-loss ones, the ``k`` nearest the median loss, the ``k``
    nearest the ``at``-th ``percentile`` of the loss, ``k`` at random, or ``explicit`` indices (then ``k`` =
    their count)."""
    __test__ = False  # not a pytest test class, despite its name

    kind: str
    k: int = 1
    indices: tuple[int, ...] = ()
    at: float | None = None  # the percentile, for kind "percentile" only

    def __post_init__(self):
        _choice("kind", self.kind, TEST_POINT_KINDS)
        if self.kind == "explicit":
            object.__setattr__(self, "indices", _indices("indices", self.indices))
            object.__setattr__(self, "k", len(self.indices))
        else:
            _int("k", self.k, 1)
            if self.indices:
                raise SpecError("indices", self.indices, f"only explicit rules take indices, not {self.kind}")
        _check_at(self.kind, self.at, self)

    def rule(self) -> tuple:
        """The rule as influence.scores.select_test_points takes it."""
        if self.kind == "explicit":
            return ("explicit", list(self.indices))
        if self.kind == "percentile":
            return ("percentile", (self.at, self.k))
        return (self.kind, self.k)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "k": self.k, "indices": list(self.indices)}
        return out if self.at is None else {**out, "at": self.at}


def _check_at(kind: str, at: object, rule: object) -> None:
    if kind == "percentile":
        if at is None:
            raise SpecError("at", at, "a percentile rule needs at: P, the percentile (0-100)")
        object.__setattr__(rule, "at", _percent("at", at))
    elif at is not None:
        raise SpecError("at", at, f"only percentile rules take at, not {kind}")


@dataclass(frozen=True)
class RemovalRule:
    """Which training points to retrain without: ``all`` of them, the ``top_k`` by |estimate|, the ``k``
    nearest the ``at``-th ``percentile`` of the estimates, ``k`` at ``random``, or ``explicit`` indices (then
    ``k`` = their count; for ``all``, k = 0). ``group``: retrain without the ``k`` points of highest estimate
    TOGETHER (one group per test point) and, for comparison, without ``groups`` random groups of ``k`` points:
    the protocol for data sets so large that one point's effect is below the training noise."""
    kind: str
    k: int = 0
    indices: tuple[int, ...] = ()
    at: float | None = None  # the percentile, for kind "percentile" only
    groups: int = 0  # random groups, for kind "group" only

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
        _check_at(self.kind, self.at, self)
        if self.kind == "group":
            _int("random", self.groups, 1)
        elif self.groups:
            raise SpecError("random", self.groups, f"only group removals take random groups, not {self.kind}")

    def count(self, n_train: int | None = None, n_test: int = 1) -> int | None:
        """How many retrains (single points, or groups) this rule asks for, at most; None if it needs n_train
        unknown. Rules chosen per test point (top_k, percentile, group) may pick up to k per test point."""
        if self.kind == "all":
            return n_train
        if self.kind == "explicit":
            return len(self.indices)
        if self.kind == "group":
            return n_test + self.groups
        if self.kind == "random":
            return self.k if n_train is None else min(self.k, n_train)
        k = self.k * n_test
        return k if n_train is None else min(k, n_train)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "k": self.k, "indices": list(self.indices)}
        if self.at is not None:
            out["at"] = self.at
        if self.kind == "group":
            out["groups"] = self.groups
        return out


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "t": 1000 ** 4,
          "ki": 1024, "mi": 1024 ** 2, "gi": 1024 ** 3, "ti": 1024 ** 4}


def memory_bytes(key: str, value: object) -> int:
    """A memory size: bytes as an integer, or a string such as ``16GiB``, ``512MB``, ``2G``."""
    if isinstance(value, bool):
        raise SpecError(key, value, "memory is bytes (an integer) or a size such as 16GiB or 512MB")
    if isinstance(value, int) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise SpecError(key, value, "memory is bytes (an integer) or a size such as 16GiB or 512MB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Resources:
    """Ray resources of one task kind (fractions are fine for small models); ``memory`` in bytes, None for
    Ray's default (no reservation)."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None
    # train only: data-parallel workers, each with the resources above (1: one task trains alone)
    workers: int = 1

    def __post_init__(self):
        for name in ("num_cpus", "num_gpus"):
            object.__setattr__(self, name, _number(name, getattr(self, name), lambda x: x >= 0, _NON_NEGATIVE))
        if self.memory is not None:
            object.__setattr__(self, "memory", memory_bytes("memory", self.memory))
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise SpecError("workers", self.workers, "workers must be an integer >= 1 (data-parallel training "
                                                     "workers; 1 trains in one task)")

    def ray_options(self) -> dict:
        """The Ray options of one task (with workers > 1: of each worker)."""
        options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            options["memory"] = self.memory
        return options


def check_training_workers(train: Resources, configurations) -> None:
    """Data-parallel training (resources.train.workers > 1) takes adam or sgd steps, and train.checkpoint_every is
    a setting of it alone."""
    for cfg in configurations:
        if train.workers > 1:
            if cfg.optimizer == "lbfgs":
                raise SpecError("resources.train.workers", train.workers,
                                "data-parallel training takes adam or sgd steps (L-BFGS runs on one worker): set "
                                "workers to 1, or change train.optimizer")
            if train.num_gpus not in (0, 1):
                raise SpecError("resources.train.num_gpus", train.num_gpus,
                                "data-parallel workers take a whole GPU each (NCCL cannot share one between "
                                "workers): set num_gpus to 1, or 0 for CPU workers (gloo)")
            if cfg.mixed_precision and not train.num_gpus:
                raise SpecError("resources.train.num_gpus", train.num_gpus,
                                "mixed precision runs on CUDA: give each data-parallel worker num_gpus: 1, or set "
                                "train.mixed_precision: false")
        elif cfg.train_checkpoint_every is not None:
            raise SpecError("train.checkpoint_every", cfg.train_checkpoint_every,
                            "saves the progress of data-parallel training: set resources.train.workers > 1 too, or "
                            "remove it (one worker trains in one task, which reruns whole)")


# ---- from a spec's YAML to rules ----------------------------------------------------------------------------

def check_test_points(key: str, value: object) -> tuple[TestPointRule, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(r, TestPointRule) for r in value):
        raise SpecError(key, value, "test_points must be a non-empty list of rules, e.g. - highest: 1")
    return tuple(value)


def check_removals(key: str, value: object) -> tuple[RemovalRule, ...]:
    rules = (value,) if isinstance(value, RemovalRule) else value
    if not isinstance(rules, (list, tuple)) or not rules or not all(isinstance(r, RemovalRule) for r in rules):
        raise SpecError(key, value, _REMOVALS_FORMS)
    kinds = [r.kind for r in rules]
    if len(rules) > 1 and ({"all", "group"} & set(kinds)):
        raise SpecError(key, kinds, "all and group removals cannot be combined with other rules")
    if len(set(kinds)) < len(kinds):
        raise SpecError(key, kinds, "each removal kind at most once in a list")
    return tuple(rules)


_REMOVALS_FORMS = ("removals must be all, {top_k: K}, {percentile: {at: P, k: K}}, {random: K}, "
                   "{explicit: [i, ...]}, {group: {k: K, random: G}}, or a list of single-point rules")
_RULE_FORMS = ("each test-point rule is a one-key mapping: highest: K, median: K, percentile: P (or {at: P, k: K}), "
               "random: K or explicit: [i, ...], e.g. - highest: 1")


def _one_key(path: str, value: object, kinds: tuple[str, ...], forms: str) -> tuple[str, object]:
    """``{kind: argument}`` -> (kind, argument), the kind checked against `kinds`."""
    if not isinstance(value, dict) or len(value) != 1:
        raise SpecError(path, value, forms)
    ((kind, argument),) = value.items()
    if kind not in kinds:
        raise SpecError(path, kind, f"{_leaf(path)} kind must be {_one_of(kinds, kind)}")
    return kind, argument


def parse_test_points(path: str, value: object) -> tuple[TestPointRule, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError(path, value, "test_points must be a non-empty list of rules, e.g. - highest: 1")
    rules = []
    for i, item in enumerate(value):
        kind, argument = _one_key(f"{path}[{i}]", item, TEST_POINT_KINDS, _RULE_FORMS)
        try:
            if kind == "explicit":
                rules.append(TestPointRule(kind, indices=argument))
            elif kind == "percentile":
                at, k = _keyed(argument, {"at": None, "k": 1}, "at", "percentile: P or percentile: {at: P, k: K}")
                rules.append(TestPointRule(kind, k, at=at))
            else:
                rules.append(TestPointRule(kind, argument))
        except SpecError as e:
            raise e.moved(f"{path}[{i}].{kind}") from None
    return tuple(rules)


def _keyed(argument: object, defaults: dict, bare: str, forms: str) -> tuple:
    """`P` or `{at: P, k: K}` -> the values of `defaults`' keys in order; a bare value is the `bare` key."""
    if not isinstance(argument, dict):
        argument = {bare: argument}
    unknown = [k for k in argument if k not in defaults]
    if unknown:
        raise SpecError(unknown[0], argument, forms, problem="unknown key")
    missing = [k for k, v in defaults.items() if v is None and k not in argument]
    if missing:
        raise SpecError(missing[0], argument, forms, problem="missing")
    return tuple(argument.get(k, v) for k, v in defaults.items())


def parse_removals(path: str, value: object) -> tuple[RemovalRule, ...]:
    if isinstance(value, list):
        if not value:
            raise SpecError(path, value, _REMOVALS_FORMS)
        rules = tuple(r for i, item in enumerate(value) for r in parse_removals(f"{path}[{i}]", item))
        try:
            return check_removals(path, rules)
        except SpecError as e:
            raise e.moved(path) from None
    if value == "all":
        return (RemovalRule("all"),)
    if isinstance(value, str):
        raise SpecError(path, value, _REMOVALS_FORMS + ("; did you mean 'all'?" if _closest(value, ["all"]) else ""))
    kind, argument = _one_key(path, value, REMOVAL_KINDS[1:], _REMOVALS_FORMS)
    try:
        if kind == "explicit":
            return (RemovalRule(kind, indices=argument),)
        if kind == "percentile":
            at, k = _keyed(argument, {"at": None, "k": None}, "at", "percentile: {at: P, k: K}")
            return (RemovalRule(kind, k, at=at),)
        if kind == "group":
            k, groups = _keyed(argument, {"k": None, "random": None}, "k", "group: {k: K, random: G}")
            return (RemovalRule(kind, k, groups=groups),)
        return (RemovalRule(kind, argument),)
    except SpecError as e:
        raise e.moved(f"{path}.{kind}" if e.key in ("k", "indices", "kind") else f"{path}.{kind}.{e.key}") from None
