"""fastattn.dropout on every backend: kept fraction, exact scaling of the kept elements, the backward's mask, replay
under torch.manual_seed, shapes and strides, and bad arguments."""

import pytest
import torch

import fastattn
from fastattn.reference import compute_dtype

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keeps_one_minus_p_scaled_and_the_backward_uses_the_same_mask(backend_device, dtype):
    name, device = backend_device
    if dtype == torch.float64 and name == "cuda":
        pytest.skip("the cuda backend runs float16/bfloat16/float32 (float64 goes to the next backend)")
    p = 0.3
    x = (torch.rand(6, 113, 37, dtype=torch.float64) + 0.5).to(device, dtype).requires_grad_()
    with fastattn.record() as calls:
        out = fastattn.dropout(x, p)
    assert [c.backend for c in calls] == [name]
    kept = out != 0  # x > 0.5 everywhere: a zero output is a dropped element
    assert abs(kept.double().mean().item() - (1 - p)) < 0.02  # 25k draws: 5 standard deviations is 0.015
    scaled = lambda t: (t.to(compute_dtype(dtype)) * (1 / (1 - p))).to(dtype)  # noqa: E731 (as torch computes it)
    # within one rounding: x * (1 / (1 - p)) or x / (1 - p), and the Triton interpreter's bf16 stores (ENVIRONMENT.md)
    rtol = torch.finfo(dtype).eps
    torch.testing.assert_close(out[kept], scaled(x.detach())[kept], rtol=rtol, atol=0)
    grad = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(grad_x, torch.where(kept, scaled(grad), 0.0), rtol=rtol, atol=0)


def test_replays_under_manual_seed_and_differs_between_calls():
    x = torch.randn(4, 300)
    torch.manual_seed(7)
    first, second = fastattn.dropout(x, 0.5), fastattn.dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(fastattn.dropout(x, 0.5), first)
    assert not torch.equal(first, second)


@pytest.mark.parametrize(
    "shape", [(), (1,), (7,), (3, 5, 7), (2, 0, 4), (2, 3, 4096 + 3)], ids=lambda s: "x".join(map(str, s)) or "0d"
)
def test_any_shape_and_strided_input(shape):
    x = torch.rand(shape, dtype=torch.float64) + 1.0
    out = fastattn.dropout(x, 0.25)
    assert out.shape == x.shape
    assert torch.all((out == 0) | (out == x * (1 / 0.75)))
    strided = torch.rand(8, 64, dtype=torch.float64).add(1.0).t()  # last dim of stride 64
    out = fastattn.dropout(strided, 0.25)
    assert torch.all((out == 0) | (out == strided * (1 / 0.75)))


def test_identity_in_eval_or_without_p_and_zeros_at_p_one():
    x = torch.randn(3, 4)
    assert fastattn.dropout(x, 0.5, training=False) is x
    assert fastattn.dropout(x, 0.0) is x
    assert torch.equal(fastattn.dropout(x, 1.0), torch.zeros_like(x))


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="p must be a probability in"):
        fastattn.dropout(torch.randn(3), 1.5)
    with pytest.raises(ValueError, match="p must be a probability in"):
        fastattn.dropout(torch.randn(3), True)
    with pytest.raises(TypeError, match="input must be a float16"):
        fastattn.dropout(torch.arange(3), 0.1)
