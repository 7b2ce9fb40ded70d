"""fastattn::softmax as a torch.library op (opcheck, torch.compile) and its errors on bad input."""

import pytest
import torch

import fastattn


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_opcheck(backend_device, log):
    _, device = backend_device
    x = torch.randn(2, 3, 5, 17, device=device, requires_grad=True)
    bias = torch.randn(5, 17, device=device, requires_grad=True)
    keep = torch.rand(3, 1, 17, device=device) > 0.2
    for mask in (None, bias, keep):
        torch.library.opcheck(torch.ops.fastattn.softmax.default, (x, mask, 0.5, True, log))
    out = torch.ops.fastattn.softmax(x, None, 0.5, False, log).detach()
    torch.library.opcheck(torch.ops.fastattn.softmax_backward.default, (torch.randn_like(out), out, 0.5, log))


def test_compile_fullgraph_aot(backend_device):
    """No graph break: the op traces with its fake kernel and autograd (aot_eager skips codegen)."""
    _, device = backend_device
    x = torch.randn(4, 9, 33, device=device, requires_grad=True)
    keep = torch.rand(9, 33, device=device) > 0.3

    def f(t):
        return fastattn.log_softmax(t * 2, mask=keep, scale=0.5, causal=True).nan_to_num(neginf=0.0).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    (g1,) = torch.autograd.grad(compiled(x).sum(), x)
    (g2,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(g1, g2)


def test_compile_fullgraph_inductor():
    """The real compiler (Inductor) on CPU, forward and backward, with the default backend choice."""
    torch._dynamo.reset()
    x = torch.randn(8, 64, requires_grad=True)
    bias = torch.randn(64)
    f = lambda t: fastattn.softmax(t, mask=bias, scale=0.25) * 3  # noqa: E731
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
    (g1,) = torch.autograd.grad(compiled(x).square().sum(), x)
    (g2,) = torch.autograd.grad(f(x).square().sum(), x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda: fastattn.softmax(torch.arange(6).view(2, 3)), TypeError, "x must be float16"),
        (lambda: fastattn.softmax([1.0, 2.0]), TypeError, "x must be a Tensor"),
        (lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(2, 3, dtype=torch.int32)), TypeError, "mask must be bool"),
        (lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(4, 3)), ValueError, "mask of shape (4, 3) does not broadcast"),
        (lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(1, 2, 3)), ValueError, "does not broadcast"),
        (lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(3, device="meta")), ValueError, "mask is on meta"),
        (lambda: fastattn.softmax(torch.randn(2, 3), dim=2), IndexError, "dim 2 is out of range"),
        (lambda: fastattn.softmax(torch.randn(2, 3), dim=1.0), TypeError, "dim must be an int"),
        (lambda: fastattn.softmax(torch.randn(3), causal=True), ValueError, "causal=True needs x with at least 2 dims"),
        (lambda: fastattn.softmax(torch.randn(3, 3), dim=0, causal=True), ValueError, "causal=True needs dim=-1"),
        (lambda: fastattn.log_softmax(torch.randn(2, 3, dtype=torch.complex64)), TypeError, "fastattn.log_softmax: x"),
    ],
    ids=["int-x", "list-x", "int-mask", "mask-shape", "mask-more-dims", "mask-device", "dim-range", "dim-type",
         "causal-1d", "causal-dim", "complex"],
)
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_forced_backend_that_cannot_run_raises():
    with fastattn.backend("cuda"), pytest.raises(fastattn.BackendError, match="forced backend"):
        fastattn.softmax(torch.randn(2, 3))
