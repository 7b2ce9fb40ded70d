"""EagerOp: plain eager calls skip the dispatcher with the same results; everything else goes through the op."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastattn.ops.norm import norm_op, run_norm
from fastattn.ops.softmax import run_softmax, softmax_op


def _norm_args(x, w, b):
    return (x, None, w, b, 1e-5, False, 0.0, None, None)


def test_eager_call_matches_the_op_with_gradients():
    torch.manual_seed(0)
    x = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)
    w = torch.randn(33, dtype=torch.float64, requires_grad=True)
    b = torch.randn(33, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 33, dtype=torch.float64)
    results = []
    for call in (run_norm, norm_op):
        out = call(*_norm_args(x, w, b))[0]
        results.append((out, *torch.autograd.grad(out, (x, w, b), grad)))
    eager, dispatched = results
    for ours, theirs in zip(eager, dispatched, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_eager_call_records_its_own_autograd_node():
    x = torch.randn(3, 8, requires_grad=True)
    assert type(run_softmax(x, None, 1.0, False, False).grad_fn).__name__.startswith("SoftmaxRowsFunction")
    assert run_softmax(x.detach(), None, 1.0, False, False).grad_fn is None
    with torch.no_grad():
        assert run_softmax(x, None, 1.0, False, False).grad_fn is None


def test_fake_tensors_go_through_the_op():
    with FakeTensorMode():
        x = torch.empty(4, 16)
        out = run_softmax(x, None, 1.0, False, False)
    assert out.shape == (4, 16)  # the op's fake kernel ran: the real one cannot run on fake tensors


def test_compiled_call_uses_the_op():
    seen = []

    def backend(graph_module, example_inputs):
        seen.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: run_softmax(x, None, 0.5, False, True), backend=backend, fullgraph=True)
    x = torch.randn(2, 9)
    torch.testing.assert_close(compiled(x), softmax_op(x, None, 0.5, False, True))
    assert any("fastattn.softmax" in target for target in seen), seen
