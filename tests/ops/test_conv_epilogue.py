"""fastattn.conv_epilogue on every backend against a float64 reference (the error-ratio rule): every activation, the
pool on and off, NCHW / channels_last / sliced inputs, odd sizes, gradients, ties, opcheck, torch.compile, bad input."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import backends, reference
from fastattn.ops.conv_epilogue import conv_epilogue_backward_op, conv_epilogue_op
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ACTIVATIONS = reference.CONV_ACTIVATIONS
# (N, C, H, W): odd H and W (the pool floors), N = 1, C = 1, 3 and 37.
SHAPES = [(2, 3, 7, 9), (1, 37, 6, 5), (3, 1, 5, 4)]


def _skip_unsupported(name, dtype):
    if dtype == torch.float64 and name == "cuda":
        pytest.skip("the cuda backend runs float16/bfloat16/float32 (float64 goes to the next backend)")


def _layout(y, channels_last):
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def _inputs(shape, dtype, device, channels_last, bias_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(shape, generator=g) * 2).to(device=device, dtype=dtype)
    bias = torch.randn(shape[1], generator=g).to(device=device, dtype=bias_dtype or dtype)
    return _layout(y, channels_last), bias


def fused(activation, pool):
    return lambda y, bias: fastattn.conv_epilogue(y, bias, activation, pool)


def unfused(activation, pool, upcast=True):
    """The reference: float64 truth (upcast), or plain PyTorch in y's dtype (the baseline)."""
    return lambda y, bias: reference.conv_epilogue(y, bias, activation, pool, upcast)


def torch_pool(activation):
    return lambda y, bias: F.max_pool2d(reference.conv_activation(y + bias.view(1, -1, 1, 1), activation), 2)


def _grads(fn, y, bias, grad):
    """d fn(y, bias) / d (y, bias) for the incoming grad."""
    y, bias = y.detach().requires_grad_(), bias.detach().requires_grad_()
    out = fn(y, bias)
    return (out,) + torch.autograd.grad(out, (y, bias), grad.to(out.dtype))


def _expected_layout(out, y):
    """Outputs are channels_last when y's channels (C > 1) have unit stride (also sliced), else contiguous."""
    if y.shape[1] > 1 and y.stride(1) == 1:
        return out.is_contiguous(memory_format=torch.channels_last)
    return out.is_contiguous()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("pool", [False, True], ids=["nopool", "pool"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward(backend_device, dtype, activation, pool, channels_last):
    """Output, grad y and grad bias against float64, with PyTorch's own error in dtype as the allowance."""
    name, device = backend_device
    _skip_unsupported(name, dtype)
    for index, shape in enumerate(SHAPES):
        y, bias = _inputs(shape, dtype, device, channels_last, seed=index)
        out_shape = (*shape[:2], shape[2] // 2, shape[3] // 2) if pool else shape
        grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(7)).to(device=device, dtype=dtype)
        with fastattn.record() as calls:
            ours = _grads(fused(activation, pool), y, bias, grad)
        assert [c.backend for c in calls] == [name, name]
        truth = _grads(unfused(activation, pool), y.double(), bias.double(), grad)
        baseline = _grads(unfused(activation, pool, upcast=False), y, bias, grad)
        out, grad_y, grad_bias = ours
        assert out.dtype == dtype and out.shape == out_shape and _expected_layout(out, y)
        assert grad_y.dtype == dtype and grad_bias.dtype == dtype
        label = f"{tuple(shape)}"
        assert_error_ratio(out, truth[0], baseline[0], name=f"{label} output")
        assert_error_ratio(grad_y, truth[1], baseline[1], ratio=GRADIENT_RATIO, name=f"{label} grad y")
        assert_error_ratio(grad_bias, truth[2], baseline[2], ratio=GRADIENT_RATIO, name=f"{label} grad bias")


@pytest.mark.parametrize("pool", [False, True], ids=["nopool", "pool"])
def test_float32_bias_with_16bit_y(backend_device, pool):
    """A float32 bias (autocast keeps parameters in float32) with bfloat16 / float16 y; the bias grad stays float32."""
    _, device = backend_device
    for dtype in (torch.bfloat16, torch.float16):
        y, bias = _inputs((2, 5, 6, 7), dtype, device, False, bias_dtype=torch.float32)
        grad = torch.randn((2, 5, 3, 3) if pool else (2, 5, 6, 7), generator=torch.Generator().manual_seed(3))
        grad = grad.to(device=device, dtype=dtype)
        out, grad_y, grad_bias = _grads(fused("silu", pool), y, bias, grad)
        truth = _grads(unfused("silu", pool), y.double(), bias.double(), grad)
        baseline = _grads(unfused("silu", pool, upcast=False), y, bias, grad)
        assert out.dtype == dtype and grad_bias.dtype == torch.float32
        assert_error_ratio(out, truth[0], baseline[0])
        assert_error_ratio(grad_y, truth[1], baseline[1], ratio=GRADIENT_RATIO, name="grad y")
        assert_error_ratio(grad_bias, truth[2], baseline[2].float(), ratio=GRADIENT_RATIO, name="grad bias")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda y: y[:, :, 1:, 2:-1], id="sliced-hw"),
        pytest.param(lambda y: y[:, :, :, ::2], id="strided-w"),
        pytest.param(lambda y: y[1:, 3:9], id="sliced-nc"),
        pytest.param(lambda y: y.contiguous(memory_format=torch.channels_last)[:, 2:7, 1:], id="channels-last-sliced"),
        pytest.param(lambda y: y.transpose(2, 3), id="transposed-hw"),
        pytest.param(lambda y: y.permute(1, 0, 2, 3), id="permuted-nc"),
    ],
)
def test_non_contiguous(backend_device, make):
    """Any strides in, the layout rule out. With the pool only monotonic activations: a non-monotonic one can make
    two window elements tie to float32 rounding, and the gradient then lands on either."""
    _, device = backend_device
    torch.manual_seed(0)
    y = make(torch.randn(3, 10, 9, 11, device=device))
    bias = torch.randn(y.shape[1], device=device)
    for activation, pool in (("relu", True), ("none", True), ("gelu", False)):
        n, c, h, w = y.shape
        grad = torch.randn((n, c, h // 2, w // 2) if pool else (n, c, h, w), device=device)
        out, grad_y, grad_bias = _grads(fused(activation, pool), y, bias, grad)
        truth = _grads(unfused(activation, pool), y.double(), bias.double(), grad)
        assert _expected_layout(out, y)
        assert_close(out, truth[0], atol=3e-6)
        assert_close(grad_y, truth[1], atol=3e-6, name="grad y")
        assert_close(grad_bias, truth[2], atol=1e-4, name="grad bias")


def test_gradcheck(backend_device):
    name, device = backend_device
    _skip_unsupported(name, torch.float64)
    y = torch.randn(2, 3, 5, 4, device=device, dtype=torch.float64)
    bias = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    for channels_last in (False, True):
        y_in = _layout(y, channels_last).requires_grad_()
        for activation in ACTIVATIONS:
            for pool in (False, True):
                fn = fused(activation, pool)  # noqa: E731
                assert torch.autograd.gradcheck(fn, (y_in, bias), fast_mode=True), (activation, pool)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_ties_and_nan_go_where_torch_sends_them(backend_device, channels_last):
    """Constant windows: the forward value of torch and the gradient on the first element, as max_pool2d's backward;
    a window holding NaNs: NaN out, and the gradient on the last NaN, as torch's."""
    _, device = backend_device
    y = torch.ones(2, 3, 5, 7, device=device)
    y[0, 1, 2, 3] = y[0, 1, 3, 2] = float("nan")  # two NaNs in window (1, 1) of plane (0, 1)
    y[1, 2, :2, :2] = 4.0  # a tie of larger values
    y = _layout(y, channels_last)
    bias = torch.full((3,), 0.5, device=device)
    grad = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32, device=device).reshape(2, 3, 2, 3) + 1
    for activation in ("relu", "none", "silu"):
        ours = _grads(fused(activation, True), y, bias, grad)
        torch_twin = _grads(torch_pool(activation), y, bias, grad)
        assert torch.equal(torch.isnan(ours[0]), torch.isnan(torch_twin[0]))
        assert_close(ours[0], torch_twin[0].double(), atol=1e-6)
        # Gradients exactly at max_pool2d's indices (the twin also has NaN where act'(NaN) meets a zero gradient).
        a = reference.conv_activation(y + bias.view(1, -1, 1, 1), activation)
        _, index = F.max_pool2d(a, 2, return_indices=True)
        picked = torch.zeros(a.shape, dtype=torch.bool, device=device).flatten(2)
        picked.scatter_(2, index.flatten(2), True)
        picked = picked.view(a.shape)
        assert torch.equal(ours[1] != 0, picked), activation
        assert_close(ours[1][picked], torch_twin[1][picked].double(), atol=1e-5, name="grad y")


def test_empty(backend_device):
    _, device = backend_device
    for shape, pool in (((0, 3, 4, 4), True), ((2, 0, 4, 4), False), ((2, 3, 0, 5), False)):
        y = torch.randn(shape, device=device, requires_grad=True)
        bias = torch.randn(shape[1], device=device, requires_grad=True)
        out = fastattn.conv_epilogue(y, bias, "relu", pool)
        assert out.shape == ((shape[0], shape[1], 2, 2) if pool else shape)
        out.sum().backward()
        assert torch.equal(bias.grad, torch.zeros_like(bias)) and y.grad.shape == shape


def test_opcheck(backend_device):
    _, device = backend_device
    y = torch.randn(2, 4, 5, 7, device=device, requires_grad=True)
    bias = torch.randn(4, device=device, requires_grad=True)
    y_cl = y.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for args in [(y, bias, "relu", True), (y_cl, bias, "gelu", False), (y_cl, None, "silu", True),
                 (y[:, :, 1:], bias, "gelu_tanh", True)]:  # fmt: skip
        torch.library.opcheck(conv_epilogue_op, args)
    grad = torch.randn(2, 4, 2, 3, device=device)
    torch.library.opcheck(conv_epilogue_backward_op, (grad, y.detach(), bias.detach(), "relu", True, True))
    torch.library.opcheck(conv_epilogue_backward_op, (grad, y_cl.detach(), None, "silu", True, False))


def test_compile_fullgraph(backend_device):
    """A conv + epilogue block traces into one graph (the op is opaque to Dynamo) and matches eager, with gradients."""
    _, device = backend_device
    x = torch.randn(2, 3, 9, 8, device=device)
    weight = torch.randn(5, 3, 3, 3, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)

    def block(x, weight, bias):
        return fastattn.conv_epilogue(F.conv2d(x, weight), bias, "gelu", pool=True).sum(dim=(2, 3))

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager_out = block(x, weight, bias)
    eager_grads = torch.autograd.grad(eager_out.sum(), (weight, bias))
    compiled_out = compiled(x, weight, bias)
    compiled_grads = torch.autograd.grad(compiled_out.sum(), (weight, bias))
    assert_close(compiled_out, eager_out.double(), atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        assert_close(got, want.double(), atol=1e-4, name="grad")


def test_cuda_backend_takes_16_and_32_bit(monkeypatch):
    """The cuda backend declares float16, bfloat16 and float32: a GPU call still goes to Triton first (the cuda
    priority), and a forced cuda backend takes them and refuses float64, saying why."""
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None)  # as on a GPU with _C built
    checks, cuda = fastattn.ops.conv_epilogue.CHECKS, torch.device("cuda")
    y = torch.randn(1, 2, 4, 4)
    assert backends.select("conv_epilogue", cuda, checks, y) == "triton"
    with fastattn.backend("cuda"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            assert backends.select("conv_epilogue_backward", cuda, checks, y.to(dtype)) == "cuda"
        with pytest.raises(backends.BackendError, match=r"cuda: dtype torch.float64 is not one of"):
            backends.select("conv_epilogue", cuda, checks, y.double())


def test_bad_input():
    y = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"bias must have shape \(C,\) = \(3,\), got \(4,\)"):
        fastattn.conv_epilogue(y, torch.randn(4))
    with pytest.raises(ValueError, match="y must be 4-D"):
        fastattn.conv_epilogue(torch.randn(3, 4, 4), torch.randn(3))
    with pytest.raises(ValueError, match="activation must be one of"):
        fastattn.conv_epilogue(y, activation="tanh")
    with pytest.raises(TypeError, match="y must be float16, bfloat16, float32 or float64, got torch.int64"):
        fastattn.conv_epilogue(torch.ones(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="bias must be torch.float32"):
        fastattn.conv_epilogue(y, torch.randn(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias must be a Tensor or None"):
        fastattn.conv_epilogue(y, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="pool=True needs H and W >= 2"):
        fastattn.conv_epilogue(torch.randn(2, 3, 1, 4), pool=True)
