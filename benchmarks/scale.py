"""Benchmark: what grows with the data set, measured side by side in one run.

    python -m benchmarks.scale [--images 2000,20000] [--image-size 32]

Driver and worker memory against the size of an ImageNet-format set. For each N, `fragile data tiny imagenet
--images N` writes an ImageFolder of N small training JPEGs (10 classes), and three fresh processes each do one
thing and report their peak resident memory (ru_maxrss):
  imports   import what a driver and a task import (torch, torchvision, the project): the floor
  plan      what the driver does before the first task: `jobs.tasks.datasets_for` (the DataSource: sizes from
            the file list, no image decoded) and the task counts
  load      what a task does when it opens the set (and what a driver did before DataSource existed): the
            whole split decoded and standardised in memory, `jobs.tasks.load_data`
Reported above the floor, in MiB, with the growth from the smallest to the largest N. The driver's column must
not grow with N beyond the file list (a few hundred bytes per image); the task's grows with the images it holds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

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
            floor, plan, load = (_child(mode, root, size) for mode in ("imports", "plan", "load"))
            assert plan["n_train"] == load["n_train"], (plan, load)
            rows.append({"images": plan["n_train"], "tasks": plan["tasks"],
                         "plan_mib": (plan["peak_kib"] - floor["peak_kib"]) / 1024,
                         "load_mib": (load["peak_kib"] - floor["peak_kib"]) / 1024,
                         "floor_mib": floor["peak_kib"] / 1024})
            print(f"  {rows[-1]['images']:>7} images: driver (plan) +{rows[-1]['plan_mib']:8.1f} MiB, "
                  f"task (load) +{rows[-1]['load_mib']:8.1f} MiB above the {rows[-1]['floor_mib']:.0f} MiB of "
                  f"the imports", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="2000,20000", help="training-set sizes N, comma-separated")
    parser.add_argument("--image-size", type=int, default=32, help="side of the centre crop (default 32)")
    args = parser.parse_args(argv)
    images = sorted(int(n) for n in args.images.split(","))
    print(f"memory against data-set size (ImageNet format, {CLASSES} classes, {args.image_size}px crops):")
    rows = memory(images, args.image_size)
    first, last = rows[0], rows[-1]
    growth = {key: last[key] - first[key] for key in ("plan_mib", "load_mib")}
    print(f"  from {first['images']} to {last['images']} images ({last['images'] / first['images']:.0f}x): the "
          f"driver grows by {growth['plan_mib']:+.1f} MiB, a task by {growth['load_mib']:+.1f} MiB")
    return {"memory": rows, "growth_mib": growth}


if __name__ == "__main__":
    main()
