"""The paper's image networks, defined as ``torch.nn.Module``s and used as pure functions of a flat θ ∈ R^P.

The rest of the project sees a model only through ``n_params``, ``num_classes``, ``init(seed, dtype, device)`` and
``forward(θ, x)`` (see :mod:`influence.models`). :class:`ModuleNet` gives any module that interface. θ is the
concatenation of ``module.named_parameters()`` in order, each flattened row-major, and ``forward`` substitutes
views of θ for every parameter with ``torch.func.functional_call`` (``vmap`` over Θ [K, P] for K stacked copies).
The module itself holds no numbers (it is built on the ``meta`` device): the parameters only ever live in θ, so
there is no state to keep in sync, and one network runs in float64 or float32, on the CPU or CUDA.

Why no BatchNorm, no Dropout and no buffers. The influence function linearises the optimum of
R(θ) = (1/n) Σ_i L(z_i, θ) + (λ/2)‖θ‖², which needs each L(z_i, θ) to depend on z_i and θ alone. BatchNorm
in training mode normalises with the statistics of the batch, so example i's loss depends on the other examples:
per-example gradients, the Hessian of a sum of per-example terms and "retrain without z_i" are then ill-defined
(and in eval mode its running statistics are buffers, state outside θ that training changes but R does not see).
Dropout makes L random. :class:`ModuleNet` refuses both, and the ResNets use GroupNorm (Wu & He 2018), which
normalises each example over groups of its own channels: gcd(32, channels) groups, i.e. 32 for every ResNet width.

Architectures (:data:`NETS`), each a function of ``input_shape`` (C, H, W) and ``num_classes``:
``small_cnn`` (Koh & Liang's all-convolutional net), ``lenet`` (LeNet-5), ``vgg13`` (CIFAR-style), ``resnet18``
and ``resnet50`` (torchvision's, GroupNorm, CIFAR stem below 64 px). θ0 is each module's own default
initialisation (torch's for ``small_cnn`` and ``lenet``, torchvision's for the others).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.func import functional_call, vmap

NETS: tuple[str, ...] = ("small_cnn", "lenet", "vgg13", "resnet18", "resnet50")
LAYER_KINDS: tuple[str, ...] = ("linear", "conv2d")

Taps = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Layer:
    """Where one Linear or Conv2d layer's parameters live in θ, for methods that treat layers separately (EK-FAC).

    ``θ[weight].view(weight_shape)`` is the weight as torch stores it: [out, in] for ``"linear"``,
    [out, in/groups, kh, kw] for ``"conv2d"``; ``θ[bias]`` is the bias [out] (None without one). ``stride``,
    ``padding``, ``dilation`` and ``groups`` are the convolution's (the defaults for ``"linear"``): what is needed to
    unfold its input into patches. Parameters outside every Layer (GroupNorm's scale and shift) are in no record.
    """

    kind: str
    name: str
    weight: slice
    weight_shape: tuple[int, ...]
    bias: slice | None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; choose one of {', '.join(LAYER_KINDS)}")


class ModuleNet:
    """The module that ``factory()`` builds, as a function of a flat θ (layout: :attr:`params`).

    ``factory`` must build the same architecture every call and draw its initial weights from torch's default
    CPU generator (every ``nn`` layer and torchvision model does); :meth:`init` calls it under a seeded, isolated
    generator. Forward order and θ order agree for every network here (the ResNet shortcut convolution runs, and
    is stored, after its block's main convolutions), so :meth:`layers` lists the Linear/Conv2d layers in that order.

    The shared module is briefly reparametrised during a call (``functional_call``), so one instance must not be
    used from several threads at once; processes (Ray tasks) each have their own.
    """

    def __init__(self, name: str, factory: Callable[[], nn.Module], input_shape: tuple[int, ...], num_classes: int):
        self.name = name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self._factory = factory
        with torch.device("meta"):
            module = factory()
        _check_module(name, module)
        # In-place activations (torchvision's ReLU(inplace=True)) would overwrite a tapped layer's output and can
        # trip torch.func transforms writing batched values into unbatched tensors; out of place costs one buffer.
        for sub in module.modules():
            if getattr(sub, "inplace", False):
                sub.inplace = False
        self.module = module
        # (name, shape, offset in θ) per parameter, in named_parameters() order: the layout of θ.
        self.params: list[tuple[str, tuple[int, ...], int]] = []
        offset = 0
        for pname, p in module.named_parameters():
            self.params.append((pname, tuple(p.shape), offset))
            offset += p.numel()
        self.n_params: int = offset
        self._sizes = [math.prod(shape) for _, shape, _ in self.params]
        self._tapped, self._layers = _find_layers(module, self.params)
        # A shape-only forward on the meta device: catches inputs too small for the architecture now, not later.
        try:
            out = module(torch.empty(2, *self.input_shape, device="meta"))
        except RuntimeError as err:
            raise ValueError(f"{name} cannot take inputs of shape {self.input_shape}: {err}") from err
        if tuple(out.shape) != (2, self.num_classes):
            raise ValueError(f"{name} gives outputs {tuple(out.shape[1:])} for {self.num_classes} classes")

    def __repr__(self) -> str:
        return (f"ModuleNet({self.name!r}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"n_params={self.n_params})")

    def init(
        self, seed: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """θ0: the module's default initialisation, built on the CPU with the generator seeded by ``seed``.

        ``fork_rng`` isolates it (the caller's RNG state is untouched) and the CPU makes it the same on every
        device. The weights are always drawn in float32 (torch's default) and then cast, so a float64 run starts
        from exactly the float32 run's θ0, and changing torch's default dtype elsewhere does not change θ0.
        """
        with torch.random.fork_rng(devices=[]), _default_dtype(torch.float32), torch.device("cpu"):
            torch.default_generator.manual_seed(seed)
            module = self._factory()
        flat = [p.detach().reshape(-1) for _, p in module.named_parameters()]
        if [n for n, _, _ in self.params] != [n for n, _ in module.named_parameters()]:
            raise RuntimeError(f"{self.name}: the factory built a different architecture the second time")
        return torch.cat(flat).to(dtype=dtype, device=device)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of θ by parameter name: shape ``p.shape`` for θ [P], [K, *p.shape] for Θ [K, P]."""
        self._check(theta)
        lead = theta.shape[:-1]
        # One split, not one slice per parameter: each slice's backward scatters into its own zeros of size P, so
        # the backward would cost O(#parameters · P) (seconds for ResNet-50); split's backward is a single cat.
        chunks = torch.split(theta, self._sizes, dim=-1)
        return {name: chunk.view(*lead, *shape) for (name, shape, _), chunk in zip(self.params, chunks)}

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits: θ [P], x [n, C, H, W] → [n, classes];  Θ [K, P] → [K, n, classes] (``vmap``, x shared).

        Rows flattened to [n, C·H·W] are accepted too and reshaped. x must have θ's dtype and device.
        """
        self._check(theta)
        x = self._images(x)
        if theta.ndim == 1:
            return self._call(theta, x)
        return vmap(self._call, in_dims=(0, None))(theta, x)

    __call__ = forward

    def layers(self) -> list[Layer]:
        """Every Linear/Conv2d layer with the slices of θ holding its weight and bias, in θ (= forward) order."""
        return list(self._layers)

    def forward_with_taps(self, theta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, Taps]:
        """Logits for θ [P] and, per entry of :meth:`layers`, (the layer's input, its output before any activation).

        For EK-FAC: the inputs give the activation factor, and with θ requiring grad,
        ``torch.autograd.grad(loss, [out for _, out in taps])`` gives the gradients with respect to the layer
        outputs (for a sum of per-example losses, row i is example i's). Captured with forward hooks that exist
        only during this call.
        """
        if theta.ndim != 1:
            raise ValueError(f"forward_with_taps takes one θ [{self.n_params}]; got {tuple(theta.shape)}")
        self._check(theta)
        taps: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self._tapped)

        def hook(i: int) -> Callable:
            def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                if taps[i] is not None:  # a layer run twice would need one tap per use; no network here does that
                    raise RuntimeError(f"{self.name}: layer {self._layers[i].name} ran twice in one forward")
                taps[i] = (inputs[0], output)
            return record

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self._tapped)]
        try:
            logits = self._call(theta, self._images(x))
        finally:
            for h in handles:
                h.remove()
        missing = [layer.name for layer, tap in zip(self._layers, taps) if tap is None]
        if missing:
            raise RuntimeError(f"{self.name}: layers {missing} did not run in forward")
        return logits, taps  # type: ignore[return-value]

    def _call(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # strict: every parameter must come from θ, so nothing of the (meta) module's own storage is ever read.
        return functional_call(self.module, self.unflatten(theta), (x,), strict=True)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2 and x.shape[1] == math.prod(self.input_shape):
            return x.reshape(x.shape[0], *self.input_shape)
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name} expects inputs [n, {', '.join(map(str, self.input_shape))}]; "
                             f"got {tuple(x.shape)}")
        return x

    def _check(self, theta: torch.Tensor) -> None:
        if theta.ndim not in (1, 2) or theta.shape[-1] != self.n_params:
            raise ValueError(f"{self!r} expects θ of shape [{self.n_params}] or [K, {self.n_params}]; "
                             f"got {tuple(theta.shape)}")


def _check_module(name: str, module: nn.Module) -> None:
    """Refuse what would make L(z_i, θ) depend on other examples or on state outside θ (see the module docstring)."""
    for sub_name, sub in module.named_modules():
        if isinstance(sub, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            raise TypeError(f"{name}: {sub_name} is a {type(sub).__name__}; influence needs per-example losses "
                             "that depend on θ and the example alone (use GroupNorm; leave dropout out)")
        if isinstance(sub, nn.Conv2d) and (isinstance(sub.padding, str) or sub.padding_mode != "zeros"):
            raise ValueError(f"{name}: {sub_name} needs numeric zero padding for its Layer record")
    buffers = [b for b, _ in module.named_buffers()]
    if buffers:
        raise ValueError(f"{name} has buffers {buffers[:3]}: state outside θ is not supported")


def _find_layers(
    module: nn.Module, params: list[tuple[str, tuple[int, ...], int]]
) -> tuple[list[nn.Module], list[Layer]]:
    """The Linear/Conv2d submodules and their :class:`Layer` records, in θ order."""
    where = {pname: (off, shape) for pname, shape, off in params}
    found: list[tuple[nn.Module, Layer]] = []
    for mname, m in module.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        prefix = f"{mname}." if mname else ""
        w_off, w_shape = where[prefix + "weight"]
        bias = None
        if m.bias is not None:
            b_off, b_shape = where[prefix + "bias"]
            bias = slice(b_off, b_off + b_shape[0])
        weight = slice(w_off, w_off + math.prod(w_shape))
        if isinstance(m, nn.Linear):
            layer = Layer("linear", mname, weight, w_shape, bias)
        else:
            layer = Layer("conv2d", mname, weight, w_shape, bias, stride=tuple(m.stride), padding=tuple(m.padding),
                          dilation=tuple(m.dilation), groups=m.groups)
        found.append((m, layer))
    found.sort(key=lambda ml: ml[1].weight.start)
    return [m for m, _ in found], [layer for _, layer in found]


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ---- architectures -------------------------------------------------------------------------------------------


def small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> ModuleNet:
    """Koh & Liang's all-convolutional net: five 3×3 convolutions with 8 channels and strides 1, 2, 1, 2, 1, a 1×1
    convolution to ``num_classes`` channels, global mean pool, Linear classes → classes; tanh after every convolution.

    As in their released code the 1×1 convolution is followed by tanh too: without it, 1×1 conv, mean pool and
    Linear would compose into one affine map, a redundant reparametrisation with exactly flat Hessian directions.
    Padding 1 (theirs was 'valid') so that 8×8 digits work as well as 28×28 MNIST.
    1 input channel, 10 classes: 80 + 4·584 + 90 + 110 = 2,616 parameters.
    """
    channels = input_shape[0]

    def build() -> nn.Module:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, stride in enumerate((1, 2, 1, 2, 1), start=1):
            layers[f"conv{i}"] = nn.Conv2d(channels if i == 1 else 8, 8, 3, stride=stride, padding=1)
            layers[f"tanh{i}"] = nn.Tanh()
        layers["conv6"] = nn.Conv2d(8, num_classes, 1)
        layers["tanh6"] = nn.Tanh()
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(num_classes, num_classes)
        return nn.Sequential(layers)

    return ModuleNet("small_cnn", build, input_shape, num_classes)


def lenet(input_shape: tuple[int, int, int], num_classes: int) -> ModuleNet:
    """LeNet-5: conv 5×5 → 6, max-pool 2, conv 5×5 → 16, max-pool 2, fc 120, fc 84, fc classes, with tanh.

    tanh as in LeCun et al. 1998 and as in ``small_cnn``: the influence function is a second-order expansion, and
    a smooth activation keeps H continuous in θ; it also keeps the comparison of the two small nets about their
    architecture rather than their activation. Padding 2 on both convolutions, so 8×8 inputs survive both pools;
    the flattened size is read off a shape-only forward (16·7·7 = 784 at 28×28, 16·2·2 = 64 at 8×8).
    """
    channels = input_shape[0]

    def features() -> nn.Sequential:
        return nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(channels, 6, 5, padding=2), tanh1=nn.Tanh(), pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(6, 16, 5, padding=2), tanh2=nn.Tanh(), pool2=nn.MaxPool2d(2), flatten=nn.Flatten(),
        ))

    flat = _flat_size(features, input_shape, "lenet")

    def build() -> nn.Module:
        layers = OrderedDict(features().named_children())
        layers.update(fc1=nn.Linear(flat, 120), tanh3=nn.Tanh(), fc2=nn.Linear(120, 84), tanh4=nn.Tanh(),
                      fc3=nn.Linear(84, num_classes))
        return nn.Sequential(layers)

    return ModuleNet("lenet", build, input_shape, num_classes)


def vgg13(input_shape: tuple[int, int, int], num_classes: int) -> ModuleNet:
    """VGG13 (torchvision's configuration "B": 3×3 convolutions 64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M,
    512, 512, M; ReLU, no BatchNorm), CIFAR-style: global average pool and one Linear 512 → classes, no dropout.

    Max-pools that would shrink a side below 1 pixel are dropped (at 32×32 all five stay, at 28×28 the last, at 8×8
    the last two). Initialised as torchvision initialises VGG: Kaiming-normal (fan_out) convolutions, N(0, 0.01)
    Linear, zero biases.
    """
    channels, height, width = input_shape

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        c, h, w = channels, height, width
        for v in torchvision.models.vgg.cfgs["B"]:
            if v == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
                c = int(v)
        net = nn.Sequential(OrderedDict(features=nn.Sequential(*layers), pool=nn.AdaptiveAvgPool2d(1),
                                        flatten=nn.Flatten(), classifier=nn.Linear(c, num_classes)))
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        return net

    return ModuleNet("vgg13", build, input_shape, num_classes)


def group_norm(channels: int) -> nn.GroupNorm:
    """The ResNets' ``norm_layer``: GroupNorm with gcd(32, channels) groups (32 for every ResNet width)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def resnet18(input_shape: tuple[int, int, int], num_classes: int) -> ModuleNet:
    """torchvision's ResNet-18 with GroupNorm; see :func:`_resnet` for the stem."""
    return _resnet("resnet18", torchvision.models.resnet18, input_shape, num_classes)


def resnet50(input_shape: tuple[int, int, int], num_classes: int) -> ModuleNet:
    """torchvision's ResNet-50 with GroupNorm; see :func:`_resnet` for the stem."""
    return _resnet("resnet50", torchvision.models.resnet50, input_shape, num_classes)


def _resnet(
    name: str, ctor: Callable[..., nn.Module], input_shape: tuple[int, int, int], num_classes: int
) -> ModuleNet:
    """Below 64 px the ImageNet stem (7×7 stride-2 conv, 3×3 stride-2 max-pool) would shrink a 32×32 image to 8×8
    before the first block; the CIFAR stem keeps it (3×3 conv, stride 1, no max-pool). The first convolution
    takes the input's channels and is initialised as torchvision initialises every convolution."""
    channels, height, width = input_shape
    cifar = min(height, width) < 64

    def build() -> nn.Module:
        net = ctor(num_classes=num_classes, norm_layer=group_norm)  # weights=None: nothing is downloaded
        if cifar or channels != 3:
            # Reassigning keeps conv1's place in named_parameters(), so it stays first in θ.
            net.conv1 = (nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False) if cifar
                         else nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False))
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        if cifar:
            net.maxpool = nn.Identity()
        return net

    return ModuleNet(name, build, input_shape, num_classes)


def _flat_size(features: Callable[[], nn.Module], input_shape: tuple[int, ...], name: str) -> int:
    with torch.device("meta"):
        try:
            out = features()(torch.empty(1, *input_shape, device="meta"))
        except RuntimeError as err:
            raise ValueError(f"{name} cannot take inputs of shape {tuple(input_shape)}: {err}") from err
    return int(out.shape[1])


_BUILDERS: dict[str, Callable[[tuple[int, int, int], int], ModuleNet]] = {
    "small_cnn": small_cnn, "lenet": lenet, "vgg13": vgg13, "resnet18": resnet18, "resnet50": resnet50,
}


def build_net(name: str, input_shape: tuple[int, int, int], num_classes: int) -> ModuleNet:
    """The network ``name`` (one of :data:`NETS`) for images of shape ``input_shape`` = (C, H, W)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETS)}")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"{name} needs image inputs [C, H, W]; got {tuple(input_shape)}")
    if num_classes < 2:
        raise ValueError(f"need num_classes >= 2; got {num_classes}")
    return _BUILDERS[name](tuple(int(s) for s in input_shape), int(num_classes))
