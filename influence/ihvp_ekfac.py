"""EK-FAC: eigenvalue-corrected Kronecker-factored curvature (George et al. 2018; Grosse et al. 2023), for the
Linear and Conv2d layers of any model (``model.layers()`` / ``model.forward_with_taps``).

For a layer l, write its weight with the bias as an extra column, W̃ = [W | b] ∈ R^{out×(in'+1)}, and its input at
position p (a Linear layer has one position; a Conv2d layer one per output pixel) as the augmented patch
ã_p = [a_p; 1] (the bias rides along as in :mod:`influence.stacked`; without a bias there is no 1). For a Conv2d
layer a_p is the receptive field of output pixel p, ``F.unfold`` with the layer's kernel size, stride, padding and
dilation, of size in' = in·kh·kw in unfold's (channel, row, column) order, which is the row-major order of the
weight [out, in, kh, kw] in θ. With g_p = ∂L/∂z_p the gradient at the layer's output at p, example i's gradient is

    G_i = ∇_{W̃} L_i = Σ_p g_{i,p} ã_{i,p}ᵀ,

and the layer's block of the Fisher-type matrix F_l = (1/n) Σ_i vec(G_i) vec(G_i)ᵀ is approximated by a Kronecker
product with the factors (KFC, Grosse & Martens 2016, whose "spatially uncorrelated" approximation drops the
products of different positions; for a Linear layer these are K-FAC's factors)

    A = (1/n) Σ_i Σ_p ã_{i,p} ã_{i,p}ᵀ,        S = (1/(n·|T|)) Σ_i Σ_p g_{i,p} g_{i,p}ᵀ      (|T| positions).

K-FAC uses S ⊗ A; EK-FAC keeps only its eigenbasis Q_S ⊗ Q_A (so the scaling of A and S is immaterial) and
replaces the eigenvalues by the exact second moments of the per-example gradients in that basis,

    Λ*_{jk} = (1/n) Σ_i ((Q_Sᵀ G_i Q_A)_{jk})²     (= diag of (Q_S ⊗ Q_A)ᵀ F_l (Q_S ⊗ Q_A), exactly),

and a solve is, per layer, V ↦ Q_S [(Q_Sᵀ V Q_A) / (Λ* + λ + δ)] Q_Aᵀ: weight decay λ and damping δ are added to
the eigenvalues. Blocks of different layers are ignored (block-diagonal). Parameters that belong to no Linear or
Conv2d layer (GroupNorm's scale and shift in the ResNets) get a diagonal block: the empirical Fisher diagonal
(1/n) Σ_i (∂L_i/∂θ_j)² + λ + δ (the same labels as the rest).

``labels``: ``"true"`` uses the training labels (the empirical Fisher, Koh & Liang's and kronfluence's
"empirical" option); ``"sampled"`` draws one label per example from the model's predictive distribution
(``seed``), a one-sample estimate of the true Fisher, which for softmax cross-entropy equals the GGN.

Cost and memory. The training data is processed ``chunk_size`` examples at a time, twice: one pass for A and S
(and the diagonal), one for Λ* in the eigenbases (a single pass when everything fits in one chunk). Memory is the
factors plus one chunk's layer inputs and output gradients (for a Conv2d layer its unfolded patches) and, per
layer, a block of per-example gradients G_i limited to ~2^24 numbers. Forward and backward run in θ's dtype (the
dtype the model was trained in: float32 for the large networks); the factors are summed over chunks, decomposed
and applied in float64, and solves are float64 as for every method.

Where it is exact. Ignoring the cross-layer blocks is exact for a model with one layer (logistic regression, a
single convolution), and with one example and one position (a Linear layer, or a convolution whose kernel covers
its whole input) F_l = (g gᵀ) ⊗ (ã ãᵀ) is a Kronecker product, so for such a model on one example EK-FAC (and
K-FAC) with ``labels="true"`` is exactly (F + (λ + δ)I)^{-1}, F the empirical Fisher. For n > 1 (or several
positions) it is exact on the diagonal in its eigenbasis (that is what Λ* is), not beyond.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from influence.ihvp import InverseHVP, Solve, check_damping, check_spectrum, direct_solve_info
from influence.models import Model
from influence.nets import Layer
from influence.registry import EKFAC_LABELS as LABELS

# Per-example gradients G_i of one layer are formed this many numbers at a time (a Conv2d layer's G_i is out·in',
# e.g. 512·4609 in a ResNet: a full chunk of them at once would be gigabytes).
_PER_EXAMPLE_BLOCK = 1 << 24


class EkfacIHVP(InverseHVP):
    """EK-FAC for every Linear/Conv2d layer of ``model`` at θ (flat layout: ``model.layers()``), plus a diagonal
    (empirical Fisher diagonal + λ + δ) for the parameters outside those layers (e.g. GroupNorm's affine ones).

    Fitted once from the layers' inputs and output gradients over the training data, ``chunk_size`` examples at a
    time (any chunking gives the same factors up to round-off); a solve is then two small products per layer, so
    it is amortised. ``residual`` is NaN (EK-FAC approximates C, so the residual against C says nothing about the
    solve), ``iterations`` 0. Grouped convolutions (``groups`` > 1) are refused.

    ``factors``: per layer (Q_S [out, out], Q_A [in'+1, in'+1] (in' without the 1 when the layer has no bias),
    Λ* [out, in'+1]), float64. ``diagonal``: the Fisher diagonal [m] of the m parameters at ``diagonal_index``
    (empty for an MLP or any net made of Linear/Conv2d layers only).
    """

    name = "ekfac"
    amortised = True
    _STATE = ("damping", "shift", "factors", "diagonal_index", "diagonal", "diagnostics")

    def __init__(
        self,
        model: Model,
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        weight_decay: float,
        *,
        damping: float = 0.0,
        labels: str = "true",
        seed: int = 0,
        chunk_size: int = 256,
    ) -> None:
        if labels not in LABELS:
            raise ValueError(f"unknown ekfac labels {labels!r}; choose one of {', '.join(LABELS)}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"ekfac seed must be an integer >= 0; got {seed!r}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"ekfac chunk_size must be an integer >= 1; got {chunk_size!r}")
        n = x.shape[0] if isinstance(x, torch.Tensor) else x.n_train
        if n == 0:
            raise ValueError("ekfac needs at least one training example to fit its factors")
        self.model = model
        self.damping = check_damping(damping)
        self.shift = float(weight_decay) + self.damping  # λ + δ, added to every eigenvalue
        self.layers: list[Layer] = _check_layers(model)
        theta = theta.detach()
        device = theta.device
        if isinstance(x, torch.Tensor):
            x, y = x.detach().to(device=device, dtype=theta.dtype), y.to(device)
        else:  # a streamed set (influence.streaming): each pass reads its chunks from the loader
            y = x.y_train.to(device)
        target = y if labels == "true" else _sampled_targets(model, theta, _chunked(x, y, n, chunk_size, theta), seed)
        self.diagonal_index = _outside_layers(model, self.layers, device)
        passes = lambda: _chunked(x, target, n, chunk_size, theta)  # noqa: E731 - one pass over the examples
        self.factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = _fit_factors(
            model, self.layers, theta, passes, n, single=n <= chunk_size)
        self.diagonal = torch.zeros(self.diagonal_index.numel(), dtype=torch.float64, device=device)
        if self.diagonal_index.numel():
            for xc, tc in passes():
                self.diagonal += _outside_square_grads(model, theta, xc, tc, self.diagonal_index)
            self.diagonal /= n

        eigenvalues = torch.cat([c.flatten() for _, _, c in self.factors] + [self.diagonal])
        check_spectrum(eigenvalues + self.shift, self.damping, float(eigenvalues.min()) + float(weight_decay))
        self.diagnostics = {
            "damping_used": self.damping,
            "labels": labels,
            "top_eigenvalue": float(eigenvalues.max()) + float(weight_decay),
            "min_eigenvalue": float(eigenvalues.min()) + float(weight_decay),
            "kronecker_layers": len(self.layers),
            "diagonal_params": int(self.diagonal_index.numel()),
            "chunk_size": chunk_size,
        }

    def _restored(self, model: Model) -> None:
        self.model = model
        self.layers = _check_layers(model)

    def _solve(self, v: torch.Tensor) -> Solve:
        b = v.shape[0]
        x = torch.empty_like(v)
        for layer, (q_s, q_a, corrected) in zip(self.layers, self.factors):
            out = layer.weight_shape[0]
            fan_in = math.prod(layer.weight_shape[1:])
            # Flat θ layout -> W̃ = [W | b] per right-hand side, [B, out, in'(+1)].
            block = v[:, layer.weight].view(b, out, fan_in)
            if layer.bias is not None:
                block = torch.cat([block, v[:, layer.bias, None]], 2)
            rotated = q_s.T @ block @ q_a / (corrected + self.shift)
            back = q_s @ rotated @ q_a.T
            x[:, layer.weight] = back[:, :, :fan_in].reshape(b, -1)
            if layer.bias is not None:
                x[:, layer.bias] = back[:, :, fan_in]
        if self.diagonal_index.numel():
            x[:, self.diagonal_index] = v[:, self.diagonal_index] / (self.diagonal + self.shift)
        return Solve(x, *direct_solve_info(v))


def _fit_factors(
    model: Model, layers: list[Layer], theta: torch.Tensor, passes, n: int, single: bool,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer (Q_S, Q_A, Λ*) from two passes over the chunks (``passes()``: (x, y) of each chunk of the n
    examples): A and S summed in float64 and eigendecomposed, then Λ* in those bases. With a ``single`` chunk
    its patches are kept for the second pass, not recomputed."""
    a_sum: list[torch.Tensor | None] = [None] * len(layers)
    s_sum: list[torch.Tensor | None] = [None] * len(layers)
    positions = [1] * len(layers)
    kept = None
    for xc, yc in passes():
        patches = _patches(model, layers, theta, xc, yc)
        for l, (a, g) in enumerate(patches):
            flat_a, flat_g = a.flatten(0, 1), g.flatten(0, 1)
            a_sum[l] = _add(a_sum[l], flat_a.T @ flat_a)
            s_sum[l] = _add(s_sum[l], flat_g.T @ flat_g)
            positions[l] = a.shape[1]
        if single:
            kept = patches
    bases = []
    for a_l, s_l, t in zip(a_sum, s_sum, positions):
        _, q_a = torch.linalg.eigh(a_l / n)
        _, q_s = torch.linalg.eigh(s_l / (n * t))
        bases.append((q_s, q_a))

    corrected = [torch.zeros(q_s.shape[0], q_a.shape[0], dtype=torch.float64, device=theta.device)
                 for q_s, q_a in bases]
    for patches in ([kept] if kept is not None else (_patches(model, layers, theta, xc, yc) for xc, yc in passes())):
        for l, (a, g) in enumerate(patches):
            corrected[l] += _rotated_second_moment(a, g, *bases[l])
    return [(q_s, q_a, c / n) for (q_s, q_a), c in zip(bases, corrected)]


def _add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    part = part.to(torch.float64)
    return part if total is None else total + part


def _check_layers(model: Model) -> list[Layer]:
    layers = model.layers()
    for layer in layers:
        if layer.kind == "conv2d" and layer.groups != 1:
            raise ValueError(
                f"ekfac supports ungrouped convolutions only: layer {layer.name!r} has groups={layer.groups}, whose "
                "weight is block-diagonal over channel groups; use another method (cg, arnoldi) for this model"
            )
    return layers


def _outside_layers(model: Model, layers: list[Layer], device: torch.device) -> torch.Tensor:
    """Indices into θ of the parameters in no Linear/Conv2d layer, ascending."""
    covered = torch.zeros(model.n_params, dtype=torch.bool, device="cpu")
    for layer in layers:
        covered[layer.weight] = True
        if layer.bias is not None:
            covered[layer.bias] = True
    return (~covered).nonzero().squeeze(1).to(device)


def _chunked(x, y: torch.Tensor, n: int, chunk_size: int, theta: torch.Tensor):
    """(x, y) of consecutive chunks of the n examples, x in θ's dtype and on its device: slices of x in memory,
    or a streamed set's chunks (the same ones) with the rows of ``y`` beside them."""
    if isinstance(x, torch.Tensor):
        for a in range(0, n, chunk_size):
            yield x[a:a + chunk_size], y[a:a + chunk_size]
        return
    for a, (xc, _) in zip(range(0, n, chunk_size), x.chunks("train", chunk_size, theta.device)):
        yield xc.to(theta.dtype), y[a:a + chunk_size]


def _sampled_targets(model: Model, theta: torch.Tensor, chunks, seed: int) -> torch.Tensor:
    """The labels the factors use with ``labels="model"``: one draw per example from the predictive distribution
    (``chunks``: (x, y) of every example, in order)."""
    with torch.no_grad():
        logits = torch.cat([model.forward(theta, xc) for xc, _ in chunks])
    # Drawn on the CPU, all n at once, so that a seed samples the same labels on every device and for any chunking.
    gen = torch.Generator().manual_seed(seed)
    probs = F.softmax(logits.to(torch.float64), dim=1).cpu()
    return torch.multinomial(probs, 1, generator=gen).squeeze(1).to(theta.device)


def _patches(
    model: Model, layers: list[Layer], theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the augmented inputs ã [m, T, in'(+1)] and output gradients g [m, T, out] at the T positions.

    L_i depends on example i's layer outputs only, so the gradient of Σ_i L_i with respect to a layer's output
    has row i equal to ∂L_i/∂z: one backward pass gives every example's g.
    """
    logits, taps = model.forward_with_taps(theta.detach().requires_grad_(True), x)
    loss = F.cross_entropy(logits, y, reduction="sum")
    grads = torch.autograd.grad(loss, [out for _, out in taps])
    out = []
    for layer, (inp, _), g in zip(layers, taps, grads):
        inp, m = inp.detach(), inp.shape[0]
        if layer.kind == "conv2d":
            a = F.unfold(inp, layer.weight_shape[2:], dilation=layer.dilation, padding=layer.padding,
                         stride=layer.stride).transpose(1, 2)  # [m, T, in·kh·kw], T = output pixels
            g = g.flatten(2).transpose(1, 2)  # [m, out, Ho, Wo] -> [m, T, out], the same pixel order
        else:
            a = inp.reshape(m, -1, inp.shape[-1])  # [m, in] -> one position
            g = g.reshape(m, -1, g.shape[-1])
        if layer.bias is not None:
            a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)], dim=2)
        out.append((a, g))
    return out


def _rotated_second_moment(a: torch.Tensor, g: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """Σ_i ((Q_Sᵀ G_i Q_A)_{jk})² over the chunk's examples, G_i = Σ_p g_{i,p} ã_{i,p}ᵀ, as [out, in'(+1)] float64."""
    gq = g @ q_s.to(g.dtype)  # [m, T, out]: Q_Sᵀ g per position
    aq = a @ q_a.to(a.dtype)  # [m, T, in']
    if a.shape[1] == 1:  # one position: (Q_Sᵀ G_i Q_A)_{jk} = (Q_Sᵀ g_i)_j (Q_Aᵀ ã_i)_k
        return (gq[:, 0].square().T @ aq[:, 0].square()).to(torch.float64)
    m, _, out = gq.shape
    step = max(1, _PER_EXAMPLE_BLOCK // (out * aq.shape[2]))
    total = torch.zeros(out, aq.shape[2], dtype=torch.float64, device=a.device)
    for i in range(0, m, step):
        per_example = gq[i : i + step].transpose(1, 2) @ aq[i : i + step]  # [b, out, in']: Q_Sᵀ G_i Q_A
        total += per_example.square().sum(0).to(torch.float64)
    return total


def _outside_square_grads(model: Model, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                          index: torch.Tensor) -> torch.Tensor:
    """Σ_i (∂L_i/∂θ_j)² over the chunk for the θ entries ``index`` (whole parameters outside every layer).

    Per-example gradients with respect to those parameters only (``vmap(grad)`` of a ``functional_call`` in which
    just they are arguments), so memory is O(m · |index|), not O(m · P). Needs a module-backed model
    (:class:`~influence.nets.ModuleNet`): an MLP has no parameters outside its layers.
    """
    if not hasattr(model, "module") or not hasattr(model, "params"):
        raise TypeError(f"{model!r} has parameters outside its Linear/Conv2d layers but no module to take their "
                        "per-example gradients from; ekfac handles such parameters for ModuleNet models only")
    wanted = set(index.tolist())
    names = [name for name, shape, off in model.params if off in wanted]
    views = model.unflatten(theta)
    fixed = {k: v for k, v in views.items() if k not in names}
    free = {k: views[k] for k in names}
    images = x.reshape(x.shape[0], *model.input_shape)

    def loss_one(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model.module, {**fixed, **params}, (xi.unsqueeze(0),), strict=True)
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(free, images, y)
    # θ order: the parameters' offsets ascend in named_parameters() order, as ``index`` does.
    flat = torch.cat([per_example[k].flatten(1) for k in names], dim=1)
    if flat.shape[1] != index.numel():
        raise RuntimeError(f"{model!r}: the parameters outside the layers do not cover whole parameters")
    return flat.square().sum(0).to(torch.float64)
