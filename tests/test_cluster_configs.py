"""The cloud configs parse and name the real entry point, the real specs and a real install step."""
from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from fragile.cli import _parser
from jobs.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster" / "configs"


def _check_fragile_command(command: str):
    """The spec the command runs, once the real CLI has accepted the command."""
    argv = shlex.split(command)
    assert argv[0] == "fragile"
    args = _parser().parse_args(argv[1:])  # the real CLI accepts it
    assert args.command == "run" and (ROOT / args.spec).is_file(), args.spec
    assert args.store.startswith("s3://")
    return load_spec(ROOT / args.spec)


def _check_room_for_training(spec, gpu_nodes: int, cpus_per_node: float) -> None:
    """The GPU group keeps up enough nodes for the spec's data-parallel training group, each with room for a
    worker: Ray Train waits for all of them at once."""
    train = spec.resources["train"]
    assert spec.experiment == "imagenet" and train.workers > 1 and train.num_gpus == 1
    assert gpu_nodes >= train.workers and cpus_per_node >= train.num_cpus


def test_ray_launcher_config():
    cfg = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())
    assert cfg["provider"]["type"] == "aws"
    workers = cfg["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("pip install -e /home/ubuntu/fragile" in c for c in cfg["setup_commands"])
    assert "/home/ubuntu/fragile" in cfg["file_mounts"]
    for node in cfg["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]  # S3 through the instance profile, no keys
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)  # token auth on every node
    assert not any("0.0.0.0" in c for c in starts)  # the dashboard only through the SSH tunnel
    usage = [line.lstrip("# ") for line in (CONFIGS / "aws-gpu.yaml").read_text().splitlines() if "fragile run" in line]
    assert usage  # the header shows how to run the study on this cluster
    spec = _check_fragile_command(usage[0])
    _check_room_for_training(spec, workers["min_workers"], workers["resources"]["CPU"])


def test_kuberay_rayjob_manifest():
    job = yaml.safe_load((CONFIGS / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = _check_fragile_command(job["spec"]["entrypoint"])
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert not any("AWS_" in k for k in runtime_env.get("env_vars", {}))  # secrets never in the runtime env
    cluster = job["spec"]["rayClusterSpec"]
    for group_spec in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        env = {e["name"]: e for e in group_spec["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpu = group["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    _check_room_for_training(spec, group["minReplicas"], float(gpu["resources"]["limits"]["cpu"]))
