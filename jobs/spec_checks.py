"""The vocabulary of experiment specs and the single-value checks behind every spec error.

Allowed names are constants here so that validating a spec imports nothing heavy; `influence/` must offer
each of them. Each check returns the normalised value or raises :class:`SpecError` naming the key path, the
bad value and what is allowed.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from typing import Callable

DATASETS = ("iris", "digits", "synthetic", "mnist", "cifar10", "imagenet")
# Data sets read from files under data.root (the others ship with scikit-learn or are generated).
FILE_DATASETS = ("mnist", "cifar10", "imagenet")
MODELS = ("mlp", "logistic", "small_cnn", "lenet", "vgg13", "resnet18", "resnet50")
# Models defined on images [C, H, W]; depth, width and activation do not apply to them.
IMAGE_MODELS = ("small_cnn", "lenet", "vgg13", "resnet18", "resnet50")
ACTIVATIONS = ("tanh", "relu", "sigmoid", "gelu")
METHODS = ("exact", "cg", "lissa", "arnoldi", "ekfac")
CURVATURES = ("hessian", "ggn")
EKFAC_LABELS = ("true", "sampled")
DAMPING_POLICIES = ("if_indefinite", "always", "never")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")
DTYPES = ("float64", "float32")
RETRAIN_STARTS = ("warm", "scratch")
TEST_POINT_KINDS = ("highest", "median", "percentile", "random", "explicit")
REMOVAL_KINDS = ("all", "top_k", "percentile", "random", "explicit", "group")
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


def _positive_int_or_derived(key: str, value: object) -> int | None:
    return None if value is None else _int(key, value, 1)


def _scale(key: str, value: object) -> float | str:
    if value == "auto":
        return "auto"
    return _number(key, value, lambda x: x > 0, "a number > 0, or auto (retry with larger scales until LiSSA converges)")


# Per method: each setting with its default and its check (the names and defaults are influence.ihvp.SETTINGS,
# without damping and damping_policy, which the influence section sets for every method alike).
METHOD_SETTINGS: dict[str, dict[str, tuple[object, Callable[[str, object], object]]]] = {
    "exact": {"curvature": ("hessian", lambda k, v: _choice(k, v, CURVATURES))},
    "cg": {"curvature": ("hessian", lambda k, v: _choice(k, v, CURVATURES)),
           "tol": (1e-8, lambda k, v: _number(k, v, lambda x: 0 < x < 1, "a number strictly between 0 and 1")),
           "max_iter": (100, lambda k, v: _int(k, v, 1))},
    "lissa": {"scale": (10.0, _scale), "depth": (None, _positive_int_or_derived),
              "repeats": (1, lambda k, v: _int(k, v, 1)), "batch_size": (10, lambda k, v: _int(k, v, 1)),
              "seed": (0, lambda k, v: _int(k, v, 0))},
    "arnoldi": {"curvature": ("hessian", lambda k, v: _choice(k, v, CURVATURES)),
                "rank": (20, lambda k, v: _int(k, v, 1)), "iterations": (None, _positive_int_or_derived),
                "seed": (0, lambda k, v: _int(k, v, 0))},
    "ekfac": {"labels": ("true", lambda k, v: _choice(k, v, EKFAC_LABELS)), "seed": (0, lambda k, v: _int(k, v, 0))},
}

