"""Benchmark: warm-start leave-one-out retraining, all removals at once (retrain_batched) vs one at a time.

    python benchmarks/retrain.py [--epochs 100] [--repeats 3] [--depths 1 4 8]

For Iris MLPs (width 5, tanh) at several depths: train briefly to θ̂, then retrain all 120 removals plus one
control for E epochs from θ̂, timed side by side in the same process, interleaved, repeated, median reported.

Columns:
  batched s   retrain_batched: the K = 121 models stacked, hand-derived gradient (influence.stacked)
  loop s      retrain_loop: the reference, one model at a time, autograd through objective() + the same Adam
  ratio       loop / batched
  stacked×1 s retrain_batched called once per model (K = 1): how much of the ratio is stacking alone,
              as opposed to the leaner gradient code
  max |Δθ|    largest difference between batched and loop results (the two must agree to 1e-6)

torch.set_num_threads(1) throughout, for fairness: a batched [K, ...] op could use more threads than a K = 1 op,
and the cluster runs one such task per CPU anyway.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from influence.data import load_dataset  # noqa: E402
from influence.models import build_model  # noqa: E402
from influence.train import removal_weights, retrain_batched, retrain_loop, train  # noqa: E402

WEIGHT_DECAY = 0.005
LR = 0.01


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100, help="retraining epochs E (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per variant (default 3)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--train-epochs", type=int, default=500, help="brief training to θ̂ (default 500)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    data = load_dataset("iris")
    x, y = data.x_train, data.y_train
    weights = removal_weights(data.n_train, range(data.n_train))  # 1 control + 120 removals
    k = weights.shape[0]
    kw = dict(weight_decay=WEIGHT_DECAY, lr=LR, epochs=args.epochs)
    print(f"Iris, width 5 tanh, K = {k} (120 removals + 1 control), E = {args.epochs} epochs, "
          f"median of {args.repeats}, torch.set_num_threads(1)")
    header = (f"{'depth':>5} {'P':>4} {'K':>4} {'train acc':>9} {'batched s':>10} {'loop s':>8} {'ratio':>6} "
              f"{'stacked×1 s':>11} {'ratio':>6} {'max |Δθ|':>9}")
    print(header)
    print("-" * len(header))
    for depth in args.depths:
        model = build_model("mlp", in_features=data.in_features, num_classes=data.num_classes, depth=depth,
                            width=5, activation="tanh")
        fit = train(model, x, y, weight_decay=WEIGHT_DECAY, lr=LR, epochs=args.train_epochs, seed=0)
        accuracy = float((model.forward(fit.theta, x).argmax(1) == y).double().mean())
        theta = fit.theta

        variants = {
            "batched": lambda: retrain_batched(model, theta, x, y, weights, **kw),
            "loop": lambda: retrain_loop(model, theta, x, y, weights, **kw),
            "stacked1": lambda: torch.cat([retrain_batched(model, theta, x, y, weights[i : i + 1], **kw)
                                           for i in range(k)]),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        results: dict[str, torch.Tensor] = {}
        variants["batched"]()  # warm-up: first-call allocations and kernel dispatch caches
        for _ in range(args.repeats):
            for name, fn in variants.items():  # interleaved, so drifts in machine load hit all variants alike
                seconds, results[name] = _timed(fn)
                times[name].append(seconds)
        med = {name: statistics.median(values) for name, values in times.items()}
        diff = float((results["batched"] - results["loop"]).abs().max())
        print(f"{depth:>5} {model.n_params:>4} {k:>4} {accuracy:>9.3f} {med['batched']:>10.3f} {med['loop']:>8.3f} "
              f"{med['loop'] / med['batched']:>5.1f}× {med['stacked1']:>11.3f} "
              f"{med['stacked1'] / med['batched']:>5.1f}× {diff:>9.1e}")


if __name__ == "__main__":
    main()
