"""LSTMClassifier and TanhRNN (fastattn's recurrent kernels) against TorchLSTMClassifier and TorchTanhRNN, their pure
torch.nn twins: state_dict, logits and gradients in float64 and float32 (error-ratio rule), train and eval, sequence
lengths 1, 2 and odd, batch 1, non-contiguous input, the fused kernels running, bad input."""

import pytest
import torch

import fastattn
from fastattn.models import LSTMClassifier, TanhRNN, TorchLSTMClassifier, TorchTanhRNN
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

ATOL = 1e-10  # float64
INPUT, HIDDEN, CLASSES = 5, 7, 3  # odd sizes

# (ours, twin, constructor arguments beyond (INPUT, HIDDEN, CLASSES))
CASES = {
    "lstm": (LSTMClassifier, TorchLSTMClassifier, dict()),  # two layers, as the seed
    "lstm-1layer": (LSTMClassifier, TorchLSTMClassifier, dict(num_layers=1)),
    "rnn": (TanhRNN, TorchTanhRNN, dict()),
    "rnn-3layers": (TanhRNN, TorchTanhRNN, dict(num_layers=3)),
}
SHAPES = [(4, 13), (3, 1), (1, 2), (1, 9)]  # (batch, seq)


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: see conftest.py


def _pair(case, direction="ours_to_twin", dtype=torch.float64):
    """(ours, twin) with the same state, copied by load_state_dict(strict=True) in the given direction."""
    ours_cls, twin_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    ours = ours_cls(INPUT, HIDDEN, CLASSES, **kwargs).to(dtype)
    torch.manual_seed(1)
    twin = twin_cls(INPUT, HIDDEN, CLASSES, **kwargs).to(dtype)
    if direction == "ours_to_twin":
        twin.load_state_dict(ours.state_dict(), strict=True)
    else:
        ours.load_state_dict(twin.state_dict(), strict=True)
    return ours, twin


def _sequences(batch, seq, dtype=torch.float64, seed=0):
    return torch.randn(batch, seq, INPUT, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _outputs_and_grads(model, x):
    """The logits and the gradients of <logits, fixed cotangent> for x and every named parameter."""
    x = x.detach().requires_grad_()
    out = model(x)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(out, [x, *params], cotangent)
    return out, dict(zip(("x", *names), grads, strict=True))


def _assert_same(ours, twin, x):
    out, grads = _outputs_and_grads(ours, x)
    expected, expected_grads = _outputs_and_grads(twin, x)
    assert out.shape == (x.shape[0], CLASSES)
    assert_close(out, expected, atol=ATOL)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], atol=ATOL, name=f"gradient of {name}")


@pytest.mark.parametrize("case", CASES)
def test_state_dict_keys_shapes_and_seeded_parameters_match_the_twin(case):
    ours_cls, twin_cls, kwargs = CASES[case]
    torch.manual_seed(3)
    ours = ours_cls(INPUT, HIDDEN, CLASSES, **kwargs)
    torch.manual_seed(3)
    twin = twin_cls(INPUT, HIDDEN, CLASSES, **kwargs)
    ours_state, twin_state = ours.state_dict(), twin.state_dict()
    assert list(ours_state) == list(twin_state)
    layers = kwargs.get("num_layers", 2 if ours_cls is LSTMClassifier else 1)
    assert f"{'lstm' if ours_cls is LSTMClassifier else 'rnn'}.weight_hh_l{layers - 1}" in ours_state
    for key, value in twin_state.items():
        assert ours_state[key].shape == value.shape and torch.equal(ours_state[key], value), key


@pytest.mark.parametrize("shape", SHAPES, ids=[f"batch{b}-seq{s}" for b, s in SHAPES])
@pytest.mark.parametrize("direction", ["ours_to_twin", "twin_to_ours"])
@pytest.mark.parametrize("case", CASES)
def test_matches_twin_float64_in_train_and_eval(case, direction, shape):
    ours, twin = _pair(case, direction)
    x = _sequences(*shape)
    for training in (True, False):  # dropout 0: the modes differ only in the code paths taken
        ours.train(training), twin.train(training)
        _assert_same(ours, twin, x)


@pytest.mark.parametrize("case", CASES)
def test_non_contiguous_input(case):
    ours, twin = _pair(case)
    x = _sequences(11, 4).transpose(0, 1)  # (4, 11, INPUT) as a view of (11, 4, INPUT)
    assert not x.is_contiguous()
    _assert_same(ours, twin, x)


def test_lstm_starts_from_the_zero_state():
    """The explicit zero (h_0, c_0) is torch.nn.LSTM's default initial state."""
    ours, twin = _pair("lstm")
    x = _sequences(3, 6)
    out, _ = twin.lstm(x)
    assert_close(ours(x), twin.fc(out[:, -1]), atol=ATOL)


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=NEEDS_GPU, id="cuda")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["lstm", "rnn-3layers"])
def test_float32_within_the_error_ratio_of_torch(case, device):
    """Against the float64 twin (float32-rounded parameters), ours may err at most twice (gradients: three times)
    as much as the float32 twin on the same device."""
    ours, twin = (m.to(device) for m in _pair(case, dtype=torch.float32))
    truth_model = CASES[case][1](INPUT, HIDDEN, CLASSES, **CASES[case][2]).double()
    truth_model.load_state_dict(ours.state_dict())
    x = _sequences(4, 29, dtype=torch.float32)
    truth, truth_grads = _outputs_and_grads(truth_model, x.double())
    out, grads = _outputs_and_grads(ours, x.to(device))
    baseline, baseline_grads = _outputs_and_grads(twin, x.to(device))
    assert out.dtype == torch.float32
    assert_error_ratio(out.cpu(), truth, baseline.cpu())
    for name, grad in grads.items():
        assert_error_ratio(grad.cpu(), truth_grads[name], baseline_grads[name].cpu(), ratio=GRADIENT_RATIO, name=name)


@pytest.mark.parametrize("case", CASES)
def test_the_fused_recurrent_kernel_runs_every_layer(case):
    ours, _ = _pair(case, dtype=torch.float32)
    layers = ours.lstm.num_layers if hasattr(ours, "lstm") else ours.rnn.num_layers
    with fastattn.record() as calls:
        ours(_sequences(2, 5, dtype=torch.float32)).sum().backward()
    assert [(c.op, c.backend) for c in calls] == [("recurrent", "cpu")] * layers


@pytest.mark.parametrize("case", ["lstm", "rnn"])
def test_predict_proba_is_the_softmax_of_the_twins_logits(case):
    ours, twin = _pair(case)
    x = _sequences(4, 5)
    probs = ours.predict_proba(x)
    assert_close(probs, torch.softmax(twin(x), dim=-1), atol=ATOL)
    assert_close(probs.sum(-1), torch.ones(4, dtype=torch.float64), atol=ATOL)
    assert_close(twin.predict_proba(x), probs, atol=ATOL)


def test_dropout_between_layers_acts_in_training_and_replays_under_manual_seed():
    torch.manual_seed(0)
    model = LSTMClassifier(INPUT, HIDDEN, CLASSES, dropout=0.4).double()
    twin = TorchLSTMClassifier(INPUT, HIDDEN, CLASSES, dropout=0.4).double()
    twin.load_state_dict(model.state_dict())
    x = _sequences(4, 6)
    assert_close(model.eval()(x), twin.eval()(x), atol=ATOL)
    model.train()
    torch.manual_seed(5)
    first = model(x)
    torch.manual_seed(5)
    assert torch.equal(model(x), first)
    assert not torch.allclose(first, model.eval()(x))


@pytest.mark.parametrize("case", ["lstm", "rnn"])
def test_compile_fullgraph_with_allow_rnn_matches_eager(case):
    """Dynamo refuses every torch.nn.RNNBase subclass unless ``allow_rnn`` is set; with it, one graph."""
    torch._dynamo.reset()
    ours, _ = _pair(case, dtype=torch.float32)
    x = _sequences(3, 6, dtype=torch.float32)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        out = compiled(x)
    expected = ours(x)
    assert_close(out, expected.double(), atol=1e-6)
    grads = torch.autograd.grad(out.sum(), list(ours.parameters()))
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected.sum(), list(ours.parameters())), strict=True):
        assert_close(grad, expected_grad.double(), atol=1e-6, name="gradient")


@pytest.mark.parametrize("case", ["lstm", "rnn"])
def test_wrong_feature_count_raises_the_error_kind_torch_raises(case):
    ours, twin = _pair(case)
    bad = torch.randn(2, 4, INPUT + 1, dtype=torch.float64)
    with pytest.raises(RuntimeError) as theirs:
        twin(bad)
    with pytest.raises(type(theirs.value), match="input_size"):
        ours(bad)


BAD_INPUTS = [
    (r"\(batch, seq, input_size\)", ValueError, lambda m: m(torch.randn(4, INPUT, dtype=torch.float64))),
    ("seq >= 1", ValueError, lambda m: m(torch.randn(2, 0, INPUT, dtype=torch.float64))),
    ("floating-point", TypeError, lambda m: m(torch.zeros(2, 3, INPUT, dtype=torch.long))),
]


@pytest.mark.parametrize("case", ["lstm", "rnn"])
@pytest.mark.parametrize("match, error, call", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(case, match, error, call):
    ours, _ = _pair(case)
    with pytest.raises(error, match=match):
        call(ours)


@pytest.mark.parametrize("cls", [LSTMClassifier, TanhRNN])
@pytest.mark.parametrize("arg", ["input_size", "hidden_size", "num_classes", "num_layers"])
def test_bad_arguments_raise_naming_the_argument(cls, arg):
    kwargs = {**dict(input_size=INPUT, hidden_size=HIDDEN, num_classes=CLASSES, num_layers=1), arg: 0}
    with pytest.raises(ValueError, match=arg):
        cls(**kwargs)
