"""Seq2SeqTransformer: matches its torch.nn twin (logits, gradients, generated tokens), and its KV-cached generate
gives the tokens of the uncached one while running each decoder layer on one new token per step."""

import pytest
import torch

import fastattn
from fastattn.models.seq2seq import Seq2SeqTransformer, TorchSeq2SeqTransformer
from fastattn.testing import assert_close

SRC_VOCAB, TGT_VOCAB, D_MODEL, NHEAD, FF, MAX_LEN = 50, 47, 32, 4, 48, 24
BATCH, SRC_LEN, TGT_LEN, NEW_TOKENS = 3, 9, 7, 12
PAD, BOS, EOS = 0, 1, 2
ATOL = 1e-10  # float64
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")),
]


def _models(norm_first=False, dtype=torch.float64, dropout=0.0, device="cpu", seed=0):
    """(ours, twin) with the same random parameters: torch's initialisation, then random biases and LayerNorm
    weights (1 +- 0.3), so that the norms differ and a swapped one shows, and embeddings scaled down to 0.2 so
    that the attention blocks (the memory too) weigh in the next token."""
    torch.manual_seed(seed)
    kwargs = dict(d_model=D_MODEL, nhead=NHEAD, dim_feedforward=FF, dropout=dropout, max_len=MAX_LEN,
                  pad_id=PAD, bos_id=BOS, eos_id=EOS, norm_first=norm_first)  # fmt: skip
    ours = Seq2SeqTransformer(SRC_VOCAB, TGT_VOCAB, **kwargs).to(device, dtype)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3)
            elif "norm" in name:
                p.copy_(1 + torch.randn_like(p) * 0.3)
            elif "embed" in name:
                p.mul_(0.2)
    twin = TorchSeq2SeqTransformer(SRC_VOCAB, TGT_VOCAB, **kwargs).to(device, dtype)
    twin.load_state_dict(ours.state_dict(), strict=True)
    return ours, twin


def _src(device="cpu", seed=1):
    """(BATCH, SRC_LEN) ids, right-padded: row 1 has 3 pads, row 2 has 5."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, SRC_VOCAB, (BATCH, SRC_LEN), generator=g)
    src[1, -3:] = PAD
    src[2, -5:] = PAD
    return src.to(device)


def _tgt(seed=2):
    """(BATCH, TGT_LEN) ids starting with BOS, row 0 right-padded by 2."""
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randint(3, TGT_VOCAB, (BATCH, TGT_LEN), generator=g)
    tgt[:, 0] = BOS
    tgt[0, -2:] = PAD
    return tgt


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("source", ["ours", "twin"], ids=["load_into_twin", "load_from_twin"])
def test_forward_and_gradients_match_twin(norm_first, mode, source):
    """Every position is compared, padding included: a padded target query still sees its earlier real tokens,
    and padded source positions are masked out of the cross-attention, so all logits are defined."""
    ours, twin = _models(norm_first)
    if source == "twin":  # the other direction of load_state_dict
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ours.load_state_dict(twin.state_dict(), strict=True)
    src, tgt = _src(), _tgt()
    weights = torch.randn(BATCH, TGT_LEN, TGT_VOCAB, dtype=torch.float64)
    results = []
    for model in (ours, twin):
        getattr(model, mode)()
        logits = model(src, tgt)
        grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
        with torch.no_grad():  # torch's eval fast path in the twin's encoder
            results.append((logits, grads, model(src, tgt)))
    (logits, grads, no_grad), (expected, expected_grads, expected_no_grad) = results
    assert logits.shape == (BATCH, TGT_LEN, TGT_VOCAB)
    assert_close(logits, expected, atol=ATOL)
    assert_close(no_grad, expected_no_grad, atol=ATOL, name="no_grad logits")
    names = [name for name, _ in ours.named_parameters()]
    for name, mine, true in zip(names, grads, expected_grads, strict=True):
        assert_close(mine, true, atol=ATOL, name=f"gradient of {name}")


def test_source_padding_and_causality():
    """Extra source padding changes nothing; changing later target tokens leaves earlier logits alone."""
    ours, _ = _models()
    ours.eval()
    src, tgt = _src(), _tgt()
    with torch.no_grad():
        logits = ours(src, tgt)
        padded = torch.cat([src, torch.full((BATCH, 4), PAD)], dim=1)
        assert_close(ours(padded, tgt), logits, atol=ATOL, name="logits with 4 more source pads")
        changed = tgt.clone()
        changed[:, 4:] = (tgt[:, 4:] + 5) % TGT_VOCAB
        assert_close(ours(src, changed)[:, :4], logits[:, :4], atol=ATOL, name="logits before the change")
    assert torch.equal(ours.generate(padded, 6), ours.generate(src, 6))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_cached_step_logits_match_decode(norm_first):
    """Teacher-forced through the KV-cached decoder one token at a time, each step's logits are decode()'s at
    that position (float64): the step function follows the layers exactly, norms and order included."""
    ours, _ = _models(norm_first)
    ours.eval()
    tokens = _tgt().masked_fill(_tgt() == PAD, 5)  # generated tokens are never padding
    with torch.no_grad():
        memory, memory_padding = ours.encode(_src())
        expected = ours.decode(tokens, memory, memory_padding)
        step = ours._cached_decoder(memory, memory_padding, TGT_LEN)
        for t in range(TGT_LEN):
            assert_close(step(tokens[:, : t + 1]), expected[:, t], atol=ATOL, name=f"logits at step {t}")


def _sampling(kind, device):
    if kind == "greedy":
        return {}
    return dict(temperature=0.7, top_k=5, generator=torch.Generator(device).manual_seed(123))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", ["greedy", "sample"])
def test_generate_cache_matches_no_cache_and_twin(kind, norm_first, dtype, device):
    ours, twin = _models(norm_first, dtype, device=device)
    src = _src(device)
    cached = ours.generate(src, NEW_TOKENS, **_sampling(kind, device))
    assert cached.dtype == torch.long and cached.shape == (BATCH, 1 + NEW_TOKENS)
    assert (cached[:, 0] == BOS).all()
    assert ((cached >= 0) & (cached < TGT_VOCAB)).all()
    uncached = ours.generate(src, NEW_TOKENS, use_cache=False, **_sampling(kind, device))
    assert torch.equal(cached, uncached), f"cached\n{cached}\nuncached\n{uncached}"
    theirs = twin.generate(src, NEW_TOKENS, **_sampling(kind, device))
    assert torch.equal(cached, theirs), f"ours\n{cached}\ntwin\n{theirs}"
    if kind == "sample":  # a different seed draws other tokens; greedy would give the same ones
        other = ours.generate(src, NEW_TOKENS, temperature=0.7, top_k=5,
                              generator=torch.Generator(device).manual_seed(7))  # fmt: skip
        assert not torch.equal(cached, other)


def test_greedy_picks_the_argmax_and_top_k_restricts_samples():
    """Greedy step 1 is the argmax of forward's logits for (bos); top_k=1 sampling is greedy; every sample with
    top_k=3 is among the 3 best logits at its step."""
    ours, _ = _models()
    ours.eval()
    src = _src()
    greedy = ours.generate(src, NEW_TOKENS)
    with torch.no_grad():
        first = ours(src, greedy[:, :1])[:, 0]
    assert torch.equal(greedy[:, 1], first.argmax(-1))
    top1 = ours.generate(src, NEW_TOKENS, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy)
    sample = ours.generate(src, NEW_TOKENS, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the logits each step sampled from (generated tokens are never padding)
        logits = ours.decode(sample[:, :-1], *ours.encode(src))
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == sample[:, 1:, None]).any(-1).all()


def test_cache_runs_attention_with_kvcache():
    ours, _ = _models(dtype=torch.float32)
    with fastattn.record() as calls:
        tokens = ours.generate(_src(), 5)
    ops = [call.op for call in calls]
    steps, layers = tokens.shape[1] - 1, len(ours.decoder.layers)
    assert ops.count("attention_kvcache") == steps * layers
    # Per step and layer: the self-attention in- and out-projections, the cross-attention query and out-projections
    # and the two feed-forward linears; then the LM head. All float32 on the CPU: the decode_linear kernel.
    linears = [call for call in calls if call.op == "decode_linear"]
    assert len(linears) == steps * (6 * layers + 1) and {call.backend for call in linears} == {"cpu"}
    with fastattn.record() as calls:
        ours.generate(_src(), 5, use_cache=False)
    assert "attention_kvcache" not in [call.op for call in calls]


@pytest.mark.parametrize("use_cache", [True, False])
def test_cached_generate_does_less_work(use_cache):
    """Count the token rows each decoder layer's feed-forward sees: one per row and step with the cache, the whole
    prefix (1 + 2 + ... + steps) without; and the cached path never calls a decoder layer's forward."""
    ours, _ = _models()
    counts = {"rows": 0, "layer calls": 0}

    def count_rows(module, args, out):
        counts["rows"] += out[..., 0].numel()

    def count_call(*_):
        counts["layer calls"] += 1

    hooks = [layer.linear1.register_forward_hook(count_rows) for layer in ours.decoder.layers]
    hooks += [layer.register_forward_hook(count_call) for layer in ours.decoder.layers]
    tokens = ours.generate(_src(), 8, use_cache=use_cache)
    for hook in hooks:
        hook.remove()
    steps, layers = tokens.shape[1] - 1, len(ours.decoder.layers)
    prefix_rows = steps if use_cache else steps * (steps + 1) // 2
    assert counts["rows"] == BATCH * prefix_rows * layers
    assert counts["layer calls"] == (0 if use_cache else steps * layers)


def _cut_at_eos(tokens, eos):
    """What generate must return for eos_id = eos, given the tokens it generated with no eos: each row up to its
    first eos, then PAD, ending at the last row's eos (or at full length if some row never emits it)."""
    out = tokens.clone()
    ends = []
    for row in out:
        hits = (row[1:] == eos).nonzero()
        end = 1 + int(hits[0]) if len(hits) else row.numel() - 1
        row[end + 1 :] = PAD
        ends.append(end)
    return out[:, : max(ends) + 1]


@pytest.mark.parametrize("kind", ["greedy", "sample"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_and_pads(kind, use_cache):
    ours, _ = _models()
    src = _src()
    free = ours.generate(src, 16, use_cache=use_cache, **_sampling(kind, "cpu"))  # EOS never appears here
    assert not (free[:, 1:] == EOS).any()
    # A token every row emits, first at different steps, made the eos: rows finish apart, and all finish early.
    firsts = {}
    for token in free[0, 1:].unique().tolist():
        steps = [int((row[1:] == token).nonzero()[0]) if (row[1:] == token).any() else None for row in free]
        if None not in steps and len(set(steps)) > 1:
            firsts[token] = steps
    assert firsts, f"no token is emitted by every row at different steps in\n{free}"
    eos = min(firsts, key=lambda token: max(firsts[token]))
    ours.eos_id = eos
    stopped = ours.generate(src, 16, use_cache=use_cache, **_sampling(kind, "cpu"))
    expected = _cut_at_eos(free, eos)
    assert expected.shape[1] < free.shape[1]
    assert torch.equal(stopped, expected), f"got\n{stopped}\nexpected\n{expected}"


def test_generate_restores_modes_and_uses_eval():
    """Dropout 0.5 in train mode: generate's tokens are those of eval mode, and each module's mode comes back."""
    ours, twin = _models(dropout=0.5)
    ours.train()
    ours.decoder.layers[1].eval()  # a mixed state, restored as it was
    tokens = ours.generate(_src(), 6)
    assert ours.training and ours.decoder.layers[0].training and not ours.decoder.layers[1].training
    assert torch.is_grad_enabled()
    twin.eval()
    assert torch.equal(tokens, twin.generate(_src(), 6))


@pytest.mark.parametrize("cls", [Seq2SeqTransformer, TorchSeq2SeqTransformer], ids=["ours", "twin"])
def test_bad_inputs_raise(cls):
    model = cls(SRC_VOCAB, TGT_VOCAB, d_model=D_MODEL, nhead=NHEAD, max_len=MAX_LEN)
    src, tgt = _src(), _tgt()
    with pytest.raises(TypeError, match="src must be an int64"):
        model(src.float(), tgt)
    with pytest.raises(TypeError, match="src must be an int64"):
        model.generate(src.float(), 3)
    with pytest.raises(IndexError, match=rf"src holds id {SRC_VOCAB}, outside \[0, {SRC_VOCAB}\)"):
        model(src.masked_fill(src == src[0, 0], SRC_VOCAB), tgt)
    with pytest.raises(IndexError, match=rf"tgt holds id -1, outside \[0, {TGT_VOCAB}\)"):
        model(src, tgt.masked_fill(tgt == BOS, -1))
    with pytest.raises(ValueError, match="src must be \\(batch, seq\\)"):
        model(src[0], tgt)
    with pytest.raises(ValueError, match=f"seq <= max_len={MAX_LEN}"):
        model(torch.ones(BATCH, MAX_LEN + 1, dtype=torch.long), tgt)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(src[:2], tgt)
    with pytest.raises(ValueError, match=f"1 \\+ max_new_tokens = {MAX_LEN + 1} tokens exceed max_len={MAX_LEN}"):
        model.generate(src, MAX_LEN)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        model.generate(src, -1)
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        model.generate(src, 3, temperature=-0.5)
    with pytest.raises(ValueError, match="top_k must be None or an int >= 1"):
        model.generate(src, 3, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match=f"eos_id must be an int in \\[0, {TGT_VOCAB}\\)"):
        cls(SRC_VOCAB, TGT_VOCAB, eos_id=TGT_VOCAB)
    assert model.generate(src, MAX_LEN - 1).shape[1] <= MAX_LEN  # the longest allowed


def test_compile_fullgraph_training_step():
    """torch.compile traces forward and backward whole: the token-range check does not read values there."""
    torch._dynamo.reset()
    ours, _ = _models(dtype=torch.float32, dropout=0.1)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    src, tgt = _src(), _tgt()
    torch.manual_seed(0)
    loss = compiled(src, tgt).square().mean()
    (grad,) = torch.autograd.grad(loss, [ours.lm_head.weight])
    torch.manual_seed(0)
    (expected,) = torch.autograd.grad(ours(src, tgt).square().mean(), [ours.lm_head.weight])
    assert_close(grad, expected, atol=1e-6)
