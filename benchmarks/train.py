"""Benchmark: full-batch MLP training to θ̂ through the hand-derived stacked step (what ``influence.train.train``
runs) against autograd + ``torch.optim.Adam``, side by side, and how chaotic the training itself is.

    python -m benchmarks.train [--depths 1 4 8] [--epochs 300 1000 4000] [--weight-decay 0.005 0]

For Iris tanh MLPs of width 5 (the Iris study's settings: Adam, lr 0.01, seed 0), per depth, weight decay and
number of epochs:

  lean s      train(): the stacked step (influence.stacked) and the written-out Adam
  autograd s  the plain loop: objective() through autograd, torch.optim.Adam (single-tensor path)
  ratio       autograd / lean, measured in this process one after the other
  |lean − autograd|   max |Δθ̂| between the two paths: round-off only, unless training amplifies it
  |θ0 + 1e-15|         max |Δθ̂| between the autograd loop from θ0 and from θ0 + 1e-15: how far round-off-sized
                      differences grow in this training run (the chaos of the optimisation itself)

When the last two columns are of the same size, the paths differ by no more than any rounding difference would
make them differ. torch.set_num_threads(1) throughout.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from influence.data import load_dataset
from influence.models import MLP
from influence.objective import objective
from influence.train import train

LR, WIDTH, SEED = 0.01, 5, 0


def autograd_train(model: MLP, theta0: torch.Tensor, x, y, weight_decay: float, epochs: int) -> torch.Tensor:
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=LR, foreach=False)
    for _ in range(epochs):
        opt.zero_grad()
        objective(model, theta, x, y, weight_decay).backward()
        opt.step()
    return theta.detach()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--epochs", type=int, nargs="+", default=[300, 1000, 4000])
    p.add_argument("--weight-decay", type=float, nargs="+", default=[0.005, 0.0])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("iris", split_seed=0, test_fraction=0.2)
    x, y = data.x_train, data.y_train
    print("| depth | weight decay | epochs | lean s | autograd s | ratio | max abs(lean − autograd) | "
          "max abs(θ0 + 1e-15 − θ0) |")
    print("|---|---|---|---|---|---|---|---|")
    for depth in args.depths:
        model = MLP(data.in_features, data.num_classes, depth, WIDTH, "tanh")
        theta0 = model.init(SEED, dtype=x.dtype)
        for wd in args.weight_decay:
            for epochs in args.epochs:
                start = time.perf_counter()
                lean = train(model, x, y, weight_decay=wd, lr=LR, epochs=epochs, seed=SEED).theta
                t_lean = time.perf_counter() - start
                start = time.perf_counter()
                plain = autograd_train(model, theta0, x, y, wd, epochs)
                t_plain = time.perf_counter() - start
                nudged = autograd_train(model, theta0 + 1e-15, x, y, wd, epochs)
                print(f"| {depth} | {wd:g} | {epochs} | {t_lean:.2f} | {t_plain:.2f} | {t_plain / t_lean:.1f} | "
                      f"{(lean - plain).abs().max():.1e} | {(nudged - plain).abs().max():.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
