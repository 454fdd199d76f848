"""Iris models trained once per test session, shared by the solver test modules (training is most of their cost)."""
from __future__ import annotations

from influence.models import build_model
from influence.train import train

WEIGHT_DECAY = 0.005
_TRAINED: dict[tuple[str, int], tuple] = {}


def trained_iris(iris, name: str, depth: int) -> tuple:
    """(model, θ̂) for Iris: `name` ("mlp" or "logistic") at `depth`, width 5, 500 Adam steps at lr 0.05, seed 0."""
    if (name, depth) not in _TRAINED:
        model = build_model(name, in_features=4, num_classes=3, depth=depth, width=5)
        theta = train(model, iris.x_train, iris.y_train, weight_decay=WEIGHT_DECAY, lr=0.05, epochs=500,
                      seed=0).theta
        _TRAINED[(name, depth)] = (model, theta)
    return _TRAINED[(name, depth)]
