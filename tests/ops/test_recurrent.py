"""fastattn.ops.recurrent (the fused recurrent layer op) on every backend that has a kernel, against the float64
references of fastattn.reference: values and gradients for each kind, lengths (packed sequences), both directions,
the LSTM projection, odd sizes, low precision by the error-ratio rule, opcheck and torch.compile."""

import itertools
import os
import signal
import threading
import time
import types

import pytest
import torch

from fastattn import backends, reference
from fastattn.ops import recurrent as ops
from fastattn.testing import GRADIENT_RATIO, OUTPUT_RATIO, assert_close, assert_error_ratio

KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu", "layernorm_lstm"]
CELLS = ("lstm", "layernorm_lstm")  # the kinds with a cell state c
NO_NORMS = (None, None, None, None, 1e-5)  # the op's LayerNorm-LSTM arguments, for the other kinds


def make_problem(kind, seq, batch, inp, hidden, proj=0, bias=True, dtype=torch.float64, seed=0, device="cpu"):
    """(x (seq, batch, inp), h0, c0 or None, weights dict), all leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    gates = reference.RECURRENT_GATES[kind]
    p = proj or hidden

    def rand(*shape, scale=0.5):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    weights = {"weight_ih": rand(gates * hidden, inp), "weight_hh": rand(gates * hidden, p)}
    if bias:
        weights.update(bias_ih=rand(gates * hidden), bias_hh=rand(gates * hidden))
    if proj:
        weights["weight_hr"] = rand(proj, hidden)
    if kind == "layernorm_lstm":  # affine pairs away from (1, 0), so that a mix-up shows
        for norm, size in (("ih", gates * hidden), ("hh", gates * hidden), ("c", hidden)):
            weights.update({f"norm_{norm}_weight": 1 + rand(size), f"norm_{norm}_bias": rand(size)})
    c0 = rand(batch, hidden) if kind in CELLS else None
    return rand(seq, batch, inp, scale=1.0), rand(batch, p), c0, weights


def assert_near(ours, truth, rel, name="output"):
    """|ours - truth| <= rel at the values' magnitude (at least 1): the ReLU RNN grows large over 13 steps."""
    assert_close(ours, truth, atol=rel * max(1.0, truth.abs().max().item()), name=name)


def leaves(x, h0, c0, weights):
    return [t for t in (x, h0, c0, *weights.values()) if t is not None]


def run(fn, kind, problem, lengths, reverse):
    """fn's (out, h_n, c_n) and the gradients of every leaf of one loss drawing on all three."""
    x, h0, c0, weights = problem
    out, h_n, c_n = fn(kind, x, h0, c0, weights, lengths, reverse)
    g = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum() + (h_n * 1.5).sum()
    if c_n is not None:
        loss = loss + (c_n * 0.5).sum()
    grads = torch.autograd.grad(loss, leaves(*problem))
    return (out, h_n, c_n), grads


def as_float64(problem):
    x, h0, c0, weights = problem

    def up(t):
        return None if t is None else t.detach().double().requires_grad_()

    return up(x), up(h0), up(c0), {k: up(v) for k, v in weights.items()}


CASES = [  # (seq, batch, input, hidden, proj)
    (1, 1, 3, 5, 0),
    (7, 3, 5, 7, 0),
    (13, 2, 4, 40, 0),
    (5, 4, 6, 9, 4),
]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("kind", KINDS)
def test_float64_matches_reference(backend_device, kind, case, with_lengths, reverse):
    seq, batch, inp, hidden, proj = case
    if proj and kind not in CELLS:
        pytest.skip("the projection (proj_size) is the LSTMs'")
    problem = make_problem(kind, seq, batch, inp, hidden, proj, device=backend_device[1])
    lengths = torch.arange(batch) % seq + 1 if with_lengths else None  # 1, 2, ... (some rows end early)
    values, grads = run(ops.recurrent_layer, kind, problem, lengths, reverse)
    with backends.backend("reference"):
        ref_values, ref_grads = run(reference.recurrent_layer, kind, problem, lengths, reverse)
    for name, ours, truth in zip(("out", "h_n", "c_n"), values, ref_values, strict=True):
        if truth is not None:
            assert_near(ours, truth, 1e-12, name)
    for i, (ours, truth) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_near(ours, truth, 1e-11, f"grad {i}")


@pytest.mark.parametrize("kind", KINDS)
def test_bias_free_and_non_contiguous(backend_device, kind):
    x, h0, c0, weights = make_problem(kind, 6, 3, 5, 8, bias=False, device=backend_device[1])
    x_strided = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (seq, batch) strides swapped
    problem = (x_strided, h0, c0, weights)
    values, grads = run(ops.recurrent_layer, kind, problem, None, False)
    ref_values, ref_grads = run(reference.recurrent_layer, kind, problem, None, False)
    for ours, truth in zip(values + grads, ref_values + ref_grads, strict=True):
        if truth is not None:
            assert_near(ours, truth, 1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_error_ratio(backend_device, kind, dtype):
    """Ours in dtype against float64, allowed twice (gradients three times) the error of torch's own ops in
    dtype (the reference run in that dtype), the largest errors over three problems. On one small problem the
    largest error is one element's luck where a norm or a long sum amplifies rounding: ours and torch's differed by
    0.6x to 6x from problem to problem there, their mean errors by under 2x."""
    lengths = torch.tensor([9, 4, 1, 7, 2, 9, 5, 3])
    ours, base, truth = [], [], []  # per problem: (values, gradients)
    for seed in range(3):
        problem = make_problem(kind, 9, 8, 6, 40, dtype=dtype, device=backend_device[1], seed=seed)
        ours.append(run(ops.recurrent_layer, kind, problem, lengths, False))
        base.append(run(reference.recurrent_layer, kind, problem, lengths, False))
        truth.append(run(reference.recurrent_layer, kind, as_float64(problem), lengths, False))
    for part, ratio, name in ((0, OUTPUT_RATIO, "output"), (1, GRADIENT_RATIO, "gradient")):
        for i, expected in enumerate(truth[0][part]):
            if expected is None:
                continue
            joined = [torch.cat([r[part][i].flatten() for r in results]) for results in (ours, truth, base)]
            assert joined[0].dtype == dtype
            assert_error_ratio(*joined, ratio=ratio, name=name)


@pytest.mark.parametrize("persistent", [False, True], ids=["per-step", "persistent"])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_blocks_and_programs(kind, persistent, monkeypatch):
    """The Triton kernels where their tiles do not fit the problem. Per step (the plain kinds' persistent kernels
    off): blocks of 8 hidden units, so H = 21 spans three, the last partial (the plain kinds' grid of blocks, the
    LayerNorm-LSTM's loops over its rows of 4H and H). Persistent (plain kinds; the LayerNorm-LSTM runs per step
    regardless): 19 rows, two programs of 16 rows, the second partial, and H = 21 in tiles of 32."""
    from fastattn.triton_kernels import recurrent as kernels  # noqa: PLC0415

    monkeypatch.setattr(kernels, "MAX_BLOCK", 8)
    monkeypatch.setattr(kernels, "PERSISTENT_MAX_HIDDEN", 128 if persistent else 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors run through the Triton interpreter
    batch = 19 if persistent else 3
    problem = make_problem(kind, 4, batch, 5, 21, device=device)
    lengths = torch.arange(batch) % 4 + 1
    with backends.backend("triton"):
        values, grads = run(ops.recurrent_layer, kind, problem, lengths, True)
    ref_values, ref_grads = run(reference.recurrent_layer, kind, problem, lengths, True)
    for ours, truth in zip(values + grads, ref_values + ref_grads, strict=True):
        if truth is not None:
            assert_near(ours, truth, 1e-11)


def test_on_a_gpu_triton_takes_only_the_persistent_layers():
    """On CUDA tensors the default choice leaves the per-step loop to the CUDA C++ backend (a C++ launch per step,
    not a Python one); forced, Triton takes every layer. (The check only reads x's dtype and device.)"""
    gpu_x = types.SimpleNamespace(dtype=torch.float32, device=torch.device("cuda"))
    check = ops.CHECKS["triton"]
    assert check(gpu_x, "lstm", False, 64) is None and check(gpu_x, "rnn_relu", False, 1) is None
    for kind, projected, hidden in (("lstm", False, 65), ("lstm", True, 32), ("layernorm_lstm", False, 32)):
        assert "persistent" in check(gpu_x, kind, projected, hidden)
    with backends.backend("triton"):
        assert check(gpu_x, "layernorm_lstm", True, 512) is None
    assert check(types.SimpleNamespace(dtype=torch.int32, device=torch.device("cuda")), "gru", False, 8) is not None


def assert_float32_error_ratios(kind, problem, lengths, values, grads):
    """Our values and gradients of a float32 `problem` by the error-ratio rule against the float64 reference."""
    baseline_values, baseline_grads = run(reference.recurrent_layer, kind, problem, lengths, False)
    truth_values, truth_grads = run(reference.recurrent_layer, kind, as_float64(problem), lengths, False)
    for ours, base, truth in zip(values, baseline_values, truth_values, strict=True):
        if truth is not None:
            assert_error_ratio(ours, truth, base)
    for ours, base, truth in zip(grads, baseline_grads, truth_grads, strict=True):
        assert_error_ratio(ours, truth, base, ratio=GRADIENT_RATIO, name="gradient")


def use_step_gemm(path, monkeypatch):
    """Sends the CPU's float32 step matmuls and projections to `path`: "packed", the AVX-512 step GEMM, large products
    included (FASTATTN_CPU_STEP_GEMM=1; skipped where the CPU lacks AVX-512F), or "fallback" (=0): oneDNN's
    prepacked linear from 2^22 multiply-adds a step, ATen's mm below."""
    monkeypatch.setenv("FASTATTN_CPU_STEP_GEMM", "1" if path == "packed" else "0")
    if path == "packed" and not backends.extension()[0].build_info()["cpu_step_gemm"]:
        pytest.skip("this CPU has no AVX-512F: the packed step GEMM cannot run here")


def step_gemm_event(path, macs):
    """The profiler event that shows a step matmul of `macs` multiply-adds ran on `path`."""
    if path == "packed":
        return "fastattn_C::pack_step_weight"
    return "mkldnn::_linear_pointwise" if macs >= 1 << 22 and torch.backends.mkldnn.is_available() else "aten::mm"


@pytest.mark.parametrize("path", ["packed", "fallback"])
@pytest.mark.parametrize("batch, hidden, proj", [(3, 24, 0), (5, 18, 7), (16, 256, 0)], ids=["small", "proj", "large"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "layernorm_lstm"])
def test_float32_step_matmuls(kind, batch, hidden, proj, path, monkeypatch):
    """Float32 steps multiply on the packed AVX-512 kernel (every size: row and column tails here) or on the fallback
    (oneDNN for large steps, ATen's mm for small ones): the error-ratio rule against float64 holds on both, forward
    and backward (where the packed kernel also runs the transposed weights), with lengths."""
    if proj and kind not in CELLS:
        pytest.skip("the projection is the LSTMs'")
    use_step_gemm(path, monkeypatch)
    problem = make_problem(kind, 4, batch, 8, hidden, proj=proj, dtype=torch.float32)
    lengths = torch.arange(batch) % 4 + 1
    with torch.profiler.profile() as prof:
        values, grads = run(ops.recurrent_layer, kind, problem, lengths, False)
    macs = batch * reference.RECURRENT_GATES[kind] * hidden * (proj or hidden)
    assert step_gemm_event(path, macs) in {event.name for event in prof.events()}
    assert_float32_error_ratios(kind, problem, lengths, values, grads)


@pytest.mark.parametrize("setting", ["default", "1"])
def test_large_products(setting, monkeypatch):
    """Large float32 products, a step of 2^25 multiply-adds or more (LSTM batch 32, hidden 512) and projections of
    2^28 in all, run on the packed kernel with FASTATTN_CPU_STEP_GEMM=1 and by default except on Intel CPUs, where
    oneDNN takes them (build_info's cpu_step_gemm_large says which); the error-ratio rule against float64 holds on
    either path, forward and backward, and for a projection alone (recurrent_matmul)."""
    use_step_gemm("packed", monkeypatch)
    if setting == "default":
        monkeypatch.delenv("FASTATTN_CPU_STEP_GEMM")
    packed = backends.extension()[0].build_info()["cpu_step_gemm_large"] or not torch.backends.mkldnn.is_available()
    assert packed or setting == "default"
    problem = make_problem("lstm", 2, 32, 8, 512, dtype=torch.float32)
    with torch.profiler.profile() as prof:
        values, grads = run(ops.recurrent_layer, "lstm", problem, None, False)
    assert ("mkldnn::_linear_pointwise" in {event.name for event in prof.events()}) == (not packed)
    assert_float32_error_ratios("lstm", problem, None, values, grads)

    x, w = torch.randn(4096, 256), torch.randn(256, 256)  # 2^28 multiply-adds
    with torch.profiler.profile() as prof:
        out = ops._cpu_ops().recurrent_matmul(x, w, None)
    assert ("fastattn_C::pack_step_weight" in {event.name for event in prof.events()}) == packed
    assert_error_ratio(out, x.double() @ w.double(), x @ w)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", KINDS)
def test_row_groups_match_the_step_loop(kind, reverse, train, set_threads, monkeypatch):
    """With the packed kernel each thread may run every step on its own rows (row groups, here 9 and 10 rows on 2
    threads: W is small) or every step be split over the threads (on 8 threads a group would get 2 rows, too few: the
    hidden units split, or for the LayerNorm-LSTM the weight panels and the rows): the same arithmetic per row, so
    the values and the gradients of x, h0 and c0 agree exactly (the weights' sum over rows, in an order that may
    depend on the threads, to rounding), with lengths, both ways."""
    use_step_gemm("packed", monkeypatch)
    problem = make_problem(kind, 5, 19, 8, 192, dtype=torch.float32)
    lengths = torch.tensor([5, 1, 3, 4] * 4 + [2, 5, 5])
    results = {}
    for count in (2, 8):
        set_threads(count)
        with torch.profiler.profile() as prof, torch.set_grad_enabled(train):
            values = ops.recurrent_layer(kind, *problem, lengths=lengths, reverse=reverse)
            loss = sum(v.sum() for v in values if v is not None)
            grads = torch.autograd.grad(loss, leaves(*problem)) if train else ()
        events = [event.name for event in prof.events()]
        row_loops = (2 if train else 1) if count == 2 else 0  # the forward's (and the backward's)
        assert events.count("fastattn_C::recurrent_row_loops") == row_loops
        unit_loops = (2 if train else 1) if count == 8 and kind != "layernorm_lstm" else 0
        assert events.count("fastattn_C::recurrent_unit_loops") == unit_loops
        results[count] = [t for t in values if t is not None], list(grads)
    (values, grads), (step_values, step_grads) = results[2], results[8]
    per_row = 3 if kind in CELLS else 2  # the gradients of x, h0 (, c0) come first
    for rows, steps in zip(values + grads[:per_row], step_values + step_grads[:per_row], strict=True):
        assert torch.equal(rows, steps)
    for rows, steps in zip(grads[per_row:], step_grads[per_row:], strict=True):
        assert_close(rows, steps, atol=1e-5 * steps.abs().max().item(), name="weight gradient")


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_unit_groups_match_one_thread(kind, batch, train, set_threads, monkeypatch):
    """A batch too small for row groups splits each step's hidden units over the threads instead, forward and
    backward (5 panels of 32 units per gate: 2 + 3 on 2 threads, 1 + 1 + 1 + 2 on 4; one and three rows take several
    panels at once): the values and the gradients of x, h0 and c0 are exactly those of one thread, with lengths, both
    ways. The LayerNorm-LSTM, whose norms span all units, runs on one thread."""
    use_step_gemm("packed", monkeypatch)
    problem = make_problem(kind, 4, batch, 8, 160, dtype=torch.float32)
    lengths = torch.tensor([4, 2, 3][:batch])
    results = {}
    for count, reverse in itertools.product((1, 2, 4), (False, True)):
        set_threads(count)
        with torch.profiler.profile() as prof, torch.set_grad_enabled(train):
            values = ops.recurrent_layer(kind, *problem, lengths=lengths, reverse=reverse)
            loss = sum(v.sum() for v in values if v is not None)
            grads = torch.autograd.grad(loss, leaves(*problem)[: 3 if kind in CELLS else 2]) if train else ()
        unit_loops = [event.name for event in prof.events()].count("fastattn_C::recurrent_unit_loops")
        assert unit_loops == ((2 if train else 1) if count > 1 and kind != "layernorm_lstm" else 0)
        results[count, reverse] = [t for t in values if t is not None] + list(grads)
    for (count, reverse), tensors in results.items():
        for ours, one_thread in zip(tensors, results[1, reverse], strict=True):
            assert torch.equal(ours, one_thread), (count, reverse)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", KINDS)
def test_inference_in_chunks_of_steps(kind, reverse, monkeypatch):
    """CPU inference runs the steps in chunks (here of 2 steps: 13 = 6 x 2 + 1), the state carried between them
    and lengths shifted: the values are those of one pass."""
    monkeypatch.setattr(ops, "INFERENCE_CHUNK_ROWS", 6)  # batch 3: 2 steps a chunk
    monkeypatch.setattr(ops, "CHUNKED_MIN_VALUES", 1)
    x, h0, c0, weights = make_problem(kind, 13, 3, 4, 6)
    lengths = torch.tensor([13, 4, 7])
    with torch.no_grad(), backends.record() as calls, torch.profiler.profile() as prof:
        ours = ops.recurrent_layer(kind, x, h0, c0, weights, lengths, reverse)
    assert [c.backend for c in calls if c.op == "recurrent"] == ["cpu"]
    assert "fastattn_C::recurrent_inference" in {event.name for event in prof.events()}
    truth = reference.recurrent_layer(kind, x, h0, c0, weights, lengths, reverse)
    for a, b in zip(ours, truth, strict=True):
        if b is not None:
            assert_near(a, b, 1e-12)


# The LayerNorm-LSTM only on the packed kernel: on the fallback, oneDNN's float32 projection over K = 1200 (one long
# sum) has about 1.6x the error of MKL's that the reference uses, and LN_ih amplifies it past the 2x rule at one entry.
PREPARE_CASES = [("lstm", 128, 0, "packed"), ("lstm", 512, 256, "packed"), ("gru", 192, 0, "packed"),
                 ("layernorm_lstm", 128, 0, "packed"), ("lstm", 128, 0, "fallback"), ("lstm", 512, 256, "fallback"),
                 ("gru", 192, 0, "fallback")]


@pytest.mark.parametrize("kind, hidden, proj, path", PREPARE_CASES, ids=lambda v: str(v))
def test_large_float32_inference_prepares_each_weight_once(kind, hidden, proj, path, monkeypatch):
    """Large float32 inference runs in chunks of steps (here 4 of 2 steps: 7 = 3 x 2 + 1), each weight prepared once
    for all of them: packed for the AVX-512 step GEMM, or prepacked for oneDNN on the fallback (every step here has
    >= 2^22 MACs, the projections >= 2^28 in all); the error-ratio rule holds."""
    use_step_gemm(path, monkeypatch)
    monkeypatch.setattr(ops, "INFERENCE_CHUNK_ROWS", 128)  # batch 64: 2 steps a chunk
    monkeypatch.setattr(ops, "CHUNKED_MIN_VALUES", 1)
    problem = make_problem(kind, 7, 64, 1200, hidden, proj=proj, dtype=torch.float32)
    lengths = torch.tensor([7, 3, 5, 1] * 16)
    with torch.no_grad(), torch.profiler.profile() as prof:
        ours = ops.recurrent_layer(kind, *problem, lengths=lengths)
    names = [event.name for event in prof.events()]
    assert names.count("fastattn_C::recurrent_inference") == 1
    prepare = "fastattn_C::pack_step_weight" if path == "packed" else "mkldnn::_reorder_linear_weight"
    assert names.count(prepare) == (3 if proj else 2)  # w_ih, w_hh (, w_hr)
    with torch.no_grad():
        baseline = reference.recurrent_layer(kind, *problem, lengths=lengths)
        truth = reference.recurrent_layer(kind, *as_float64(problem), lengths=lengths)
    for a, base, b in zip(ours, baseline, truth, strict=True):
        if b is not None:
            assert_error_ratio(a, b, base)


def test_inference_saves_nothing_and_matches():
    """Under no_grad the op keeps no activations; the values are those of the differentiable run."""
    problem = make_problem("lstm", 5, 2, 3, 6)
    with torch.no_grad():
        out, h_n, c_n = ops.recurrent_layer("lstm", *problem[:3], problem[3])
        x_proj = torch.nn.functional.linear(problem[0], problem[3]["weight_ih"], problem[3]["bias_ih"])
        *_, saved = ops.run_recurrent("cpu", 0, x_proj, problem[1], problem[2], problem[3]["weight_hh"],
                                      problem[3]["bias_hh"], None, None, False, False, *NO_NORMS)  # fmt: skip
    assert saved.numel() == 0
    ref = reference.recurrent_layer("lstm", *problem[:3], problem[3])
    for ours, truth in zip((out, h_n, c_n), ref, strict=True):
        assert_close(ours, truth, atol=1e-12)


# The kernel backends that run CPU tensors here: the C++ one, and Triton under the interpreter.
CPU_KERNELS = [name for name in ("cpu", "triton") if backends.unavailable_reason(name, torch.device("cpu")) is None]


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_opcheck(backend):
    x, h0, c0, weights = make_problem("lstm", 4, 2, 3, 5, proj=2)
    x_proj = torch.nn.functional.linear(x, weights["weight_ih"], weights["bias_ih"]).detach().requires_grad_()
    lengths = torch.tensor([4, 2])
    for kind, proj in ((0, weights["weight_hr"]), (0, None)):
        w_hh = weights["weight_hh"] if proj is not None else torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
        h = h0 if proj is not None else torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        args = (backend, kind, x_proj, h, c0, w_hh, weights["bias_hh"], proj, lengths, True, True, *NO_NORMS)
        torch.library.opcheck(ops.recurrent_op, args)
    gx, gh0, _, gw = make_problem("gru", 4, 2, 3, 5)
    gx_proj = torch.nn.functional.linear(gx, gw["weight_ih"]).detach()
    args = (backend, 1, gx_proj, gh0, None, gw["weight_hh"], gw["bias_hh"], None, None, False, True, *NO_NORMS)
    torch.library.opcheck(ops.recurrent_op, args)
    lx, lh0, lc0, lw = make_problem("layernorm_lstm", 4, 2, 3, 5)
    norms = [lw[f"norm_{n}"] for n in ("hh_weight", "hh_bias", "c_weight", "c_bias")]
    lx_proj = torch.nn.functional.linear(lx, lw["weight_ih"]).detach()
    args = (backend, 4, lx_proj, lh0, lc0, lw["weight_hh"], lw["bias_hh"], None, lengths, False, True, *norms, 1e-5)
    torch.library.opcheck(ops.recurrent_op, args)


def test_compile():
    def layer(x, h0, c0, w_ih, w_hh):
        out, h_n, c_n = ops.recurrent_layer("lstm", x, h0, c0, {"weight_ih": w_ih, "weight_hh": w_hh})
        return out.sum() + h_n.sum() + c_n.sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):  # float32: the oneDNN input projection
        x, h0, c0, weights = make_problem("lstm", 4, 2, 3, 5, bias=False)
        args = tuple(t.detach().to(dtype).requires_grad_() for t in (x, h0, c0, weights["weight_ih"],
                                                                     weights["weight_hh"]))
        expected = torch.autograd.grad(layer(*args), args)
        assert_close(compiled(*args), layer(*args), atol=atol)
        for ours, truth in zip(torch.autograd.grad(compiled(*args), args), expected, strict=True):
            assert_close(ours, truth, atol=atol)


def test_inductor_compiles_the_float32_layer():
    """Inductor lowers mkldnn's linear only with a frozen weight: a compiled layer must not hand it a parameter."""
    x, h0, c0, weights = make_problem("lstm", 4, 2, 3, 5, dtype=torch.float32)

    def layer(x, h0, c0, w_ih, w_hh):
        return ops.recurrent_layer("lstm", x, h0, c0, {"weight_ih": w_ih, "weight_hh": w_hh})[0]

    args = (x, h0, c0, weights["weight_ih"], weights["weight_hh"])
    with torch.no_grad():  # inference: the oneDNN projection path in eager
        assert_close(torch.compile(layer, fullgraph=True)(*args), layer(*args), atol=1e-5)


@pytest.mark.parametrize("absent", ["norm_ih_weight", "norm_ih_bias", "norm_hh_bias", "norm_c_weight", "norm_c_bias",
                                    "bias_ih", "bias_hh", "biases"])
def test_layernorm_lstm_without_some_affine_parameters(absent):
    """An absent norm weight reads 1 and an absent bias 0, as in the reference, in training and in inference (where the
    cells also apply LN_ih and add the biases)."""
    x, h0, c0, weights = make_problem("layernorm_lstm", 5, 3, 4, 6)
    for key in ("bias_ih", "bias_hh") if absent == "biases" else (absent,):
        del weights[key]
    problem = (x, h0, c0, weights)
    lengths = torch.tensor([5, 2, 3])
    with backends.record() as calls:
        values, grads = run(ops.recurrent_layer, "layernorm_lstm", problem, lengths, True)
    assert [c.backend for c in calls if c.op == "recurrent"] == ["cpu"]
    ref_values, ref_grads = run(reference.recurrent_layer, "layernorm_lstm", problem, lengths, True)
    for ours, truth in zip(values + grads, ref_values + ref_grads, strict=True):
        assert_near(ours, truth, 1e-11)
    with torch.no_grad(), torch.profiler.profile() as prof:
        inferred = ops.recurrent_layer("layernorm_lstm", *problem, lengths, True)
    assert "fastattn_C::recurrent_inference" in {event.name for event in prof.events()}
    for ours, truth in zip(inferred, ref_values, strict=True):
        assert_near(ours, truth, 1e-11)


def test_backward_checks_what_the_kernels_read():
    """The driver's backward (CPU and CUDA) refuses saved activations, cell states or lengths of the wrong shape
    rather than reading past them."""
    x, h0, c0, weights = make_problem("lstm", 3, 2, 4, 5)
    x_proj = torch.nn.functional.linear(x, weights["weight_ih"]).detach()
    args = (0, x_proj, h0.detach(), c0.detach(), weights["weight_hh"].detach(), None, None, None, False, True)
    out, hstate, cstate, saved = torch.ops.fastattn_C.recurrent_forward(*args, *NO_NORMS)
    w_hh = weights["weight_hh"].detach()

    def backward(cstate=cstate, saved=saved, lengths=None, w_hh=w_hh):
        return torch.ops.fastattn_C.recurrent_backward(0, torch.ones_like(out), None, None, w_hh, None, hstate,
                                                      cstate, saved, lengths, False, None, None, None, None)  # fmt: skip

    backward()  # the forward's own outputs pass
    with pytest.raises(RuntimeError, match=r"w_hh must be \(G\*H, P\) with grad_out's P = 5"):
        backward(w_hh=torch.randn(20, 40, dtype=w_hh.dtype))
    with pytest.raises(RuntimeError, match="saved must be contiguous"):
        backward(saved=saved[:, :, :-1])
    with pytest.raises(RuntimeError, match="cstate must be contiguous"):
        backward(cstate=cstate[:-1])
    with pytest.raises(RuntimeError, match="lengths must be"):
        backward(lengths=torch.tensor([3, 2, 1]))


def test_inference_op_checks_its_arguments():
    """fastattn_C's recurrent_inference (CPU) refuses what it cannot run rather than reading past it."""
    x, h0, c0, w = (t.detach() if isinstance(t, torch.Tensor) else t for t in make_problem("lstm", 3, 2, 4, 5))
    w = {key: value.detach() for key, value in w.items()}

    def inference(kind=0, x=x, w_ih=w["weight_ih"], chunk=2, norm_ih_weight=None):
        return torch.ops.fastattn_C.recurrent_inference(kind, x, w_ih, None, h0, c0, w["weight_hh"], None, None,
                                                        None, False, chunk, norm_ih_weight, None, *NO_NORMS)  # fmt: skip

    out, h_n, c_n = inference()
    truth = reference.recurrent_layer("lstm", x, h0, c0, {"weight_ih": w["weight_ih"], "weight_hh": w["weight_hh"]})
    for ours, expected in zip((out, h_n, c_n), truth, strict=True):
        assert_close(ours, expected, atol=1e-12)
    with pytest.raises(RuntimeError, match=r"norm_ih_weight must be \(20,\)"):
        inference(kind=4, norm_ih_weight=torch.ones(5, dtype=x.dtype))
    with pytest.raises(RuntimeError, match="chunk must be at least 1"):
        inference(chunk=0)
    with pytest.raises(RuntimeError, match=r"w_ih \(G\*H, I\)"):
        inference(w_ih=w["weight_ih"][:, :-1])
    with pytest.raises(RuntimeError, match="w_ih must have x's dtype"):
        inference(w_ih=w["weight_ih"].float())


def strided_like(t, layout):
    """t (float32) as a tensor of the same values laid out "dense", "transposed" (column-major) or "strided" (every
    other element of a wider tensor)."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "strided":
        return torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0]
    return t


@pytest.mark.parametrize("path", ["packed", "fallback"])
@pytest.mark.parametrize("layout", ["dense", "transposed", "strided"])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (1, 40, 101), (2, 19, 101), (3, 130, 45), (7, 33, 5), (130, 70, 129),
                                     (300, 64, 520)], ids=str)  # fmt: skip
def test_recurrent_matmul(m, k, n, layout, path, monkeypatch):
    """fastattn_C's recurrent_matmul (the CPU projections and their input gradient): a (M, K) b (K, N) (+ bias) in
    every layout of a and b, with row and column tails (also inside the blocks of 4 or 2 panels that 1 to 3 rows
    take) and several 128-row blocks, within the error-ratio rule of torch's own float32 product."""
    use_step_gemm(path, monkeypatch)
    g = torch.Generator().manual_seed(0)
    a64, b64, bias64 = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((m, k), (k, n), (n,)))
    a, b, bias = strided_like(a64.float(), layout), strided_like(b64.float(), layout), bias64.float()
    for with_bias in (False, True):
        ours = torch.ops.fastattn_C.recurrent_matmul(a, b, bias if with_bias else None)
        base = torch.addmm(bias, a, b) if with_bias else a @ b
        assert_error_ratio(ours, a64 @ b64 + (bias64 if with_bias else 0), base)


def test_scratch_memory_is_reused(monkeypatch):
    """The CPU loops' scratch (packed weights, buffers, the values saved for backward) comes from fastattn's pool of
    CPU blocks: freed, a block serves the next call of its size (no fresh pages to fault in), also when its tensor
    died on another thread; a tensor too large for the pool comes from torch's allocator, and so does what may reach
    a user (the output, the states, recurrent_matmul's product: resizable, as torch's tensors are)."""
    use_step_gemm("packed", monkeypatch)
    w_hh = torch.randn(384, 96)

    def saved_values(batch):  # (out, hstate, cstate, saved) of an LSTM layer, 6 steps
        x_proj, state = torch.randn(6, batch, 384), torch.zeros(batch, 96)
        return torch.ops.fastattn_C.recurrent_forward(ops.KIND_IDS["lstm"], x_proj, state, state, w_hh, None, None,
                                                      None, False, True, None, None, None, None, 1e-5)  # fmt: skip

    *outputs, saved = saved_values(3)
    assert all(t.untyped_storage().resizable() for t in outputs)
    assert not saved.untyped_storage().resizable()  # the pool's
    address, expected = saved.data_ptr(), saved.clone()
    held = [saved]
    del saved
    thread = threading.Thread(target=held.clear)  # the last reference dies on another thread
    thread.start()
    thread.join()
    second = saved_values(3)[3]
    assert second.data_ptr() == address
    assert not torch.equal(second, expected)  # new values in the old block
    assert saved_values(2000)[3].untyped_storage().resizable()  # 18 MB
    product = torch.ops.fastattn_C.recurrent_matmul(torch.randn(4, 8), torch.randn(8, 16), None)
    assert product.untyped_storage().resizable()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python 3.12+ on forking a threaded process
def test_layers_run_in_a_forked_child(set_threads, monkeypatch):
    """Processes forked while another thread runs recurrent layers (an OpenMP team of unit groups, the scratch pool
    taking and freeing blocks under its lock) run the layer in the child with the parent's values; a child that hangs
    fails the test. The child runs on one thread, as DataLoader's workers do: GNU OpenMP cannot start a team in a
    child of a process whose forking thread ran one (torch's own ops hang there too)."""
    use_step_gemm("packed", monkeypatch)
    set_threads(2)
    problem = make_problem("lstm", 20, 1, 16, 96, dtype=torch.float32)
    with torch.no_grad():
        expected = ops.recurrent_layer("lstm", *problem)[0]
    stop = threading.Event()

    def run_layers():
        with torch.no_grad():
            while not stop.is_set():
                ops.recurrent_layer("lstm", *problem)

    thread = threading.Thread(target=run_layers)
    thread.start()
    try:
        for _ in range(10):
            pid = os.fork()
            if pid == 0:  # the child: exit status 0 when the values match, never back into pytest
                code = 1
                try:
                    torch.set_num_threads(1)
                    with torch.no_grad():
                        code = 0 if torch.equal(ops.recurrent_layer("lstm", *problem)[0], expected) else 1
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 60
            while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            if status[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            assert status[0] != 0, "the forked child hung"
            assert os.waitstatus_to_exitcode(status[1]) == 0, "the forked child computed other values"
    finally:
        stop.set()
        thread.join()


def test_recurrent_matmul_checks_its_arguments():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    matmul = torch.ops.fastattn_C.recurrent_matmul
    with pytest.raises(RuntimeError, match=r"a \(M, K\) and b \(K, N\) expected"):
        matmul(a, b[:-1], None)
    with pytest.raises(RuntimeError, match=r"a \(M, K\) and b \(K, N\) expected"):
        matmul(a[None], b, None)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        matmul(a, b.double(), None)
    for bias in (torch.zeros(4), torch.zeros(0)):
        with pytest.raises(RuntimeError, match=r"bias must be \(N,\) = \(5,\)"):
            matmul(a, b, bias)


def test_bad_kind():
    x, h0, c0, weights = make_problem("lstm", 2, 1, 3, 4)
    with pytest.raises(ValueError, match="kind"):
        ops.recurrent_layer("lstmm", x, h0, c0, weights)
