"""Models as pure functions of one flat parameter vector θ ∈ R^P: MLPs here, image networks in :mod:`influence.nets`.

Influence functions need ∇_θ, ∇²_θ and (H + δI)^{-1} over *all* parameters at once, and leave-one-out
retraining wants K copies of the same network trained side by side. Both are simplest when the parameters are a
single flat tensor: θ of shape [P] is one model, Θ of shape [K, P] is K models. The network is then a pure
function ``forward(θ, x)``; there is no ``nn.Module`` state to keep in sync.

Layout of θ, layer by layer: the weight W_l ∈ R^{out×in} (row-major, as ``nn.Linear`` stores it), then the
bias b_l ∈ R^{out}. ``unflatten`` returns views in that order.

Every model offers the same interface: ``n_params``, ``num_classes``, ``input_shape``, ``init(seed, dtype,
device)``, ``forward(θ, x)``, and for per-layer methods (EK-FAC) ``layers()`` (a :class:`~influence.nets.Layer`
per Linear/Conv2d: where its weight and bias live in θ) and ``forward_with_taps(θ, x)`` (each such layer's input
and output). :func:`build_model` builds any of :data:`MODELS` by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from influence.nets import NETS, Layer, ModuleNet, Taps, build_net

ACTIVATIONS: tuple[str, ...] = ("tanh", "relu", "sigmoid", "gelu")
MODELS: tuple[str, ...] = ("mlp", "logistic") + NETS

_ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
}


class MLP:
    """A fully connected network ``in_features → width (× depth) → num_classes`` with biases everywhere.

    ``depth`` is the number of hidden layers; depth 0 is multinomial logistic regression (a single linear map),
    the convex case where influence functions are known to be accurate.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int,
        width: int,
        activation: str = "tanh",
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if depth < 0:
            raise ValueError(f"depth is the number of hidden layers and must be >= 0; got {depth}")
        if depth > 0 and width < 1:
            raise ValueError(f"width must be >= 1 for a network with hidden layers; got {width}")
        if in_features < 1 or num_classes < 2:
            raise ValueError(f"need in_features >= 1 and num_classes >= 2; got {in_features}, {num_classes}")
        input_shape = (in_features,) if input_shape is None else tuple(int(s) for s in input_shape)
        if math.prod(input_shape) != in_features:
            raise ValueError(f"input_shape {input_shape} has {math.prod(input_shape)} entries, "
                             f"not in_features={in_features}")
        self.input_shape = input_shape
        self.in_features = in_features
        self.num_classes = num_classes
        self.depth = depth
        self.width = width if depth > 0 else 0
        self.activation = activation
        self._act = _ACTIVATION_FNS[activation]

        sizes = [in_features] + [width] * depth + [num_classes]
        # (fan_in, fan_out, offset of W_l in θ, offset of b_l in θ) per layer: where each block of θ lives.
        self.layout: list[tuple[int, int, int, int]] = []
        offset = 0
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            self.layout.append((fan_in, fan_out, offset, offset + fan_in * fan_out))
            offset += fan_in * fan_out + fan_out
        self.n_params: int = offset

    def __repr__(self) -> str:
        return (
            f"MLP(in_features={self.in_features}, num_classes={self.num_classes}, depth={self.depth}, "
            f"width={self.width}, activation={self.activation!r}, n_params={self.n_params})"
        )

    def init(
        self, seed: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """θ0 drawn as ``nn.Linear`` draws it: W, b ~ U(-1/√fan_in, 1/√fan_in), from ``torch.Generator(seed)``.

        (``nn.Linear`` uses Kaiming-uniform with a = √5 for W, which reduces to the same bound.)
        Always drawn on the CPU and then moved to ``device``: GPU generators give other numbers for the same
        seed, and θ0 must be the same on every device for runs to be comparable.
        """
        gen = torch.Generator().manual_seed(seed)
        theta = torch.empty(self.n_params, dtype=dtype, device="cpu")
        for fan_in, fan_out, w_off, b_off in self.layout:
            bound = 1.0 / math.sqrt(fan_in)
            block = theta[w_off : b_off + fan_out]
            block.copy_(torch.rand(block.shape, generator=gen, dtype=dtype, device="cpu").mul_(2 * bound).sub_(bound))
        return theta.to(device)

    def unflatten(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views ``(W_l, b_l)`` into θ: W_l is [out, in] for θ [P] and [K, out, in] for Θ [K, P]."""
        self._check(theta)
        lead = theta.shape[:-1]
        out = []
        for fan_in, fan_out, w_off, b_off in self.layout:
            w = theta[..., w_off:b_off].view(*lead, fan_out, fan_in)
            out.append((w, theta[..., b_off : b_off + fan_out]))
        return out

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits: θ [P], x [n, d] → [n, C];  Θ [K, P], x [n, d] → [K, n, C].

        The stacked case is one batched matrix product per layer, no Python loop over K: evaluating all the
        retrained leave-one-out models is one call. (Retraining itself runs on :mod:`influence.stacked`.)
        """
        layers = self.unflatten(theta)
        last = len(layers) - 1
        if x.ndim > 2:
            x = x.flatten(1)
        if theta.ndim == 1:
            h = x
            for l, (w, b) in enumerate(layers):
                h = torch.addmm(b, h, w.t())
                h = self._act(h) if l < last else h
            return h
        # Stacked models run feature-major, h^T of shape [K, features, n]: every product is W_l h^T with both
        # operands as stored, and the logits come out as [K, C, n], the layout cross_entropy takes directly
        # (see objective.per_example_loss). Profiled about 20% faster than [K, n, features] for Iris at K = 121.
        h = x.t()
        for l, (w, b) in enumerate(layers):
            # The first layer's input x^T [d, n] is shared by all K models; matmul broadcasts it without copies.
            h = torch.matmul(w, h).add_(b.unsqueeze(2)) if l == 0 else torch.baddbmm(b.unsqueeze(2), w, h)
            h = self._act(h) if l < last else h
        return h.transpose(1, 2)

    __call__ = forward

    def layers(self) -> list[Layer]:
        """One ``"linear"`` :class:`~influence.nets.Layer` per entry of :attr:`layout`: ``θ[layer.weight]`` is W_l
        (shape [out, in]) and ``θ[layer.bias]`` is b_l, named ``fc0``, ``fc1``, ... in forward order."""
        return [
            Layer("linear", f"fc{l}", slice(w_off, b_off), (fan_out, fan_in), slice(b_off, b_off + fan_out))
            for l, (fan_in, fan_out, w_off, b_off) in enumerate(self.layout)
        ]

    def forward_with_taps(self, theta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, Taps]:
        """Logits for θ [P] and, per entry of :meth:`layers`, (layer input h_{l-1}, pre-activation z_l).

        The same kernels as :meth:`forward`, so the logits agree exactly. With θ requiring grad,
        ``torch.autograd.grad(loss, [z for _, z in taps])`` gives ∂loss/∂z_l for every layer.
        """
        if theta.ndim != 1:
            raise ValueError(f"forward_with_taps takes one θ [{self.n_params}]; got {tuple(theta.shape)}")
        layers = self.unflatten(theta)
        last = len(layers) - 1
        h = x.flatten(1) if x.ndim > 2 else x
        taps = []
        for l, (w, b) in enumerate(layers):
            z = torch.addmm(b, h, w.t())
            taps.append((h, z))
            h = self._act(z) if l < last else z
        return h, taps

    def _check(self, theta: torch.Tensor) -> None:
        if theta.ndim not in (1, 2) or theta.shape[-1] != self.n_params:
            raise ValueError(f"{self!r} expects θ of shape [{self.n_params}] or [K, {self.n_params}]; "
                             f"got {tuple(theta.shape)}")


Model = MLP | ModuleNet  # what every function taking a ``model`` accepts


def build_model(
    model: str,
    *,
    num_classes: int,
    input_shape: tuple[int, ...] | None = None,
    in_features: int | None = None,
    depth: int = 1,
    width: int = 5,
    activation: str = "tanh",
    dataset: str | None = None,
) -> Model:
    """The model named ``model`` (one of :data:`MODELS`) for examples of shape ``input_shape`` (or flat rows of
    ``in_features``; give either or both, consistently).

    ``depth``, ``width`` and ``activation`` describe the MLP only (``"logistic"`` is depth 0); the image networks
    of :mod:`influence.nets` have fixed architectures and need a 3-d ``input_shape`` (C, H, W). ``dataset`` only
    names the data in error messages.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if input_shape is None and in_features is None:
        raise ValueError(f"build_model({model!r}) needs input_shape (C, H, W) or in_features")
    shape = (int(in_features),) if input_shape is None else tuple(int(s) for s in input_shape)
    if in_features is not None and math.prod(shape) != in_features:
        raise ValueError(f"input_shape {shape} does not have in_features={in_features} entries")
    if model in ("mlp", "logistic"):
        return MLP(math.prod(shape), num_classes, 0 if model == "logistic" else depth, width, activation,
                   input_shape=shape)
    if len(shape) != 3:
        data = f"dataset {dataset}" if dataset else "the data"
        raise ValueError(f"{model} needs image inputs [C, H, W]; {data} has flat features {shape}")
    return build_net(model, shape, num_classes)
