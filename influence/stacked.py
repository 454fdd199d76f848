"""The gradient of K weighted objectives R(θ_k; w_k) for K stacked MLP copies, by hand, in preallocated buffers.

This is the inner step of leave-one-out retraining, run thousands of times per configuration, and for Iris-sized
networks it is mostly overhead: a depth-1 width-5 MLP has 43 parameters. Profiling autograd on the stacked
forward (Iris, depth 1, K = 121) put most of the time outside the useful arithmetic: cross-entropy's
log-softmax/NLL kernels and their backward (slow for C = 3), zero-filled gradients for every slice of Θ, and
``tanh_backward`` at several times its standalone cost. Writing the backward pass out makes every tensor's
layout a choice and halves the step. ``tests/test_influence_train.py`` checks the result against
``torch.autograd`` on :func:`influence.objective.objective` for every activation and depth 0, 1, 3.

Layout. Activations are feature-major, h^T ∈ R^{K×width×n}, so each layer is one (batched) matrix product in
natural layout. Each layer's bias rides along as an extra weight column: W̃_l = [W_l | b_l] ∈ R^{K×out×(in+1)}
acting on h̃ = [h; 1]. Then the forward is one product per layer, and the backward's ∂W̃ = ∂z h̃ᵀ yields the bias
gradient (the row sums of ∂z) in the same product. The optimiser sees all W̃_l as one flat vector; since Adam
and the L2 term are elementwise, the order of the entries does not matter, and :meth:`StackedMLP.load` /
:meth:`StackedMLP.theta` translate to and from the model's flat θ layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from influence.models import MLP

_aten = torch.ops.aten

# h = σ(z) into a preallocated buffer; the same kernels the model's forward uses (relu is clamp_min inside torch).
_ACT_OUT: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "tanh": lambda z, out: torch.tanh(z, out=out),
    "sigmoid": lambda z, out: torch.sigmoid(z, out=out),
    "relu": lambda z, out: torch.clamp_min(z, 0.0, out=out),
    "gelu": lambda z, out: _aten.gelu.out(z, out=out),
}

# ∂z = ∂h ⊙ σ'(z) via the kernels autograd itself uses; tanh, sigmoid and relu need only h = σ(z), gelu needs z.
_ACT_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "tanh": lambda g, z, h, out: _aten.tanh_backward.grad_input(g, h, grad_input=out),
    "sigmoid": lambda g, z, h, out: _aten.sigmoid_backward.grad_input(g, h, grad_input=out),
    "relu": lambda g, z, h, out: _aten.threshold_backward.grad_input(g, h, 0.0, grad_input=out),
    "gelu": lambda g, z, h, out: _aten.gelu_backward.grad_input(g, z, approximate="none", grad_input=out),
}


class StackedMLP:
    """K copies of ``model`` over fixed data (x, y) and fixed weightings w ∈ R^{K×n}.

    The parameters live in the flat buffer :attr:`params` (set with :meth:`load`, read with :meth:`theta`);
    :meth:`grad` writes ∇_θ (1/n) Σ_i w_{k,i} L(z_i, θ_k) for all k into :attr:`grads`, in the same layout. The
    L2 term is left to the caller (it is one in-place ``add_``). Everything the step touches is allocated here,
    once, views included: an optimiser updating :attr:`params` in place is seen by the next :meth:`grad`.
    """

    def __init__(self, model: MLP, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> None:
        if weights.ndim != 2 or weights.shape[1] != x.shape[0]:
            raise ValueError(f"weights must be [K, n] with n={x.shape[0]}; got {tuple(weights.shape)}")
        k, n = weights.shape
        if x.ndim > 2:
            x = x.flatten(1)  # images [n, C, H, W]: the MLP sees them row-major flattened, as MLP.forward does
        # Every buffer lives where the data does (CPU or CUDA) and in its dtype.
        dtype, device = x.dtype, x.device
        self.model = model
        self.k = k
        self._act = _ACT_OUT[model.activation]
        self._act_backward = _ACT_BACKWARD[model.activation]

        # (fan_in, fan_out, offset of W̃_l in the flat buffer) per layer.
        self._blocks: list[tuple[int, int, int]] = []
        offset = 0
        for fan_in, fan_out, _, _ in model.layout:
            self._blocks.append((fan_in, fan_out, offset))
            offset += k * fan_out * (fan_in + 1)
        self.size = offset

        ones = torch.ones(n, 1, dtype=dtype, device=device)
        self._x_aug = torch.cat([x, ones], dim=1)  # [n, d+1]: ∂W̃_1 = ∂z_1 x̃ is one product
        self._x_aug_t = self._x_aug.t().contiguous()  # [d+1, n]: z_1 = W̃_1 x̃ᵀ is one product for all K
        self._z = [torch.empty(k, fan_out, n, dtype=dtype, device=device) for _, fan_out, _ in self._blocks]
        self._h_aug = []  # hidden activations with their constant row of ones (for the bias column)
        for _, fan_out, _ in self._blocks[:-1]:
            h = torch.empty(k, fan_out + 1, n, dtype=dtype, device=device)
            h[:, fan_out].fill_(1.0)
            self._h_aug.append(h)
        self._dh = [torch.empty(k, fan_in, n, dtype=dtype, device=device) for fan_in, _, _ in self._blocks[1:]]
        self._col = torch.empty(k, 1, n, dtype=dtype, device=device)  # per-example scalars: max logit, then w/(n Σ exp)
        # ∂R/∂z_L = (w_i/n)(softmax(z_i) - e_{y_i}); the e_{y_i} w_i/n part is fixed, so it is precomputed.
        self._scaled = (weights / n).to(device=device, dtype=dtype).unsqueeze(1)  # [K, 1, n]
        onehot_t = F.one_hot(y.to(device), model.num_classes).to(dtype).t()  # [C, n]
        self._neg_target = -onehot_t * self._scaled  # [K, C, n]

        # The parameters and their gradient, flat (what the optimiser updates), and the views the step uses.
        self.params = torch.zeros(self.size, dtype=dtype, device=device)
        self.grads = torch.zeros(self.size, dtype=dtype, device=device)
        self._weights = self._views(self.params)
        self._grads = self._views(self.grads)
        self._w_t = [None] + [w[:, :, :-1].transpose(1, 2) for w in self._weights[1:]]  # W_lᵀ, for ∂h
        self._h = [h[:, :-1] for h in self._h_aug]
        self._h_aug_t = [h.transpose(1, 2) for h in self._h_aug]

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            flat[off : off + self.k * fan_out * (fan_in + 1)].view(self.k, fan_out, fan_in + 1)
            for fan_in, fan_out, off in self._blocks
        ]

    def load(self, theta: torch.Tensor) -> None:
        """Set the parameters from Θ [K, P] (or θ [P], copied to all K) in the model's layout."""
        theta = theta.expand(self.k, -1)
        for (fan_in, fan_out, w_off, b_off), block in zip(self.model.layout, self._weights):
            block[:, :, :fan_in].copy_(theta[:, w_off:b_off].view(self.k, fan_out, fan_in))
            block[:, :, fan_in].copy_(theta[:, b_off : b_off + fan_out])

    def theta(self) -> torch.Tensor:
        """The current parameters as Θ [K, P] in the model's layout (a copy)."""
        theta = torch.empty(self.k, self.model.n_params, dtype=self.params.dtype, device=self.params.device)
        for (fan_in, fan_out, w_off, b_off), block in zip(self.model.layout, self._weights):
            theta[:, w_off:b_off].view(self.k, fan_out, fan_in).copy_(block[:, :, :fan_in])
            theta[:, b_off : b_off + fan_out].copy_(block[:, :, fan_in])
        return theta

    def grad(self) -> torch.Tensor:
        """Fill and return :attr:`grads` with ∇ of the weighted data term at :attr:`params`."""
        k = self.k
        weights, grads = self._weights, self._grads
        last = len(weights) - 1

        # Forward, keeping z_l (gelu's backward needs it) and h̃_l. The first layer's input x̃ is shared by all
        # K models, so it is a single [K·out, d+1] × [d+1, n] product rather than K small ones.
        for l, w in enumerate(weights):
            z = self._z[l]
            if l == 0:
                torch.mm(w.view(k * w.shape[1], -1), self._x_aug_t, out=z.view(k * w.shape[1], -1))
            else:
                torch.bmm(w, self._h_aug[l - 1], out=z)
            if l < last:
                self._act(z, self._h[l])

        # ∂R/∂z_L = softmax(z_L)·(w/n) - e_y·(w/n), in place in z_L; the max shift keeps exp finite.
        dz = self._z[last]
        col = self._col
        torch.amax(dz, dim=1, keepdim=True, out=col)
        dz.sub_(col).exp_()
        torch.sum(dz, dim=1, keepdim=True, out=col)
        torch.div(self._scaled, col, out=col)
        torch.addcmul(self._neg_target, dz, col, out=dz)

        # Backward: ∂W̃_l = ∂z_l h̃_{l-1}ᵀ, ∂h_{l-1} = W_lᵀ ∂z_l, ∂z_{l-1} = ∂h_{l-1} ⊙ σ'(z_{l-1}).
        for l in range(last, -1, -1):
            w, g = weights[l], grads[l]
            if l == 0:
                torch.mm(dz.view(k * w.shape[1], -1), self._x_aug, out=g.view(k * w.shape[1], -1))
                break
            torch.bmm(dz, self._h_aug_t[l - 1], out=g)
            dh = torch.bmm(self._w_t[l], dz, out=self._dh[l - 1])
            z_prev = self._z[l - 1]
            dz = self._act_backward(dh, z_prev, self._h[l - 1], z_prev)
        return self.grads
