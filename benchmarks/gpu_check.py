"""GPU check: influence/ on CUDA gives the CPU's numbers (float64), and where the GPU wins on time.

    python benchmarks/gpu_check.py [--quick] [--require-cuda] [--json FILE]

Three parts, each run on the CPU and on CUDA from the same inputs:
  train      Iris MLPs (width 5, tanh, depth 1/4/8) trained from the same θ0 (a CPU draw) for 300 epochs:
             max |Δθ| between the devices
  retrain    retrain_batched of all 120 Iris removals + 1 control for 200 epochs, and of all 1437 digits
             removals + 1 control (depth 2, width 32), the large K where a GPU should win: max |Δθ| and wall
             times measured side by side (interleaved, median of the repeats; CPU with 1 thread, as a
             cluster task with num_cpus 1 runs, and with all threads)
  estimates  influence_estimates with exact, cg, arnoldi and lissa at each trained Iris θ̂: max |Δ| / max |x|
             over the estimates (lissa draws its minibatches on the CPU, so both devices use the same ones)

Exits 1 if any float64 agreement is worse than 1e-8 (and with --require-cuda, 2 if there is no usable GPU).
Without CUDA it runs the CPU side alone and says so: ``--quick`` (smaller everything) is the smoke test of this
script on a CPU-only machine. Self-contained: torch, scikit-learn and this checkout, nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from influence.data import load_dataset  # noqa: E402
from influence.ihvp import make_solver  # noqa: E402
from influence.models import build_model  # noqa: E402
from influence.objective import per_example_loss  # noqa: E402
from influence.scores import influence_estimates  # noqa: E402
from influence.retrain import removal_weights, retrain_batched  # noqa: E402
from influence.train import train  # noqa: E402

TOLERANCE = 1e-8  # float64 agreement required between the devices
WEIGHT_DECAY = 0.005
LR = 0.01
DAMPING = 0.01
# Row label -> (method, settings). CG on the Hessian stops (NaN rows) where H + δI is indefinite, which a
# briefly trained deep net often is; CG on the GGN (PSD) always has numbers to compare.
METHODS = {"exact": ("exact", {}), "cg": ("cg", {}), "cg ggn": ("cg", {"curvature": "ggn"}),
           "arnoldi": ("arnoldi", {"rank": 20}), "lissa": ("lissa", {"scale": "auto"})}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).abs().max())


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a| over the entries finite in both; inf if the two disagree on which are NaN."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    if not torch.equal(a.isnan(), b.isnan()):
        return math.inf
    ok = ~a.isnan()
    if not bool(ok.any()):
        return 0.0
    return float((a[ok] - b[ok]).abs().max()) / max(float(a[ok].abs().max()), 1e-300)


def _fmt(value: float | None, spec: str = ".1e") -> str:
    return "—" if value is None else format(value, spec)


class Check:
    """Collects agreement numbers against TOLERANCE, for the verdict at the end and the JSON record."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.failures: list[str] = []

    def add(self, part: str, what: str, diff: float | None, **facts) -> None:
        self.rows.append({"part": part, "what": what, "diff": diff, **facts})
        if diff is not None and not diff <= TOLERANCE:
            self.failures.append(f"{part} {what}: {diff:.2e} > {TOLERANCE:g}")


def part_train(args, devices, check: Check) -> dict[int, tuple]:
    """Train each depth on every device from one θ0; returns {depth: (model, θ̂ on the CPU)}."""
    data = load_dataset("iris")
    print(f"\n[train] Iris, width 5 tanh, {args.train_epochs} epochs of full-batch Adam from the same θ0")
    print(f"{'depth':>5} {'P':>4} {'cpu s':>7} {'cuda s':>7} {'‖∇R‖':>8} {'max |Δθ|':>9}")
    fitted = {}
    for depth in args.depths:
        model = build_model("mlp", in_features=4, num_classes=3, depth=depth, width=5)
        theta0 = model.init(depth)
        out = {}
        for name, device in devices.items():
            d = data.to(device)
            out[name] = _timed(lambda: train(model, d.x_train, d.y_train, weight_decay=WEIGHT_DECAY, lr=LR,
                                                    epochs=args.train_epochs, seed=0, theta0=theta0.to(device)),
                                      device)
        cpu_s, cpu = out["cpu"]
        cuda_s, cuda = out.get("cuda", (None, None))
        diff = None if cuda is None else _max_abs(cpu.theta, cuda.theta)
        check.add("train", f"depth {depth}", diff, cpu_s=cpu_s, cuda_s=cuda_s)
        print(f"{depth:>5} {model.n_params:>4} {cpu_s:>7.2f} {_fmt(cuda_s, '7.2f'):>7} {cpu.grad_norm:>8.1e} "
              f"{_fmt(diff):>9}", flush=True)
        fitted[depth] = (model, cpu.theta)
    return fitted


def _retrain_case(label, model, theta, data, removed, epochs, repeats, devices, threads, check: Check) -> None:
    weights = removal_weights(data.n_train, removed, controls=1)
    k = weights.shape[0]
    kw = dict(weight_decay=WEIGHT_DECAY, lr=LR, epochs=epochs)
    moved = {name: (data.to(dev), theta.to(dev), weights.to(dev)) for name, dev in devices.items()}

    def run(name: str, epochs: int = epochs):
        d, th, w = moved[name]
        return retrain_batched(model, th, d.x_train, d.y_train, w, **{**kw, "epochs": epochs})

    # variant -> (device name, CPU threads); the CUDA run keeps the default thread count.
    variants = {f"cpu×{t}": ("cpu", t) for t in threads}
    if "cuda" in devices:
        variants["cuda"] = ("cuda", None)
        run("cuda", epochs=2)  # warm-up: CUDA context, cuBLAS handles, kernel caches
    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, torch.Tensor] = {}
    default_threads = torch.get_num_threads()
    for _ in range(repeats):
        for variant, (name, t) in variants.items():  # interleaved, so drifts in machine load hit all alike
            torch.set_num_threads(t or default_threads)
            seconds, results[variant] = _timed(lambda: run(name), devices[name])
            times[variant].append(seconds)
    torch.set_num_threads(default_threads)
    med = {name: statistics.median(v) for name, v in times.items()}
    cpu_names = [n for n in med if n.startswith("cpu")]
    diff = _max_abs(results[cpu_names[0]], results["cuda"]) if "cuda" in results else None
    best_cpu = min(med[n] for n in cpu_names)
    ratio = best_cpu / med["cuda"] if "cuda" in med else None
    check.add("retrain", label, diff, K=k, epochs=epochs, seconds=med, cpu_over_cuda=ratio)
    cols = " ".join(f"{name} {med[name]:.3f}s" for name in variants)
    print(f"{label:<28} K={k:<5} E={epochs:<4} {cols}  best cpu/cuda {_fmt(ratio, '.1f')}×  max |Δθ| {_fmt(diff)}",
          flush=True)


def part_retrain(args, devices, fitted, check: Check) -> None:
    threads = sorted({1, torch.get_num_threads()})
    print(f"\n[retrain] retrain_batched, warm-started from θ̂, median of {args.repeats} (cpu×N: N torch threads)")
    iris = load_dataset("iris")
    for depth, (model, theta) in fitted.items():
        _retrain_case(f"iris depth {depth} width 5", model, theta, iris, range(iris.n_train), args.retrain_epochs,
                      args.repeats, devices, threads, check)
    digits = load_dataset("digits")
    model = build_model("mlp", in_features=digits.in_features, num_classes=digits.num_classes, depth=2, width=32)
    theta = train(model, digits.x_train, digits.y_train, weight_decay=WEIGHT_DECAY, lr=LR,
                  epochs=args.digits_train_epochs, seed=0).theta
    removed = range(min(args.digits_removals, digits.n_train))
    # One CPU thread at this size would take minutes; all threads only.
    _retrain_case("digits depth 2 width 32", model, theta, digits, removed, args.digits_epochs, 1, devices,
                  [torch.get_num_threads()], check)


def part_estimates(args, devices, fitted, check: Check) -> None:
    data = load_dataset("iris")
    print(f"\n[estimates] influence_estimates at θ̂, δ = {DAMPING}, the {args.test_points} highest-loss test points")
    print(f"{'depth':>5} {'method':>8} {'cpu s':>7} {'cuda s':>7} {'diverged':>8} {'max rel Δ':>10}")
    for depth, (model, theta) in fitted.items():
        with torch.no_grad():
            losses = per_example_loss(model, theta, data.x_test, data.y_test)
        test_idx = torch.argsort(losses, descending=True, stable=True)[: args.test_points].tolist()
        for label, (method, settings) in METHODS.items():
            out = {}
            for name, device in devices.items():
                d, th = data.to(device), theta.to(device)

                def estimate():
                    solver = make_solver(method, model, th, d.x_train, d.y_train, WEIGHT_DECAY, damping=DAMPING,
                                         **settings)
                    return influence_estimates(model, th, d, test_idx, solver)

                out[name] = _timed(estimate, device)
            cpu_s, cpu = out["cpu"]
            cuda_s, cuda = out.get("cuda", (None, None))
            diff = None
            if cuda is not None:
                diff = max(_max_rel(cpu.estimate, cuda.estimate), _max_rel(cpu.predicted_dtheta, cuda.predicted_dtheta))
            check.add("estimates", f"depth {depth} {label}", diff, cpu_s=cpu_s, cuda_s=cuda_s)
            print(f"{depth:>5} {label:>8} {cpu_s:>7.2f} {_fmt(cuda_s, '7.2f'):>7} {int(cpu.diverged.sum()):>8} "
                  f"{_fmt(diff):>10}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: the CPU-only smoke test of this script")
    parser.add_argument("--require-cuda", action="store_true", help="exit 2 when no CUDA device is usable")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    args = parser.parse_args()
    full = dict(depths=[1, 4, 8], train_epochs=300, retrain_epochs=200, repeats=3, digits_train_epochs=200,
                digits_removals=10**9, digits_epochs=50, test_points=5)
    quick = dict(depths=[1, 4], train_epochs=30, retrain_epochs=20, repeats=1, digits_train_epochs=10,
                 digits_removals=63, digits_epochs=3, test_points=2)
    for key, value in (quick if args.quick else full).items():
        setattr(args, key, value)

    devices = {"cpu": torch.device("cpu")}
    if torch.cuda.is_available():
        devices["cuda"] = torch.device("cuda")
        print(f"torch {torch.__version__}, CUDA device: {torch.cuda.get_device_name(0)}, "
              f"CPU threads: {torch.get_num_threads()}")
    else:
        if args.require_cuda:
            print("no usable CUDA device (torch.cuda.is_available() is False) and --require-cuda was given")
            return 2
        print(f"torch {torch.__version__}: no CUDA device, so the CUDA side of every comparison is skipped "
              f"(the CPU side still runs). CPU threads: {torch.get_num_threads()}")
    start = time.perf_counter()
    check = Check()
    fitted = part_train(args, devices, check)
    part_retrain(args, devices, fitted, check)
    part_estimates(args, devices, fitted, check)

    compared = sum(row["diff"] is not None for row in check.rows)
    print(f"\n{compared} comparisons against tolerance {TOLERANCE:g} in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "devices": list(devices),
                                         "tolerance": TOLERANCE, "rows": check.rows,
                                         "failures": check.failures}, indent=1, default=str))
    if check.failures:
        print("FAILED:\n  " + "\n  ".join(check.failures))
        return 1
    print("OK" if compared else "OK (CPU side only: nothing compared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
