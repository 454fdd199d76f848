"""The paper's models as pure functions of a flat θ: counts, shapes, stacking, init, layers and taps, images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.func import grad

from influence.curvature import CurvatureOperator
from influence.models import MLP, MODELS, build_model
from influence.nets import NETS, ModuleNet, group_norm
from influence.objective import objective, per_example_loss
from influence.scores import per_example_grads
from influence.stacked import StackedMLP

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MNIST, CIFAR, DIGITS = (1, 28, 28), (3, 32, 32), (1, 8, 8)
# Every network at every input shape, except the expensive ones where a cheaper shape says the same.
CASES = [(name, shape) for name in NETS for shape in (DIGITS, MNIST, CIFAR)
         if name not in ("vgg13", "resnet50") or shape == CIFAR]


def net(name: str, shape: tuple[int, int, int] = DIGITS, classes: int = 10) -> ModuleNet:
    return build_model(name, num_classes=classes, input_shape=shape)


def real_module(model: ModuleNet, seed: int) -> nn.Module:
    """The nn.Module itself, with the weights ``init(seed)`` flattens (for comparisons with plain torch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model._factory()


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- parameter counts and shapes -----------------------------------------------------------------------------


def test_parameter_counts_match_torch_modules():
    assert net("small_cnn", MNIST).n_params == 80 + 4 * 584 + 90 + 110 == 2616
    assert net("small_cnn", DIGITS).n_params == 2616  # global pooling: independent of the image size
    # LeNet at 28×28 with padding 2 on both convolutions: 16·7·7 = 784 features into fc1.
    lenet = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (784 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert net("lenet", MNIST).n_params == lenet
    with torch.device("meta"):
        vgg_features = count(torchvision.models.vgg13().features)
        tv18 = count(torchvision.models.resnet18(num_classes=10))
        tv50 = count(torchvision.models.resnet50(num_classes=10))
    assert net("vgg13", CIFAR).n_params == vgg_features + 512 * 10 + 10
    # GroupNorm has BatchNorm's parameters (a scale and a shift per channel): at 224 px the counts are torchvision's;
    # the CIFAR stem swaps conv1's 7×7 kernel for a 3×3 one.
    assert net("resnet18", (3, 224, 224)).n_params == tv18
    assert net("resnet50", (3, 64, 64)).n_params == tv50
    assert net("resnet18", CIFAR).n_params == tv18 - 64 * 3 * (49 - 9)
    assert net("resnet18", MNIST).n_params == tv18 - 64 * (3 * 49 - 9)
    for name, shape in CASES:
        model = net(name, shape)
        assert model.n_params == count(real_module(model, 0)) == sum(math.prod(s) for _, s, _ in model.params)


@pytest.mark.parametrize("name,shape", CASES)
def test_forward_shapes(name, shape):
    model = net(name, shape)
    theta = model.init(0, torch.float32)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        logits = model.forward(theta, x)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        assert torch.equal(model.forward(theta, x.flatten(1)), logits)  # flattened rows are accepted too
    with pytest.raises(ValueError, match=r"expects inputs \[n, "):
        model.forward(theta, torch.randn(2, shape[0], shape[1] + 1, shape[2]))


def test_resnets_use_groupnorm_and_the_cifar_stem():
    model = net("resnet18", CIFAR)
    module = real_module(model, 0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    assert module.bn1.num_groups == 32 and group_norm(2048).num_groups == 32 and group_norm(8).num_groups == 8
    assert module.conv1.kernel_size == (3, 3) and module.conv1.stride == (1, 1)
    assert isinstance(module.maxpool, nn.Identity)
    big = real_module(net("resnet18", (1, 64, 64)), 0)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.in_channels == 1 and isinstance(big.maxpool, nn.MaxPool2d)


def test_module_net_refuses_batchnorm_and_dropout():
    for layer in (nn.BatchNorm2d(4), nn.Dropout(0.5)):
        with pytest.raises(TypeError, match="per-example losses"):
            ModuleNet("bad", lambda layer=layer: nn.Sequential(nn.Conv2d(1, 4, 3), layer, nn.Flatten(),
                                                               nn.Linear(36, 3)), (1, 5, 5), 3)


# ---- stacking, init, gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_cnn", "lenet", "resnet18"])
def test_stacked_forward_equals_single_forwards(name):
    model = net(name, DIGITS)
    thetas = torch.stack([model.init(seed) for seed in (1, 2, 3)])
    x = torch.randn(4, *DIGITS, dtype=torch.float64)
    with torch.no_grad():
        stacked = model.forward(thetas, x)
        single = torch.stack([model.forward(t, x) for t in thetas])
    assert stacked.shape == (3, 4, 10)
    torch.testing.assert_close(stacked, single, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NETS)
def test_init_is_deterministic_per_seed_and_isolated(name):
    model = net(name, CIFAR if name in ("vgg13", "resnet50") else DIGITS)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = model.init(7)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    assert torch.equal(a, model.init(7)) and not torch.equal(a, model.init(8))
    assert a.dtype == torch.float64 and a.shape == (model.n_params,)
    # Drawn in float32 then cast: the float64 θ0 is the float32 θ0 exactly.
    assert torch.equal(model.init(7, dtype=torch.float32).double(), a)


@pytest.mark.parametrize("name", NETS)
def test_gradients_through_forward_are_finite(name):
    shape = CIFAR if name in ("vgg13", "resnet50") else DIGITS
    model = net(name, shape)
    dtype = torch.float32 if name in ("vgg13", "resnet50") else torch.float64
    theta = model.init(0, dtype)
    x, y = torch.randn(2, *shape, dtype=dtype), torch.tensor([1, 7])
    g = grad(lambda t: per_example_loss(model, t, x, y).mean())(theta)
    assert g.shape == theta.shape and torch.isfinite(g).all() and g.abs().sum() > 0


def test_per_example_grads_equal_an_autograd_loop():
    model = net("small_cnn", DIGITS)
    theta = model.init(3)
    x, y = torch.randn(5, *DIGITS, dtype=torch.float64), torch.tensor([0, 3, 9, 3, 1])
    fast = per_example_grads(model, theta, x, y, chunk_size=2)
    slow = []
    for i in range(5):
        t = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model.forward(t, x[i : i + 1]), y[i : i + 1]), t)
        slow.append(g)
    torch.testing.assert_close(fast, torch.stack(slow), rtol=1e-10, atol=1e-12)


def test_curvature_products_run_through_functional_call():
    """Forward-over-reverse HVPs (jvp through conv, pool and functional_call) equal reverse-over-reverse ones;
    GGN products are symmetric."""
    model = net("small_cnn", DIGITS)
    theta = model.init(4)
    x, y = torch.randn(4, *DIGITS, dtype=torch.float64), torch.tensor([0, 5, 5, 9])
    u, v = torch.randn(2, model.n_params, dtype=torch.float64)
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(model, t, x, y, 1e-3), t, create_graph=True)
    (hv,) = torch.autograd.grad(g @ v, t)
    torch.testing.assert_close(CurvatureOperator(model, theta, x, y, 1e-3).matvec(v), hv, rtol=1e-10, atol=1e-12)
    gu, gv = CurvatureOperator(model, theta, x, y, 1e-3, curvature="ggn").matvec(torch.stack([u, v]))
    torch.testing.assert_close(v @ gu, u @ gv, rtol=1e-10, atol=1e-12)


# ---- layers() and forward_with_taps --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_cnn", "lenet", "vgg13", "resnet18", "mlp"])
def test_layers_tile_every_linear_and_conv(name):
    if name == "mlp":
        model = build_model("mlp", num_classes=3, in_features=4, depth=2, width=5)
        theta = model.init(0)
        views = [t for pair in model.unflatten(theta) for t in pair]
        named = dict(zip([f"fc{l}.{p}" for l in range(3) for p in ("weight", "bias")], views))
        kinds = {f"fc{l}": nn.Linear for l in range(3)}
    else:
        model = net(name, CIFAR if name == "vgg13" else DIGITS)
        theta = model.init(5, torch.float32)
        module = real_module(model, 5)
        named = dict(module.named_parameters())
        kinds = {n: type(m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    layers = model.layers()
    assert [layer.name for layer in layers] == list(kinds)  # every Linear/Conv2d, in θ order
    covered = torch.zeros(model.n_params, dtype=torch.int64)
    for layer in layers:
        assert layer.kind == ("linear" if kinds[layer.name] is nn.Linear else "conv2d")
        assert torch.equal(theta[layer.weight].view(layer.weight_shape), named[f"{layer.name}.weight"])
        covered[layer.weight] += 1
        if layer.bias is not None:
            assert torch.equal(theta[layer.bias], named[f"{layer.name}.bias"])
            covered[layer.bias] += 1
        else:
            assert f"{layer.name}.bias" not in named
    assert covered.max() == 1  # no overlaps; what is left is exactly the normalisation layers' parameters
    if name != "mlp":
        others = sum(p.numel() for n, p in named.items() if n.rsplit(".", 1)[0] not in kinds)
        assert int(covered.sum()) + others == model.n_params
    else:
        assert int(covered.sum()) == model.n_params


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_forward_with_taps_gives_each_layer_input_and_output(name):
    model = net(name, DIGITS)
    theta = model.init(0).requires_grad_(True)
    x, y = torch.randn(3, *DIGITS, dtype=torch.float64), torch.tensor([2, 4, 6])
    logits, taps = model.forward_with_taps(theta, x)
    torch.testing.assert_close(logits, model.forward(theta, x), rtol=0, atol=0)
    layers = model.layers()
    assert len(taps) == len(layers)
    for layer, (inp, out) in zip(layers, taps):
        w = theta[layer.weight].view(layer.weight_shape)
        b = None if layer.bias is None else theta[layer.bias]
        if layer.kind == "conv2d":
            again = F.conv2d(inp, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
        else:
            again = F.linear(inp, w, b)
        torch.testing.assert_close(again, out, rtol=1e-12, atol=1e-12)
    # Gradients with respect to the layer outputs: one backward gives all of them; row i belongs to example i.
    loss = F.cross_entropy(logits, y, reduction="sum")
    grads = torch.autograd.grad(loss, [out for _, out in taps])
    assert all(g.shape == out.shape and torch.isfinite(g).all() for g, (_, out) in zip(grads, taps))
    # The weight gradient of a bias-free conv equals what its tapped input and output gradient give.
    i = next(i for i, layer in enumerate(layers) if layer.kind == "conv2d")
    (g_theta,) = torch.autograd.grad(F.cross_entropy(model.forward(theta, x), y, reduction="sum"), theta)
    layer = layers[i]
    g_w = torch.nn.grad.conv2d_weight(taps[i][0], layer.weight_shape, grads[i], layer.stride, layer.padding,
                                      layer.dilation, layer.groups)
    torch.testing.assert_close(g_theta[layer.weight].view(layer.weight_shape), g_w, rtol=1e-10, atol=1e-12)


def test_mlp_taps_match_forward():
    model = build_model("mlp", num_classes=3, in_features=4, depth=2, width=5)
    theta, x = model.init(0), torch.randn(6, 4, dtype=torch.float64)
    logits, taps = model.forward_with_taps(theta, x)
    assert torch.equal(logits, model.forward(theta, x))
    for layer, (inp, out) in zip(model.layers(), taps):
        torch.testing.assert_close(F.linear(inp, theta[layer.weight].view(layer.weight_shape), theta[layer.bias]), out)


# ---- the MLP on images, and build_model ----------------------------------------------------------------------


def test_mlp_accepts_images():
    model = build_model("mlp", num_classes=10, input_shape=DIGITS, depth=1, width=7)
    assert model.input_shape == DIGITS and model.in_features == 64
    assert model.n_params == MLP(64, 10, 1, 7).n_params
    theta = torch.stack([model.init(0), model.init(1)])
    x = torch.randn(5, *DIGITS, dtype=torch.float64)
    assert torch.equal(model.forward(theta[0], x), model.forward(theta[0], x.flatten(1)))
    assert torch.equal(model.forward(theta, x), model.forward(theta, x.flatten(1)))
    y, weights = torch.tensor([0, 1, 2, 3, 4]), torch.ones(2, 5, dtype=torch.float64)
    grads = []
    for inputs in (x, x.flatten(1)):
        stack = StackedMLP(model, inputs, y, weights)
        stack.load(theta)
        grads.append(stack.grad().clone())
    assert torch.equal(grads[0], grads[1])


def test_build_model_names_and_errors():
    assert MODELS == ("mlp", "logistic", "small_cnn", "lenet", "vgg13", "resnet18", "resnet50")
    assert build_model("logistic", in_features=4, num_classes=3, depth=5).depth == 0
    assert build_model("mlp", input_shape=(4,), in_features=4, num_classes=3).in_features == 4
    flat = r"small_cnn needs image inputs \[C, H, W\]; dataset iris has flat features \(4,\)"
    with pytest.raises(ValueError, match=flat):
        build_model("small_cnn", in_features=4, num_classes=3, dataset="iris")
    with pytest.raises(ValueError, match="unknown model 'cnn'; choose one of mlp, logistic, small_cnn, lenet"):
        build_model("cnn", in_features=4, num_classes=3)
    with pytest.raises(ValueError, match="in_features=10"):
        build_model("mlp", input_shape=DIGITS, in_features=10, num_classes=3)
    with pytest.raises(ValueError, match="lenet cannot take inputs"):
        build_model("lenet", input_shape=(1, 2, 2), num_classes=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_cuda_matches_cpu(name):
    model = net(name, DIGITS)
    theta = model.init(0)
    assert torch.equal(model.init(0, device="cuda").cpu(), theta)
    x = torch.randn(4, *DIGITS, dtype=torch.float64)
    thetas = torch.stack([theta, model.init(1)])
    with torch.no_grad():
        torch.testing.assert_close(model.forward(thetas.cuda(), x.cuda()).cpu(), model.forward(thetas, x))
