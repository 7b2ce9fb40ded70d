"""fastattn.ConvBNAct and fastattn.FusedConv2d against their unfused torch.nn twins: state_dict, outputs and gradients
in float64 (1e-10) and float32 (error-ratio rule), train and eval (BatchNorm folded), channels_last, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn import reference
from fastattn.nn import fold_batchnorm
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

CONV_ARGS = dict(in_channels=3, out_channels=6, kernel_size=3, stride=1, padding=1)


def torch_twin(module: nn.Module) -> nn.Sequential:
    """The unfused torch.nn sequence a fastattn module stands for, holding a copy of its state."""
    if isinstance(module, fastattn.ConvBNAct):
        layers = [nn.Conv2d(**_conv_kwargs(module[0]))]
        if len(module) > 1:
            bn = module[1]
            stats = bn.track_running_stats
            layers.append(nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, track_running_stats=stats))
    else:
        layers = [nn.Conv2d(**_conv_kwargs(module))]
    weight = next(module.parameters())
    twin = nn.Sequential(*layers).to(device=weight.device, dtype=weight.dtype)
    twin.load_state_dict(module.state_dict() if isinstance(module, fastattn.ConvBNAct) else _prefixed(module))
    twin.train(module.training)
    return twin


def _prefixed(module):
    return {f"0.{key}": value for key, value in module.state_dict().items()}


def _conv_kwargs(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode)  # fmt: skip


def twin_forward(module, twin, x):
    y = twin(x)
    return reference.conv_epilogue(y, None, module.activation, module.pool, upcast=False)


def _randomize_bn(bn: nn.BatchNorm2d, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)


def test_state_dict_keys_match_the_torch_sequence():
    block = fastattn.ConvBNAct(**CONV_ARGS)
    expected = nn.Sequential(nn.Conv2d(**CONV_ARGS), nn.BatchNorm2d(6))
    assert list(block.state_dict()) == list(expected.state_dict()) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"
    ]  # fmt: skip
    block.load_state_dict(expected.state_dict())  # a checkpoint of the sequence loads unchanged
    assert torch.equal(block[0].weight, expected[0].weight)
    assert list(fastattn.ConvBNAct(**CONV_ARGS, bias=False, batch_norm=False).state_dict()) == ["0.weight"]
    fused = fastattn.FusedConv2d(3, 6, 3, activation="relu")
    assert list(fused.state_dict()) == list(nn.Conv2d(3, 6, 3).state_dict()) == ["weight", "bias"]
    assert "activation='relu', pool=False" in repr(fused) and "activation='relu'" in repr(block)


ACTIVATION_POOL = [("relu", True), ("gelu", False), ("gelu_tanh", True), ("silu", True), ("none", False)]


@pytest.mark.parametrize("activation,pool", ACTIVATION_POOL)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_act_float64(activation, pool, training):
    """Outputs, parameter gradients and (training) running statistics equal the twin's to 1e-10."""
    torch.manual_seed(0)
    block = fastattn.ConvBNAct(**CONV_ARGS, activation=activation, pool=pool, dtype=torch.float64)
    _randomize_bn(block[1])
    block.train(training)
    twin = torch_twin(block)
    x = torch.randn(4, 3, 11, 9, dtype=torch.float64)
    out, expected = block(x), twin_forward(block, twin, x)
    assert_close(out, expected, atol=1e-10)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, list(block.parameters()), grad)
    theirs = torch.autograd.grad(expected, list(twin.parameters()), grad)
    for (name, _), got, want in zip(block.named_parameters(), ours, theirs, strict=True):
        assert_close(got, want, atol=1e-10, name=f"grad {name}")
    for key, value in twin.state_dict().items():  # running statistics and num_batches_tracked
        assert_close(block.state_dict()[key], value, atol=1e-12, name=key)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_act_float32_error_ratio(backend_device, training):
    """Float32 against the float64 twin, with the float32 twin's error as the allowance, on every backend."""
    _, device = backend_device
    torch.manual_seed(1)
    block = fastattn.ConvBNAct(**CONV_ARGS, activation="gelu", pool=True).to(device)
    _randomize_bn(block[1])
    block.train(training)
    x = torch.randn(3, 3, 10, 7, device=device)
    grad = torch.randn(3, 6, 5, 3, device=device)
    results = []
    for module, inputs in ((block, x), (torch_twin(block).double(), x.double()), (torch_twin(block), x)):
        out = module(inputs) if module is block else twin_forward(block, module, inputs)
        grads = torch.autograd.grad(out, list(module.parameters()), grad.to(out.dtype))
        results.append((out, *grads))
    for name, ours, truth, baseline in zip(["output", "grad conv weight", "grad conv bias", "grad bn weight",
                                            "grad bn bias"], *results, strict=True):  # fmt: skip
        assert_error_ratio(ours, truth, baseline, ratio=GRADIENT_RATIO if name != "output" else 2.0, name=name)


def test_eval_folding_is_never_stale():
    """Eval mode refolds on every call: changing the conv weight or the running statistics changes the output."""
    block = fastattn.ConvBNAct(**CONV_ARGS, dtype=torch.float64).eval()
    _randomize_bn(block[1])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    block(x)
    with torch.no_grad():
        block[0].weight.mul_(1.5)
        block[1].running_var.mul_(2.0)
        block[1].running_mean.add_(0.3)
    assert_close(block(x), twin_forward(block, torch_twin(block), x), atol=1e-10)


def test_batchnorm_without_running_stats_uses_batch_stats_in_eval():
    block = fastattn.ConvBNAct(**CONV_ARGS, dtype=torch.float64)
    block[1] = nn.BatchNorm2d(6, track_running_stats=False, dtype=torch.float64)
    block.eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    assert_close(block(x), twin_forward(block, torch_twin(block), x), atol=1e-10)


def test_fold_batchnorm():
    conv, bn = nn.Conv2d(3, 4, 3, dtype=torch.float64), nn.BatchNorm2d(4, eps=1e-3, dtype=torch.float64).eval()
    _randomize_bn(bn)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    for bias in (conv.bias, None):
        weight, folded_bias = fold_batchnorm(conv.weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                             bn.eps)  # fmt: skip
        expected = bn(F.conv2d(x, conv.weight, bias))
        assert_close(F.conv2d(x, weight, folded_bias), expected, atol=1e-12)
    weight, folded_bias = fold_batchnorm(conv.weight.float(), None, bn.running_mean, bn.running_var)
    assert weight.dtype == torch.float32 and folded_bias.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, padding=1, activation="relu", pool=False),
        dict(padding=2, dilation=2, groups=2, activation="silu", pool=True),
        dict(padding=1, padding_mode="reflect", activation="gelu", pool=True, bias=False),
        dict(padding=1),  # activation "none": a plain Conv2d
    ],
    ids=["strided", "dilated-grouped", "reflect-nobias", "plain"],
)
def test_fused_conv2d_float64(kwargs):
    torch.manual_seed(2)
    fused = fastattn.FusedConv2d(4, 6, 3, dtype=torch.float64, **kwargs)
    twin = torch_twin(fused)
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64, requires_grad=True)
    out, expected = fused(x), twin_forward(fused, twin, x)
    assert_close(out, expected, atol=1e-10)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, *fused.parameters()], grad)
    theirs = torch.autograd.grad(expected, [x, *twin.parameters()], grad)
    for got, want in zip(ours, theirs, strict=True):
        assert_close(got, want, atol=1e-10, name="grad")


def test_fused_conv2d_from_torch_shares_parameters():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 5, 3)
    fused = fastattn.FusedConv2d.from_torch(conv, activation="relu", pool=True)
    assert fused.weight is conv.weight and type(conv) is nn.Conv2d
    x = torch.randn(2, 3, 8, 8)
    assert_close(fused(x), F.max_pool2d(F.relu(conv(x)), 2).double(), atol=1e-6)


@pytest.mark.parametrize("module", ["conv_bn_act", "fused"])
def test_channels_last_in_channels_last_out(module):
    torch.manual_seed(3)
    if module == "fused":
        block = fastattn.FusedConv2d(3, 8, 3, padding=1, activation="relu", pool=True)
    else:
        block = fastattn.ConvBNAct(3, 8, 3, padding=1, activation="silu", pool=True).eval()
    x = torch.randn(2, 3, 9, 10).contiguous(memory_format=torch.channels_last)
    out = block(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_close(out, twin_forward(block, torch_twin(block), x).double(), atol=2e-5)


def test_compile_fullgraph_training_step():
    """A small CNN of both modules compiles into one graph (train and eval) and matches eager."""
    torch.manual_seed(4)
    model = nn.Sequential(fastattn.ConvBNAct(3, 4, 3, padding=1, pool=True),
                          fastattn.FusedConv2d(4, 5, 3, activation="gelu", pool=True))  # fmt: skip
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        model.train(training)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        expected = model(x)
        model.load_state_dict(state)  # undo the running-statistics update of the eager call
        out = compiled(x)
        assert_close(out, expected.double(), atol=1e-5)
        if training:
            grads = torch.autograd.grad(out.sum(), list(model.parameters()))
            assert all(torch.isfinite(g).all() for g in grads)


def test_bad_input():
    with pytest.raises(ValueError, match="ConvBNAct: activation must be one of"):
        fastattn.ConvBNAct(3, 4, 3, activation="tanh")
    with pytest.raises(ValueError, match="FusedConv2d: activation must be one of"):
        fastattn.FusedConv2d(3, 4, 3, activation="elu")
    block, twin = fastattn.FusedConv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    for bad in (torch.randn(2, 5, 8, 8), torch.randn(2, 3)):  # wrong channels, wrong dims: torch.nn's errors
        with pytest.raises(RuntimeError) as theirs:
            twin(bad)
        with pytest.raises(type(theirs.value)):
            block(bad)
    with pytest.raises(ValueError, match="pool=True needs H and W >= 2"):
        fastattn.FusedConv2d(3, 4, 3, pool=True)(torch.randn(1, 3, 3, 8))
