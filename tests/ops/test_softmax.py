"""fastattn.softmax / log_softmax on every backend against a float64 reference (the error-ratio rule)."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

import fastattn
from fastattn import reference
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (rows..., N): N = 1, 7, 113, 1000, 4097 as the issue asks, and one row longer than a fused block.
SHAPES = [(3, 1), (2, 3, 7), (5, 113), (2, 1000), (2, 4097), (1, 16411)]
MASKS = ["none", "bool", "float", "float32-full"]


def _skip_unsupported(name, device, dtype):
    if dtype == torch.float64 and name == "cuda":
        pytest.skip("the cuda backend runs float16/bfloat16/float32 (float64 goes to the next backend)")


def make_mask(kind, shape, dtype, device, requires_grad=False):
    """A mask broadcast over the leading dims: (N,) per column, (rows, N) per row, or full size."""
    g = torch.Generator().manual_seed(1)
    rows_n = shape[-2:] if len(shape) >= 2 else shape
    if kind == "none":
        return None
    if kind == "bool":
        return (torch.rand(rows_n, generator=g) > 0.3).to(device)
    if kind == "float":
        mask = torch.randn(shape[-1], generator=g).to(device=device, dtype=dtype)
    else:
        mask = torch.randn(shape, generator=g).to(device=device, dtype=torch.float32)
    return mask.requires_grad_(requires_grad)


def run(x, log, **kwargs):
    return (fastattn.log_softmax if log else fastattn.softmax)(x, **kwargs)


def truth_and_baseline(x, log, mask, scale, causal):
    """The float64 truth, and plain PyTorch in x's dtype (whose error sets our allowance)."""
    truth = reference.softmax(x.double(), mask if mask is None or mask.dtype == torch.bool else mask.double(),
                              scale, causal, log)
    baseline = reference.softmax(x, mask, scale, causal, log, upcast=False)
    return truth, baseline


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_forward(backend_device, shape, dtype, log):
    name, device = backend_device
    _skip_unsupported(name, device, dtype)
    x = torch.randn(shape, device=device).mul(3).to(dtype)
    with fastattn.record() as calls:
        out = run(x, log, scale=0.7)
    assert [c.backend for c in calls] == [name]
    assert out.dtype == dtype and out.shape == x.shape
    assert_error_ratio(out, *truth_and_baseline(x, log, None, 0.7, False))


# Row lengths on both sides of every power of two up to past the CUDA kernels' register limit (16384 16-bit
# elements), where their kernel choice changes; offsets that start rows off a 16-byte boundary.
SWEEP_N = sorted({1, 3, 5} | {2**k + d for k in range(1, 15) for d in (-1, 0, 1)} | {32769})


@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_row_length_sweep(backend_device, dtype, offset):
    """Forward and backward of rows sliced out of a wider tensor, at every row length of SWEEP_N."""
    name, device = backend_device
    if name == "triton" and device.type == "cpu":
        pytest.skip("compiled kernels only: the Triton interpreter would take minutes (it runs the SHAPES grid)")
    for n in SWEEP_N:
        for log in (False, True):
            torch.manual_seed(n)
            base = torch.randn(3, n + 5, device=device).mul(2).to(dtype)
            x = base[:, offset : offset + n].requires_grad_()  # rows start `offset` elements into base's rows
            grad = torch.randn(3, n, device=device).to(dtype)
            out = run(x, log, scale=0.9)
            assert_error_ratio(out, *truth_and_baseline(x.detach(), log, None, 0.9, False), name=f"n={n} output")
            (ours,) = torch.autograd.grad(out, x, grad)
            x64 = x.detach().double().requires_grad_()
            (truth,) = torch.autograd.grad(reference.softmax(x64, None, 0.9, False, log), x64, grad.double())
            x_low = x.detach().requires_grad_()
            (baseline,) = torch.autograd.grad(reference.softmax(x_low, None, 0.9, False, log, upcast=False), x_low, grad)
            assert_error_ratio(ours, truth, baseline, ratio=GRADIENT_RATIO, name=f"n={n} grad x")


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 2, 5, 113), (1, 1, 3, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_forward_masked(backend_device, shape, dtype, log, causal, mask_kind):
    name, device = backend_device
    _skip_unsupported(name, device, dtype)
    x = torch.randn(shape, device=device).to(dtype)
    mask = make_mask(mask_kind, shape, dtype, device)
    out = run(x, log, mask=mask, scale=1 / math.sqrt(8), causal=causal)
    assert_error_ratio(out, *truth_and_baseline(x, log, mask, 1 / math.sqrt(8), causal))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "shape,mask_kind,causal",
    [((3, 1), "none", False), ((2, 3, 7), "bool", True), ((5, 113), "float", False), ((2, 1000), "none", True),
     ((1, 2, 4097), "float32-full", False), ((1, 16411), "bool", False)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_backward(backend_device, shape, dtype, log, mask_kind, causal):
    name, device = backend_device
    _skip_unsupported(name, device, dtype)
    x = torch.randn(shape, device=device).to(dtype)
    mask = make_mask(mask_kind, shape, dtype, device)
    grad = torch.randn(shape, device=device).to(dtype)

    def grad_of(fn, x_in):
        x_in = x_in.detach().requires_grad_()
        fn(x_in).backward(grad.to(x_in.dtype))
        return x_in.grad

    truth_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    truth = grad_of(lambda t: reference.softmax(t, truth_mask, 0.5, causal, log), x.double())
    baseline = grad_of(lambda t: reference.softmax(t, mask, 0.5, causal, log, upcast=False), x)
    ours = grad_of(lambda t: run(t, log, mask=mask, scale=0.5, causal=causal), x)
    assert ours.dtype == dtype
    assert_error_ratio(ours, truth, baseline, ratio=GRADIENT_RATIO, name="grad x")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_mask_gradient(backend_device, log):
    """A float mask that requires grad (a learned bias, broadcast over rows) gets d out / d mask."""
    name, device = backend_device
    if name == "cuda":
        pytest.skip("the cuda backend has no float64 kernels")
    x = torch.randn(4, 3, 5, 33, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 1, 33, device=device, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 3, 5, 33, device=device, dtype=torch.float64)
    run(x, log, mask=bias, scale=0.3).backward(grad)
    ours = (x.grad, bias.grad)
    x.grad = bias.grad = None
    reference.softmax(x, bias, 0.3, False, log).backward(grad)
    assert_close(ours[0], x.grad, atol=1e-12, name="grad x")
    assert_close(ours[1], bias.grad, atol=1e-12, name="grad mask")


def test_gradcheck(backend_device):
    name, device = backend_device
    if name == "cuda":
        pytest.skip("the cuda backend has no float64 kernels to gradcheck")
    x = torch.randn(3, 5, 9, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, 9, device=device, dtype=torch.float64, requires_grad=True)
    keep = make_mask("bool", (5, 9), torch.float64, device)
    for log in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: run(a, log, mask=b, scale=0.8), (x, bias))
        # masked log-softmax entries are -inf: finite differences need them finite
        assert torch.autograd.gradcheck(lambda a: run(a, log, mask=keep, causal=True).nan_to_num(neginf=0.0), (x,))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: x.transpose(0, 1), id="transposed-leading"),
        pytest.param(lambda x: x[:, ::2], id="sliced-rows"),
        pytest.param(lambda x: x[..., 3:50], id="sliced-columns"),
        pytest.param(lambda x: x.transpose(-1, -2), id="transposed-last"),
        pytest.param(lambda x: x.permute(2, 0, 1, 3)[1:], id="permuted"),
        pytest.param(lambda x: x[:1, :1, :1].expand(2, 3, 5, 64), id="expanded"),
    ],
)
def test_non_contiguous(backend_device, make):
    name, device = backend_device
    base = torch.randn(4, 6, 64, 64, device=device)
    x = make(base)
    mask = make_mask("bool", tuple(x.shape), torch.float32, device)
    for log in (False, True):
        out = run(x, log, mask=mask, causal=True)
        assert_close(out, reference.softmax(x.double(), mask, 1.0, True, log), atol=2e-6)


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_other_dims(backend_device, dim):
    _, device = backend_device
    x = torch.randn(5, 7, 9, device=device)
    mask = torch.randn(7, 1, device=device)
    for log in (False, True):
        out = run(x, log, dim=dim, mask=mask)
        expected = (torch.log_softmax if log else torch.softmax)((x + mask).double(), dim)
        assert_close(out, expected, atol=2e-6)


def test_fully_masked_rows(backend_device):
    """A row with nothing to attend to gives softmax 0 / log-softmax -inf and zero gradient, never NaN."""
    _, device = backend_device
    x = torch.randn(2, 4, 40, device=device, requires_grad=True)
    keep = torch.rand(4, 40, device=device) > 0.5
    keep[1] = False
    bias = torch.zeros(4, 40, device=device)
    bias[2] = float("-inf")
    for mask in (keep, bias):
        for log in (False, True):
            out = run(x, log, mask=mask)
            dead = out[:, 1] if mask is keep else out[:, 2]
            assert torch.all(dead == (float("-inf") if log else 0.0))
            out.masked_fill(torch.isinf(out), 0).sum().backward()
            assert not torch.isnan(out).any() and not torch.isnan(x.grad).any()
            assert torch.all(x.grad[:, 1 if mask is keep else 2] == 0)
            x.grad = None


@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_propagate_like_torch(backend_device, special):
    _, device = backend_device
    x = torch.randn(3, 50, device=device)
    x[1, 7] = special
    for log in (False, True):
        out = run(x, log)
        expected = (torch.log_softmax if log else torch.softmax)(x, -1)
        assert torch.equal(torch.isnan(out), torch.isnan(expected))
        assert_close(out, expected.double(), atol=2e-6)


def test_empty_and_scalar(backend_device):
    _, device = backend_device
    assert run(torch.randn(0, 5, device=device), False).shape == (0, 5)
    assert run(torch.randn(4, 0, device=device), True).shape == (4, 0)
    assert run(torch.tensor(2.5, device=device), False).item() == 1.0


def test_deterministic(backend_device):
    _, device = backend_device
    x = torch.randn(8, 333, device=device)
    assert torch.equal(fastattn.softmax(x), fastattn.softmax(x))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    leading=st.lists(st.integers(1, 4), min_size=0, max_size=4),
    n=st.integers(1, 300),
    mask_dims=st.integers(0, 3),
    causal=st.booleans(),
    log=st.booleans(),
    permute=st.booleans(),
    data=st.data(),
)
def test_fuzz_shapes_strides_masks(backend_device, leading, n, mask_dims, causal, log, permute, data):
    """Random ranks, sizes, dim orders and broadcast masks against the float64 reference."""
    _, device = backend_device
    shape = tuple(leading) + (n,)
    causal = causal and len(shape) >= 2
    x = torch.randn(shape, device=device)
    if permute and len(leading) >= 2:
        order = data.draw(st.permutations(range(len(leading))))
        x = x.permute(*order, len(leading)).contiguous().permute(*[order.index(i) for i in range(len(leading))], -1)
    mask_shape = tuple(s if data.draw(st.booleans()) else 1 for s in shape[len(shape) - min(mask_dims, len(shape)):])
    mask = torch.rand(mask_shape, device=device) > 0.2 if mask_dims else None
    out = run(x, log, mask=mask, scale=0.9, causal=causal)
    assert_close(out, reference.softmax(x.double(), mask, 0.9, causal, log), atol=3e-6)
