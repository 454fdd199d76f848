"""The vocabulary of experiment specs and the single-value checks behind every spec error.

Allowed names are constants, so that validating a spec imports nothing heavy. The influence vocabularies
(methods, curvatures, EK-FAC labels, damping policies, test-point and removal kinds) and each method's settings
come from :mod:`influence.registry`, which declares them once next to their implementations and is pure (no
torch); data sets, models and activations are listed here, and `influence/` must offer each of them. Each check
returns the normalised value or raises :class:`SpecError` naming the key path, the bad value and what is allowed.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from typing import Callable

from influence.registry import (  # noqa: F401 (the vocabulary is part of this module's interface)
    CURVATURES, DAMPING_POLICIES, EKFAC_LABELS, METHODS, REMOVAL_KINDS, TEST_POINT_KINDS, Setting, spec_settings,
)

DATASETS = ("iris", "digits", "synthetic", "mnist", "cifar10", "imagenet")
# Data sets read from files under data.root (the others ship with scikit-learn or are generated).
FILE_DATASETS = ("mnist", "cifar10", "imagenet")
MODELS = ("mlp", "logistic", "small_cnn", "lenet", "vgg13", "resnet18", "resnet50")
# Models defined on images [C, H, W]; depth, width and activation do not apply to them.
IMAGE_MODELS = ("small_cnn", "lenet", "vgg13", "resnet18", "resnet50")
ACTIVATIONS = ("tanh", "relu", "sigmoid", "gelu")
OPTIMIZERS = ("adam", "sgd", "lbfgs")
SCHEDULES = ("constant", "cosine", "step")
DTYPES = ("float64", "float32")
RETRAIN_STARTS = ("warm", "scratch")
# What each configuration's ground truth is (ground_truth.kind): leave-one-out retraining warm-started from θ̂ or
# from the initialisation, the proximal Bregman response function, the last layer refitted exactly, or the
# linear datamodeling score (models retrained on random subsets of the training set). A
# configuration's field holds "loo" for both retrainings (its retrain_start says which) or the kind's name.
GROUND_TRUTHS = ("loo_warm", "loo_scratch", "pbrf", "last_layer", "lds")
TRUTH_FIELDS = ("loo", "pbrf", "last_layer", "lds")
RESOURCE_KINDS = ("train", "influence", "retrain")

_NAME = re.compile(r"[A-Za-z0-9_-]+")


class SpecError(Exception):
    """A mistake in a spec: where it is (``key``, a path like ``sweep[0].depth``), the offending ``value``,
    and what is ``allowed`` instead. ``str(e)`` is one line:
    ``spec iris.yaml: sweep[0].depth: 0 is not allowed (depth must be an integer >= 1)``."""

    def __init__(self, key: str, value: object, allowed: str, source: str = "<spec>", problem: str | None = None):
        super().__init__(key, value, allowed, source, problem)  # args = the init arguments: pickles as is
        self.key, self.value, self.allowed, self.source, self.problem = key, value, allowed, source, problem

    def __str__(self) -> str:
        where = f"{self.key}: " if self.key else ""
        what = self.problem or f"{_show(self.value)} is not allowed"
        return " ".join(f"spec {self.source}: {where}{what} ({self.allowed})".split())

    def moved(self, key: str | None = None, source: str | None = None) -> SpecError:
        """The same mistake, reported at another key path and/or in another file."""
        return SpecError(self.key if key is None else key, self.value, self.allowed,
                         self.source if source is None else source, self.problem)


def _show(value: object, limit: int = 60) -> str:
    """A value as the user wrote it, on one short line."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, default=repr)
        except (TypeError, ValueError):
            text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _leaf(key: str) -> str:
    """``sweep[0].depth`` -> ``depth``: the name a rule is stated for."""
    return key.rsplit(".", 1)[-1].split("[", 1)[0]


def _closest(word: object, choices) -> str | None:
    found = difflib.get_close_matches(str(word), list(choices), n=1)
    return found[0] if found else None


def _one_of(choices, word: object = None) -> str:
    guess = _closest(word, choices) if isinstance(word, str) else None
    return f"one of {', '.join(choices)}" + (f"; did you mean {guess!r}?" if guess else "")


# ---- single-value checks: each returns the normalised value or raises SpecError(key, ...) -------------------

def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int to Python, not to a spec


def _int(key: str, value: object, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise SpecError(key, value, f"{_leaf(key)} must be an integer >= {minimum}")
    return value


def _number(key: str, value: object, ok: Callable[[float], bool], rule: str) -> float:
    """A finite number (an int is fine) satisfying `ok`, as a float; -0.0 becomes 0.0 so ids do not split."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and ok(value)):
        raise SpecError(key, value, f"{_leaf(key)} must be {rule}")
    return float(value) + 0.0


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise SpecError(key, value, f"{_leaf(key)} must be {_one_of(choices, value)}")
    return value


def _experiment(key: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        hint = f'; quote it: experiment: "{value}"' if isinstance(value, (int, float)) else ""
        raise SpecError(key, value, f"the experiment name is the folder under the store: letters, digits, _ and - "
                                    f"only{hint}")
    return value


def _size(key: str, value: object) -> int:
    # Depth and width: >= 1 for an mlp. 0 passes here because logistic (depth 0) is decided per configuration.
    if not _is_int(value) or value < 0:
        raise SpecError(key, value, f"{_leaf(key)} must be an integer >= 1")
    return value


def _indices(key: str, value: object) -> tuple[int, ...]:
    """A non-empty list of data-point indices, duplicates dropped (order kept)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise SpecError(key, value, "explicit takes a non-empty list of indices, e.g. explicit: [0, 5]")
    for v in value:
        if not _is_int(v) or v < 0:
            raise SpecError(key, v, "indices must be integers >= 0")
    return tuple(dict.fromkeys(value))


def _methods(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise SpecError(key, value, f"methods must be a non-empty list of {', '.join(METHODS)}, e.g. methods: [exact]")
    for v in value:
        _choice(key, v, METHODS)
    return tuple(dict.fromkeys(value))


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SpecError(key, value, f"{_leaf(key)} must be true or false")
    return value


def _percent(key: str, value: object) -> float:
    return _number(key, value, lambda x: 0 <= x <= 100, "a percentile between 0 and 100")


def _subset(key: str, value: object) -> float | int:
    """A fraction of the training points in (0, 1) or a count >= 1 (1 itself means one point, not all)."""
    if isinstance(value, float) and 0 < value < 1:
        return value
    if _is_int(value) and value >= 1:
        return value
    raise SpecError(key, value, "subset must be a fraction strictly between 0 and 1 (e.g. 0.1) or a count of "
                                "training points >= 1; omit it for the whole set")


def _data_root(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(key, value, "data.root is a local folder or an s3://bucket/prefix URI")
    return value


def _classes(key: str, value: object) -> int | tuple[str, ...]:
    if _is_int(value) and value >= 2:
        return value
    if isinstance(value, (list, tuple)) and len(value) >= 2 and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SpecError(key, value, "classes is a count >= 2 (the first classes in sorted order) or a list of at "
                                "least two class folder names")


def _optional(check: Callable[[str, object], object]) -> Callable[[str, object], object]:
    return lambda key, value: None if value is None else check(key, value)


def _scale(key: str, value: object) -> float | str:
    if value == "auto":
        return "auto"
    return _number(key, value, lambda x: x > 0, "a number > 0, or auto (retry with larger scales until LiSSA converges)")


def _setting_check(setting: Setting) -> Callable[[str, object], object]:
    """The spec check of one declared method setting (its constraint, as the checks above state it)."""
    if setting.kind == "choice":
        return lambda k, v: _choice(k, v, setting.choices)
    if setting.kind == "number":
        return lambda k, v: _number(k, v, setting.in_range, setting.rule())
    if setting.kind == "int":
        return lambda k, v: _int(k, v, setting.minimum)
    if setting.kind == "int_or_derived":
        return _optional(lambda k, v: _int(k, v, setting.minimum))  # None: derived
    return _scale  # "scale"


# Per method: each setting a spec may give it, with its default and its check, from influence.registry
# (without damping and damping_policy, which the influence section sets for every method alike, and ekfac's
# chunk_size, which a task takes from influence.grad_chunk).
METHOD_SETTINGS: dict[str, dict[str, tuple[object, Callable[[str, object], object]]]] = {
    method: {s.name: (s.default, _setting_check(s)) for s in spec_settings(method)} for method in METHODS
}



# Per solved ground truth: each setting a spec may give it under ground_truth.<kind>, with its default and its
# check. damping None: pbrf takes the influence damping (the estimate it pairs with); last_layer takes 0 when the
# configuration has weight decay (the refit is then strongly convex and exact) and the influence damping when
# not (features that separate the classes have no minimum without an L2 term).
_TOL = (1e-10, lambda k, v: _number(k, v, lambda x: x > 0, "a number > 0 (‖∇J‖₂ at which the solve stops)"))
_MAX_ITER = (100, lambda k, v: _int(k, v, 1))
_DAMPING_OR_DERIVED = (None, _optional(lambda k, v: _number(k, v, lambda x: x >= 0, "a number >= 0")))
TRUTH_SETTINGS: dict[str, dict[str, tuple[object, Callable[[str, object], object]]]] = {
    "pbrf": {"damping": _DAMPING_OR_DERIVED, "tol": _TOL, "max_iter": _MAX_ITER},
    "last_layer": {"damping": _DAMPING_OR_DERIVED, "tol": _TOL, "max_iter": _MAX_ITER},
    # LDS (Park et al. 2023): `subsets` random subsets, each keeping a `fraction` of the training points, each
    # retrained from `start` (scratch: θ̂'s initialisation and schedule; warm: θ̂, for ground_truth.epochs).
    "lds": {"subsets": (100, lambda k, v: _int(k, v, 3)),
            "fraction": (0.5, lambda k, v: _number(k, v, lambda x: 0 < x < 1, "a number strictly between 0 and 1 "
                                                                              "(the share of training points kept)")),
            "start": ("scratch", lambda k, v: _choice(k, v, RETRAIN_STARTS))},
}
# Settings of ground_truth.<kind> that are measurements (how many replicates), not part of what is measured: they
# set the configuration's field of that name (outside its id), as ground_truth.replicates does for the others.
TRUTH_MEASUREMENTS = {"lds": ("replicates",)}
