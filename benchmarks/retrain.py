"""Benchmark: warm-start leave-one-out retraining, all removals at once (retrain_batched) vs one at a time.

    python benchmarks/retrain.py [--cases iris cnn] [--epochs 100] [--repeats 3] [--depths 1 4 8]
                                 [--cnn-model small_cnn] [--cnn-epochs 2] [--batch-size 64] [--dtype float32]

Case ``iris``: for Iris MLPs (width 5, tanh) at several depths: train briefly to θ̂, then retrain all 120
removals plus one control for E epochs from θ̂, timed side by side in the same process, interleaved, repeated,
median reported.

Columns:
  batched s   retrain_batched: the K = 121 models stacked, hand-derived gradient (influence.stacked)
  loop s      retrain_loop: the reference, one model at a time, autograd through objective() + the same Adam
  ratio       loop / batched
  stacked×1 s retrain_batched called once per model (K = 1): how much of the ratio is stacking alone,
              as opposed to the leaner gradient code
  max |Δθ|    largest difference between batched and loop results (the two must agree to 1e-6)

Case ``cnn``: the generic stacked path (Θ [K, P] through vmap, minibatches) against retrain_loop, for an image
network (default small_cnn) on digits (1437 images 1×8×8, 10 classes): θ̂ from a few minibatch epochs, then
42 removals + 1 control (K = 43) retrained for a few epochs in the same minibatch order, timed side by side as
above. Columns: the same, for one configuration. (On the CPU, float64 grouped convolutions have no fast kernel
and the stacked path gains much less than in float32.)

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
from influence.retrain import removal_weights, retrain_batched, retrain_loop  # noqa: E402
from influence.train import train  # noqa: E402

WEIGHT_DECAY = 0.005
LR = 0.01
CNN_WEIGHT_DECAY = 0.001  # the paper's, for its CNNs
CNN_LR = 0.01


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _side_by_side(variants: dict, repeats: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median wall time and last result per variant, run interleaved so drifts in machine load hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, torch.Tensor] = {}
    next(iter(variants.values()))()  # warm-up: first-call allocations and kernel dispatch caches
    for _ in range(repeats):
        for name, fn in variants.items():
            seconds, results[name] = _timed(fn)
            times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=["iris", "cnn"], default=["iris", "cnn"])
    parser.add_argument("--epochs", type=int, default=100, help="iris: retraining epochs E (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per variant (default 3)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--train-epochs", type=int, default=500, help="iris: brief training to θ̂ (default 500)")
    parser.add_argument("--cnn-model", default="small_cnn", help="cnn: any model name build_model knows")
    parser.add_argument("--cnn-epochs", type=int, default=2, help="cnn: retraining epochs (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="cnn: minibatch size (default 64)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="cnn: (default float32)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if "iris" in args.cases:
        iris_case(args)
    if "cnn" in args.cases:
        cnn_case(args)


def cnn_case(args: argparse.Namespace) -> None:
    data = load_dataset("digits")
    dtype = getattr(torch, args.dtype)
    x, y = data.x_train.to(dtype), data.y_train
    model = build_model(args.cnn_model, input_shape=data.input_shape, num_classes=data.num_classes)
    opts = dict(weight_decay=CNN_WEIGHT_DECAY, batch_size=args.batch_size)
    theta = train(model, x, y, lr=CNN_LR, epochs=2, seed=0, **opts).theta
    weights = removal_weights(data.n_train, range(42), dtype=dtype)  # 1 control + 42 removals: K = 43
    k = weights.shape[0]
    kw = dict(lr=CNN_LR / 10, epochs=args.cnn_epochs, seed=1, **opts)
    med, results = _side_by_side({
        "batched": lambda: retrain_batched(model, theta, x, y, weights, **kw),
        "loop": lambda: retrain_loop(model, theta, x, y, weights, **kw),
    }, args.repeats)
    diff = float((results["batched"] - results["loop"]).abs().max())
    print(f"\n{args.cnn_model} on digits (n = {data.n_train}, {data.input_shape}, {data.num_classes} classes), "
          f"{args.dtype}, K = {k} (42 removals + 1 control), {args.cnn_epochs} epochs in batches of "
          f"{args.batch_size}, median of {args.repeats}, torch.set_num_threads(1)")
    header = f"{'model':>10} {'P':>6} {'K':>4} {'batched s':>10} {'loop s':>8} {'ratio':>6} {'max |Δθ|':>9}"
    print(header)
    print("-" * len(header))
    print(f"{args.cnn_model:>10} {model.n_params:>6} {k:>4} {med['batched']:>10.3f} {med['loop']:>8.3f} "
          f"{med['loop'] / med['batched']:>5.1f}× {diff:>9.1e}")


def iris_case(args: argparse.Namespace) -> None:
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
        med, results = _side_by_side(variants, args.repeats)
        diff = float((results["batched"] - results["loop"]).abs().max())
        print(f"{depth:>5} {model.n_params:>4} {k:>4} {accuracy:>9.3f} {med['batched']:>10.3f} {med['loop']:>8.3f} "
              f"{med['loop'] / med['batched']:>5.1f}× {med['stacked1']:>11.3f} "
              f"{med['stacked1'] / med['batched']:>5.1f}× {diff:>9.1e}")


if __name__ == "__main__":
    main()
