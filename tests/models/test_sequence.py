"""SequenceTransformer (fastattn kernels) against TorchSequenceTransformer, its pure torch.nn twin."""

import pytest
import torch

import fastattn
from fastattn.models.sequence import SequenceTransformer, TorchSequenceTransformer
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

INPUT_DIM, OUTPUTS, D_MODEL, NHEAD, FF = 5, 3, 24, 3, 40  # head dim 8; odd input and output sizes
BATCH, SEQ = 3, 11
ATOL = 1e-10  # float64

CONFIGS = [dict(), dict(norm_first=True), dict(causal=True), dict(norm_first=True, causal=True)]


def _ids(config):
    return "-".join(k for k, v in config.items() if v) or "post_norm"


def _build(cls, seed, dtype=torch.float64, **config):
    torch.manual_seed(seed)
    kwargs = dict(d_model=D_MODEL, nhead=NHEAD, num_layers=2, dim_feedforward=FF, dropout=0.0)
    return cls(INPUT_DIM, OUTPUTS, **{**kwargs, **config}).to(dtype)


def _pair(direction, dtype=torch.float64, **config):
    """(ours, twin) with the same parameters, copied by load_state_dict(strict=True) in the given direction."""
    if direction == "ours_to_twin":
        ours, twin = (
            _build(SequenceTransformer, 0, dtype, **config),
            _build(TorchSequenceTransformer, 1, dtype, **config),
        )
        twin.load_state_dict(ours.state_dict(), strict=True)
    else:
        ours, twin = (
            _build(SequenceTransformer, 1, dtype, **config),
            _build(TorchSequenceTransformer, 0, dtype, **config),
        )
        ours.load_state_dict(twin.state_dict(), strict=True)
    return ours, twin


def _inputs(dtype=torch.float64, seq=SEQ):
    x = torch.randn(BATCH, seq, INPUT_DIM, dtype=dtype, requires_grad=True)
    padding = torch.zeros(BATCH, seq, dtype=torch.bool)
    padding[1, -4:] = True  # right padding
    padding[2, :2] = True  # left padding: with causal=True, steps 0 and 1 see no key (attention output 0)
    return x, padding


def _outputs_and_grads(model, x, padding):
    """The output and the gradients of <output, fixed cotangent> for x and every named parameter."""
    out = model(x, padding)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)  # same in any dtype
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(out, [x, *params], cotangent)
    return out, dict(zip(("x", *names), grads, strict=True))


def _assert_same(ours, twin, x, padding):
    out, grads = _outputs_and_grads(ours, x, padding)
    expected, expected_grads = _outputs_and_grads(twin, x, padding)
    assert_close(out, expected, atol=ATOL)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], atol=ATOL, name=f"gradient of {name}")


@pytest.mark.parametrize("norm_first", [False, True])
def test_same_seed_gives_the_same_parameters_and_keys(norm_first):
    ours = _build(SequenceTransformer, 3, norm_first=norm_first)
    twin = _build(TorchSequenceTransformer, 3, norm_first=norm_first)
    ours_state, twin_state = ours.state_dict(), twin.state_dict()
    assert list(ours_state) == list(twin_state)
    assert ("encoder.norm.weight" in ours_state) == norm_first
    assert "pos_encoder.pe" not in twin_state and "pe" in dict(twin.pos_encoder.named_buffers())  # non-persistent
    for key, value in twin_state.items():
        assert torch.equal(ours_state[key], value), key


@pytest.mark.parametrize("direction", ["ours_to_twin", "twin_to_ours"])
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_matches_twin_in_eval_and_train(config, direction):
    ours, twin = _pair(direction, **config)
    x, padding = _inputs()
    for mode in ("eval", "train"):  # dropout 0: train differs from eval only in which torch code paths run
        ours.train(mode == "train"), twin.train(mode == "train")
        _assert_same(ours, twin, x, padding)
        _assert_same(ours, twin, x, None)
        with torch.no_grad():  # the twin's eval layers take torch's fused fast path here
            assert_close(ours(x, padding), twin(x, padding), atol=ATOL, name=f"{mode} output under no_grad")


def test_causal_outputs_ignore_later_steps():
    ours, _ = _pair("ours_to_twin", causal=True)
    x, _ = _inputs()
    changed = x.detach().clone()
    changed[:, 6:] += 1.0
    with torch.no_grad():
        before, after = ours(x), ours(changed)
    assert_close(after[:, :6], before[:, :6], atol=ATOL)
    assert not torch.allclose(after[:, 6:], before[:, 6:])


def test_fully_padded_sequence_gives_finite_outputs_as_the_twin():
    """A sequence padded throughout leaves every query without a key: fastattn's attention then outputs 0, as
    torch's SDPA math path does since torch 2.5 (its "safe softmax"), so every output and gradient is compared."""
    ours, twin = _pair("ours_to_twin")
    x, padding = _inputs()
    padding[0] = True
    for mode in (False, True):
        ours.train(mode), twin.train(mode)
        with torch.no_grad():
            out = ours(x, padding)
            assert torch.isfinite(out).all()
            assert_close(out, twin(x, padding), atol=ATOL)
        _assert_same(ours, twin, x, padding)


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
LOW_PRECISION = [
    pytest.param("cpu", torch.float32, id="cpu-float32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float32, marks=NEEDS_GPU, id="cuda-float32"),
    pytest.param("cuda", torch.bfloat16, marks=NEEDS_GPU, id="cuda-bfloat16"),
]


@pytest.mark.parametrize("device, dtype", LOW_PRECISION)
@pytest.mark.parametrize("config", [dict(), dict(norm_first=True, causal=True)], ids=_ids)
def test_low_precision_within_the_error_ratio_of_torch(config, device, dtype):
    """Against the float64 twin on the CPU, ours may err at most twice (gradients: three times) as much as the
    twin in the same dtype and device. bfloat16 compares outputs only."""
    _check_error_ratio(config, device, dtype, SEQ)


def test_float32_linears_on_the_packed_gemm_within_the_error_ratio(monkeypatch):
    """BATCH * 171 >= 512 rows and d_model 64: the encoder's linears (attention projections, feed-forward) run
    fastattn.linear's packed GEMM where the CPU has one (FASTATTN_CPU_STEP_GEMM=1), within the error-ratio rule
    forward and backward; the narrow input projection and head run F.linear."""
    monkeypatch.setenv("FASTATTN_CPU_STEP_GEMM", "1")
    if not fastattn.backends.extension()[0].build_info()["cpu_step_gemm"]:
        pytest.skip("this CPU has no AVX-512F: the packed GEMM cannot run here")
    with fastattn.record() as calls:
        _check_error_ratio(dict(norm_first=True, causal=True, d_model=64, nhead=4, dim_feedforward=96), "cpu",
                           torch.float32, 171)  # fmt: skip
    assert sum(c.op == "linear" and c.backend == "cpu" for c in calls) == 4 * 2  # 4 a layer


def _check_error_ratio(config, device, dtype, seq):
    ours, twin = (model.to(device) for model in _pair("ours_to_twin", dtype, **config))
    truth_model = _build(TorchSequenceTransformer, 9, **config)
    truth_model.load_state_dict(ours.state_dict())  # the rounded values, held in float64
    x, padding = _inputs(seq=seq)
    padding[:, 0] = False  # every step sees a key (torch's GPU kernels need not give a keyless step 0)
    x_low = x.detach().to(device, dtype).requires_grad_()
    x = x_low.detach().cpu().double().requires_grad_()
    truth, truth_grads = _outputs_and_grads(truth_model, x, padding)
    out, grads = _outputs_and_grads(ours, x_low, padding.to(device))
    baseline, baseline_grads = _outputs_and_grads(twin, x_low, padding.to(device))
    assert out.dtype == dtype
    assert_error_ratio(out.cpu(), truth, baseline.cpu())
    if dtype == torch.float32:
        for name, grad in grads.items():
            assert_error_ratio(grad.cpu(), truth_grads[name], baseline_grads[name].cpu(), ratio=GRADIENT_RATIO,
                               name=name)  # fmt: skip


def _dropout_rates(model):
    """The dropout probability of every dropout site: nn.Dropout modules, attention, the positional encoding."""
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.dropout for m in model.modules() if isinstance(m, (torch.nn.MultiheadAttention,
                                                                  fastattn.SinusoidalPositionalEncoding))]  # fmt: skip
    return rates


def test_dropout_changes_training_outputs_and_replays_under_manual_seed():
    model = _build(SequenceTransformer, 0, dropout=0.3)
    assert set(_dropout_rates(model)) == {0.3} and len(_dropout_rates(model)) == len(
        _dropout_rates(_build(TorchSequenceTransformer, 0, dropout=0.3)))  # fmt: skip
    x, padding = _inputs()
    model.eval()
    plain = model(x, padding)
    model.train()
    torch.manual_seed(5)
    first = model(x, padding)
    torch.manual_seed(5)
    assert torch.equal(model(x, padding), first)
    assert not torch.allclose(first, plain)


def test_fastattn_kernels_run_forward_and_backward():
    ours, _ = _pair("ours_to_twin", norm_first=True, causal=True)
    ours.train()
    x, padding = _inputs()
    with fastattn.record() as calls:
        ours(x, padding).sum().backward()
    ops = {c.op for c in calls}
    assert {"positional_add", "attention", "attention_backward", "norm", "norm_backward"} <= ops
    assert {c.backend for c in calls} <= set(fastattn.backends.BACKENDS), "something ran outside fastattn"


def test_compile_fullgraph_training_step_matches_eager():
    """No graph break with dropout on, and the compiled step draws the same dropout as eager under one seed."""
    torch._dynamo.reset()
    model = _build(SequenceTransformer, 0, torch.float32, dropout=0.1, norm_first=True, causal=True).train()
    x, padding = _inputs(torch.float32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for run in (compiled, model):
        torch.manual_seed(1)
        loss = run(x, padding).square().mean()
        results.append((loss, torch.autograd.grad(loss, [x, *model.parameters()])))
    (loss, grads), (expected, expected_grads) = results
    assert_close(loss, expected, atol=1e-6, name="loss")
    for i, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
        assert_close(grad, expected_grad, atol=1e-6, name=f"gradient {i}")


BAD_INPUTS = [
    ("input_dim", ValueError, lambda m, x, p: m(x[..., :-1])),
    ("batch, seq, input_dim", ValueError, lambda m, x, p: m(x[0])),
    ("floating-point", TypeError, lambda m, x, p: m(x.long())),
    (r"key_padding_mask must be \(batch, seq\)", ValueError, lambda m, x, p: m(x, p[:, :-1])),
    (r"key_padding_mask must be \(batch, seq\)", ValueError, lambda m, x, p: m(x, p[:2])),
    ("key_padding_mask must be a bool", TypeError, lambda m, x, p: m(x, p.long())),
    ("max_len=8", IndexError, lambda m, x, p: m(x)),
]


@pytest.mark.parametrize("match, error, call", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(match, error, call):
    model = _build(SequenceTransformer, 0, max_len=8)
    x, padding = _inputs()
    with pytest.raises(error, match=match):
        call(model, x.detach(), padding)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(nhead=5), "divisible by nhead"), (dict(dropout=1.0), "dropout"), (dict(num_layers=0), "num_layers"),
     (dict(max_len=0), "max_len")],
)  # fmt: skip
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SequenceTransformer(INPUT_DIM, OUTPUTS, d_model=D_MODEL, **{"nhead": NHEAD, **kwargs})
