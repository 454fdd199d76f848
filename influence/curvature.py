"""Curvature of the training objective at θ̂, as a matrix (small models) or as products that never form it.

    H = ∇²_θ R(θ),   R(θ) = (1/n) Σ_i L(z_i, θ) + (λ/2)‖θ‖²                              (``"hessian"``)
    G = (1/n) Σ_i J_iᵀ H_out,i J_i + λI,   J_i = ∂f(x_i, θ)/∂θ ∈ R^{C×P},                 (``"ggn"``)
                                          H_out,i = ∇²_f L = diag(p_i) − p_i p_iᵀ  (softmax cross-entropy)

The Gauss-Newton matrix G drops H's term (1/n) Σ_i Σ_c (∂L_i/∂f_c) ∇²_θ f_c(x_i), which is what makes H indefinite
for a non-convex network; G is PSD, so G + λI is positive definite. For a model linear in θ (logistic
regression) that term is zero and G = H.

Every iterative inverse-HVP method only needs ``v ↦ C v``; :class:`CurvatureOperator` supplies it for a block of
vectors at once (``vmap``), over all training points or a minibatch (LiSSA), in float64 whatever the inputs are:
the small models of the study are exactly where the smallest eigenvalues decide the answer. Everything stays
on the device of θ and x (CPU or CUDA); an operator's ``device`` is where its products live, so that solvers
can allocate their workspaces there.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vjp, vmap

from influence.models import MLP
from influence.objective import objective
from influence.registry import CURVATURES

# Products with the identity, this many columns at a time, when a matrix is formed from products (GGN).
_MATRIX_BLOCK = 256
# Dense curvature of convolutional nets: identity columns per product block, and examples per chunk.
_CONV_BLOCK, _CONV_CHUNK = 16, 128


def _load_forward_ad() -> None:
    """Import torch's forward-AD decompositions once, quietly.

    The first ``torch.func.jvp`` of a process imports them, and that import scripts a few functions with
    ``torch.jit.script``, which warns (FutureWarning: deprecated) in every fresh worker process. The warning is
    about torch's internals, not about anything we do, so it is silenced here, once, for that import only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".torch.jit.script. is deprecated", category=FutureWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def hessian(
    model: MLP, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float
) -> torch.Tensor:
    """H = ∇²_θ R(θ) ∈ R^{P×P} of the full objective (data term and λI), by ``torch.func`` over flat θ.

    Computed in float64 whatever the inputs are: the study's small models are exactly where the Hessian's
    smallest eigenvalues decide the answer, and float32 round-off (~1e-7 relative) would swamp them.
    Reverse-over-reverse (``jacrev(jacrev(R))``): the same matrix as forward-over-reverse, similar cost at this
    size, and no forward-AD set-up.
    """
    theta64 = theta.detach().to(torch.float64)
    if not isinstance(x, torch.Tensor) and isinstance(model, MLP):  # streamed: jacrev takes every point at once
        whole = x.materialise().to(theta.device)
        x, y = whole.x_train, whole.y_train
    x64 = x.to(torch.float64) if isinstance(x, torch.Tensor) else x  # (a streamed set is converted per chunk)
    if not isinstance(model, MLP):
        # Convolutional nets: jacrev(jacrev) would hold P copies of every activation at once (26 GB for the
        # small CNN on 200 MNIST images); Hessian-vector products with blocks of the identity, over chunks of
        # the examples, keep memory at one block's worth.
        return _dense(CurvatureOperator(model, theta64, x64, y, weight_decay, chunk=_CONV_CHUNK), _CONV_BLOCK)
    h = jacrev(jacrev(lambda t: objective(model, t, x64, y, weight_decay)))(theta64)
    # Autograd's H is symmetric only up to round-off; eigh reads one triangle, so make both triangles agree.
    return 0.5 * (h + h.T)


class Operator(Protocol):
    """What the iterative solvers need: ``matvec(V)`` = C V for V [B, P] (rows are vectors), optionally over
    the training points ``idx`` only (a minibatch estimate of C, for LiSSA). Products are float64 on
    ``device``."""

    n_params: int
    n_examples: int
    device: torch.device

    def matvec(self, v: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor: ...


class MatrixOperator:
    """An explicit symmetric matrix as an :class:`Operator` (``idx`` is ignored: there are no examples).

    For tests, and for small problems where the matrix is at hand anyway.
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square [P, P]; got shape {tuple(matrix.shape)}")
        self.matrix = matrix.to(torch.float64)
        self.n_params = int(matrix.shape[0])
        self.n_examples = 1
        self.device = matrix.device

    def matvec(self, v: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return v.to(torch.float64) @ self.matrix  # symmetric: (C vᵀ)ᵀ = v C


class CurvatureOperator:
    """v ↦ C v for C = H (``"hessian"``) or G (``"ggn"``) of R at θ, never forming C.

    Hessian products are forward-over-reverse, ``jvp`` of ``grad(R)`` (Pearlmutter's trick: one gradient's cost
    per product). GGN products go through the logits: u = J v by ``jvp``, w = H_out u per example in closed
    form, then Jᵀ w by ``vjp``. Both are ``vmap``-ed over a block of vectors, which is what batched CG needs.
    With ``idx`` the data term is the mean over those training points only (with λ, as R on a minibatch).

    Products run in θ's dtype (float64 for the small models, float32 where a spec asks for it) and over the
    training points ``chunk`` at a time, so memory is bounded by the chunk, not by n (MNIST, CIFAR-10). ``x``
    may be a streamed set (:class:`influence.streaming.StreamedSet`, ``y`` None): a full product is then a pass
    over its chunks, a minibatch product decodes the minibatch; the same chunks and sums, the same products.
    """

    def __init__(
        self,
        model: MLP,
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        weight_decay: float,
        curvature: str = "hessian",
        chunk: int = 2048,
    ) -> None:
        if not isinstance(x, torch.Tensor):  # a streamed set (influence.streaming): read a pass of chunks per product
            self._setup(model, theta, weight_decay, curvature, chunk, x.n_train)
            self.data, self.x, self.y = x, None, None
            return
        self._setup(model, theta, weight_decay, curvature, chunk, int(x.shape[0]))
        self.data = None
        self.x, self.y = x.detach().to(device=self.theta.device, dtype=self.theta.dtype), y.to(self.theta.device)

    def _setup(self, model, theta: torch.Tensor, weight_decay: float, curvature: str, chunk: int,
               n_examples: int) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}")
        _load_forward_ad()
        self.model = model
        dtype = theta.dtype if theta.dtype in (torch.float32, torch.float64) else torch.float64
        self.theta = theta.detach().to(dtype)
        self.chunk = int(chunk)
        self.device = self.theta.device
        self.weight_decay = float(weight_decay)
        self.curvature = curvature
        self.n_params = model.n_params
        self.n_examples = int(n_examples)

    def matvec(self, v: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """C v for v [P] or [B, P]; with ``idx``, C on those training points only."""
        vv = v.to(self.theta.dtype)
        block = vv.unsqueeze(0) if vv.ndim == 1 else vv
        if block.shape[0] == 0:
            return block.clone()
        product = self._hvp if self.curvature == "hessian" else self._ggnvp
        m = self.n_examples if idx is None else int(idx.shape[0])
        out = self.weight_decay * block
        # The data term is a mean over examples: a sum over chunks, each weighted by its share of the examples.
        for xc, yc in self._chunks(idx):
            out = out + product(block, xc, yc) * (xc.shape[0] / m)
        return out[0] if vv.ndim == 1 else out

    def _chunks(self, idx: torch.Tensor | None):
        """(x, y) of consecutive chunks of the examples (of those in ``idx`` only, when given)."""
        if self.data is not None:  # streamed: every example in a pass of the loader, a minibatch decoded directly
            if idx is None:
                for x, y in self.data.chunks("train", self.chunk, self.device):
                    yield x.to(self.theta.dtype), y
                return
            x, y = self.data.take("train", idx, self.device)
            x = x.to(self.theta.dtype)
        else:
            if idx is not None:
                idx = idx.to(self.device)
            x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        for start in range(0, x.shape[0], self.chunk):
            yield x[start:start + self.chunk], y[start:start + self.chunk]

    def _hvp(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Hessian of the mean loss over (x, y), without the L2 term, times each row of v."""
        g = grad(lambda t: objective(self.model, t, x, y, 0.0))
        return vmap(lambda u: jvp(g, (self.theta,), (u,))[1])(v)

    def _ggnvp(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = self.model

        def logits(t: torch.Tensor) -> torch.Tensor:
            return model.forward(t, x)

        z, pullback = vjp(logits, self.theta)
        p = F.softmax(z, dim=-1)  # [m, C]
        m = x.shape[0]

        def one(u: torch.Tensor) -> torch.Tensor:
            ju = jvp(logits, (self.theta,), (u,))[1]  # J u, [m, C]
            w = p * ju - p * (p * ju).sum(-1, keepdim=True)  # (diag p − p pᵀ) J u, per example
            return pullback(w / m)[0]

        return vmap(one)(v)


def gauss_newton(
    model: MLP, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float
) -> torch.Tensor:
    """G = (1/n) Σ_i J_iᵀ H_out,i J_i + λI ∈ R^{P×P}, formed from GGN-vector products with the identity."""
    return _dense(CurvatureOperator(model, theta, x, y, weight_decay, curvature="ggn"), _MATRIX_BLOCK)


def _dense(op: "CurvatureOperator", block: int) -> torch.Tensor:
    """The operator's matrix from products with ``block`` columns of the identity at a time, symmetrised
    (both triangles agree; eigh reads one)."""
    eye = torch.eye(op.n_params, dtype=torch.float64, device=op.device)
    m = torch.cat([op.matvec(eye[i : i + block]) for i in range(0, op.n_params, block)])
    return 0.5 * (m + m.T)


def curvature_matrix(
    model: MLP, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float, curvature: str
) -> torch.Tensor:
    """H or G as a dense [P, P] float64 matrix, by name (one of :data:`CURVATURES`)."""
    if curvature == "hessian":
        return hessian(model, theta, x, y, weight_decay)
    if curvature == "ggn":
        return gauss_newton(model, theta, x, y, weight_decay)
    raise ValueError(f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}")
