"""ImageCNN and MnistCNN (fastattn's fused conv blocks) against TorchImageCNN and TorchMnistCNN, their pure torch.nn
twins: state_dict, outputs and gradients in float64 and float32 (error-ratio rule), train and eval (BatchNorm folded),
odd image sizes, channels_last and cropped inputs, batch 1, the fused kernels running, bad input."""

import pytest
import torch

import fastattn
from fastattn.models import ImageCNN, MnistCNN, TorchImageCNN, TorchMnistCNN
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

ATOL = 1e-10  # float64

# (ours, twin, constructor arguments, input (C, H, W), fc input features worked out by hand: 64 * H' * W')
CASES = {
    "image": (ImageCNN, TorchImageCNN, dict(), (3, 32, 32), 64 * 5 * 5),  # 32 -> 28 -> 14 -> 10 -> 5
    "image-bn": (ImageCNN, TorchImageCNN, dict(batch_norm=True), (3, 32, 32), 64 * 5 * 5),
    "image-36x28-k3": (ImageCNN, TorchImageCNN, dict(in_channels=2, image_size=(36, 28), num_classes=7, kernel_size=3,
                                                     hidden=19), (2, 36, 28), 64 * 7 * 5),  # 36->34->17->15->7
    "image-bn-35x29": (ImageCNN, TorchImageCNN, dict(image_size=(35, 29), batch_norm=True, hidden=24), (3, 35, 29),
                       64 * 5 * 4),  # 35 -> 31 -> 15 -> 11 -> 5; 29 -> 25 -> 12 -> 8 -> 4
    "mnist": (MnistCNN, TorchMnistCNN, dict(dropout=0.0), (1, 28, 28), 64 * 5 * 5),  # 28 -> 26 -> 13 -> 11 -> 5
    "mnist-31x27": (MnistCNN, TorchMnistCNN, dict(in_channels=2, image_size=(31, 27), num_classes=3, dropout=0.0),
                    (2, 31, 27), 64 * 6 * 5),  # 31 -> 29 -> 14 -> 12 -> 6; 27 -> 25 -> 12 -> 10 -> 5
}  # fmt: skip


def _first_linear(model):
    return model.fc1 if hasattr(model, "fc1") else model.fc


def _randomize_batchnorm(model, seed=0):
    """Non-trivial affine parameters and running statistics, so that folding them in eval is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: see conftest.py


def _pair(case, direction="ours_to_twin", dtype=torch.float64):
    """(ours, twin) with the same state, copied by load_state_dict(strict=True) in the given direction."""
    ours_cls, twin_cls, kwargs, _, _ = CASES[case]
    torch.manual_seed(0)
    ours = ours_cls(**kwargs).to(dtype)
    torch.manual_seed(1)
    twin = twin_cls(**kwargs).to(dtype)
    source, target = (ours, twin) if direction == "ours_to_twin" else (twin, ours)
    _randomize_batchnorm(source)
    target.load_state_dict(source.state_dict(), strict=True)
    return ours, twin


def _images(case, batch=3, dtype=torch.float64, seed=0):
    return torch.randn(batch, *CASES[case][3], dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _outputs_and_grads(model, x):
    """The logits and the gradients of <logits, fixed cotangent> for x and every named parameter."""
    x = x.detach().requires_grad_()
    out = model(x)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(out, [x, *params], cotangent)
    return out, dict(zip(("x", *names), grads, strict=True))


def _assert_same(ours, twin, x, x_twin=None):
    out, grads = _outputs_and_grads(ours, x)
    expected, expected_grads = _outputs_and_grads(twin, x if x_twin is None else x_twin)
    assert_close(out, expected, atol=ATOL)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], atol=ATOL, name=f"gradient of {name}")
    for key, value in twin.state_dict().items():  # running statistics after a training step
        assert_close(ours.state_dict()[key], value, atol=ATOL, name=key)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_keys_shapes_and_seeded_parameters_match_the_twin(case):
    ours_cls, twin_cls, kwargs, _, fc_in = CASES[case]
    torch.manual_seed(3)
    ours = ours_cls(**kwargs)
    torch.manual_seed(3)
    twin = twin_cls(**kwargs)
    ours_state, twin_state = ours.state_dict(), twin.state_dict()
    assert list(ours_state) == list(twin_state)
    assert _first_linear(ours).in_features == _first_linear(twin).in_features == fc_in
    for key, value in twin_state.items():
        assert ours_state[key].shape == value.shape and torch.equal(ours_state[key], value), key
    assert ("conv1.1.running_mean" in ours_state) == kwargs.get("batch_norm", False)


@pytest.mark.parametrize("direction", ["ours_to_twin", "twin_to_ours"])
@pytest.mark.parametrize("case", CASES)
def test_matches_twin_float64_in_train_and_eval(case, direction):
    ours, twin = _pair(case, direction)
    x = _images(case)
    for training in (True, False):  # training first: BatchNorm updates its running statistics, then folds them
        ours.train(training), twin.train(training)
        _assert_same(ours, twin, x)


@pytest.mark.parametrize("case", ["image-bn-35x29", "mnist-31x27"])
@pytest.mark.parametrize("layout", ["channels_last", "cropped", "batch1"])
def test_channels_last_cropped_and_single_image_inputs(case, layout):
    ours, twin = _pair(case)
    x = _images(case, batch=2)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    elif layout == "cropped":  # a non-contiguous view inside larger images
        c, h, w = CASES[case][3]
        x = torch.randn(2, c + 1, h + 3, w + 2, dtype=torch.float64)[:, 1:, 2:-1, 1:-1]
        assert x.shape[1:] == (c, h, w) and not x.is_contiguous()
    else:
        x = x[:1]
    for training in (True, False):
        ours.train(training), twin.train(training)
        _assert_same(ours, twin, x, x.contiguous())


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=NEEDS_GPU, id="cuda")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ["image-bn-35x29", "mnist-31x27", "image"])
def test_float32_within_the_error_ratio_of_torch(case, training, device):
    """Against the float64 twin (float32-rounded parameters), ours may err at most twice (gradients: three times)
    as much as the float32 twin on the same device."""
    ours, twin = (m.to(device).train(training) for m in _pair(case, dtype=torch.float32))
    truth_model = CASES[case][1](**CASES[case][2]).double().train(training)
    truth_model.load_state_dict(ours.state_dict())
    x = _images(case, dtype=torch.float32)
    truth, truth_grads = _outputs_and_grads(truth_model, x.double())
    out, grads = _outputs_and_grads(ours, x.to(device))
    baseline, baseline_grads = _outputs_and_grads(twin, x.to(device))
    assert out.dtype == torch.float32
    assert_error_ratio(out.cpu(), truth, baseline.cpu())
    for name, grad in grads.items():
        assert_error_ratio(grad.cpu(), truth_grads[name], baseline_grads[name].cpu(), ratio=GRADIENT_RATIO, name=name)


@pytest.mark.parametrize("case", ["image", "image-bn", "mnist"])
def test_the_fused_conv_epilogue_runs_forward_and_backward(case):
    """Both conv blocks run fastattn's CPU epilogue kernel, forward and backward, in train and eval: no fallback."""
    ours, _ = _pair(case, dtype=torch.float32)
    x = _images(case, dtype=torch.float32)
    for training in (True, False):
        ours.train(training)
        with fastattn.record() as calls:
            ours(x).sum().backward()
        assert [(c.op, c.backend) for c in calls if c.op == "conv_epilogue"] == [("conv_epilogue", "cpu")] * 2
        assert [(c.op, c.backend) for c in calls if c.op == "conv_epilogue_backward"] == [
            ("conv_epilogue_backward", "cpu")] * 2  # fmt: skip
        assert {c.backend for c in calls} == {"cpu"}, calls


def test_mnist_dropout_acts_in_training_only_and_predict_proba_is_the_softmax():
    torch.manual_seed(0)
    model = MnistCNN(dropout=0.5).double()
    twin = TorchMnistCNN(dropout=0.5).double()
    twin.load_state_dict(model.state_dict())
    x = _images("mnist")
    model.eval(), twin.eval()
    assert_close(model(x), twin(x), atol=ATOL)
    probs = model.predict_proba(x)
    assert_close(probs, torch.softmax(twin(x), dim=-1), atol=ATOL)
    assert_close(probs.sum(-1), torch.ones(3, dtype=torch.float64), atol=ATOL)
    assert_close(twin.predict_proba(x), probs, atol=ATOL)
    model.train()
    torch.manual_seed(5)
    first = model(x)
    torch.manual_seed(5)
    assert torch.equal(model(x), first)
    assert not torch.allclose(first, model.eval()(x))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    ours, _ = _pair("image-bn-35x29", dtype=torch.float32)
    ours.eval()
    x = _images("image-bn-35x29", dtype=torch.float32)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), ours(x).double(), atol=1e-5)


@pytest.mark.parametrize(
    "cls, kwargs, smallest",
    [(ImageCNN, dict(), 16), (ImageCNN, dict(kernel_size=3), 10), (MnistCNN, dict(), 10)],
    ids=["image-k5", "image-k3", "mnist"],
)
def test_too_small_image_raises_naming_image_size(cls, kwargs, smallest):
    """The smallest side leaves one pixel after the second pool (worked out by hand: 3k + 1); one less raises."""
    for model_cls in (cls, {ImageCNN: TorchImageCNN, MnistCNN: TorchMnistCNN}[cls]):
        assert _first_linear(model_cls(image_size=smallest, **kwargs)).in_features == 64
        for size in (smallest - 1, (smallest, smallest - 1), (smallest - 1, 40)):
            with pytest.raises(ValueError, match=rf"image_size .* too small.* at least {smallest}"):
                model_cls(image_size=size, **kwargs)


@pytest.mark.parametrize("case", ["image", "image-bn", "mnist"])
def test_wrong_channel_count_raises_the_error_kind_torch_raises(case):
    ours, twin = _pair(case, dtype=torch.float32)
    c, h, w = CASES[case][3]
    bad = torch.randn(2, c + 1, h, w)
    with pytest.raises(RuntimeError) as theirs:
        twin(bad)
    with pytest.raises(type(theirs.value), match=f"in_channels={c}"):
        ours(bad)


BAD_INPUTS = [
    ("image_size=", ValueError, lambda m: m(torch.randn(2, 3, 32, 30))),
    (r"\(N, C, H, W\)", ValueError, lambda m: m(torch.randn(3, 32, 32))),
    ("floating-point", TypeError, lambda m: m(torch.zeros(2, 3, 32, 32, dtype=torch.long))),
]


@pytest.mark.parametrize("match, error, call", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(match, error, call):
    with pytest.raises(error, match=match):
        call(ImageCNN())


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [(ImageCNN, dict(image_size=(32,)), "image_size"), (ImageCNN, dict(image_size=32.0), "image_size"),
     (ImageCNN, dict(kernel_size=0), "kernel_size"), (ImageCNN, dict(hidden=0), "hidden"),
     (MnistCNN, dict(num_classes=0), "num_classes"), (MnistCNN, dict(dropout=1.0), "dropout")],
)  # fmt: skip
def test_bad_arguments_raise_naming_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
