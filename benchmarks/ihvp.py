"""Benchmark: the inverse-HVP methods on the paper's small CNN on digits, side by side with the peer library captum.

    python -m benchmarks.ihvp [--test-points 100] [--methods exact cg lissa arnoldi ekfac] [--dtype float64]
                              [--curvature hessian] [--damping 0.01] [--peers captum-naive captum-arnoldi]
                              [--quick] [--json out.json] [--workdir DIR]

Koh & Liang's small CNN (``small_cnn``: 2,616 parameters, 8×8 inputs) trained with Adam on scikit-learn's digits
(1,437 training images, λ = 1e-3, 300 full-batch epochs). Then, for the first T test points, every method of ``influence.ihvp.METHODS``
(``make_solver`` with the settings of ``SETTINGS`` unless set here) computes s_t = (C + δI)^{-1} ∇L(z_t) and the
estimates (1/n) s_tᵀ ∇L(z_i) for all n training points. Every method runs in a fresh Python process, one after the
other, on the same θ̂ and test points; everything below is measured in that one run.

Columns:
  fit s         one-off cost: forming and factorising C (exact), the Ritz pairs (arnoldi), the factors (ekfac),
                the Hessian and its eigendecomposition / the Arnoldi projection (captum's constructors); ~0 for cg
                and lissa, whose cost is in every solve
  solve ms/pt   the T solves s_t, divided by T (one batched call: cg and lissa solve a block of right-hand sides)
  e2e ms/pt     everything after the fit that turns T test points into T×n estimates, divided by T: test
                gradients, solves, training gradients and the products (captum: its ``influence()`` call, which
                recomputes the training gradients, as ours does)
  total s       fit + T · e2e: the whole cost of the T test points
  peak MB       peak memory of the fit and solves above what the process held before them. CPU: growth of
                ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the resident-set high-water mark) in the method's
                own fresh process, the model, data and test gradients already loaded (captum: its constructor and
                ``influence()`` call, gradients included). CUDA: ``torch.cuda.max_memory_allocated`` above the
                allocation before (tensors only, not the caching allocator's reserve)
  ρ vs exact    Spearman correlation of the method's T×n estimates with ``exact``'s over the n training points,
                per test point, averaged over the test points (rows whose solve diverged are left out and
                counted in ``notes``); ``exact`` solves the same system as cg/arnoldi (``--curvature``, damping δ
                always added); with ``exact:ggn`` among the methods a second column compares against the GGN
  rel err       ‖estimates − exact's‖ / ‖exact's‖ over all T×n estimates: the values, not only their ranks
  ÷CG           the row's cost divided by cg's (below 1: cheaper than CG)

``curvature`` says what each row inverts: exact, cg and arnoldi ``--curvature`` (or their ``:ggn`` / ``:hessian``
suffix); lissa the Hessian (its only one); ekfac the empirical Fisher (labels "true"), block-diagonal and
Kronecker-factored, which is why ``exact:ggn`` (the Fisher's closest exact relative) is worth a column.

captum (``pip install captum``, the ``bench`` extra). Its influence score of training point i on test point t is
∇L_tᵀ (H_Σ + r I)^{-1} ∇L_i with H_Σ the Hessian of the *summed* training loss (no L2 term; captum's loss never
sees θ) and r = ``hessian_reg``. With r = n (λ + δ), H_Σ + r I = n (H + δI) for our H (which holds λ), so its
score is exactly our (1/n) ∇L_tᵀ (H + δI)^{-1} ∇L_i, with our sign convention (positive = the test loss goes up
when z_i is removed). That is how it is run here: ``captum-naive`` (``NaiveInfluenceFunction``: the dense Hessian,
kept eigenvalues > ``hessian_inverse_tol``, projection_dim = P, so a pseudo-inverse that drops non-positive
directions of H + δI, where ours inverts them) and ``captum-arnoldi`` (``ArnoldiInfluenceFunction`` with
projection_dim = our arnoldi rank and arnoldi_dim = our 2·rank iterations). It is always the Hessian, whatever
``--curvature`` says. captum has no CG or LiSSA, so those two have no peer row. Its ``nn.Module`` is the one
``influence.nets.ModuleNet`` holds, materialised with θ̂ loaded.

``--quick`` (for the test suite): a 200-parameter CNN (``tiny_cnn``, the same layer kinds) on 200 training
digits, 4 test points, exact/cg/ekfac and captum-arnoldi, all in this process (``--in-process``: no process start
per method, so peak memory is only a lower bound after the first); seconds, not the numbers to quote.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

from influence.data import Dataset, load_dataset  # noqa: E402
from influence.ihvp import CURVATURES, METHODS, make_solver  # noqa: E402
from influence.metrics import spearman  # noqa: E402
from influence.models import build_model  # noqa: E402
from influence.nets import ModuleNet  # noqa: E402
from influence.scores import per_example_grads  # noqa: E402
from influence.train import train  # noqa: E402

MODELS: tuple[str, ...] = ("small_cnn", "tiny_cnn")
PEERS: tuple[str, ...] = ("captum-naive", "captum-arnoldi")
DTYPES: tuple[str, ...] = ("float64", "float32")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
GRAD_CHUNK = 256  # training gradients per chunk when forming the estimates


@dataclass(frozen=True)
class Config:
    """One benchmark run; written next to the results (``--json``) and handed to every worker process.

    ``methods`` are names from ``influence.ihvp.METHODS``, optionally ``method:curvature`` (``exact:ggn``) to run
    a method on the other curvature than ``curvature``; ``exact`` is always run (it is the reference).
    """

    model: str = "small_cnn"
    test_points: int = 100
    methods: tuple[str, ...] = METHODS
    peers: tuple[str, ...] = PEERS
    dtype: str = "float64"
    device: str = "cpu"
    curvature: str = "hessian"
    damping: float = 0.01
    weight_decay: float = 1e-3
    epochs: int = 300
    lr: float = 0.01
    train_subset: int | None = None
    arnoldi_rank: int = 20
    threads: int = 1
    seed: int = 0
    in_process: bool = False

    def __post_init__(self) -> None:
        _choice("model", self.model, MODELS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("curvature", self.curvature, CURVATURES)
        for name in self.methods:
            method, _, curvature = name.partition(":")
            _choice("method", method, METHODS)
            if curvature:
                _choice(f"curvature of {name!r}", curvature, CURVATURES)
                if method not in ("exact", "cg", "arnoldi"):
                    raise ValueError(f"{name!r}: only exact, cg and arnoldi take a curvature")
        for peer in self.peers:
            _choice("peer", peer, PEERS)
        if self.test_points < 1 or self.epochs < 0 or self.threads < 1 or self.arnoldi_rank < 1:
            raise ValueError("test_points, threads and arnoldi_rank must be >= 1 and epochs >= 0")
        if self.train_subset is not None and self.train_subset < 2:
            raise ValueError(f"train_subset must be >= 2 training points; got {self.train_subset}")
        if not self.damping >= 0 or not self.weight_decay >= 0:
            raise ValueError("damping and weight_decay must be >= 0")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA GPU here")

    @property
    def runs(self) -> tuple[str, ...]:
        """What the workers run, in order: exact first (the reference), the other methods, then the peers."""
        ours = ["exact"] + [m for m in dict.fromkeys(self.methods) if m != "exact"]
        return tuple(ours) + tuple(dict.fromkeys(self.peers))


QUICK = dict(model="tiny_cnn", test_points=4, methods=("exact", "cg", "ekfac"), peers=("captum-arnoldi",),
             train_subset=200, epochs=100, lr=0.02, damping=0.05, arnoldi_rank=10, in_process=True)


def _choice(what: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


# ---- the model, the data and θ̂ (shared by the parent and every worker) ----------------------------------------


def tiny_cnn(input_shape: tuple[int, int, int], num_classes: int) -> ModuleNet:
    """A 200-parameter CNN of the same layer kinds as ``small_cnn`` (a strided 3×3 conv, a 1×1 conv, Linear)."""

    def build() -> torch.nn.Module:
        nn = torch.nn
        return nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(input_shape[0], 4, 3, stride=2, padding=1), tanh1=nn.Tanh(),
            conv2=nn.Conv2d(4, num_classes, 1), tanh2=nn.Tanh(), pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(), fc=nn.Linear(num_classes, num_classes)))

    return ModuleNet("tiny_cnn", build, input_shape, num_classes)


def load(cfg: Config) -> tuple[ModuleNet, Dataset]:
    data = load_dataset("digits", dtype=getattr(torch, cfg.dtype))
    if cfg.train_subset is not None:
        k = cfg.train_subset
        data = Dataset(data.name, data.x_train[:k], data.y_train[:k], data.x_test, data.y_test, data.num_classes)
    if cfg.test_points > data.n_test:
        raise ValueError(f"--test-points {cfg.test_points}: digits has {data.n_test} test points")
    if cfg.model == "tiny_cnn":
        model = tiny_cnn(data.input_shape, data.num_classes)
    else:
        model = build_model(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes)
    return model, data.to(cfg.device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory above what is held when constructed: RSS high-water mark on the CPU, tensors on CUDA."""

    def __init__(self, device: str) -> None:
        self.device = device
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def mb(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base) / 2**20


# ---- workers: one fresh process per method ---------------------------------------------------------------------


def settings_for(cfg: Config, run: str) -> tuple[str, dict]:
    """(method, make_solver settings) for a run name; δ is added by every method (exact: damping_policy always)."""
    method, _, curvature = run.partition(":")
    curvature = curvature or cfg.curvature
    settings: dict = {"damping": cfg.damping}
    if method == "exact":
        settings.update(curvature=curvature, damping_policy="always")
    elif method == "cg":
        settings.update(curvature=curvature)
    elif method == "arnoldi":
        settings.update(curvature=curvature, rank=cfg.arnoldi_rank)
    return method, settings


def _curvature_of(cfg: Config, run: str) -> str:
    method, _, curvature = run.partition(":")
    if method.startswith("captum"):
        return "hessian"
    if method == "lissa":
        return "hessian"  # LiSSA's recursion is on Hessian products only
    if method == "ekfac":
        return "fisher"
    return curvature or cfg.curvature


def run_ours(cfg: Config, run: str, model: ModuleNet, data: Dataset, theta: torch.Tensor) -> dict:
    method, settings = settings_for(cfg, run)
    t = cfg.test_points
    start = time.perf_counter()
    test_grads = per_example_grads(model, theta, data.x_test[:t], data.y_test[:t])
    _sync(cfg.device)
    test_grad_s = time.perf_counter() - start

    memory = PeakMemory(cfg.device)
    start = time.perf_counter()
    solver = make_solver(method, model, theta, data.x_train, data.y_train, cfg.weight_decay, **settings)
    _sync(cfg.device)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    solved = solver.solve_with_info(test_grads)
    _sync(cfg.device)
    solve_s = time.perf_counter() - start
    peak_mb = memory.mb()

    start = time.perf_counter()
    n = data.n_train
    estimate = torch.empty(t, n, dtype=torch.float64, device=solved.x.device)
    for lo in range(0, n, GRAD_CHUNK):
        hi = min(lo + GRAD_CHUNK, n)
        grads = per_example_grads(model, theta, data.x_train[lo:hi], data.y_train[lo:hi]).to(torch.float64)
        estimate[:, lo:hi] = solved.x @ grads.T / n
    _sync(cfg.device)
    train_grad_s = time.perf_counter() - start
    diagnostics = {k: v for k, v in solver.diagnostics.items() if isinstance(v, (int, float, str, bool))}
    return dict(estimate=estimate.cpu(), fit_s=fit_s, solve_s=solve_s, e2e_s=test_grad_s + solve_s + train_grad_s,
                peak_mb=peak_mb, diverged=int(solved.diverged.sum()),
                iterations=float(solved.iterations.double().mean()), diagnostics=diagnostics)


def as_module(model: ModuleNet, theta: torch.Tensor) -> torch.nn.Module:
    """The ``nn.Module`` that ``model`` holds (on the meta device), materialised on θ's device with θ loaded."""
    import copy

    module = copy.deepcopy(model.module).to_empty(device=theta.device).to(theta.dtype)
    views = model.unflatten(theta)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(views[name])
    return module.eval()


def run_captum(cfg: Config, run: str, model: ModuleNet, data: Dataset, theta: torch.Tensor, workdir: Path) -> dict:
    from captum.influence import NaiveInfluenceFunction
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction  # not re-exported
    from torch.utils.data import TensorDataset

    t, n = cfg.test_points, data.n_train
    module = as_module(model, theta)
    x_test = data.x_test[:t].reshape(t, *model.input_shape)
    with torch.no_grad():
        if not torch.allclose(module(x_test), model.forward(theta, x_test), rtol=1e-5, atol=1e-6):
            raise RuntimeError("the materialised module does not reproduce model.forward(θ̂, x)")
    checkpoint = workdir / f"{run}-checkpoint.pt"
    torch.save(module.state_dict(), checkpoint)
    train_set = TensorDataset(data.x_train.reshape(n, *model.input_shape), data.y_train)
    common = dict(loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=n,
                  hessian_reg=n * (cfg.weight_decay + cfg.damping), projection_on_cpu=cfg.device == "cpu")

    memory = PeakMemory(cfg.device)
    start = time.perf_counter()
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)  # captum's
    if run == "captum-naive":
        influence = NaiveInfluenceFunction(module, train_set, str(checkpoint), projection_dim=model.n_params,
                                           seed=cfg.seed, **common)
    else:
        influence = ArnoldiInfluenceFunction(module, train_set, str(checkpoint), projection_dim=cfg.arnoldi_rank,
                                             arnoldi_dim=min(2 * cfg.arnoldi_rank, model.n_params), seed=cfg.seed,
                                             **common)
    _sync(cfg.device)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = influence.influence((x_test, data.y_test[:t]))
    _sync(cfg.device)
    e2e_s = time.perf_counter() - start
    peak_mb = memory.mb()
    return dict(estimate=scores.detach().to(torch.float64).cpu(), fit_s=fit_s, solve_s=math.nan, e2e_s=e2e_s,
                peak_mb=peak_mb, diverged=0, iterations=math.nan, diagnostics={})


def run_one(cfg: Config, run: str, model: ModuleNet, data: Dataset, theta: torch.Tensor, workdir: Path) -> dict:
    if run.startswith("captum"):
        return run_captum(cfg, run, model, data, theta, workdir)
    return run_ours(cfg, run, model, data, theta)


def prepare(cfg: Config, theta: torch.Tensor, workdir: Path) -> None:
    """What a worker reads: the configuration and θ̂."""
    (workdir / "config.json").write_text(json.dumps(asdict(cfg)))
    torch.save(theta.cpu(), workdir / "theta.pt")


def worker(run: str, workdir: Path) -> None:
    cfg = Config(**_from_json(json.loads((workdir / "config.json").read_text())))
    torch.set_num_threads(cfg.threads)
    model, data = load(cfg)
    theta = torch.load(workdir / "theta.pt").to(cfg.device)
    torch.save(run_one(cfg, run, model, data, theta, workdir), workdir / f"{run}.pt")


def _from_json(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _in_process(cfg: Config, run: str, model: ModuleNet, data: Dataset, theta: torch.Tensor, workdir: Path,
                log: Callable[[str], None]) -> dict:
    start = time.perf_counter()
    try:
        result = run_one(cfg, run, model, data, theta, workdir)
    except Exception as err:  # noqa: BLE001 (a failing method is a row of the table, not the end of the run)
        log(f"  {run}: FAILED: {type(err).__name__}: {err}")
        return {"error": f"{type(err).__name__}: {err}"[:500]}
    log(f"  {run}: done in {time.perf_counter() - start:.1f} s")
    return result


def spawn(run: str, workdir: Path, log: Callable[[str], None]) -> dict:
    """Run one method in a fresh process (``--worker``) on a :func:`prepare`-d workdir; its result, or {"error"}."""
    cmd = [sys.executable, "-m", "benchmarks.ihvp", "--worker", run, "--workdir", str(workdir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        log(f"  {run}: FAILED (exit {proc.returncode}): {tail[0][:200]}")
        return {"error": tail[0][:500]}
    log(f"  {run}: done in {time.perf_counter() - start:.1f} s (process included)")
    return torch.load(workdir / f"{run}.pt", weights_only=False)


# ---- the parent: train, run the workers, compare, print --------------------------------------------------------


def _mean_spearman(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    values = [spearman(estimate[t], reference[t]) for t in range(reference.shape[0])]
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _train(cfg: Config, model: ModuleNet, data: Dataset) -> tuple[torch.Tensor, dict]:
    start = time.perf_counter()
    fit = train(model, data.x_train, data.y_train, weight_decay=cfg.weight_decay, lr=cfg.lr, epochs=cfg.epochs,
                seed=cfg.seed)
    theta = fit.theta
    with torch.no_grad():
        train_acc = float((model.forward(theta, data.x_train).argmax(1) == data.y_train).double().mean())
        test_acc = float((model.forward(theta, data.x_test).argmax(1) == data.y_test).double().mean())
    setup = dict(model=cfg.model, n_params=model.n_params, n_train=data.n_train, test_points=cfg.test_points,
                 train_seconds=time.perf_counter() - start, train_loss=fit.train_loss, grad_norm=fit.grad_norm,
                 train_accuracy=train_acc, test_accuracy=test_acc, threads=cfg.threads, device=cfg.device,
                 torch=torch.__version__, memory=_memory_measure(cfg))
    return theta, setup


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor | None) -> float:
    """‖estimate − exact‖ / ‖exact‖ over the rows that did not diverge (Frobenius): the values, not the ranks."""
    if reference is None:
        return math.nan
    ok = torch.isfinite(estimate).all(1)
    return float((estimate[ok] - reference[ok]).norm() / reference[ok].norm()) if bool(ok.any()) else math.nan


def benchmark(cfg: Config, log: Callable[[str], None] = print, workdir: Path | None = None) -> dict:
    """Train θ̂, run every method and peer (each in its own process unless ``cfg.in_process``), and return the
    configuration, the setup and one row per run.

    ``workdir``: keep θ̂ and every run's result there, and reuse them when the directory holds a run of the same
    configuration (a long benchmark interrupted halfway resumes where it stopped); None: a temporary directory.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="bench-ihvp-") as tmp:
            return benchmark(cfg, log, Path(tmp))
    torch.set_num_threads(cfg.threads)
    model, data = load(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    setup_file = workdir / "setup.json"
    same = (workdir / "config.json").exists() and _from_json(json.loads((workdir / "config.json").read_text())) \
        == _from_json(asdict(cfg))
    if same and setup_file.exists() and (workdir / "theta.pt").exists():
        theta = torch.load(workdir / "theta.pt").to(cfg.device)
        setup = json.loads(setup_file.read_text())
        log(f"reusing θ̂ and finished runs in {workdir}")
    else:
        for old in workdir.glob("*.pt"):
            old.unlink()  # results of another configuration
        theta, setup = _train(cfg, model, data)
        prepare(cfg, theta, workdir)
        setup_file.write_text(json.dumps(setup))
    log(f"{cfg.model} ({setup['n_params']} parameters) on digits: n = {setup['n_train']}, {cfg.epochs} Adam epochs "
        f"(lr {cfg.lr}, λ = {cfg.weight_decay}) in {setup['train_seconds']:.1f} s: train loss "
        f"{setup['train_loss']:.4f}, ‖∇R‖ {setup['grad_norm']:.1e}, accuracy train {setup['train_accuracy']:.3f} / "
        f"test {setup['test_accuracy']:.3f}")

    peers = [p for p in cfg.peers if _captum_available()]
    if cfg.peers and not peers:
        log("captum is not installed (pip install captum, or the project's `bench` extra): peer rows skipped")
    runs = [r for r in cfg.runs if not r.startswith("captum") or r in peers]
    results: dict[str, dict] = {}
    for run in runs:
        done = workdir / f"{run}.pt"
        if done.exists():
            results[run] = torch.load(done, weights_only=False)
            log(f"  {run}: reused {done}")
        elif cfg.in_process:
            results[run] = _in_process(cfg, run, model, data, theta, workdir, log)
            if "error" not in results[run]:
                torch.save(results[run], done)
        else:
            results[run] = spawn(run, workdir, log)

    reference = results["exact"].get("estimate")
    ggn_reference = results.get("exact:ggn", {}).get("estimate")
    rows = []
    for run in runs:
        r = results[run]
        row = dict(method=run, curvature=_curvature_of(cfg, run), error=r.get("error"))
        if "error" not in r:
            est = r["estimate"]
            row.update(fit_s=r["fit_s"], solve_ms=1e3 * r["solve_s"] / cfg.test_points,
                       e2e_ms=1e3 * r["e2e_s"] / cfg.test_points, total_s=r["fit_s"] + r["e2e_s"],
                       peak_mb=r["peak_mb"], diverged=r["diverged"], iterations=r["iterations"],
                       spearman=_mean_spearman(est, reference) if reference is not None else math.nan,
                       rel_err=_relative_error(est, reference),
                       diagnostics=r["diagnostics"])
            if ggn_reference is not None:
                row["spearman_ggn"] = _mean_spearman(est, ggn_reference)
        rows.append(row)
    cg = next((row for row in rows if row["method"] == "cg" and row["error"] is None), None)
    for row in rows:
        for key in ("solve_ms", "e2e_ms", "total_s"):
            ok = cg is not None and row["error"] is None and cg[key] > 0
            row[f"{key}_vs_cg"] = row[key] / cg[key] if ok else math.nan
    return {"config": asdict(cfg), "setup": setup, "rows": rows}


def _memory_measure(cfg: Config) -> str:
    if cfg.device == "cuda":
        return "torch.cuda.max_memory_allocated growth" + ("" if cfg.in_process else ", fresh process per method")
    if cfg.in_process:
        return "getrusage ru_maxrss growth in one process for all methods (a lower bound after the first)"
    return "getrusage ru_maxrss growth, fresh process per method"


def _captum_available() -> bool:
    return importlib.util.find_spec("captum") is not None


def format_table(result: dict) -> str:
    rows = result["rows"]
    ggn = any("spearman_ggn" in r for r in rows)
    head = (f"{'method':<15} {'curvature':<9} {'fit s':>8} {'solve ms/pt':>11} {'e2e ms/pt':>10} {'total s':>8} "
            f"{'peak MB':>8} {'ρ vs exact':>10} {'rel err':>8}" + (f" {'ρ vs GGN':>8}" if ggn else "")
            + f" {'solve ÷CG':>9} {'e2e ÷CG':>8} {'total ÷CG':>9}  notes")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"] is not None:
            lines.append(f"{r['method']:<15} {r['curvature']:<9} failed: {r['error'][:80]}")
            continue
        notes = []
        if r["diverged"]:
            notes.append(f"{r['diverged']}/{result['setup']['test_points']} diverged")
        if math.isfinite(r["iterations"]) and r["iterations"] > 0:
            notes.append(f"{r['iterations']:.0f} products/pt")
        lines.append(
            f"{r['method']:<15} {r['curvature']:<9} {r['fit_s']:>8.2f} {_num(r['solve_ms'], 11, '.2f')} "
            f"{r['e2e_ms']:>10.2f} {r['total_s']:>8.2f} {r['peak_mb']:>8.1f} {_num(r['spearman'], 10, '.3f')} {_num(r['rel_err'], 8, '.1e')}"
            + (f" {_num(r.get('spearman_ggn', math.nan), 8, '.3f')}" if ggn else "")
            + f" {_num(r['solve_ms_vs_cg'], 9, '.4f')} {_num(r['e2e_ms_vs_cg'], 8, '.3f')}"
            f" {_num(r['total_s_vs_cg'], 9, '.3f')}  {', '.join(notes)}")
    return "\n".join(lines)


def _num(value: float, width: int, spec: str) -> str:
    return f"{value:>{width}{spec}}" if math.isfinite(value) else f"{'—':>{width}}"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ihvp", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Columns and conventions: see the module docstring (benchmarks/ihvp.py).")
    d = Config()
    parser.add_argument("--test-points", type=int, default=d.test_points,
                        help=f"test points T, the first T of the test split (default {d.test_points})")
    parser.add_argument("--methods", nargs="+", default=list(d.methods), metavar="METHOD",
                        help=f"from {', '.join(METHODS)}; METHOD:ggn or METHOD:hessian for exact/cg/arnoldi on the "
                             f"other curvature (e.g. exact:ggn); exact always runs (default: all five)")
    parser.add_argument("--peers", nargs="*", default=list(d.peers), choices=PEERS,
                        help="captum rows (default both; none: --peers with nothing after it)")
    parser.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="data and θ̂ (default float64; curvature "
                        "and solves are float64 whatever this is)")
    parser.add_argument("--device", choices=DEVICES, default=d.device)
    parser.add_argument("--curvature", choices=CURVATURES, default=d.curvature,
                        help="C for exact, cg and arnoldi (default hessian, as in the paper)")
    parser.add_argument("--damping", type=float, default=d.damping, help=f"δ, added by every method (default "
                        f"{d.damping}, Koh & Liang's)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--epochs", type=int, default=d.epochs, help="full-batch Adam epochs to θ̂")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--train-subset", type=int, default=None, help="first k training points only")
    parser.add_argument("--arnoldi-rank", type=int, default=d.arnoldi_rank,
                        help="rank of arnoldi and captum-arnoldi (iterations 2·rank)")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads per process (default 1)")
    parser.add_argument("--model", choices=MODELS, default=d.model)
    parser.add_argument("--in-process", action="store_true",
                        help="run every method in this process (faster start; peak memory only a lower bound)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--json", type=Path, default=None, help="also write config, setup and rows here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep θ̂ and each method's result here and reuse them on a rerun of the same "
                             "configuration (default: a temporary directory)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> Config:
    cfg = Config(model=args.model, test_points=args.test_points, methods=tuple(args.methods), peers=tuple(args.peers),
                 dtype=args.dtype, device=args.device, curvature=args.curvature, damping=args.damping,
                 weight_decay=args.weight_decay, epochs=args.epochs, lr=args.lr, train_subset=args.train_subset,
                 arnoldi_rank=args.arnoldi_rank, threads=args.threads, in_process=args.in_process)
    if args.quick:
        # Quick settings, except what was given explicitly on the command line.
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        cfg = replace(cfg, **{k: v for k, v in QUICK.items() if k not in given})
    return cfg


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    if args.worker:
        worker(args.worker, args.workdir)
        return None
    try:
        cfg = config_from_args(args, argv)
    except ValueError as err:
        make_parser().error(str(err))
    result = benchmark(cfg, workdir=args.workdir)
    print()
    print(format_table(result))
    print(f"\nT = {cfg.test_points} test points; δ = {cfg.damping}; peak MB: {result['setup']['memory']}; "
          f"torch {torch.__version__}, {cfg.threads} thread(s), {cfg.device}.")
    if any(r["method"].startswith("captum") for r in result["rows"]):
        print("captum scores = ∇L_tᵀ (H_Σ + n(λ+δ)I)^{-1} ∇L_i = our (1/n) ∇L_tᵀ (H + δI)^{-1} ∇L_i, same sign "
              "(positive: the test loss goes up without z_i); it always uses the Hessian.")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
