"""fastattn's Transformer modules are drop-ins for torch.nn's: same parameters, initialisation and results."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.testing import assert_close

D_MODEL, NHEAD, FF = 24, 3, 40
SRC, TGT, BATCH = 9, 7, 3
ATOL = 1e-10  # float64

LAYER_CONFIGS = [
    dict(),
    dict(norm_first=True),
    dict(batch_first=True, activation="gelu"),
    dict(batch_first=True, norm_first=True, activation=F.silu, bias=False),
    dict(layer_norm_eps=1e-3, activation=torch.nn.GELU()),
]


def _ids(config):
    return "-".join(f"{k}{getattr(v, '__name__', v)}" for k, v in config.items()) or "default"


def _randomised(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def _twins(torch_cls, fast_cls, *args, **kwargs):
    """(ours, torch's) with the same random parameters, float64, dropout 0 (torch's dropout draws differ)."""
    theirs = _randomised(torch_cls(*args, dropout=0.0, dtype=torch.float64, **kwargs))
    ours = fast_cls(*args, dropout=0.0, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _seq(length, batch_first, requires_grad=True):
    shape = (BATCH, length, D_MODEL) if batch_first else (length, BATCH, D_MODEL)
    return torch.randn(shape, dtype=torch.float64, requires_grad=requires_grad)


def _padding(length):
    padding = torch.zeros(BATCH, length, dtype=torch.bool)
    padding[1, -3:] = True
    return padding


def _check_same(ours, theirs, run, inputs):
    """Outputs, and gradients of the inputs and parameters, of run(ours) and run(theirs)."""
    results = []
    for module in (ours, theirs):
        out = run(module)
        grads = torch.autograd.grad(out, [*inputs, *module.parameters()], torch.ones_like(out))
        results.append((out, grads))
    (out, grads), (expected, expected_grads) = results
    assert_close(out, expected, atol=ATOL)
    for i, (mine, true) in enumerate(zip(grads, expected_grads, strict=True)):
        assert_close(mine, true, atol=ATOL, name=f"gradient {i}")


@pytest.mark.parametrize("config", LAYER_CONFIGS, ids=_ids)
@pytest.mark.parametrize("masks", ["none", "causal", "padding+float"])
def test_encoder_layer_matches_torch(config, masks):
    ours, theirs = _twins(torch.nn.TransformerEncoderLayer, fastattn.TransformerEncoderLayer, D_MODEL, NHEAD, FF,
                          **config)  # fmt: skip
    src = _seq(SRC, config.get("batch_first", False))
    kwargs = {}
    if masks == "causal":
        kwargs = dict(src_mask=torch.nn.Transformer.generate_square_subsequent_mask(SRC, dtype=torch.float64),
                      is_causal=True)  # fmt: skip
    elif masks == "padding+float":
        kwargs = dict(src_mask=torch.randn(SRC, SRC, dtype=torch.float64), src_key_padding_mask=_padding(SRC))
    with fastattn.record() as calls:
        _check_same(ours, theirs, lambda m: m(src, **kwargs), [src])
    ops = {c.op for c in calls}
    assert {"attention", "attention_backward", "norm"} <= ops


@pytest.mark.parametrize("config", LAYER_CONFIGS, ids=_ids)
def test_decoder_layer_matches_torch(config):
    ours, theirs = _twins(torch.nn.TransformerDecoderLayer, fastattn.TransformerDecoderLayer, D_MODEL, NHEAD, FF,
                          **config)  # fmt: skip
    batch_first = config.get("batch_first", False)
    tgt, memory = _seq(TGT, batch_first), _seq(SRC, batch_first)
    kwargs = dict(
        tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(TGT, dtype=torch.float64), tgt_is_causal=True,
        tgt_key_padding_mask=_padding(TGT), memory_key_padding_mask=_padding(SRC),
        memory_mask=torch.rand(TGT, SRC) < 0.2,
    )  # fmt: skip
    _check_same(ours, theirs, lambda m: m(tgt, memory, **kwargs), [tgt, memory])


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_matches_torch_from_the_same_seed(norm_first):
    """Same seed, same parameters (the constructors draw alike); then the same outputs and gradients."""
    kwargs = dict(d_model=D_MODEL, nhead=NHEAD, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=FF,
                  dropout=0.0, norm_first=norm_first, dtype=torch.float64)  # fmt: skip
    torch.manual_seed(0)
    theirs = torch.nn.Transformer(**kwargs)
    torch.manual_seed(0)
    ours = fastattn.Transformer(**kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    src, tgt = _seq(SRC, False), _seq(TGT, False)
    masks = dict(tgt_mask=ours.generate_square_subsequent_mask(TGT, dtype=torch.float64),
                 src_key_padding_mask=_padding(SRC), memory_key_padding_mask=_padding(SRC))  # fmt: skip
    _check_same(ours, theirs, lambda m: m(src, tgt, **masks), [src, tgt])


def test_encoder_eval_zeroes_padding_like_torchs_nested_fast_path():
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, 4, FF, batch_first=True, dtype=torch.float64)  # even heads
    theirs = _randomised(torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(D_MODEL, dtype=torch.float64)))
    ours = fastattn.TransformerEncoder(copy.deepcopy(layer), 2, norm=torch.nn.LayerNorm(D_MODEL, dtype=torch.float64))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert theirs.use_nested_tensor and all(type(m) is fastattn.TransformerEncoderLayer for m in ours.layers)
    ours.eval(), theirs.eval()
    src = _seq(SRC, True, requires_grad=False)
    padding = _padding(SRC)
    with torch.no_grad():
        out, expected = ours(src, src_key_padding_mask=padding), theirs(src, src_key_padding_mask=padding)
        assert_close(out, expected, atol=ATOL)  # padded rows included: norm(0) = its bias
        assert_close(ours(src), theirs(src), atol=ATOL)
        additive = torch.zeros(padding.shape, dtype=torch.float64).masked_fill(padding, float("-inf"))
        assert_close(ours(src, src_key_padding_mask=additive), expected, atol=ATOL)
        assert_close(theirs(src, src_key_padding_mask=additive), expected, atol=ATOL)
    ours.train(), theirs.train()
    for module in (ours, theirs):
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if isinstance(m, torch.nn.MultiheadAttention):
                m.dropout = 0.0
    assert_close(ours(src, src_key_padding_mask=padding), theirs(src, src_key_padding_mask=padding), atol=ATOL)


def test_torch_checkpoint_loads_strictly_and_convert_keeps_results():
    torch.manual_seed(1)
    theirs = torch.nn.Transformer(D_MODEL, NHEAD, 1, 1, FF, dropout=0.0, batch_first=True, dtype=torch.float64)
    ours = fastattn.Transformer(D_MODEL, NHEAD, 1, 1, FF, dropout=0.0, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    src, tgt = _seq(SRC, True, False), _seq(TGT, True, False)
    expected = theirs(src, tgt)
    assert_close(ours(src, tgt), expected, atol=ATOL)
    report = fastattn.convert(theirs)
    assert type(theirs) is fastattn.Transformer and not report.left
    assert_close(theirs(src, tgt), expected, atol=ATOL)


def test_dropout_runs_in_training_and_replays():
    layer = fastattn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=0.3, batch_first=True)
    src = torch.randn(2, SRC, D_MODEL)
    layer.eval()
    plain = layer(src)
    layer.train()
    torch.manual_seed(5)
    first = layer(src)
    torch.manual_seed(5)
    assert torch.equal(first, layer(src))
    assert not torch.allclose(first, plain)


def test_bad_input_raises_like_torch():
    kwargs = dict(d_model=D_MODEL, nhead=NHEAD, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=FF)
    ours, theirs = fastattn.Transformer(**kwargs), torch.nn.Transformer(**kwargs)
    calls = [
        lambda m: m(torch.randn(SRC, 2, D_MODEL), torch.randn(TGT, 3, D_MODEL)),  # batch sizes differ
        lambda m: m(torch.randn(SRC, 2, D_MODEL + 1), torch.randn(TGT, 2, D_MODEL + 1)),  # not d_model
        lambda m: m(torch.randn(SRC, 2, D_MODEL), torch.randn(TGT, 2, D_MODEL), src_mask=torch.zeros(3, 3)),
        lambda m: m.encoder(torch.randn(SRC, 2, D_MODEL), src_key_padding_mask=torch.zeros(2, SRC, dtype=torch.int)),
    ]
    for call in calls:
        with pytest.raises(Exception) as theirs_error:
            call(theirs)
        with pytest.raises(type(theirs_error.value)):
            call(ours)


def test_compile_fullgraph_training_step():
    torch._dynamo.reset()
    layer = fastattn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=0.1, batch_first=True, norm_first=True)
    src = torch.randn(2, SRC, D_MODEL, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(src).sum().backward()
    assert src.grad is not None and torch.isfinite(src.grad).all()
