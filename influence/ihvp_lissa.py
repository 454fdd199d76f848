"""LiSSA: the stochastic Neumann-series inverse-HVP of Agarwal et al. (2016), as Koh & Liang (2017) use it.

For A = C + δI with eigenvalues in (0, 2·scale), (A/scale)^{-1} = Σ_k (I − A/scale)^k, and the partial sums obey

    h_0 = v,   h_j = v + (1 − δ/scale) h_{j−1} − (C_batch h_{j−1}) / scale,     x = h_depth / scale,

with C_batch the curvature on a fresh minibatch at every step (an unbiased estimate of C), so each step costs one
minibatch HVP. ``repeats`` independent recursions are averaged.

Damping. Koh & Liang's code writes (1 − δ) h, whose fixed point solves (C + scale·δ I) x = v: its damping is
δ·scale in units of C, so it changes when the scale does. We write (1 − δ/scale) so that δ means what it means
in every other method here, and so that ``scale="auto"`` (which changes the scale) does not change the answer.

Divergence. If some eigenvalue of A/scale lies outside (0, 2) (scale too small, or A indefinite) the series grows
geometrically. When every step contracts, ‖h_j‖ <= (j + 1)‖v‖ (each term of the partial sum has norm <= ‖v‖);
a right-hand side whose ‖h_j‖ exceeds 10·(j + 1)·‖v‖ or turns non-finite is stopped and reported ``diverged``
(x is NaN): never a number. The factor 10 leaves room for minibatch steps of a non-convex model that expand a
little now and then (measured: the ratio stays <= 1 on Iris logistic and depth 1, reaches 1.7 at depth 2 with
batch size 10), and catches the slow divergence of a scale just below the top eigenvalue / 2, where a looser
bound (1e3) let an answer 100× off through on Iris depth 2.
"""

from __future__ import annotations

import math

import torch

from influence.curvature import Operator
from influence.ihvp import InverseHVP, Solve, check_damping, relative_residual

# ‖h_j‖ > _GROWTH · (j + 1) · ‖v‖ is divergence; the bound without the factor holds whenever the steps contract.
_GROWTH = 10.0
# scale="auto": the scales tried, smallest first (Koh & Liang's default 10, then ×10 up to 1e6).
AUTO_SCALES: tuple[float, ...] = (10.0, 1e2, 1e3, 1e4, 1e5, 1e6)


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"lissa setting {name} must be an integer >= {minimum}; got {value!r}")
    return value


class LissaIHVP(InverseHVP):
    """LiSSA with settings named as in Koh & Liang's code: ``damping``, ``scale``, ``depth``, ``repeats``,
    ``batch_size`` (examples per minibatch HVP, drawn uniformly without replacement, afresh for every step;
    ``batch_size`` >= n is the full data every step, the deterministic Neumann series) and ``seed``.

    ``depth`` None means ceil(n / repeats) (the paper's rule: depth × repeats ≈ n). ``scale="auto"`` tries
    :data:`AUTO_SCALES` in turn and keeps, per right-hand side, the first that does not diverge;
    ``diagnostics["scale_used"]`` is the largest scale any converged right-hand side needed so far, and
    ``iterations`` counts the minibatch HVPs spent on a right-hand side over all attempts. (Too large a scale
    costs accuracy, not safety: the error shrinks like (1 − μ_min/scale)^depth.)

    The minibatch stream is re-seeded from ``seed`` for every solve and drawn whatever the right-hand sides, so a
    right-hand side's answer does not depend on which others are solved with it (sharding gives the same
    numbers). The minibatches are drawn on the CPU (then moved), so a seed picks the same minibatches on every
    device. ``residual`` is the true ‖(C + δI) x − v‖ / ‖v‖ on the full data (one more product per solve):
    LiSSA's error, stochastic and truncation together, is visible there.
    """

    name = "lissa"
    amortised = False

    def __init__(
        self,
        op: Operator,
        *,
        damping: float = 0.0,
        scale: float | str = 10.0,
        depth: int | None = None,
        repeats: int = 1,
        batch_size: int = 10,
        seed: int = 0,
    ) -> None:
        self.op = op
        self.damping = check_damping(damping)
        if scale == "auto":
            self.scales: tuple[float, ...] = AUTO_SCALES
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
            self.scales = (float(scale),)
        else:
            raise ValueError(f"lissa scale must be a number > 0 or 'auto'; got {scale!r}")
        self.repeats = _check_int("repeats", repeats, 1)
        n = op.n_examples
        self.depth = math.ceil(n / self.repeats) if depth is None else _check_int("depth", depth, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.diagnostics = {
            "damping_used": self.damping,
            "scale": scale,
            "scale_used": None,
            "depth": self.depth,
            "repeats": self.repeats,
            "batch_size": self.batch_size,
            "diverged": 0,  # right-hand sides, over every solve so far
            "message": "",
        }

    def _recursion(self, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [B, P], HVPs spent [B], diverged [B]) for one scale, all repeats."""
        b = v.shape[0]
        n = self.op.n_examples
        gen = torch.Generator().manual_seed(self.seed)
        v_norm = v.norm(dim=1)
        total = torch.zeros_like(v)
        steps = torch.zeros(b, dtype=torch.int64, device=v.device)
        diverged = torch.zeros(b, dtype=torch.bool, device=v.device)
        keep = 1.0 - self.damping / scale
        for _ in range(self.repeats):
            h = v.clone()
            for j in range(1, self.depth + 1):
                # Drawn even when nothing is left to run: the stream must not depend on the other columns.
                batch = torch.randperm(n, generator=gen, device="cpu")[: self.batch_size].to(v.device)
                cols = (~diverged).nonzero().squeeze(1)
                if cols.numel() == 0:
                    continue
                hc = h[cols]
                hc = v[cols] + keep * hc - self.op.matvec(hc, batch) / scale
                h[cols] = hc
                steps[cols] += 1
                norms = hc.norm(dim=1)
                bad = ~(norms <= _GROWTH * (j + 1) * v_norm[cols])  # also catches NaN and inf
                diverged[cols[bad]] = True
            total += h / scale
        return total / self.repeats, steps, diverged

    def _solve(self, v: torch.Tensor) -> Solve:
        b = v.shape[0]
        x = torch.full_like(v, math.nan)
        iterations = torch.zeros(b, dtype=torch.int64, device=v.device)
        pending = torch.arange(b, device=v.device)
        used: list[float] = []
        for scale in self.scales:
            est, steps, diverged = self._recursion(v[pending], scale)
            iterations[pending] += steps
            done = pending[~diverged]
            x[done] = est[~diverged]
            if done.numel():
                used.append(scale)
            pending = pending[diverged]
            if pending.numel() == 0:
                break
        diverged = torch.zeros(b, dtype=torch.bool, device=v.device)
        diverged[pending] = True
        residual = torch.full((b,), math.nan, dtype=torch.float64, device=v.device)
        ok = ~diverged
        if bool(ok.any()):
            xo = x[ok]
            residual[ok] = relative_residual(self.op.matvec(xo) + self.damping * xo, v[ok])
        previous = self.diagnostics["scale_used"]
        if used:
            self.diagnostics["scale_used"] = max(used + ([previous] if previous is not None else []))
        self.diagnostics["diverged"] += int(diverged.sum())
        if pending.numel():
            self.diagnostics["message"] = (
                f"LiSSA diverged for {pending.numel()} of {b} right-hand sides at scale "
                f"{self.scales[-1]:g}: C + δI (δ = {self.damping:g}) has an eigenvalue outside (0, 2·scale). "
                f"Use a larger scale (or 'auto'), or damping if C is indefinite."
            )
        return Solve(x, iterations, residual, diverged)
