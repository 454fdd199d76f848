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
import math
import os
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Callable

from jobs.spec_checks import (  # noqa: F401 (the vocabulary is part of this module's interface)
    ACTIVATIONS, DAMPING_POLICIES, DATASETS, DTYPES, FILE_DATASETS, GROUND_TRUTHS, IMAGE_MODELS, METHODS, MODELS,
    OPTIMIZERS, REMOVAL_KINDS, RESOURCE_KINDS, RETRAIN_STARTS, SCHEDULES, TEST_POINT_KINDS, TRUTH_FIELDS,
    TRUTH_MEASUREMENTS, TRUTH_SETTINGS, METHOD_SETTINGS, SpecError, _bool,
    _choice, _classes, _closest, _data_root, _experiment, _indices, _int, _methods, _number,
    _optional, _percent, _show, _size, _subset,
)
from jobs.spec_rules import (  # noqa: F401 (part of this module's interface)
    RemovalRule, Resources, TestPointRule, check_removals, check_test_points, check_training_workers, parse_removals,
    parse_test_points,
)
from jobs.spec_yaml import read_spec_file

SPECS_DIR = Path(__file__).resolve().parent / "specs"
RETRAIN_FRACTION = 0.06  # warm-start retraining for 6% of the training epochs (Koh & Liang's code)


_POSITIVE, _NON_NEGATIVE = "a number > 0", "a number >= 0"
# One check per Configuration field, in field order (checks of later fields may rely on earlier ones).
_CHECKS: dict[str, Callable[[str, object], object]] = {
    "experiment": _experiment,
    "dataset": lambda k, v: _choice(k, v, DATASETS),
    "test_fraction": lambda k, v: _number(k, v, lambda x: 0 < x < 1, "a number strictly between 0 and 1"),
    "split_seed": lambda k, v: _int(k, v, 0),
    "data_root": _optional(_data_root),
    "subset": _optional(_subset),
    "test_subset": _optional(lambda k, v: _int(k, v, 1)),
    "classes": _optional(_classes),
    "per_class": _optional(lambda k, v: _int(k, v, 1)),
    "image_size": _optional(lambda k, v: _int(k, v, 8)),
    "model": lambda k, v: _choice(k, v, MODELS),
    "depth": _size,
    "width": _size,
    "activation": lambda k, v: _choice(k, v, ACTIVATIONS),
    "optimizer": _optional(lambda k, v: _choice(k, v, OPTIMIZERS)),
    "lr": _optional(lambda k, v: _number(k, v, lambda x: x > 0, _POSITIVE)),
    "epochs": lambda k, v: _int(k, v, 1),
    "weight_decay": lambda k, v: _number(k, v, lambda x: x >= 0, _NON_NEGATIVE),
    "seed": lambda k, v: _int(k, v, 0),
    "momentum": lambda k, v: _number(k, v, lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "batch_size": _optional(lambda k, v: _int(k, v, 1)),
    "schedule": lambda k, v: _choice(k, v, SCHEDULES),
    "mixed_precision": _bool,
    "dtype": lambda k, v: _choice(k, v, DTYPES),
    "methods": _methods,
    "solvers": lambda k, v: v,  # checked against the methods in __post_init__
    "test_chunk": lambda k, v: _int(k, v, 1),
    "grad_chunk": lambda k, v: _int(k, v, 1),
    "train_shard": _optional(lambda k, v: _int(k, v, 1)),
    "damping": lambda k, v: _number(k, v, lambda x: x >= 0, _NON_NEGATIVE),
    "damping_policy": lambda k, v: _choice(k, v, DAMPING_POLICIES),
    "test_points": check_test_points,
    "removals": check_removals,
    "retrain_start": lambda k, v: _choice(k, v, RETRAIN_STARTS),
    "retrain_epochs": _optional(lambda k, v: _int(k, v, 0)),
    "retrain_lr": _optional(lambda k, v: _number(k, v, lambda x: x > 0, _POSITIVE)),
    "controls": lambda k, v: _int(k, v, 1),
    "perturbation": lambda k, v: _number(k, v, lambda x: x >= 0, _NON_NEGATIVE),
    "retrain_chunk": lambda k, v: _int(k, v, 1),
    "grad_tol": _optional(lambda k, v: _number(k, v, lambda x: x > 0, _POSITIVE)),
    "replicates": lambda k, v: _int(k, v, 1),
    "retrain_checkpoint_every": _optional(lambda k, v: _int(k, v, 1)),
    "train_checkpoint_every": _optional(lambda k, v: _int(k, v, 1)),
    "ground_truth": lambda k, v: _choice(k, v, TRUTH_FIELDS),
    "truth_settings": lambda k, v: v,  # checked against the kind in __post_init__
}


_DEFAULT_TEST_POINTS = (TestPointRule("highest", 1), TestPointRule("median", 1))
# The fields that define the trained base model θ̂ (and so its checkpoint).
MODEL_FIELDS = ("dataset", "test_fraction", "split_seed", "data_root", "subset", "test_subset", "classes",
                "per_class", "image_size", "model", "depth", "width", "activation", "optimizer", "lr", "epochs",
                "weight_decay", "seed", "momentum", "batch_size", "schedule", "mixed_precision", "dtype",
                "grad_tol")


def later(default: object):
    """A Configuration field added after the first results were stored, with its ``default``: left out of the
    canonical JSON (so of config_id and model_key) while it holds that default, so configurations written
    before it existed keep their ids and resume. Every field added from now on must be declared with it."""
    return field(default=default, metadata={"later": True})


def measurement(default: object):
    """A field that says how much of a measurement to take, not what is measured (the replicates of the
    ground truth): never part of the canonical JSON, so of config_id, so that asking for more of it resumes
    the same configuration and computes only what is new. Not sweepable (a sweep over it would collapse to
    one configuration); the rows it produces record it."""
    return field(default=default, metadata={"later": True, "measurement": True})


def runtime(default: object):
    """A field that says how the work is run, not what it computes (how often a long retrain saves its
    progress): like a :func:`measurement`, never part of the canonical JSON, so changing it resumes the same
    configuration, and not sweepable."""
    return field(default=default, metadata={"later": True, "runtime": True})


def _hash(obj: object) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:12]


def _without_later_defaults(d: dict) -> dict:
    return {k: v for k, v in d.items()
            if not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k]) and k not in _NOT_IN_ID}


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True)
class Configuration:
    """One point of the sweep: everything needed to train θ̂, estimate influence and measure ground truth.

    Normalised on construction: ints given for floats become floats; a logistic model has depth 0 and
    width 0 (it has no hidden layers); ``optimizer`` None becomes "lbfgs" for a logistic model trained full
    batch at a constant rate and "adam" otherwise, ``lr`` None 1.0 for L-BFGS and 0.01 otherwise;
    ``retrain_epochs`` None becomes round(0.06 · epochs) and
    ``retrain_lr`` None becomes ``lr``. Raises :class:`SpecError` keyed by field name. (So
    ``dataclasses.replace(c, epochs=...)`` keeps c's resolved retrain_epochs: pass ``retrain_epochs=None``
    to re-derive it.)
    """
    experiment: str
    # data
    dataset: str = "iris"
    test_fraction: float = 0.2
    split_seed: int = 0
    data_root: str | None = later(None)  # local folder or s3:// URI holding mnist / cifar10 / imagenet files
    subset: float | int | None = later(None)  # a fraction or count of the training points (stratified, by split_seed)
    test_subset: int | None = later(None)  # a count of test points
    classes: int | tuple[str, ...] | None = later(None)  # imagenet: the first k class folders, or these ones
    per_class: int | None = later(None)  # imagenet: the first m training images of each class
    image_size: int | None = later(None)  # imagenet: side of the centre crop (default 224)
    # model
    model: str = "mlp"
    depth: int = 1
    width: int = 5
    activation: str = "tanh"
    # training of θ̂. optimizer None: L-BFGS for a convex model trained full batch at a constant rate (the
    # logistic model: training and every retrain then reach the optimum the influence function is derived
    # at), else Adam; lr None: 1.0 for L-BFGS (its line search's first step), else 0.01.
    optimizer: str | None = None  # a name after construction
    lr: float | None = None  # a float after construction
    epochs: int = 4000
    weight_decay: float = 0.005
    seed: int = 0
    momentum: float = later(0.9)  # sgd only
    batch_size: int | None = later(None)  # None: full batch
    schedule: str = later("constant")
    mixed_precision: bool = later(False)  # bfloat16 autocast of the forward, on CUDA only
    dtype: str = later("float64")
    # influence estimation
    methods: tuple[str, ...] = ("exact",)
    damping: float = 0.01
    damping_policy: str = "if_indefinite"
    # per method its settings, named as in the papers: {method: {setting: value}} in, and after construction
    # ((method, ((setting, value), ...)), ...) with every default filled in, so the id covers them all
    solvers: object = ()
    test_chunk: int = 16  # test points per influence task
    grad_chunk: int = 1024  # training gradients held at once: peak memory is grad_chunk x parameters
    # training points per influence task (None: every training point in the task that solves): with a shard
    # size, each (method, chunk of test points) is solved once into a stored `ihvp` artifact and its estimates
    # are tasks over shards of the training set
    train_shard: int | None = later(None)
    test_points: tuple[TestPointRule, ...] = _DEFAULT_TEST_POINTS
    # ground truth (warm-started retraining)
    removals: tuple[RemovalRule, ...] = (RemovalRule("all"),)
    retrain_start: str = later("warm")  # warm: from θ̂ for retrain_epochs; scratch: from θ0, the full schedule
    retrain_epochs: int | None = None  # an int after construction
    retrain_lr: float | None = None  # a float after construction
    controls: int = 3
    perturbation: float = 1e-12
    retrain_chunk: int = 128
    # θ̂ must be a stationary point: ‖∇R(θ̂)‖₂ <= grad_tol, else its configuration is flagged (None: no check).
    # L-BFGS also stops there.
    grad_tol: float | None = later(None)
    # Independent draws of the training noise under which every removal and its paired control are retrained
    # (replicate 0 is the protocol as it was before replicates; the ground truth is the replicates' mean).
    replicates: int = measurement(1)
    # A retrain run longer than this many optimiser steps saves its progress (parameters, optimiser state, step)
    # to the store that often, and a rerun after a failure or preemption continues from it (None: never).
    retrain_checkpoint_every: int | None = runtime(None)
    # Data-parallel training (resources.train.workers > 1) saves its progress this often (optimiser steps), and a
    # worker group restarted after a failure continues from it (None: it starts again).
    train_checkpoint_every: int | None = runtime(None)
    # What the ground truth is (ground_truth.kind): "loo", leave-one-out retraining (retrain_start says from
    # where), a response solved from θ̂ for every removal, "pbrf" or "last_layer" (influence/truths.py), or
    # "lds", models retrained on random subsets (jobs/protocol.py lds_subsets).
    # Its settings ground_truth.<kind> in, and after construction ((setting, value), ...) with every default
    # filled in (empty for loo).
    ground_truth: str = later("loo")
    truth_settings: object = later(())

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](f.name, getattr(self, f.name)))
        if self.model == "logistic" or self.model in IMAGE_MODELS:
            object.__setattr__(self, "depth", 0)
            object.__setattr__(self, "width", 0)
        else:
            for name in ("depth", "width"):
                if getattr(self, name) < 1:
                    raise SpecError(name, getattr(self, name), f"{name} must be an integer >= 1")
        object.__setattr__(self, "solvers", _resolve_solvers(self.methods, self.solvers))
        self._check_data()
        if self.optimizer is None:
            plain = self.batch_size is None and self.schedule == "constant" and not self.mixed_precision
            object.__setattr__(self, "optimizer", "lbfgs" if self.model == "logistic" and plain else "adam")
        if self.lr is None:
            object.__setattr__(self, "lr", 1.0 if self.optimizer == "lbfgs" else 0.01)
        if self.optimizer == "lbfgs":
            for name, allowed in (("batch_size", None), ("schedule", "constant"), ("mixed_precision", False)):
                if getattr(self, name) != allowed:
                    raise SpecError(name, getattr(self, name), f"L-BFGS takes full-batch steps with a line search: "
                                                               f"set {name} to {_show(allowed)} or use adam or sgd")
        if self.optimizer == "lbfgs" and self.retrain_checkpoint_every is not None:
            raise SpecError("retrain_checkpoint_every", self.retrain_checkpoint_every,
                            "L-BFGS retrains cannot resume from saved progress (their curvature pairs and line "
                            "search are not saved): remove ground_truth.checkpoint_every, or train with adam or sgd")
        if self.mixed_precision and self.dtype != "float32":
            raise SpecError("mixed_precision", True, "mixed precision trains a float32 model in bfloat16: set "
                                                     "train.dtype: float32 as well")
        if self.retrain_epochs is None:
            full = self.retrain_start == "scratch"
            object.__setattr__(self, "retrain_epochs", self.epochs if full else int(round(RETRAIN_FRACTION * self.epochs)))
        if self.retrain_lr is None:
            object.__setattr__(self, "retrain_lr", self.lr)
        self._resolve_truth()

    def _resolve_truth(self) -> None:
        """Fill the ground truth's settings in. A solved ground truth has no training noise: one control (the
        solve with nothing removed), one replicate, no retraining epochs, so retraining settings given for the
        leave-one-out kinds of the same spec leave its id alone."""
        given = self.truth_settings
        if isinstance(given, tuple):
            given = dict(given)
        if not isinstance(given, dict):
            raise SpecError("truth_settings", given, "ground-truth settings are a mapping, e.g. pbrf: {tol: 1e-10}")
        if self.ground_truth == "loo":
            if given:
                raise SpecError("truth_settings", given, "leave-one-out retraining takes its settings from "
                                                         "ground_truth.epochs, lr, controls, ...")
            return
        allowed = TRUTH_SETTINGS[self.ground_truth]
        for key in given:
            if key not in allowed:
                raise _unknown(f"ground_truth.{self.ground_truth}", key, tuple(allowed))
        settings = {k: check(f"ground_truth.{self.ground_truth}.{k}", given.get(k, default))
                    for k, (default, check) in allowed.items()}
        if self.ground_truth == "lds":
            self._resolve_lds(settings)
            return
        if settings["damping"] is None:
            derived = 0.0 if self.ground_truth == "last_layer" and self.weight_decay > 0 else self.damping
            settings["damping"] = derived
        if self.ground_truth == "last_layer" and self.weight_decay == 0 and settings["damping"] == 0:
            raise SpecError("ground_truth.last_layer.damping", 0.0, "without weight decay the last layer's refit "
                                                                    "needs damping > 0: features that separate the "
                                                                    "classes have no minimum")
        object.__setattr__(self, "truth_settings", tuple(sorted(settings.items())))
        for name, value in (("controls", 1), ("replicates", 1), ("retrain_epochs", 0), ("retrain_lr", self.lr),
                            ("retrain_start", "warm"), ("perturbation", 0.0), ("retrain_checkpoint_every", None)):
            object.__setattr__(self, name, value)

    def _resolve_lds(self, settings: dict) -> None:
        """Each subset model is retrained like a leave-one-out retrain from its start (scratch: θ̂'s schedule;
        warm: ground_truth.epochs), with one control (the full set, trained alike) and the spec's replicates."""
        object.__setattr__(self, "truth_settings", tuple(sorted(settings.items())))
        object.__setattr__(self, "retrain_start", settings["start"])
        if settings["start"] == "scratch":
            object.__setattr__(self, "retrain_epochs", self.epochs)
        object.__setattr__(self, "controls", 1)
        object.__setattr__(self, "perturbation", 0.0)

    @property
    def truth(self) -> str:
        """The ground truth's name as rows record it: loo_warm, loo_scratch, pbrf, last_layer or lds."""
        return f"loo_{self.retrain_start}" if self.ground_truth == "loo" else self.ground_truth

    def truth_setting(self, name: str) -> object:
        return dict(self.truth_settings)[name]

    def _check_data(self) -> None:
        image_data = self.dataset not in ("iris", "synthetic")
        if self.model in IMAGE_MODELS and not image_data:
            raise SpecError("model", self.model, f"{self.model} needs image data ({', '.join(d for d in DATASETS if d not in ('iris', 'synthetic'))}); "
                                                 f"{self.dataset} has flat features")
        if self.dataset in FILE_DATASETS and self.data_root is None:
            raise SpecError("data_root", None, f"{self.dataset} is read from files: set data.root to the folder (or "
                                               f"s3:// URI) that holds them; `fragile data tiny {self.dataset} DIR` "
                                               f"writes a tiny set in the real format", problem="missing")
        for name in ("data_root", "subset", "test_subset"):
            if getattr(self, name) is not None and self.dataset not in FILE_DATASETS + ("digits",):
                raise SpecError(name, getattr(self, name), f"only for digits, {', '.join(FILE_DATASETS)}; "
                                                           f"{self.dataset} has a fixed size")
        if self.data_root is not None and self.dataset not in FILE_DATASETS:
            raise SpecError("data_root", self.data_root, f"{self.dataset} ships with scikit-learn; data.root is "
                                                         f"for {', '.join(FILE_DATASETS)}")
        for name in ("classes", "per_class", "image_size"):
            if getattr(self, name) is not None and self.dataset != "imagenet":
                raise SpecError(name, getattr(self, name), "only for imagenet")

    def to_dict(self) -> dict:
        """Every field, JSON-able (rules as mappings, tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["methods"] = list(self.methods)
        out["solvers"] = {m: dict(settings) for m, settings in self.solvers}
        out["test_points"] = [r.to_dict() for r in self.test_points]
        # One rule stays a mapping (as before lists of rules existed), so old ids are unchanged.
        rules = [r.to_dict() for r in self.removals]
        out["removals"] = rules[0] if len(rules) == 1 else rules
        if isinstance(self.classes, tuple):
            out["classes"] = list(self.classes)
        out["truth_settings"] = dict(self.truth_settings)
        return out

    def canonical_json(self) -> str:
        """``to_dict()`` as JSON with sorted keys and no whitespace: the text ``config_id`` hashes. Fields
        added later are left out while they hold their defaults (see :func:`later`)."""
        return _canonical(_without_later_defaults(self.to_dict()))

    @cached_property
    def config_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]

    @cached_property
    def model_key(self) -> str:
        """12 hex of the fields in MODEL_FIELDS only: the identity of the trained checkpoint θ̂."""
        d = self.to_dict()
        return _hash(_without_later_defaults({name: d[name] for name in MODEL_FIELDS}))

    @property
    def image_model(self) -> bool:
        return self.model in IMAGE_MODELS

    def data_options(self) -> dict:
        """The keyword arguments of influence.data.load_dataset for this configuration's data (the root is
        resolved separately: an s3:// root is copied to a local cache first)."""
        out = {"split_seed": self.split_seed, "test_fraction": self.test_fraction}
        for name in ("subset", "test_subset", "classes", "per_class", "image_size"):
            if getattr(self, name) is not None:
                out[name] = list(self.classes) if name == "classes" and isinstance(self.classes, tuple) else getattr(self, name)
        return out

    def solver_settings(self, method: str) -> dict:
        """The settings of one method, every default filled in."""
        return dict(dict(self.solvers)[method])

    def label(self) -> str:
        """A short human name, e.g. ``mlp d3 w5 tanh wd0.005 s1``."""
        if self.model == "logistic" or self.image_model:
            shape = self.model
        else:
            shape = f"mlp d{self.depth} w{self.width} {self.activation}"
        return f"{shape} wd{self.weight_decay:g} s{self.seed}"


# The fields declared with later(), and the defaults they are left out at.
_LATER_DEFAULTS = {f.name: f.default for f in fields(Configuration) if f.metadata.get("later")}
_LATER_DEFAULTS["truth_settings"] = {}  # as to_dict() writes the empty settings of leave-one-out
# Fields that are None only until construction resolves them (Configuration.__post_init__): never null after.
RESOLVED_FIELDS = ("optimizer", "lr", "retrain_epochs", "retrain_lr")
# The fields declared with measurement() or runtime(): never in the canonical JSON.
_NOT_IN_ID = frozenset(f.name for f in fields(Configuration)
                       if f.metadata.get("measurement") or f.metadata.get("runtime"))


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
    "replicates": "set ground_truth.replicates; a configuration's replicates are one measurement, and a "
                  "rerun with more of them computes only the new ones",
    "retrain_checkpoint_every": "set ground_truth.checkpoint_every; how often a retrain saves its progress "
                                "does not change what it computes",
    "train_checkpoint_every": "set train.checkpoint_every; how often training saves its progress does not change "
                              "what it computes",
    "ground_truth": "set ground_truth.kind: a list of ground truths runs them side by side on the same models",
    "truth_settings": "set each ground truth's settings in the ground_truth section, e.g. ground_truth.pbrf.tol",
}
SWEEPABLE = tuple(name for name in FIELDS if name not in _NOT_SWEEPABLE)

# Spec file layout: section -> {key in the file: Configuration field}.
_SECTIONS = {
    "data": {"name": "dataset", "test_fraction": "test_fraction", "split_seed": "split_seed", "root": "data_root",
             "subset": "subset", "test_subset": "test_subset", "classes": "classes", "per_class": "per_class",
             "image_size": "image_size"},
    "model": {"family": "model", "depth": "depth", "width": "width", "activation": "activation"},
    "train": {"optimizer": "optimizer", "lr": "lr", "epochs": "epochs", "weight_decay": "weight_decay",
              "seed": "seed", "momentum": "momentum", "batch_size": "batch_size", "schedule": "schedule",
              "mixed_precision": "mixed_precision", "dtype": "dtype", "grad_tol": "grad_tol",
              "checkpoint_every": "train_checkpoint_every"},
    "influence": {"methods": "methods", "damping": "damping", "damping_policy": "damping_policy",
                  "test_chunk": "test_chunk", "grad_chunk": "grad_chunk", "train_shard": "train_shard"},
    "ground_truth": {"removals": "removals", "start": "retrain_start", "epochs": "retrain_epochs", "lr": "retrain_lr",
                     "controls": "controls", "perturbation": "perturbation", "chunk": "retrain_chunk",
                     "replicates": "replicates", "checkpoint_every": "retrain_checkpoint_every"},
}
# Keys of the ground_truth section that are not Configuration fields: the list of kinds and their settings.
_TRUTH_KEYS = ("kind",) + tuple(TRUTH_SETTINGS)
_TOP_KEYS = ("experiment", "data", "model", "train", "influence", "test_points", "ground_truth", "resources",
             "sweep")
_PATHS = {"experiment": "experiment", "test_points": "test_points"} | {
    flat: f"{section}.{key}" for section, keys in _SECTIONS.items() for key, flat in keys.items()}
# A sweep axis written the way the file spells it (`chunk`, `ground_truth.epochs`) -> its flat name.
_AXIS_HINTS = {key: flat for section, keys in _SECTIONS.items() for key, flat in keys.items()
               if key not in FIELDS and flat in SWEEPABLE}
_AXIS_HINTS |= {path: flat for flat, path in _PATHS.items() if flat in SWEEPABLE}
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
        """Per grid, the axes with more than one value, except seed, and ground_truth where ground_truth.kind
        lists several: the columns of a report table."""
        truths = ["ground_truth"] if len({c.truth for c in self.configurations()}) > 1 else []
        return [[axis for axis, values in grid.items() if len(values) > 1 and axis != "seed"] + truths
                for grid in self.grids]


# ---- parsing ----------------------------------------------------------------------------------------------

def load_spec(path: str | os.PathLike, *, max_configurations: int | None = None) -> Spec:
    """Read and validate a spec file; every mistake is a :class:`SpecError` naming the file.

    ``max_configurations``: a sweep whose grids would expand to more configurations is refused before it is
    expanded (expanding a runaway grid would itself take hours and all memory)."""
    source = str(path)
    data = read_spec_file(path, SPECS_DIR)
    return parse_spec(data, source, max_configurations=max_configurations)


def parse_spec(data: object, source: str = "<spec>", *, max_configurations: int | None = None) -> Spec:
    """Validate spec data (as loaded from YAML) and expand its sweep (see ``load_spec``)."""
    try:
        return _parse(data, source, max_configurations)
    except SpecError as e:
        raise e.moved(source=source) from None


def grid_size(grids: tuple[dict[str, tuple], ...]) -> int:
    """How many configurations the grids list before de-duplication (an upper bound of the sweep's size)."""
    return sum(math.prod(len(values) for values in grid.values()) for grid in grids)


def _parse(data: object, source: str, max_configurations: int | None = None) -> Spec:
    if data is None:
        raise SpecError("", None, "a spec needs at least `experiment: NAME`", problem="the spec is empty")
    top = _mapping("", data, _TOP_KEYS)
    if "experiment" not in top:
        raise SpecError("experiment", None, "every spec names its experiment: the folder under the store, "
                                            "e.g. experiment: iris", problem="missing")
    values: dict[str, object] = {"experiment": top["experiment"]}
    truth_section: dict = {}
    for section, keys in _SECTIONS.items():
        allowed = tuple(keys) + (METHODS if section == "influence" else ()) + (
            _TRUTH_KEYS if section == "ground_truth" else ())
        for key, raw in _mapping(section, top.get(section), allowed).items():
            if section == "ground_truth" and key in _TRUTH_KEYS:
                truth_section[key] = raw
            elif key in keys:
                values[keys[key]] = raw
            else:  # influence.<method>: that method's settings
                values.setdefault("solvers", {})[key] = raw
    if "removals" in values:
        values["removals"] = parse_removals(_PATHS["removals"], values["removals"])
    if "test_points" in top:
        values["test_points"] = parse_test_points("test_points", top["test_points"])
    resources = _resources(top.get("resources"))
    grids, grid_paths = _grids(top.get("sweep"))
    planned = grid_size(grids)
    if max_configurations is not None and planned > max_configurations:
        raise SpecError("sweep", None, f"more than {max_configurations:,}: pass --yes to run a sweep this large, or "
                                       f"narrow it", problem=f"the grids expand to {planned:,} configurations")

    kinds = _truth_kinds(truth_section, values)
    base = _configuration(values | kinds[0], _PATHS)
    # Kind by kind (outermost), so the leave-one-out configurations train the shared θ̂s first and the others
    # find them stored.
    configurations = tuple({c.config_id: c for kind in kinds
                            for c in _expand(values | kind, grids, grid_paths)}.values())
    check_training_workers(resources["train"], configurations)
    spec_hash = _hash({"experiment": base.experiment,
                       "configurations": sorted(c.config_id for c in configurations)})
    return Spec(base.experiment, source, base, grids, resources, spec_hash, configurations)


def _truth_kinds(section: dict, values: dict) -> list[dict]:
    """The Configuration values of each kind of ground_truth.kind (one string or a list), in the order given;
    [{}] without it (leave-one-out as ground_truth.start says)."""
    raw = section.get("kind")
    for name in TRUTH_SETTINGS:
        if name in section and (raw is None or name not in (raw if isinstance(raw, list) else [raw])):
            raise SpecError(f"ground_truth.{name}", section[name], f"settings for {name}, which ground_truth.kind does "
                                                                   f"not run; add it there or remove them")
    if raw is None:
        return [{}]
    listed = raw if isinstance(raw, list) else [raw]
    if not listed:
        raise SpecError("ground_truth.kind", raw, f"name at least one of {', '.join(GROUND_TRUTHS)}")
    kinds = [_choice("ground_truth.kind", k, GROUND_TRUTHS) for k in listed]
    if len(set(kinds)) != len(kinds):
        raise SpecError("ground_truth.kind", raw, "each ground truth once")
    if "retrain_start" in values and any(k.startswith("loo_") for k in kinds):
        raise SpecError("ground_truth.start", values["retrain_start"], "with ground_truth.kind, name loo_warm or "
                                                                       "loo_scratch there instead of start")
    out = []
    for k in kinds:
        if k.startswith("loo_"):
            start = k.removeprefix("loo_")
            # A scratch retrain repeats θ̂'s schedule unless its epochs are given for it alone (start: scratch).
            extra = {"retrain_epochs": None} if start == "scratch" and len(kinds) > 1 else {}
            out.append({"ground_truth": "loo", "retrain_start": start} | extra)
        else:
            settings = section.get(k) or {}  # not a mapping: Configuration says so under its key
            measured = TRUTH_MEASUREMENTS.get(k, ()) if isinstance(settings, dict) else ()
            extra = {name: settings[name] for name in measured if name in settings}
            if extra:
                settings = {key: v for key, v in settings.items() if key not in extra}
            out.append({"ground_truth": k, "truth_settings": settings} | extra)
    return out


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


def _resources(value: object) -> dict[str, Resources]:
    body = _mapping("resources", value, RESOURCE_KINDS)
    out = {}
    for kind in RESOURCE_KINDS:
        allowed = ("num_cpus", "num_gpus", "memory") + (("workers",) if kind == "train" else ())
        options = _mapping(f"resources.{kind}", body.get(kind), allowed)
        try:
            out[kind] = Resources(**options)
        except SpecError as e:
            raise e.moved(f"resources.{kind}.{e.key}") from None
    return out


_SWEEP_FORMS = "sweep must be a grid (axis: [values, ...]) or a non-empty list of grids; omit it for one configuration"


def _axis_list() -> str:
    """The sweep axes as a user writes them, grouped by the spec section they come from; where an axis is
    not named like its key in the section, that key follows it: ``data: dataset (data.name), ...``."""
    groups: dict[str, list[str]] = {}
    for axis in SWEEPABLE:
        path = _PATHS.get(axis, axis)
        section, _, key = path.rpartition(".")
        groups.setdefault(section, []).append(axis if key == axis else f"{axis} ({path})")
    return "; ".join(f"{section}: {', '.join(axes)}" if section else ", ".join(axes)
                     for section, axes in groups.items())


def _unknown_axis(where: str, axis: object) -> SpecError:
    """A sweep axis that is not one: the axes listed by section, with the closest one guessed (a spec
    key written in a sweep, ``ground_truth.epochs`` or ``chunk``, is pointed at its axis name)."""
    guess = _AXIS_HINTS.get(axis) or _closest(axis, SWEEPABLE)
    if guess is None:  # a mistyped spec key, e.g. ground_truth.epoch
        near = _closest(axis, _AXIS_HINTS)
        guess = _AXIS_HINTS[near] if near else None
    shown = f"{guess!r}" + (f" ({_PATHS[guess]})" if guess in _PATHS and _PATHS[guess].rpartition(".")[2] != guess
                            else "")
    return SpecError(f"{where}.{axis}", axis,
                     f"sweep axes are spec keys without their section, renamed where shown; allowed: "
                     f"{_axis_list()}" + (f"; did you mean {shown}?" if guess else ""),
                     problem="unknown key")


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
                raise _unknown_axis(where, axis)
            if not isinstance(values, list):
                raise SpecError(path, values, f"sweep values must be a list, e.g. {axis}: [{_show(values)}]")
            if not values:
                raise SpecError(path, values, "a sweep list needs at least one value")
            checked[axis] = tuple(dict.fromkeys(_CHECKS[axis](path, v) for v in values))
        grids.append(checked)
    return tuple(grids), tuple(where for _, where in items)
