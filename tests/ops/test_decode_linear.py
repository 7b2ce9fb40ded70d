"""fastattn.decode_linear (the linears of a decoding step) against a float64 reference (the error-ratio rule),
on the CPU kernel and on its F.linear fallback."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import decode_linear
from fastattn.ops.decode_linear import MAX_ROWS
from fastattn.testing import assert_error_ratio


def _run(x, weight, bias):
    """decode_linear's output and the backend it ran on."""
    with fastattn.record() as calls:
        out = decode_linear(x, weight, bias)
    assert [c.op for c in calls] == ["decode_linear"]
    return out, calls[0]


def _check(x, weight, bias):
    out, call = _run(x, weight, bias)
    assert call.backend == "cpu", call.skipped
    assert out.shape == (*x.shape[:-1], weight.shape[0]) and out.dtype == torch.float32 and out.is_contiguous()
    truth = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert_error_ratio(out, truth, F.linear(x, weight, bias))


# Rows 1-4 are one register tile; 5, 7 and 16 are tiles plus a remainder. K: shorter than a vector, with and
# without a tail past the vectors. N: fewer columns than a tile, a remainder past the tiles, more than a chunk.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, MAX_ROWS])
@pytest.mark.parametrize("k, n", [(1, 3), (7, 5), (40, 33), (72, 113), (256, 300), (1023, 64)])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64(rows, k, n, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g)
    weight = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g) if with_bias else None
    _check(x, weight, bias)


def test_large_product_splits_over_threads(set_threads):
    """Enough columns for several tasks: every column is written once, whatever the thread split."""
    set_threads(2)
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 256, generator=g), torch.randn(4099, 256, generator=g), torch.randn(4099)
    _check(x, weight, bias)


def test_strided_inputs():
    """Leading dims, x rows and weight rows with strides past K (slices of wider tensors), a noncontiguous bias,
    and a weight that is a block of rows of a larger one (as the query rows of a packed in_proj_weight)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 2 * 72, generator=g)[..., :72]  # (batch, 1, K), row stride 2K
    packed = torch.randn(3 * 40, 100, generator=g)[:, 10:82]  # (3N, K) rows of stride 100
    bias = torch.randn(2 * 3 * 40, generator=g)[::2]
    _check(x, packed[40:80], bias[40:80])
    _check(x.transpose(0, 1), packed, bias)  # (1, batch, K): rows 2K apart


def test_no_rows():
    out, call = _run(torch.randn(0, 8), torch.randn(5, 8), torch.randn(5))
    assert call.backend == "cpu" and out.shape == (0, 5)


@pytest.mark.parametrize(
    "case, why",
    [
        ("float64", "float32"),
        ("grad", "backward"),
        ("rows", f"1 to {MAX_ROWS} rows"),
        ("weight_t", "unit stride"),
    ],
)
def test_fallback_runs_f_linear_and_says_why(case, why):
    """Inputs the kernel does not take run F.linear (gradients included), recorded with the reason."""
    g = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(3, 24, generator=g), torch.randn(10, 24, generator=g), torch.randn(10, generator=g)
    if case == "float64":
        x, weight, bias = x.double(), weight.double(), bias.double()
    elif case == "grad":
        weight.requires_grad_()
    elif case == "rows":
        x = torch.randn(MAX_ROWS + 1, 24, generator=g)
    else:
        weight = torch.randn(24, 10, generator=g).t()
    out, call = _run(x, weight, bias)
    assert call.backend == "torch" and why in call.skipped["fastattn"]
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=0, atol=0)
    if case == "grad":
        (grad,) = torch.autograd.grad(out.sum(), weight)
        torch.testing.assert_close(grad, x.sum(0).expand(10, 24), rtol=1e-6, atol=1e-5)


def test_mismatched_shapes_raise_as_f_linear():
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        decode_linear(torch.randn(2, 8), torch.randn(5, 9))
    with pytest.raises(RuntimeError):
        decode_linear(torch.randn(2, 8), torch.randn(5, 8), torch.randn(4))
