"""fastattn.MultiheadAttention is a drop-in for torch.nn.MultiheadAttention."""

import pytest
import torch

import fastattn
from fastattn.testing import assert_close

EMBED, HEADS = 40, 5  # head dim 8
SEQ_Q, SEQ_K, BATCH = 7, 13, 3

CONFIGS = [
    dict(),
    dict(batch_first=True),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, batch_first=True),
    dict(add_bias_kv=True, add_zero_attn=True),
    dict(kdim=24, vdim=16),
    dict(kdim=24, vdim=16, batch_first=True, bias=False),
]


def _pair(config, dtype=torch.float64, **kwargs):
    """(ours, torch's) with the same random parameters (biases too, which torch initialises to 0)."""
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, dtype=dtype, **config, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = fastattn.MultiheadAttention(EMBED, HEADS, dtype=dtype, **config, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _inputs(config, kind, batched=True, dtype=torch.float64, seq_k=SEQ_K):
    """(query, key, value) for 'self' (one tensor), 'cross' (key is value) or 'distinct' attention."""
    kdim, vdim = config.get("kdim", EMBED), config.get("vdim", EMBED)
    lead = (BATCH,) if batched else ()

    def make(seq, dim):
        shape = (*lead, seq, dim) if config.get("batch_first") or not batched else (seq, *lead, dim)
        return torch.randn(shape, dtype=dtype, requires_grad=True)

    query = make(SEQ_Q, EMBED)
    if kind == "self" and kdim == vdim == EMBED:
        return query, query, query
    key = make(seq_k, kdim)
    return query, key, (key if kind == "cross" and kdim == vdim else make(seq_k, vdim))


def _masks(kind, dtype=torch.float64, seq_q=SEQ_Q, seq_k=SEQ_K):
    """attn_mask and key_padding_mask of a kind; no query loses every key (torch would give NaN there)."""
    g = torch.Generator().manual_seed(1)
    blocked = torch.rand(seq_q, seq_k, generator=g) < 0.3
    blocked[:, 0] = False
    padding = torch.zeros(BATCH, seq_k, dtype=torch.bool)
    padding[1, -4:] = True
    padding[2, -1] = True
    if kind == "none":
        return {}
    if kind == "bool":
        return dict(attn_mask=blocked)
    if kind == "float":
        return dict(attn_mask=torch.randn(seq_q, seq_k, generator=g, dtype=dtype))
    if kind == "3d":
        return dict(attn_mask=torch.rand(BATCH * HEADS, seq_q, seq_k, generator=g) < 0.3 * (torch.arange(seq_k) > 0))
    if kind == "padding":
        return dict(key_padding_mask=padding)
    if kind == "float-padding":
        return dict(key_padding_mask=torch.zeros(BATCH, seq_k, dtype=dtype).masked_fill(padding, float("-inf")))
    if kind == "bool+padding":
        return dict(attn_mask=blocked, key_padding_mask=padding)
    if kind == "float+padding":
        return dict(attn_mask=torch.randn(seq_q, seq_k, generator=g, dtype=dtype), key_padding_mask=padding)
    raise ValueError(kind)


def _outputs_and_grads(module, inputs, **kwargs):
    out, weights = module(*inputs, **kwargs)
    leaves = [t for t in dict.fromkeys(inputs)] + list(module.parameters())
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return out, weights, grads


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("kind", ["self", "cross", "distinct"])
def test_matches_torch(config, kind):
    ours, theirs = _pair(config)
    inputs = _inputs(config, kind)
    masks = _masks("bool+padding", seq_k=inputs[1].shape[1 if config.get("batch_first") else 0])
    with fastattn.record() as calls:
        out, weights, grads = _outputs_and_grads(ours, inputs, need_weights=False, **masks)
    assert {c.op for c in calls} == {"attention", "attention_backward"}
    expected, _, expected_grads = _outputs_and_grads(theirs, inputs, need_weights=False, **masks)
    assert weights is None
    assert out.shape == expected.shape
    assert_close(out, expected, atol=1e-10)
    for i, (mine, true) in enumerate(zip(grads, expected_grads, strict=True)):
        assert_close(mine, true, atol=1e-10, name=f"gradient {i}")


@pytest.mark.parametrize(
    "masks", ["none", "bool", "float", "3d", "padding", "float-padding", "bool+padding", "float+padding"]
)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_masks_match_torch(masks, batch_first):
    config = dict(batch_first=batch_first, add_bias_kv=masks == "3d")
    ours, theirs = _pair(config)
    inputs = _inputs(config, "self", seq_k=SEQ_Q)
    kwargs = _masks(masks, seq_k=SEQ_Q)
    assert_close(ours(*inputs, need_weights=False, **kwargs)[0], theirs(*inputs, need_weights=False, **kwargs)[0],
                 atol=1e-10)  # fmt: skip


def test_causal_hint_matches_the_causal_mask():
    ours, theirs = _pair(dict(batch_first=True))
    x = torch.randn(BATCH, SEQ_Q, EMBED, dtype=torch.float64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(SEQ_Q, dtype=torch.float64)
    padding = _masks("padding", seq_k=SEQ_Q)["key_padding_mask"]
    for kwargs in (dict(), dict(key_padding_mask=padding)):
        expected = theirs(x, x, x, attn_mask=causal, need_weights=False, **kwargs)[0]
        with fastattn.record() as calls:
            out = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=False, **kwargs)[0]
        assert_close(out, expected, atol=1e-10)
        assert [c.op for c in calls] == ["attention"]


def test_unbatched_input():
    for config in (dict(), dict(batch_first=True), dict(kdim=24, vdim=16)):
        ours, theirs = _pair(config)
        inputs = _inputs(config, "distinct", batched=False)
        padding = torch.zeros(SEQ_K, dtype=torch.bool)
        padding[-3:] = True
        out, _ = ours(*inputs, key_padding_mask=padding, need_weights=False)
        expected, _ = theirs(*inputs, key_padding_mask=padding, need_weights=False)
        assert out.shape == (SEQ_Q, EMBED)
        assert_close(out, expected, atol=1e-10)


def test_need_weights_runs_torch_and_says_so():
    ours, theirs = _pair(dict(batch_first=True))
    inputs = _inputs(dict(batch_first=True), "self")
    for average in (True, False):
        with fastattn.record() as calls:
            out, weights = ours(*inputs, average_attn_weights=average, **_masks("padding", seq_k=SEQ_Q))
        expected, expected_weights = theirs(*inputs, average_attn_weights=average, **_masks("padding", seq_k=SEQ_Q))
        assert_close(out, expected, atol=1e-12)
        assert_close(weights, expected_weights, atol=1e-12)
        assert [(c.op, c.backend) for c in calls] == [("multihead_attention", "torch.nn")]
        assert "need_weights" in calls[0].skipped["fastattn"]


def test_fully_masked_query_gives_the_bias_like_torch():
    ours, theirs = _pair(dict(batch_first=True))
    x = torch.randn(1, 4, EMBED, dtype=torch.float64)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2] = True  # query 2 may see no key
    out, _ = ours(x, x, x, attn_mask=mask, need_weights=False)
    assert_close(out[0, 2], ours.out_proj.bias.detach(), atol=1e-12)
    assert_close(out, theirs(x, x, x, attn_mask=mask, need_weights=False)[0], atol=1e-10)


def test_state_dict_and_initialisation_are_torchs():
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, add_bias_kv=True, kdim=24, vdim=16)
    torch.manual_seed(0)
    ours = fastattn.MultiheadAttention(EMBED, HEADS, add_bias_kv=True, kdim=24, vdim=16)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert repr(ours) == repr(theirs).replace("torch.nn", "fastattn")


def test_from_torch_shares_parameters():
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=True, dtype=torch.float64)
    ours = fastattn.MultiheadAttention.from_torch(theirs)
    assert ours.in_proj_weight is theirs.in_proj_weight
    x = torch.randn(2, 5, EMBED, dtype=torch.float64)
    assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0], atol=1e-12)


def test_dropout_in_training_only_and_replayable():
    ours, _ = _pair(dict(batch_first=True, dropout=0.5))
    x = torch.randn(2, 16, EMBED, dtype=torch.float64)
    ours.eval()
    plain = ours(x, x, x, need_weights=False)[0]
    ours.train()
    torch.manual_seed(3)
    first = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(3)
    assert torch.equal(first, ours(x, x, x, need_weights=False)[0])
    assert not torch.allclose(first, plain)
    ours.dropout = 0.0
    assert_close(ours(x, x, x, need_weights=False)[0], plain, atol=1e-12)


def test_dropout_gradient_replays_the_mask():
    ours, _ = _pair(dict(batch_first=True, dropout=0.3))
    ours.train()
    x = torch.randn(1, 5, EMBED, dtype=torch.float64, requires_grad=True)

    def f(t):
        torch.manual_seed(4)
        return ours(t, t, t, need_weights=False)[0]

    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)


def test_each_backend(backend_device):
    """The module on every kernel backend, float32, against torch's module."""
    _, device = backend_device
    ours, theirs = _pair(dict(batch_first=True), dtype=torch.float32, device=device)
    x = torch.randn(2, 9, EMBED, device=device)
    padding = torch.zeros(2, 9, dtype=torch.bool, device=device)
    padding[1, 6:] = True
    out = ours(x, x, x, key_padding_mask=padding, need_weights=False)[0]
    expected = theirs(x, x, x, key_padding_mask=padding, need_weights=False)[0]
    assert_close(out, expected, atol=1e-5)


def test_compile_fullgraph_with_dropout():
    torch._dynamo.reset()
    ours, _ = _pair(dict(batch_first=True, dropout=0.2), dtype=torch.float32)
    x = torch.randn(2, 6, EMBED)
    f = lambda t: ours(t, t, t, need_weights=False)[0]  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    out = compiled(x)
    torch.manual_seed(0)
    assert_close(out, f(x), atol=1e-6)


BAD = [
    ("wrong embed dim", lambda m, x: m(x[..., :-1], x[..., :-1], x[..., :-1], need_weights=False)),
    ("4-D query", lambda m, x: m(x[None], x[None], x[None], need_weights=False)),
    ("2-D mask shape", lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.bool), need_weights=False)),
    ("3-D mask shape", lambda m, x: m(x, x, x, attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool), need_weights=False)),
    ("padding shape", lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool),
                                     need_weights=False)),
    ("int mask", lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64), need_weights=False)),
    ("causal without mask", lambda m, x: m(x, x, x, is_causal=True, need_weights=False)),
]  # fmt: skip


@pytest.mark.parametrize("call", [c for _, c in BAD], ids=[name for name, _ in BAD])
def test_bad_input_raises_like_torch(call):
    ours, theirs = _pair(dict(batch_first=True))
    x = torch.randn(2, 5, EMBED, dtype=torch.float64)
    with pytest.raises(Exception) as theirs_error:
        call(theirs, x)
    with pytest.raises(type(theirs_error.value)):
        call(ours, x)
