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
    }
    left = {name: why for name, _, why in report.left}
    assert set(left) == {"mine", "rnn"}
    assert "subclass" in left["mine"] and "LSTM" in left["rnn"]
    assert "replaced 13 module(s), left 2" in str(report)

    assert type(model.shared) is fastattn.LayerNorm and model.shared is model.norm
    assert list(model.parameters()) == parameters and optimizer.param_groups[0]["params"] == parameters
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with fastattn.record() as calls:
        out = model(x)
    assert {"attention", "norm", "softmax"} <= {c.op for c in calls}
    assert_close(out, expected, atol=1e-10)
    assert not fastattn.convert(model).replaced  # converting twice changes nothing more


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
