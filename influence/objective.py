"""The training objective and its per-example losses.

    R(θ; w) = (1/n) Σ_i w_i L(z_i, θ) + (λ/2) ‖θ‖²,      L = cross-entropy,  w_i = 1 by default.

The normaliser is n = len(x) *always*, also when some w_i are 0. Removing z_i is then w_i = 0, i.e. up-weighting
z_i by ε = -1/n, which is exactly the perturbation the influence function linearises; dividing by Σ w_i = n - 1
instead would also rescale λ relative to the data term and add a second, unmodelled change to every
leave-one-out optimum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from influence.models import MLP


def per_example_loss(model: MLP, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L(z_i, θ) for every example: [n] for θ [P], [K, n] for Θ [K, P]."""
    logits = model.forward(theta, x)
    if logits.ndim == 2:
        return F.cross_entropy(logits, y, reduction="none")
    # [K, n, C] -> cross_entropy's "[N, C, d1]" layout, so the K models take one kernel call, not K.
    return F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], -1), reduction="none")


def objective(
    model: MLP,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weight_decay: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """R(θ; w) = (1/n) Σ_i w_i L(z_i, θ) + (λ/2)‖θ‖² with λ = ``weight_decay`` and n = len(x).

    ``weights`` is [n] or, for Θ [K, P], [K, n] (one weighting per model copy). Returns a scalar for θ [P] and
    [K] for Θ [K, P].
    """
    losses = per_example_loss(model, theta, x, y)
    n = x.shape[0]
    if weights is None:
        data = losses.sum(-1) / n
    else:
        if weights.shape[-1] != n:
            raise ValueError(f"weights must have n={n} entries per row; got shape {tuple(weights.shape)}")
        data = (losses * weights).sum(-1) / n
    if weight_decay == 0.0:
        return data
    return data + 0.5 * weight_decay * (theta * theta).sum(-1)
