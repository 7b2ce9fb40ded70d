"""fastattn.linear: large float32 CPU products on the packed AVX-512 GEMM, against float64 (the error-ratio rule),
forward and backward; every other call is F.linear's, bit for bit."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import backends
from fastattn.ops.linear import MIN_IN_FEATURES, MIN_OUT_FEATURES, MIN_ROWS, linear, module_linear
from fastattn.testing import GRADIENT_RATIO, assert_error_ratio


@pytest.fixture
def kernel(monkeypatch):
    """The packed GEMM takes large products (FASTATTN_CPU_STEP_GEMM=1; skipped where the CPU lacks AVX-512F)."""
    monkeypatch.setenv("FASTATTN_CPU_STEP_GEMM", "1")
    if not backends.extension()[0].build_info()["cpu_step_gemm"]:
        pytest.skip("this CPU has no AVX-512F: the packed GEMM cannot run here")


def _backends(fn, *args):
    """fn(*args) and the backends of the linear calls fastattn.record() saw (the kernel's only)."""
    with fastattn.record() as calls:
        out = fn(*args)
    return out, [c.backend for c in calls if c.op == "linear"]


def _inputs(rows, k, n, seed, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    weight = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g) if with_bias else None
    return x, weight, bias


def _check(x, weight, bias):
    """The kernel runs; output and gradients of x, weight and bias within the error-ratio rule against float64."""
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    truth_leaves = [t.detach().double().requires_grad_() for t in leaves]
    base_leaves = [t.detach().clone().requires_grad_() for t in leaves]

    def call(fn, tensors):
        return fn(tensors[0], tensors[1], tensors[2] if bias is not None else None)

    out, ran = _backends(call, linear, leaves)
    assert ran == ["cpu"]
    truth, base = call(F.linear, truth_leaves), call(F.linear, base_leaves)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert_error_ratio(out, truth, base)
    grad = torch.randn_like(base)
    for mine, true, theirs in zip(torch.autograd.grad(out, leaves, grad),
                                  torch.autograd.grad(truth, truth_leaves, grad.double()),
                                  torch.autograd.grad(base, base_leaves, grad), strict=True):  # fmt: skip
        assert_error_ratio(mine, true, theirs, ratio=GRADIENT_RATIO, name="gradient")


# Rows at the threshold, with a tail past the 128-row blocks; K and N with tails past 16 lanes and 32-column panels.
@pytest.mark.parametrize("rows, k, n", [(MIN_ROWS, MIN_IN_FEATURES, MIN_OUT_FEATURES), (600, 40, 72),
                                        (1023, 257, 130), (700, 1024, 33)])  # fmt: skip
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64(kernel, rows, k, n, with_bias):
    _check(*_inputs(rows, k, n, rows + k + n, with_bias))


def test_strided_and_batched_inputs(kernel):
    """x (seq, batch, K) transposed from batch-first, a weight that is a block of rows of a packed in_proj (row
    stride past K), a transposed weight and a strided bias."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 160, 72, generator=g).transpose(0, 1)  # (160, 4, K), not contiguous
    in_proj = torch.randn(3 * 40, 100, generator=g)[:, 10:82]  # (3N, K), row stride 100
    bias = torch.randn(2 * 3 * 40, generator=g)[::2]
    _check(x, in_proj[40:80], bias[40:80])
    _check(x, torch.randn(72, 48, generator=g).t(), None)


def test_other_calls_run_f_linear(kernel):
    """Too few rows, outputs or inputs, float64, inputs already under a functorch transform: F.linear itself,
    bit for bit, and no kernel call recorded."""
    x, weight, bias = _inputs(MIN_ROWS, 64, 64, 2)
    cases = [
        (x[:-1], weight, bias),
        (x, weight[: MIN_OUT_FEATURES - 1], bias[: MIN_OUT_FEATURES - 1]),
        (x[:, : MIN_IN_FEATURES - 1], weight[:, : MIN_IN_FEATURES - 1], bias),
        (x.double(), weight.double(), bias.double()),
        (x, weight.double(), bias),  # mixed dtypes: F.linear's error below
    ]
    for args in cases[:-1]:
        out, ran = _backends(linear, *args)
        assert ran == [] and torch.equal(out, F.linear(*args))
    with pytest.raises(RuntimeError):
        linear(*cases[-1])
    grad, ran = _backends(torch.func.grad(lambda w: linear(x, w, bias).sum()), weight)
    assert ran == [] and torch.equal(grad, torch.func.grad(lambda w: F.linear(x, w, bias).sum())(weight))


def test_switched_off_or_default(monkeypatch):
    """FASTATTN_CPU_STEP_GEMM=0 sends every call to F.linear; by default the kernel runs where build_info says the
    packed GEMM takes large products (AVX-512F, not an Intel CPU)."""
    x, weight, bias = _inputs(MIN_ROWS, 64, 64, 3)
    monkeypatch.setenv("FASTATTN_CPU_STEP_GEMM", "0")
    assert _backends(linear, x, weight, bias)[1] == []
    monkeypatch.delenv("FASTATTN_CPU_STEP_GEMM")
    info = backends.extension()[0].build_info()
    expected = ["cpu"] if info["cpu_step_gemm"] and info["cpu_step_gemm_large"] else []
    assert _backends(linear, x, weight, bias)[1] == expected


def test_shape_errors_are_f_linear_s(kernel):
    x, weight, _ = _inputs(MIN_ROWS, 64, 64, 4)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        linear(x, weight[:, :-1])
    with pytest.raises(RuntimeError):
        linear(x, weight, torch.randn(63))


def test_gradients_of_gradients(kernel):
    """Under create_graph the backward stays differentiable: second derivatives equal F.linear's."""
    x, weight, bias = (t.requires_grad_() for t in _inputs(MIN_ROWS, 64, 64, 5))

    def second(fn):
        (gx,) = torch.autograd.grad(fn(x, weight, bias).pow(2).sum(), [x], create_graph=True)
        return torch.autograd.grad(gx.sum(), [weight, bias])

    for mine, theirs in zip(second(linear), second(F.linear), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph(kernel):
    """Compiled graphs run F.linear (Inductor lowers it) without a graph break."""
    x, weight, bias = _inputs(MIN_ROWS, 64, 64, 6)
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, weight, bias), F.linear(x, weight, bias))


def test_module_linear_keeps_hooks_and_overrides(kernel):
    """A plain nn.Linear runs linear(); one with a forward hook, or a subclass with its own forward, runs its own
    forward."""
    x = torch.randn(MIN_ROWS, 64)
    plain = torch.nn.Linear(64, 48)
    assert _backends(module_linear, plain, x)[1] == ["cpu"]
    seen = []
    plain.register_forward_hook(lambda *_: seen.append(True))
    out, ran = _backends(module_linear, plain, x)
    assert ran == [] and seen == [True] and torch.equal(out, F.linear(x, plain.weight, plain.bias))

    class Doubled(torch.nn.Linear):
        def forward(self, t):
            return 2 * super().forward(t)

    doubled = Doubled(64, 48)
    out, ran = _backends(module_linear, doubled, x)
    assert ran == [] and torch.equal(out, 2 * F.linear(x, doubled.weight, doubled.bias))
