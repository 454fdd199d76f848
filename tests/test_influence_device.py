"""Devices and dtypes: everything in influence/ computes where its inputs are, and tasks pick their device.

Without a GPU the checks use a stand-in for a second device: under ``with torch.device("meta")`` every tensor
created *without* an explicit device lands on the meta device (which holds no data), while inputs stay on the
CPU. A function that allocates a workspace, a buffer or a random draw anywhere but on its inputs' device then
fails (mixed devices, or ``.item()`` of a meta tensor) or returns a meta tensor. The same code on CUDA inputs
would have made CPU tensors. With a GPU, the tests at the end compare CPU and CUDA numbers directly.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from influence.curvature import CurvatureOperator, MatrixOperator, gauss_newton, hessian
from influence.data import load_dataset
from influence.ihvp import METHODS, make_solver
from influence.models import build_model
from influence.scores import influence_estimates, per_example_grads, select_removals, select_test_points
from influence.stacked import StackedMLP
from influence.retrain import check_same_device, removal_weights, retrain_batched, retrain_loop
from influence.train import train

ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
WD = 0.005

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fitted(iris):
    """A depth-1 width-5 tanh MLP briefly trained on Iris, in float64."""
    model = build_model("mlp", in_features=iris.in_features, num_classes=iris.num_classes, depth=1, width=5)
    theta = train(model, iris.x_train, iris.y_train, weight_decay=WD, lr=0.01, epochs=300, seed=0).theta
    return model, theta


# --- static: no factory call in influence/ leaves the device to torch's default ------------------------------

FACTORIES = {"empty", "zeros", "ones", "full", "arange", "eye", "linspace", "rand", "randn", "randint",
             "randperm", "tensor", "as_tensor", "normal"}


def _factory_calls_without_device(path: Path) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            bad.append(f"{path.name}:{node.lineno} torch.{node.func.attr}(...)")
    return bad


def test_no_tensor_factory_in_influence_without_a_device():
    """torch.zeros(...) and friends name their device (the input's, or "cpu" for a reproducible random draw
    that is moved afterwards); the ``*_like`` forms follow their argument and are fine."""
    bad = [hit for path in sorted((ROOT / "influence").glob("*.py")) for hit in _factory_calls_without_device(path)]
    assert not bad, "tensor factories without device=: " + ", ".join(bad)


def test_static_check_sees_a_factory_without_device(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import torch\na = torch.zeros(3, dtype=torch.int64)\nb = torch.zeros(3, device=a.device)\n"
                    "c = torch.zeros_like(a)\n")
    assert _factory_calls_without_device(path) == ["m.py:2 torch.zeros(...)"]


# --- dynamic: every path, inputs on the CPU, torch's default device elsewhere ---------------------------------


def _probe_optim() -> None:
    t = torch.zeros(2, dtype=torch.float64, device="cpu", requires_grad=True)
    opt = torch.optim.Adam([t], foreach=False)
    (t * t).sum().backward()
    opt.step()


def _probe_jacrev() -> None:
    from torch.func import jacrev

    x, y = torch.ones(3, 2, dtype=torch.float64, device="cpu"), torch.zeros(3, dtype=torch.int64, device="cpu")
    jacrev(jacrev(lambda t: torch.nn.functional.cross_entropy(x @ t.view(2, 2), y)))(x[0].repeat(2))


@pytest.fixture(scope="module")
def stand_in_hosts() -> set[str]:
    """The torch machinery that the meta stand-in can host. Some torch versions (2.11, for one) create tensors
    on the default device inside torch.optim (Adam's step counter) or torch.func's jacrev, on purpose; under
    the stand-in that would be blamed on our code, so the paths that use them are checked only where torch
    itself passes."""
    hosts = set()
    for name, probe in (("optim", _probe_optim), ("jacrev", _probe_jacrev)):
        try:
            with torch.device("meta"):
                probe()
            hosts.add(name)
        except (RuntimeError, NotImplementedError):
            pass
    return hosts


def _paths(model, theta, data):
    """(name, torch machinery it needs beyond plain ops, run) for every path of influence/."""
    x, y = data.x_train, data.y_train
    weights = removal_weights(data.n_train, [0, 5, 7], device=x.device, dtype=x.dtype)
    kw = dict(weight_decay=WD, lr=0.01, epochs=3)
    yield "train", "optim", lambda: train(model, x, y, seed=0, **kw).theta
    yield "train from theta0", "optim", lambda: train(model, x, y, seed=0, theta0=theta, **kw).theta
    yield "retrain_batched", "", lambda: retrain_batched(model, theta, x, y, weights, **kw)
    yield "retrain_loop", "", lambda: retrain_loop(model, theta, x, y, weights, **kw)
    yield "StackedMLP.grad", "", lambda: _stacked_grad(model, theta, x, y, weights)
    yield "hessian", "jacrev", lambda: hessian(model, theta, x, y, WD)
    yield "gauss_newton", "", lambda: gauss_newton(model, theta, x, y, WD)
    yield "minibatch HVP", "", lambda: CurvatureOperator(model, theta, x, y, WD).matvec(
        torch.ones(2, model.n_params, dtype=torch.float64, device=x.device), torch.tensor([1, 4], device="cpu"))
    yield "per_example_grads", "", lambda: per_example_grads(model, theta, x, y)
    yield "per_example_grads, none", "", lambda: per_example_grads(model, theta, x[:0], y[:0])
    for method in METHODS:
        needs = "jacrev" if method == "exact" else ""
        yield f"influence_estimates {method}", needs, lambda m=method: _estimates(model, theta, data, m)
    yield "lissa scale=auto", "", lambda: _estimates(model, theta, data, "lissa", scale="auto", depth=20)
    yield "ekfac sampled labels", "", lambda: _estimates(model, theta, data, "ekfac", labels="sampled")
    yield "cg, diverged rows", "", lambda: _estimates(model, theta, data, "cg", curvature="hessian", damping=0.0)
    yield "empty solve", "", lambda: make_solver("cg", model, theta, x, y, WD).solve_with_info(
        theta.new_zeros(0, model.n_params)).residual


def _stacked_grad(model, theta, x, y, weights):
    stack = StackedMLP(model, x, y, weights)
    stack.load(theta)
    return torch.cat([stack.grad(), stack.theta().flatten()])


def _estimates(model, theta, data, method, **settings):
    settings.setdefault("damping", 0.01)
    solver = make_solver(method, model, theta, data.x_train, data.y_train, WD, **settings)
    inf = influence_estimates(model, theta, data, [0, 3], solver, dtheta=True, chunk_size=50)
    return torch.cat([inf.estimate.flatten(), inf.predicted_dtheta, inf.test_loss.double(),
                      inf.iterations.double(), inf.residual, inf.diverged.double()])


def test_every_path_computes_on_its_inputs_device(iris, fitted, stand_in_hosts):
    model, theta = fitted
    failures = []
    for name, needs, run in _paths(model, theta, iris):
        if needs and needs not in stand_in_hosts:
            continue
        try:
            with torch.device("meta"):
                out = run()
        except (RuntimeError, NotImplementedError) as exc:
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        if out.device.type != "cpu":
            failures.append(f"{name}: result on {out.device}")
    assert not failures, "created tensors off the inputs' device:\n" + "\n".join(failures)


def test_selection_and_weights_are_device_independent():
    with torch.device("meta"):
        chosen = select_test_points(torch.arange(30.0, device="cpu"), [("random", 3), ("highest", 2)], seed=0)
        removals = select_removals(torch.zeros(3, 30, device="cpu"), "random", k=5, seed=1)
        weights = removal_weights(30, [1, 2], device="cpu")
    assert chosen == select_test_points(torch.arange(30.0), [("random", 3), ("highest", 2)], seed=0)
    assert removals == select_removals(torch.zeros(3, 30), "random", k=5, seed=1)
    assert weights.device.type == "cpu" and weights.sum() == 3 * 30 - 2


def test_init_is_a_cpu_draw_whatever_the_default_device(fitted):
    model, _ = fitted
    with torch.device("meta"):
        theta0 = model.init(3)
        moved = model.init(3, device="meta")
    assert theta0.device.type == "cpu" and moved.device.type == "meta"
    assert torch.equal(theta0, model.init(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_follow_the_inputs_dtype(iris, fitted, dtype):
    """Training, retraining and gradients keep the data's dtype; curvature and solves are float64 always
    (documented: the smallest eigenvalues need it), on the same device."""
    model, theta64 = fitted
    theta, x, y = theta64.to(dtype), iris.x_train.to(dtype), iris.y_train
    weights = removal_weights(iris.n_train, [0, 1], dtype=dtype)
    kw = dict(weight_decay=WD, lr=0.01, epochs=3)
    assert weights.dtype == dtype
    assert train(model, x, y, seed=0, **kw).theta.dtype == dtype
    assert retrain_batched(model, theta, x, y, weights, **kw).dtype == dtype
    assert retrain_loop(model, theta, x, y, weights, **kw).dtype == dtype
    assert per_example_grads(model, theta, x, y).dtype == dtype
    assert model.forward(theta.expand(2, -1), x).dtype == dtype
    data = load_dataset("iris", dtype=dtype)
    for method in METHODS:
        solver = make_solver(method, model, theta, x, y, WD, damping=0.01)
        inf = influence_estimates(model, theta, data, [0], solver)
        assert inf.estimate.dtype == torch.float64 and inf.test_loss.dtype == dtype, method
    assert hessian(model, theta, x, y, WD).dtype == torch.float64
    assert MatrixOperator(torch.eye(3, dtype=dtype)).matvec(torch.ones(3, dtype=dtype)).dtype == torch.float64


def test_mixed_devices_are_refused_with_the_arguments_named(iris, fitted):
    model, theta = fitted
    with pytest.raises(ValueError, match=r"theta0 on meta, x on cpu.*\.to\(device\)"):
        check_same_device(theta0=theta.to("meta"), x=iris.x_train)
    weights = removal_weights(iris.n_train, [0])
    with pytest.raises(ValueError, match="weights on meta"):
        retrain_batched(model, theta, iris.x_train, iris.y_train, weights.to("meta"), weight_decay=WD, lr=0.01,
                        epochs=1)


def test_dataset_moves_as_a_whole(iris):
    moved = iris.to("meta")
    assert {t.device.type for t in (moved.x_train, moved.y_train, moved.x_test, moved.y_test)} == {"meta"}
    assert moved.device.type == "meta" and moved.num_classes == iris.num_classes and iris.device.type == "cpu"


# --- tasks: which device ----------------------------------------------------------------------------------------


def test_the_task_device_is_cuda_only_when_a_gpu_was_assigned_and_usable(monkeypatch):
    from jobs import tasks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tasks.device_for([]) == torch.device("cpu")  # no GPU assigned
    assert tasks.device_for(["0"]) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tasks.device_for(["0"]) == torch.device("cpu")  # assigned, but torch cannot use it


class _FakeContext:
    def __init__(self, gpus):
        self.gpus = gpus

    def get_assigned_resources(self):
        return {"CPU": 1.0, **({"GPU": float(len(self.gpus))} if self.gpus else {})}

    def get_accelerator_ids(self):
        return {"GPU": self.gpus}

    def get_node_id(self):
        return "f" * 56


def test_the_ray_wrapper_hands_the_assigned_gpu_to_the_body_as_its_device(monkeypatch):
    pytest.importorskip("ray")
    from cluster import runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = runner.with_task_resources(lambda x, device: (x, device))
    for gpus, expected in ((["1"], torch.device("cuda")), ([], torch.device("cpu"))):
        monkeypatch.setattr(runner.ray, "get_runtime_context", lambda gpus=gpus: _FakeContext(gpus))
        assert seen(7) == (7, expected)


def _task_config(tmp_path):
    from jobs.spec import parse_spec
    from storage.uri import open_store

    cfg = parse_spec({
        "experiment": "device", "train": {"epochs": 200, "weight_decay": WD},
        "influence": {"methods": ["exact", "lissa"], "lissa": {"scale": "auto"}, "damping": 0.01},
        "test_points": [{"highest": 2}], "ground_truth": {"epochs": 20, "controls": 2, "chunk": 8},
    }).configurations()[0]
    return open_store(str(tmp_path)), cfg


def _run_tasks(store, cfg, data, device=torch.device("cpu")):
    from jobs import tasks
    from storage import tables

    theta, out = tasks.train_task(store, cfg, data, device=device)
    test_idx = [i for i, _ in out.test_points]
    parts = [tasks.influence_task(store, cfg, data, theta, m, 0, test_idx, out.damping, device=device)
             for m in cfg.methods]
    parts.append(tasks.retrain_task(store, cfg, data, theta, 0, [0, 3, 9], test_idx, device=device))
    return theta, [tables.read_part(store, p).to_pydict() for p in parts]


def test_tasks_on_cpu_allocate_nothing_off_the_cpu(tmp_path, monkeypatch, iris, stand_in_hosts):
    """The task bodies end to end with torch's default device elsewhere: θ̂ and every row come from the CPU."""
    pytest.importorskip("pyarrow")
    if stand_in_hosts != {"optim", "jacrev"}:
        pytest.skip(f"torch {torch.__version__} allocates on the default device inside optim or jacrev")
    store, cfg = _task_config(tmp_path)
    with torch.device("meta"):
        theta, rows = _run_tasks(store, cfg, iris)
    assert theta.device.type == "cpu"
    assert all(len(r["test_idx"]) > 0 for r in rows)


# --- CUDA: the same numbers on both devices (run on a GPU machine) ---------------------------------------------


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a| over the finite entries; inf unless a and b are NaN in the same places."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    if not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    a, b = a[~a.isnan()], b[~b.isnan()]
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-300)


@CUDA
def test_cuda_training_and_retraining_match_cpu(iris):
    model = build_model("mlp", in_features=4, num_classes=3, depth=2, width=5)
    gpu = iris.to("cuda")
    kw = dict(weight_decay=WD, lr=0.01, epochs=200)
    theta_cpu = train(model, iris.x_train, iris.y_train, seed=0, **kw).theta
    theta_gpu = train(model, gpu.x_train, gpu.y_train, seed=0, **kw).theta
    assert theta_gpu.device.type == "cuda"
    assert _max_rel(theta_cpu, theta_gpu) < 1e-8
    weights = removal_weights(iris.n_train, range(iris.n_train))
    out_cpu = retrain_batched(model, theta_cpu, iris.x_train, iris.y_train, weights, **kw)
    out_gpu = retrain_batched(model, theta_cpu.cuda(), gpu.x_train, gpu.y_train, weights.cuda(), **kw)
    assert out_gpu.device.type == "cuda"
    assert float((out_cpu - out_gpu.cpu()).abs().max()) < 1e-8
    loop_gpu = retrain_loop(model, theta_cpu.cuda(), gpu.x_train, gpu.y_train, weights[:3].cuda(), **kw)
    assert float((out_cpu[:3] - loop_gpu.cpu()).abs().max()) < 1e-8


@CUDA
@pytest.mark.parametrize("method,settings", [
    ("exact", {}), ("cg", {}), ("arnoldi", {"rank": 30}), ("lissa", {"scale": "auto"}), ("ekfac", {}),
    ("ekfac", {"labels": "sampled"}), ("exact", {"curvature": "ggn"}),
])
def test_cuda_estimates_match_cpu(iris, fitted, method, settings):
    model, theta = fitted
    gpu = iris.to("cuda")
    results = []
    for data, th in ((iris, theta), (gpu, theta.cuda())):
        solver = make_solver(method, model, th, data.x_train, data.y_train, WD, damping=0.01, **settings)
        results.append(influence_estimates(model, th, data, [0, 1, 2], solver, dtheta=True))
    cpu, cuda = results
    assert cuda.estimate.device.type == "cuda"
    assert _max_rel(cpu.estimate, cuda.estimate) < 1e-8
    assert _max_rel(cpu.predicted_dtheta, cuda.predicted_dtheta) < 1e-8
    if method == "lissa":  # the same minibatches on both devices, so the same steps and scale
        assert torch.equal(cpu.iterations, cuda.iterations.cpu())


@CUDA
def test_cuda_tasks_write_the_same_rows_as_cpu_tasks(tmp_path, monkeypatch, iris):
    pytest.importorskip("pyarrow")
    from jobs import tasks

    results = []
    for gpus in ([], ["0"]):
        (tmp_path / f"gpus{len(gpus)}").mkdir()
        store, cfg = _task_config(tmp_path / f"gpus{len(gpus)}")
        results.append(_run_tasks(store, cfg, iris, tasks.device_for(gpus)))
    (theta_cpu, rows_cpu), (theta_gpu, rows_gpu) = results
    assert theta_gpu.device.type == "cpu" and _max_rel(theta_cpu, theta_gpu) < 1e-8
    for a, b in zip(rows_cpu, rows_gpu):
        for column in ("estimate", "actual", "loss_retrained"):
            if column in a:
                assert _max_rel(torch.tensor(a[column]), torch.tensor(b[column])) < 1e-6, column


def test_gpu_check_script_runs_quick(tmp_path):
    """benchmarks/gpu_check.py --quick: without CUDA the CPU side alone, with CUDA the comparisons too."""
    import json
    import subprocess
    import sys

    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(out.read_text())
    assert {row["part"] for row in record["rows"]} == {"train", "retrain", "estimates"}
    assert record["devices"] == (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
