"""EK-FAC: eigenvalue-corrected Kronecker-factored curvature (George et al. 2018; Grosse et al. 2023).

For layer l of the MLP, with augmented input ã_i = [a_i; 1] (the bias rides along as the last column, as in
:mod:`influence.stacked`, W̃_l = [W_l | b_l] ∈ R^{out×(in+1)}) and pre-activation gradient g_i = ∂L_i/∂z_l, the
per-example gradient is ∇_{W̃} L_i = g_i ã_iᵀ, and the layer's block of the Fisher-type matrix is

    F_l = (1/n) Σ_i vec(g_i ã_iᵀ) vec(g_i ã_iᵀ)ᵀ  ≈  S ⊗ A,   S = (1/n) Σ g_i g_iᵀ,  A = (1/n) Σ ã_i ã_iᵀ.

K-FAC uses S ⊗ A; EK-FAC keeps its eigenbasis Q_S ⊗ Q_A but replaces the eigenvalues by the exact second
moments of the gradients in that basis,

    Λ*_{jk} = (1/n) Σ_i ((Q_Sᵀ g_i)_j (Q_Aᵀ ã_i)_k)²     (= diag of (Q_S ⊗ Q_A)ᵀ F_l (Q_S ⊗ Q_A), exactly),

and a solve is, per layer, V ↦ Q_S [(Q_Sᵀ V Q_A) / (Λ* + λ + δ)] Q_Aᵀ: weight decay λ and damping δ are added to
the eigenvalues. Blocks of different layers are ignored (block-diagonal).

``labels``: ``"true"`` uses the training labels (the empirical Fisher, Koh & Liang's and kronfluence's
"empirical" option); ``"sampled"`` draws one label per example from the model's predictive distribution
(``seed``), a one-sample estimate of the true Fisher, which for softmax cross-entropy equals the GGN.

Where it is exact. Ignoring the cross-layer blocks is exact for a single layer (logistic regression, depth 0),
and S ⊗ A equals F_l when there is one example (n = 1: F_l = (g gᵀ) ⊗ (ã ãᵀ) is a Kronecker product), so for
logistic regression on one example EK-FAC (and K-FAC) with ``labels="true"`` is exactly (F + (λ + δ)I)^{-1}, F
the empirical Fisher. For n > 1 it is exact on the diagonal in its eigenbasis (that is what Λ* is), not beyond.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from influence.ihvp import InverseHVP, Solve, check_damping, check_spectrum, direct_solve_info
from influence.models import MLP

LABELS: tuple[str, ...] = ("true", "sampled")


class EkfacIHVP(InverseHVP):
    """EK-FAC for the Linear layers of an :class:`~influence.models.MLP` at θ (flat layout ``model.layout``).

    Fitted once from per-example activations and pre-activation gradients (one forward and one backward over
    the training data); a solve is then two small products per layer, so it is amortised. ``residual`` is NaN
    (EK-FAC approximates C, so the residual against C says nothing about the solve), ``iterations`` 0.
    ``factors``: per layer (Q_S [out, out], Q_A [in+1, in+1], Λ* [out, in+1]).
    """

    name = "ekfac"
    amortised = True

    def __init__(
        self,
        model: MLP,
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        weight_decay: float,
        *,
        damping: float = 0.0,
        labels: str = "true",
        seed: int = 0,
    ) -> None:
        if labels not in LABELS:
            raise ValueError(f"unknown ekfac labels {labels!r}; choose one of {', '.join(LABELS)}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"ekfac seed must be an integer >= 0; got {seed!r}")
        self.model = model
        self.damping = check_damping(damping)
        self.shift = float(weight_decay) + self.damping  # λ + δ, added to every eigenvalue
        inputs, grads = _activations_and_gradients(model, theta, x, y, labels, seed)
        n = x.shape[0]
        self.factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for a, g in zip(inputs, grads):
            _, q_a = torch.linalg.eigh(a.T @ a / n)
            _, q_s = torch.linalg.eigh(g.T @ g / n)
            corrected = (g @ q_s).square().T @ (a @ q_a).square() / n  # Λ*, [out, in+1]
            self.factors.append((q_s, q_a, corrected))
        eigenvalues = torch.cat([c.flatten() for _, _, c in self.factors])
        check_spectrum(eigenvalues + self.shift, self.damping, float(eigenvalues.min()) + float(weight_decay))
        self.diagnostics = {
            "damping_used": self.damping,
            "labels": labels,
            "top_eigenvalue": float(eigenvalues.max()) + float(weight_decay),
            "min_eigenvalue": float(eigenvalues.min()) + float(weight_decay),
        }

    def _solve(self, v: torch.Tensor) -> Solve:
        b = v.shape[0]
        x = torch.empty_like(v)
        for (fan_in, fan_out, w_off, b_off), (q_s, q_a, corrected) in zip(self.model.layout, self.factors):
            # Flat θ layout -> W̃ = [W | b] per right-hand side, [B, out, in+1].
            block = torch.cat([v[:, w_off:b_off].view(b, fan_out, fan_in), v[:, b_off : b_off + fan_out, None]], 2)
            rotated = q_s.T @ block @ q_a / (corrected + self.shift)
            back = q_s @ rotated @ q_a.T
            x[:, w_off:b_off] = back[:, :, :fan_in].reshape(b, -1)
            x[:, b_off : b_off + fan_out] = back[:, :, fan_in]
        return Solve(x, *direct_solve_info(v))


def _activations_and_gradients(
    model: MLP, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, labels: str, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the augmented inputs ã_i [n, in+1] and the pre-activation gradients g_i = ∂L_i/∂z_l [n, out].

    L_i depends on example i's pre-activations only, so the gradient of Σ_i L_i with respect to z_l has row i
    equal to ∂L_i/∂z_l: one backward pass gives every example's g.
    """
    theta64 = theta.detach().to(torch.float64).requires_grad_(True)
    h = x.detach().to(torch.float64)
    ones = torch.ones(h.shape[0], 1, dtype=torch.float64, device=h.device)
    inputs, pre = [], []
    layers = model.unflatten(theta64)
    for l, (w, b) in enumerate(layers):
        inputs.append(torch.cat([h.detach(), ones], dim=1))
        z = torch.addmm(b, h, w.t())
        pre.append(z)
        h = model._act(z) if l < len(layers) - 1 else z
    if labels == "sampled":
        # Drawn on the CPU, so that a seed samples the same labels on every device.
        gen = torch.Generator().manual_seed(seed)
        probs = F.softmax(h.detach(), dim=1).cpu()
        target = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(h.device)
    else:
        target = y
    loss = F.cross_entropy(h, target, reduction="sum")
    grads = torch.autograd.grad(loss, pre)
    return inputs, [g.detach() for g in grads]
