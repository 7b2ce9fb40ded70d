"""fastattn.convert swaps torch.nn modules for fastattn's in place, keeps everything else, and reports."""

import pytest
import torch

import fastattn
from fastattn.testing import assert_close

D = 16


class MyLayerNorm(torch.nn.LayerNorm):  # a user subclass: its forward is its own business
    def forward(self, x):
        return super().forward(x) * 2


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True, dtype=torch.float64)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.attn = torch.nn.MultiheadAttention(D, 4, batch_first=True, dtype=torch.float64)
        self.norm = torch.nn.LayerNorm(D, dtype=torch.float64)
        self.rms = torch.nn.RMSNorm(D, dtype=torch.float64)
        self.mine = MyLayerNorm(D, dtype=torch.float64)
        self.rnn = torch.nn.LSTM(D, D, batch_first=True, dtype=torch.float64)
        self.softmax = torch.nn.Softmax(dim=-1)
        self.shared = self.norm  # one module under two names

    def forward(self, x):
        x = self.encoder(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.shared(self.rms(self.norm(x)))
        x = self.rnn(self.mine(x))[0]
        return self.softmax(x)


def test_convert_replaces_in_place_and_reports():
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    report = fastattn.convert(model)

    assert report.model is model
    replaced = {name: new for name, _, new in report.replaced}
    assert replaced == {
        "encoder": "fastattn.TransformerEncoder",
        "encoder.layers.0": "fastattn.TransformerEncoderLayer",
        "encoder.layers.0.self_attn": "fastattn.MultiheadAttention",
        "encoder.layers.0.norm1": "fastattn.LayerNorm",
        "encoder.layers.0.norm2": "fastattn.LayerNorm",
        "encoder.layers.1": "fastattn.TransformerEncoderLayer",
        "encoder.layers.1.self_attn": "fastattn.MultiheadAttention",
        "encoder.layers.1.norm1": "fastattn.LayerNorm",
        "encoder.layers.1.norm2": "fastattn.LayerNorm",
        "attn": "fastattn.MultiheadAttention",
        "norm": "fastattn.LayerNorm",
        "rms": "fastattn.RMSNorm",
        "softmax": "fastattn.Softmax",
        "rnn": "fastattn.LSTM",
    }
    left = {name: why for name, _, why in report.left}
    assert set(left) == {"mine"}
    assert "subclass" in left["mine"]
    assert "replaced 14 module(s), left 1" in str(report)

    assert type(model.shared) is fastattn.LayerNorm and model.shared is model.norm
    assert list(model.parameters()) == parameters and optimizer.param_groups[0]["params"] == parameters
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with fastattn.record() as calls:
        out = model(x)
    assert {"attention", "norm", "softmax"} <= {c.op for c in calls}
    assert_close(out, expected, atol=1e-10)
    assert not fastattn.convert(model).replaced  # converting twice changes nothing more


class Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(D, 7, num_layers=2, bidirectional=True, proj_size=3, dtype=torch.float64)
        self.gru = torch.nn.GRU(6, 5, batch_first=True, dtype=torch.float64)
        self.rnn = torch.nn.RNN(5, 4, nonlinearity="relu", bias=False, dtype=torch.float64)
        self.ln_lstm = fastattn.LayerNormLSTM(4, 3, dtype=torch.float64)  # fastattn's own: neither replaced nor left

    def forward(self, x, lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h, c) = self.lstm(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out)  # (seq, batch, 6)
        out, h_gru = self.gru(out.transpose(0, 1))
        out, h_rnn = self.rnn(out.transpose(0, 1))
        out, (h_ln, c_ln) = self.ln_lstm(out)
        return [out, h, c, h_gru, h_rnn, h_ln, c_ln]


def test_convert_replaces_recurrent_layers():
    torch.manual_seed(2)
    model = Recurrent()
    x, lengths = torch.randn(9, 3, D, dtype=torch.float64, requires_grad=True), [5, 9, 2]
    expected = model(x, lengths)
    expected_grads = torch.autograd.grad(sum(t.square().sum() for t in expected), [x, *model.parameters()])

    report = fastattn.convert(model)

    replaced = {name: (old, new) for name, old, new in report.replaced}
    assert replaced == {
        "lstm": ("torch.nn.LSTM", "fastattn.LSTM"),
        "gru": ("torch.nn.GRU", "fastattn.GRU"),
        "rnn": ("torch.nn.RNN", "fastattn.RNN"),
    }
    assert not report.left
    assert type(model.lstm) is fastattn.LSTM and type(model.rnn) is fastattn.RNN and model.rnn.nonlinearity == "relu"
    got = model(x, lengths)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert_close(a, b, atol=1e-10, name=f"output {i}")
    grads = torch.autograd.grad(sum(t.square().sum() for t in got), [x, *model.parameters()])
    names = ["x", *[n for n, _ in model.named_parameters()]]
    for name, a, b in zip(names, grads, expected_grads, strict=True):
        assert_close(a, b, atol=1e-10, name=f"grad {name}")


def test_convert_keeps_training_mode_and_gradients():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(D, D, dtype=torch.float64), torch.nn.LayerNorm(D, dtype=torch.float64))
    x = torch.randn(4, D, dtype=torch.float64)
    (expected,) = torch.autograd.grad(model(x).square().sum(), [model[0].weight])
    fastattn.convert(model)
    assert model.training and type(model[1]) is fastattn.LayerNorm
    (grad,) = torch.autograd.grad(model(x).square().sum(), [model[0].weight])
    assert_close(grad, expected, atol=1e-10)


def test_convert_reports_torchscript_modules():
    scripted = torch.jit.script(torch.nn.LayerNorm(D))
    report = fastattn.convert(torch.nn.Sequential(scripted))
    assert not report.replaced
    assert [(name, why) for name, _, why in report.left] == [("0", "a TorchScript module cannot be changed")]


def test_convert_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastattn.convert(lambda x: x)
