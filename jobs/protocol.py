"""The study's protocol: every decision about what is computed, as pure functions of a configuration and of
the results that landed. Decided here once; the task bodies (`jobs/tasks.py`), the plan (`jobs/plan.py`), the
per-configuration pipeline (`jobs/pipeline.py`) and the coordinator only apply them.

- **Part names** of every table: a part is the output of one task, named after its task key.
- **Damping**: the δ of (H + δI), one per configuration, so every method solves the same system
  (`damping`), and the settings each solver is built with (`solver_settings`).
- **Spectrum**: how the top and smallest eigenvalue of H at θ̂ are found for a model (`spectrum_plan`).
- **Ground truth**: where retraining starts, which learning-rate schedule it follows, the seeds of its
  minibatch orders and of its control starts, which chunk stores the controls, when copies are stacked.
- **Removals**: which method's estimates rank the training points to retrain without, and what happens when
  a solve diverged (`ranking_estimates`, `removals`).
- **The train result** (`TrainOutput`) is always read from the `models` and `test_points` rows, whether the
  train task has just written them or a resumed run finds them in the store: one path for both.

Cheap to import (no torch, no Ray): torch is imported inside the few functions that build tensors.
Part of the science code (jobs/science.py): a change here changes the stamp of every result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from influence.registry import damping_to_add
from jobs.spec import Configuration

# ---- part names ---------------------------------------------------------------------------------------------

CONFIG_PART = "config"  # configs: one row per configuration
MODEL_PART = "model"  # models: θ̂'s facts
TEST_POINTS_PART = "test_points"  # test_points: the chosen test points
SUBSETS_PART = "subsets"  # subsets: an LDS configuration's subsets
RUNNING_PART = "running"  # stats: the snapshot replaced as results land
FINAL_PART = "final"  # stats: written once every task landed; what resume looks for


def influence_part(method: str, chunk: int) -> str:
    """The influence part of one method and chunk of test points (and, sharded, the name of their solve)."""
    return f"{method}-{chunk:03d}"


def shard_part(method: str, chunk: int, shard: int) -> str:
    """The influence part of one method, chunk of test points and shard of training points."""
    return f"{influence_part(method, chunk)}-s{shard:04d}"


def solve_of(part: str) -> str | None:
    """The solve a sharded influence part's estimates come from (`shard_part` -> `influence_part`); None for
    an influence part that is not a shard."""
    head, sep, tail = part.rpartition("-s")
    return head if sep and len(tail) == 4 and tail.isdigit() else None


def solve_task_part(solve: str) -> str:
    """The name a solve is counted under as a task (it writes an `ihvp` artifact, not a part)."""
    return f"{solve}-solve"


def train_shards(cfg: Configuration, n_train: int) -> list[tuple[int, int]] | None:
    """The ranges [start, stop) of training points of the influence tasks, or None when one task per (method,
    chunk of test points) covers every training point (`influence.train_shard` unset)."""
    if cfg.train_shard is None:
        return None
    return [(start, min(start + cfg.train_shard, n_train)) for start in range(0, n_train, cfg.train_shard)]


def retrain_part(chunk: int, replicate: int = 0) -> str:
    """The retrain part of one chunk of removals under one replicate (chunk 0 also holds the controls).
    Replicate 0 keeps the name parts had before replicates existed."""
    return f"retrain-{chunk:05d}" if replicate == 0 else f"retrain-{chunk:05d}-r{replicate:03d}"


# ---- damping and solvers ---------------------------------------------------------------------------------------


def damping(cfg: Configuration, min_eigenvalue: float, top_eigenvalue: float) -> float:
    """The δ of (H + δI) for every method of a configuration, decided once from H's spectrum at θ̂, so that all
    methods solve the same system. `if_indefinite` adds δ only when H has an eigenvalue <= 0 (relative to its
    largest); where the smallest eigenvalue is unknown (NaN: models too large for an exact Hessian) it adds δ,
    the safe choice for a non-convex net."""
    return damping_to_add(cfg.damping_policy, cfg.damping, min_eigenvalue, top_eigenvalue)


def solver_settings(cfg: Configuration, method: str, delta: float) -> dict:
    """The settings `influence.ihvp.make_solver` gets for `method`: the spec's settings with δ = `delta`. The
    exact method would otherwise apply the damping policy again to the spectrum it computes: told "always",
    it adds exactly `delta`, which `damping` already decided. EK-FAC fits its factors `grad_chunk` examples
    at a time (memory, not the result)."""
    settings = {**cfg.solver_settings(method), "damping": delta}
    if method == "exact":
        settings["damping_policy"] = "always"
    if method == "ekfac":
        settings["chunk_size"] = cfg.grad_chunk
    return settings


# Exact Hessians (and their eigenvalues) are formed only up to this many parameters; larger MLPs report NaN.
EXACT_HESSIAN_MAX_PARAMS = 5000
# Convolutional nets: the top eigenvalue from this many Arnoldi steps (fewer for the largest: the Krylov basis
# holds one float64 vector of P entries per step).
ARNOLDI_STEPS, ARNOLDI_STEPS_LARGE, LARGE_MODEL_PARAMS = 20, 6, 200_000


@dataclass(frozen=True)
class SpectrumPlan:
    """How H's top and smallest eigenvalue at θ̂ are found: `exact` (both, from the dense Hessian), `arnoldi`
    (the top one from `steps` steps; the smallest unknown) or `none` (both unknown)."""

    method: str
    steps: int = 0


def spectrum_plan(is_mlp: bool, n_params: int) -> SpectrumPlan:
    if is_mlp:
        return SpectrumPlan("exact") if n_params <= EXACT_HESSIAN_MAX_PARAMS else SpectrumPlan("none")
    steps = ARNOLDI_STEPS if n_params <= LARGE_MODEL_PARAMS else ARNOLDI_STEPS_LARGE
    return SpectrumPlan("arnoldi", min(steps, n_params))


# ---- ground truth ----------------------------------------------------------------------------------------------

# Retraining stacks all removals of a chunk into one computation up to this many parameters per model; beyond
# it (VGG, ResNets) the copies would not fit beside each other, so they retrain one after another.
BATCHED_RETRAIN_MAX_PARAMS = 200_000


def batched(n_params: int) -> bool:
    """Whether the copies of a retrain chunk are stacked into one computation (else one after another)."""
    return n_params <= BATCHED_RETRAIN_MAX_PARAMS


def retrain_schedule(cfg: Configuration) -> str:
    """Retraining from scratch repeats θ̂'s schedule; a warm start continues at a constant learning rate."""
    return cfg.schedule if cfg.retrain_start == "scratch" else "constant"


def order_seed(cfg: Configuration, replicate: int = 0) -> int:
    """The minibatch order of retraining: one per configuration, so every chunk's removals and the controls
    (stored by chunk 0 only) see the same order and its noise cancels in actual = removed − control. Control
    replicate r > 0 uses another order: the spread this adds is the training-noise floor."""
    return cfg.seed * 1000 + 500 + replicate


def control_seed(cfg: Configuration, replicate: int) -> int:
    """The seed of the relative perturbation of control replicate r > 0's start (full batch)."""
    return cfg.seed * 1000 + replicate


def controls_in_chunk(cfg: Configuration, chunk: int, replicate: int = 0) -> int:
    """Controls a retrain chunk computes: in replicate 0, every control replicate in chunk 0, which stores
    them; the others compute control 0 only, which their removals are measured against. Replicates r > 0
    compute their own paired control only (chunk 0 stores it)."""
    return cfg.controls if chunk == 0 and replicate == 0 else 1


# Seeds of replicates r > 0 sit above every control and order seed of the same configuration.
REPLICATE_SEEDS = 1_000_000


def replicate_seed(cfg: Configuration, replicate: int) -> int:
    """The seed of replicate r > 0's draw of training noise: its minibatch order, its perturbed start (full
    batch) and, from scratch, its initialisation."""
    return REPLICATE_SEEDS + cfg.seed * 1000 + replicate


def replicate_order_seed(cfg: Configuration, replicate: int) -> int:
    """The minibatch order every retrain of a replicate follows: replicate 0's is `order_seed(cfg)`."""
    return order_seed(cfg) if replicate == 0 else replicate_seed(cfg, replicate)


def replicate_base(cfg: Configuration, base, model, replicate: int):
    """Where every retrain (removals and control) of a replicate starts. Replicate 0: the protocol's base (θ̂,
    or θ0 from scratch). Replicate r > 0 draws the training noise the protocol has: from scratch a fresh
    initialisation; a full-batch warm start θ̂ perturbed by a relative `perturbation` (drawn on the CPU, so
    identical on every device); a minibatch warm start θ̂ itself (its order differs instead)."""
    import torch

    if replicate == 0:
        return base
    if cfg.retrain_start == "scratch":
        return model.init(replicate_seed(cfg, replicate), dtype=base.dtype, device=base.device)
    if cfg.batch_size is not None:
        return base
    g = torch.Generator().manual_seed(replicate_seed(cfg, replicate))
    noise = torch.randn(base.shape, generator=g, dtype=base.dtype, device="cpu").to(base.device)
    return base + cfg.perturbation * base.abs().clamp_min(1e-3) * noise


def control_starts(cfg: Configuration, base):
    """Starting points [controls, P] of the control retrains: the base itself, then the base perturbed by a
    relative `perturbation` (one seed per replicate, identical in every chunk). The spread of their final test
    losses is the noise floor of the ground truth: warm-started Adam near a minimum amplifies round-off. The
    noise is drawn on the CPU (then moved to the base's device), so the starts are the same on every device.
    With minibatches, replicates r > 0 start from the base exactly and differ in their order instead."""
    import torch

    starts = [base]
    for r in range(1, cfg.controls):
        if cfg.batch_size is not None:
            starts.append(base)
            continue
        g = torch.Generator().manual_seed(control_seed(cfg, r))
        noise = torch.randn(base.shape, generator=g, dtype=base.dtype, device="cpu").to(base.device)
        starts.append(base + cfg.perturbation * base.abs().clamp_min(1e-3) * noise)
    return torch.stack(starts)


# ---- removals --------------------------------------------------------------------------------------------------

RANKED_KINDS = ("top_k", "percentile", "group")  # removal rules that rank the training points by estimate


def needs_estimates(cfg: Configuration) -> bool:
    """Whether the removals depend on landed influence estimates (then they are chosen after those land)."""
    return cfg.ground_truth != "lds" and any(r.kind in RANKED_KINDS for r in cfg.removals)


# Seeds of the LDS subsets sit above every replicate seed of the same configuration.
SUBSET_SEEDS = 2_000_000


def subset_seed(cfg: Configuration, subset: int) -> int:
    """The seed of LDS subset `subset`'s draw: from the configuration's seed and split, so every reader (and
    every rerun) draws the same mask."""
    return SUBSET_SEEDS + cfg.seed * 100_000 + cfg.split_seed * 10_000 + subset


def lds_subsets(cfg: Configuration, n: int) -> list[dict]:
    """The LDS subsets of a configuration: per subset its id, seed, the fraction kept and the training points
    left out (sorted), each drawn uniformly without replacement by numpy's PCG64 from its own seed; the points
    kept are round(fraction · n), at least 1 and at most n − 1."""
    import numpy as np

    settings = dict(cfg.truth_settings)
    keep = min(n - 1, max(1, round(settings["fraction"] * n)))
    out = []
    for s in range(settings["subsets"]):
        seed = subset_seed(cfg, s)
        kept = np.random.default_rng(seed).choice(n, size=keep, replace=False)
        left_out = np.setdiff1d(np.arange(n), kept)
        out.append({"subset": s, "seed": seed, "fraction": settings["fraction"], "n_train": n,
                    "left_out": [int(i) for i in left_out]})
    return out


def mask_hash(n: int, left_out: list[int]) -> str:
    """16 hex of the sha256 of the subset's mask as n bytes (1 kept, 0 left out): what a reader recomputes to
    check it holds the same mask."""
    import hashlib

    import numpy as np

    mask = np.ones(n, dtype=np.uint8)
    mask[np.asarray(left_out, dtype=np.int64)] = 0
    return hashlib.sha256(mask.tobytes()).hexdigest()[:16]


def ranking_estimates(cfg: Configuration, influence, n: int):
    """(method, estimates [T, n] as a numpy array, test points ascending) that rank the removals: the first
    method's (the removal set must not depend on which methods are compared), or, where its solve diverged
    for some test point, the next method's that converged for all. `influence` is the configuration's
    influence rows (an Arrow table). Raises ValueError when every method diverged somewhere."""
    import numpy as np
    import pyarrow.compute as pc

    for method in cfg.methods:
        rows = influence.filter(pc.equal(influence["method"], method)).sort_by(
            [("test_idx", "ascending"), ("train_idx", "ascending")])
        estimate = np.asarray(rows["estimate"].to_numpy(zero_copy_only=False), dtype=np.float64).reshape(-1, n)
        if not np.isnan(estimate).any():
            return method, estimate
    raise ValueError(f"every method's solve diverged for some test point ({', '.join(cfg.methods)}), so the "
                     f"points to retrain without cannot be ranked; see the influence table's diverged column")


def removals(cfg: Configuration, influence, n: int, n_test: int) -> tuple[list[int], list | None]:
    """The rules' training points, as a sorted union; for group removal, the group ids and their (members,
    mode). `influence`: the configuration's landed influence rows (read only when a rule ranks by them)."""
    import torch

    from influence.scores import select_groups, select_removals

    if cfg.ground_truth == "lds":  # one "group" per subset: the points it leaves out
        subsets = lds_subsets(cfg, n)
        return [s["subset"] for s in subsets], [(s["left_out"], "lds") for s in subsets]
    estimate = torch.empty(0, n, dtype=torch.float64)  # the other rules only need n
    if needs_estimates(cfg):
        estimate = torch.from_numpy(ranking_estimates(cfg, influence, n)[1].copy())
    if cfg.removals[0].kind == "group":
        r = cfg.removals[0]
        members = select_groups(estimate, r.k, r.groups, seed=cfg.seed)
        groups = [(m, "group" if g < n_test else "random_group") for g, m in enumerate(members)]
        return list(range(len(groups))), groups
    removed = set()
    for r in cfg.removals:
        removed.update(select_removals(estimate, r.kind, k=r.k, seed=cfg.seed, indices=r.indices, at=r.at))
    return sorted(removed), None


# ---- the train result ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainOutput:
    """What the rest of a configuration needs from training (θ̂ itself travels separately)."""

    test_points: list[tuple[int, str]]  # (test index, the rule that chose it)
    n_train: int
    damping: float  # δ every method uses for this configuration (see `damping`)
    degenerate_reason: str | None
    science: dict[str, str | None]  # table -> the science stamp of its part
    notices: tuple[str, ...] = ()  # what the user should hear (a bad checkpoint set aside)
    stationary: bool | None = None  # θ̂ within the configuration's grad_tol (None: no tolerance set)


def train_output(cfg: Configuration, models: dict, test_points: dict, notices: tuple[str, ...] = ()) -> TrainOutput:
    """The train result from the configuration's `models` and `test_points` rows (column -> list of values, as
    `pyarrow.Table.to_pydict` gives them): the rows the train task just wrote, or those a resumed run read."""
    def first(column: str):
        return models[column][0]

    return TrainOutput(
        test_points=list(zip(test_points["test_idx"], test_points["selection"])),
        n_train=first("n_train"),
        damping=damping(cfg, _float(first("min_eigenvalue")), _float(first("top_eigenvalue"))),
        degenerate_reason=first("degenerate_reason"),
        science={"models": first("science"), **({"test_points": test_points["science"][0]}
                                                if test_points["test_idx"] else {})},
        notices=tuple(notices),
        stationary=(models.get("stationary") or [None])[0],
    )


def _float(value) -> float:
    return math.nan if value is None else float(value)
