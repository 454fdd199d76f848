"""Benchmark: what grows with the data set and what data-parallel training buys, measured side by side.

    python -m benchmarks.scale [--part memory|ddp|nodes|shard|all] [--images 2000,20000] [--image-size 32]
                               [--model small_cnn] [--epochs 40] [--retrain-tasks 16]
                               [--shard-points 512] [--test-points 100]

Driver and worker memory against the size of an ImageNet-format set. For each N, `fragile data tiny imagenet
--images N` writes an ImageFolder of N small training JPEGs (10 classes), and three fresh processes each do one
thing and report their peak resident memory (ru_maxrss):
  imports   import what a driver and a task import (torch, torchvision, the project): the floor
  plan      what the driver does before the first task: `jobs.tasks.datasets_for` (the DataSource: sizes from
            the file list, no image decoded) and the task counts
  load      what a task does when it holds the set (influence and retrain tasks, and what a driver did before
            DataSource existed): the whole split decoded and standardised in memory, `jobs.tasks.load_data`
  stream    what a train task does with a minibatched file set: `DataSource.stream` with one DataLoader
            process, an epoch of minibatches of 64 and an evaluation pass (the loader's peak reported apart)
Reported above the floor, in MiB, with the growth from the smallest to the largest N. The driver's column must
not grow with N beyond the file list (a few hundred bytes per image), nor must the streaming task's; the task
that holds the set grows with its images.

Training throughput with 1 and 2 data-parallel workers (Ray Train, gloo, 1 CPU and 1 torch thread each) of a
model (default the small CNN) on digits (1,437 training images, minibatches of 64, SGD, float64), each worker running
`influence.data_parallel.train_data_parallel` with its all-reduce timed. Per W: the examples per second of the
training loop itself, the share of the loop spent in the all-reduce, and the seconds Ray Train takes to start
the group (the fit's wall time minus the loop's). The ratio of the two throughputs is what a second worker buys.

Retrains per second on 1 and on 2 Ray worker nodes of 1 CPU each (`cluster.local.up(workers=N, num_cpus=0)`: a
head without CPUs, so every task runs on a worker node, as `fragile cluster up --workers N --num-cpus 0` does):
the same retrain tasks of the small CNN on digits (8 removals and a control each, 2 epochs of minibatches of
64, SGD), submitted at once as the pipeline submits them, timed from submission to the last part landed, after
a first round of two tasks per node has started a worker process (and imported torch) on each.

Influence shard throughput: the training examples per second of one shard task's work
(`influence.scores.shard_estimates`: the shard's per-example gradients, `vmap(grad)` a chunk at a time, dotted
with the stored s_t of 100 test points) for the small CNN on MNIST-shaped images and ResNet-18 on CIFAR-shaped
images, float32 on this machine's CPU threads, from random images and a random s_t (the shard stage's cost does
not depend on how s_t was solved). Beside it, in the same run, the plain way: one `torch.autograd.grad` per
training example, then the same dot products. Both must give the same estimates (float32 tolerance: 1e-4 of the
largest estimate, 1e-2 for ResNet-18, whose 11M-term float32 dot products differ by about 2e-3). The split
says where the time goes: the gradients alone (`per_example_grads` over the same chunks) against the whole.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # drivers and nodes on loopback (cluster/local.py)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10

_CHILD = r"""
import json, resource, sys
from jobs import tasks
from jobs.plan import task_counts
from jobs.spec import Configuration
import torchvision.transforms  # a task's imports, for the floor
mode, root, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = Configuration("scale", dataset="imagenet", data_root=root, image_size=size, model="small_cnn", batch_size=64)
out = {}
if mode == "plan":
    source = tasks.datasets_for([cfg])[tasks.dataset_key(cfg)]
    out = {"n_train": source.n_train, "tasks": sum(task_counts([cfg], lambda c: source.n_train).values())}
elif mode == "load":
    out = {"n_train": tasks.load_data(cfg).n_train}
elif mode == "stream":
    stream = tasks.datasets_for([cfg])[tasks.dataset_key(cfg)].stream(workers=1)
    seen = sum(len(y) for _, y in stream.epoch_batches(64, seed=0, epoch=0))  # an epoch of minibatches
    seen += sum(len(y) for _, y in stream.chunks("train", tasks.EVAL_CHUNK))  # and an evaluation pass
    stream.close()
    out = {"n_train": stream.n_train, "seen": seen,
           "worker_peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
out["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(out))
"""


def _child(mode: str, root: str, size: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, root, str(size)], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on {root} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(images: list[int], size: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fragile-scale-") as tmp:
        for n in images:
            root = str(Path(tmp) / f"imagenet-{n}")
            subprocess.run([sys.executable, "-m", "fragile", "data", "tiny", "imagenet", root, "--images", str(n),
                            "--classes", str(CLASSES)], cwd=ROOT, check=True, capture_output=True)
            floor, plan, load, stream = (_child(mode, root, size) for mode in ("imports", "plan", "load", "stream"))
            assert plan["n_train"] == load["n_train"] == stream["n_train"], (plan, load, stream)
            assert stream["seen"] == 2 * stream["n_train"], stream
            rows.append({"images": plan["n_train"], "tasks": plan["tasks"],
                         "plan_mib": (plan["peak_kib"] - floor["peak_kib"]) / 1024,
                         "load_mib": (load["peak_kib"] - floor["peak_kib"]) / 1024,
                         "stream_mib": (stream["peak_kib"] - floor["peak_kib"]) / 1024,
                         "loader_mib": stream["worker_peak_kib"] / 1024,
                         "floor_mib": floor["peak_kib"] / 1024})
            print(f"  {rows[-1]['images']:>7} images: driver (plan) +{rows[-1]['plan_mib']:7.1f} MiB, "
                  f"task (load) +{rows[-1]['load_mib']:7.1f} MiB, task (stream) +{rows[-1]['stream_mib']:7.1f} MiB "
                  f"and its loader process {rows[-1]['loader_mib']:.0f} MiB; above the {rows[-1]['floor_mib']:.0f} "
                  f"MiB of the imports", flush=True)
    return rows


def _timed_worker(config: dict) -> None:
    """A Ray Train worker: train_data_parallel with its all-reduce timed; worker 0 writes the times."""
    import torch
    import torch.distributed as dist
    import ray.train

    from influence.data import load_dataset
    from influence.data_parallel import train_data_parallel
    from influence.models import build_model

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    data = load_dataset("digits")
    model = build_model(config["model"], input_shape=data.input_shape, num_classes=data.num_classes)
    reduce_seconds = [0.0]

    def all_reduce(tensor) -> None:
        start = time.perf_counter()
        dist.all_reduce(tensor)
        reduce_seconds[0] += time.perf_counter() - start

    start = time.perf_counter()
    train_data_parallel(model, data.x_train, data.y_train, rank=rank, world=world, all_reduce=all_reduce,
                        weight_decay=1e-3, lr=0.05, epochs=config["epochs"], seed=0, optimizer="sgd",
                        batch_size=64)
    loop = time.perf_counter() - start
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"loop_s": loop, "reduce_s": reduce_seconds[0],
                                                   "examples": data.n_train * config["epochs"]}))


def ddp(model: str, epochs: int) -> list[dict]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.runtime import connect

    runtime = connect(None, num_cpus=2)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="fragile-ddp-") as tmp:
            for workers in (1, 2):
                out = str(Path(tmp) / f"w{workers}.json")
                trainer = TorchTrainer(_timed_worker, train_loop_config={"epochs": epochs, "out": out, "model": model},
                                       scaling_config=ScalingConfig(num_workers=workers,
                                                                    resources_per_worker={"CPU": 1}),
                                       run_config=RunConfig(name=f"ddp-{workers}", storage_path=tmp))
                start = time.perf_counter()
                trainer.fit()
                wall = time.perf_counter() - start
                timed = json.loads(Path(out).read_text())
                rows.append({"workers": workers, "examples_per_s": timed["examples"] / timed["loop_s"],
                             "reduce_share": timed["reduce_s"] / timed["loop_s"], "loop_s": timed["loop_s"],
                             "startup_s": wall - timed["loop_s"]})
                print(f"  {workers} worker(s): {rows[-1]['examples_per_s']:7.0f} examples/s in the loop "
                      f"({rows[-1]['loop_s']:.1f} s, {100 * rows[-1]['reduce_share']:.0f}% of it in the "
                      f"all-reduce), {rows[-1]['startup_s']:.1f} s to start the group", flush=True)
    finally:
        if runtime.started_here:
            ray.shutdown()
    return rows


def nodes(tasks_count: int) -> list[dict]:
    import ray

    from cluster import local, s3server
    from cluster.runner import _remote, task_options
    from cluster.runtime import connect
    from influence.data import load_dataset
    from jobs import tasks
    from jobs.spec import Configuration
    from storage.uri import open_store

    cfg = Configuration("scale", dataset="digits", model="small_cnn", optimizer="sgd", lr=0.05, batch_size=64,
                        epochs=10, weight_decay=1e-3, retrain_epochs=2, controls=1, retrain_chunk=8)
    data = load_dataset("digits")
    theta = tasks.model_for(cfg, data).init(0, dtype=torch_float64())
    rows = []
    os.environ["RAY_AUTH_MODE"] = "disabled"
    for count in (1, 2):
        with tempfile.TemporaryDirectory(prefix="fragile-nodes-") as tmp:
            ports = s3server.free_ports(2)
            state = local.up(Path(tmp) / "cluster", ray_port=ports[0], dashboard_port=ports[1],
                             s3_port=s3server._port_pairs(1)[0], num_cpus=0, auth="disabled", workers=count,
                             worker_cpus=1)
            try:
                connect(f"127.0.0.1:{state.ray_port}")  # (pins this process to the loopback address)
                store = open_store(str(Path(tmp) / "store"))
                data_ref, theta_ref = ray.put(data), ray.put(theta)
                body = _remote(tasks.retrain_task, 1)

                def submit(chunks: range) -> list:
                    return [body.options(**task_options({"num_cpus": 1}, f"retrain {k}")).remote(
                        store, cfg, data_ref, theta_ref, k, list(range(8 * k, 8 * k + 8)), [0, 1]) for k in chunks]

                ray.get(submit(range(100, 100 + 2 * count)))  # warm: a worker process with torch on every node
                start = time.perf_counter()
                ray.get(submit(range(tasks_count)))
                wall = time.perf_counter() - start
            finally:
                if ray.is_initialized():
                    ray.shutdown()
                local.down(Path(tmp) / "cluster")
        rows.append({"nodes": count, "retrains_per_s": 8 * tasks_count / wall, "seconds": wall})
        print(f"  {count} worker node(s): {rows[-1]['retrains_per_s']:.1f} retrains/s ({tasks_count} tasks of 8 "
              f"removals in {wall:.1f} s)", flush=True)
    return rows


def shard(points: int, test_points: int) -> list[dict]:
    import torch

    from influence.data import Dataset
    from influence.models import build_model
    from influence.objective import per_example_loss
    from influence.scores import per_example_grads, shard_estimates

    rows = []
    # (model, input shape, chunk): the chunk keeps a chunk's gradients to ~1 GiB (ResNet-18 has 11.2M parameters)
    for name, shape, chunk in (("small_cnn", (1, 28, 28), 256), ("resnet18", (3, 32, 32), 16)):
        model = build_model(name, num_classes=CLASSES, input_shape=shape)
        theta = model.init(0, torch.float32)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(points, *shape, generator=gen)
        y = torch.randint(0, CLASSES, (points,), generator=gen)
        data = Dataset("synthetic", x, y, x[:test_points], y[:test_points], CLASSES)
        s_test = torch.randn(test_points, model.n_params, generator=gen) / model.n_params ** 0.5
        shard_estimates(model, theta, data, s_test, 0, min(chunk, points), chunk_size=chunk)  # warm-up

        start = time.perf_counter()
        estimate, _ = shard_estimates(model, theta, data, s_test, 0, points, chunk_size=chunk)
        whole = time.perf_counter() - start
        start = time.perf_counter()
        for first in range(0, points, chunk):
            per_example_grads(model, theta, x[first:first + chunk], y[first:first + chunk], chunk)
        grads_only = time.perf_counter() - start

        loop_points = min(points, 4 * chunk)  # the loop is slow: time a prefix of the shard
        start = time.perf_counter()
        looped = torch.empty(test_points, loop_points)
        for i in range(loop_points):
            t = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(per_example_loss(model, t, x[i:i + 1], y[i:i + 1]).sum(), t)
            looped[:, i] = (s_test @ g) / points
        loop = time.perf_counter() - start
        scale = float(estimate.abs().max())
        diff = float((estimate[:, :loop_points] - looped).abs().max()) / scale
        row = {"model": name, "params": model.n_params, "points": points, "test_points": test_points,
               "chunk": chunk, "examples_per_s": points / whole, "loop_examples_per_s": loop_points / loop,
               "gradient_share": grads_only / whole, "max_rel_diff": diff}
        rows.append(row)
        print(f"  {name:>9} ({model.n_params:,} parameters, chunks of {chunk}): {row['examples_per_s']:8.1f} "
              f"training examples/s against {test_points} test points ({100 * row['gradient_share']:.0f}% of it "
              f"the per-example gradients); one autograd.grad per example: {row['loop_examples_per_s']:7.1f}/s "
              f"({row['examples_per_s'] / row['loop_examples_per_s']:.1f}x); max relative difference {diff:.1e}",
              flush=True)
        if not diff < (1e-4 if model.n_params < 1e6 else 1e-2):  # float32 dot products over 11M parameters
            raise SystemExit(f"{name}: the shard's estimates differ from the looped ones by {diff:.1e} (relative)")
    return rows


def torch_float64():
    import torch

    return torch.float64


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("memory", "ddp", "nodes", "shard", "all"), default="all")
    parser.add_argument("--images", default="2000,20000", help="training-set sizes N, comma-separated")
    parser.add_argument("--image-size", type=int, default=32, help="side of the centre crop (default 32)")
    parser.add_argument("--model", default="small_cnn", help="model of the DDP part (default small_cnn)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of the DDP part (default 40)")
    parser.add_argument("--retrain-tasks", type=int, default=16, help="retrain tasks of the nodes part (default 16)")
    parser.add_argument("--shard-points", type=int, default=512, help="training points of the shard part (512)")
    parser.add_argument("--test-points", type=int, default=100, help="test points of the shard part (100)")
    args = parser.parse_args(argv)
    out: dict = {}
    if args.part in ("memory", "all"):
        images = sorted(int(n) for n in args.images.split(","))
        print(f"memory against data-set size (ImageNet format, {CLASSES} classes, {args.image_size}px crops):")
        rows = memory(images, args.image_size)
        first, last = rows[0], rows[-1]
        growth = {key: last[key] - first[key] for key in ("plan_mib", "load_mib", "stream_mib", "loader_mib")}
        print(f"  from {first['images']} to {last['images']} images ({last['images'] / first['images']:.0f}x): "
              f"the driver grows by {growth['plan_mib']:+.1f} MiB, a task holding the set by "
              f"{growth['load_mib']:+.1f} MiB, a streaming task by {growth['stream_mib']:+.1f} MiB (its loader "
              f"process by {growth['loader_mib']:+.1f} MiB)")
        out |= {"memory": rows, "growth_mib": growth}
    if args.part in ("ddp", "all"):
        print(f"data-parallel training, {args.model} on digits, {args.epochs} epochs of minibatches of 64 (gloo, "
              f"1 CPU per worker):")
        rows = ddp(args.model, args.epochs)
        ratio = rows[1]["examples_per_s"] / rows[0]["examples_per_s"]
        print(f"  2 workers / 1 worker: {ratio:.2f}x the examples per second of the training loop")
        out |= {"ddp": rows, "ddp_ratio": ratio}
    if args.part in ("nodes", "all"):
        print("retrain throughput on worker nodes of 1 CPU each (small CNN on digits):")
        rows = nodes(args.retrain_tasks)
        ratio = rows[1]["retrains_per_s"] / rows[0]["retrains_per_s"]
        print(f"  2 nodes / 1 node: {ratio:.2f}x the retrains per second (target >= 1.8x)")
        out |= {"nodes": rows, "nodes_ratio": ratio}
    if args.part in ("shard", "all"):
        import torch

        print(f"influence shard throughput on this CPU ({torch.get_num_threads()} torch threads, float32):")
        out |= {"shard": shard(args.shard_points, args.test_points)}
    return out


if __name__ == "__main__":
    main()
