"""BertMLM (fastattn kernels) against TorchBertMLM, its pure torch.nn twin."""

import pytest
import torch

import fastattn
from fastattn.models.bert import BertMLM, TorchBertMLM
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

VOCAB, HIDDEN, HEADS, INTERMEDIATE, MAX_POSITIONS, TYPES = 53, 24, 3, 40, 16, 3  # head dim 8, odd vocab
BATCH, SEQ = 3, 11
ATOL = 1e-10  # float64


def _build(cls, seed, dtype=torch.float64, **config):
    torch.manual_seed(seed)
    kwargs = dict(hidden=HIDDEN, heads=HEADS, layers=2, intermediate=INTERMEDIATE, max_positions=MAX_POSITIONS,
                  type_vocab_size=TYPES, dropout=0.0)  # fmt: skip
    return cls(VOCAB, **{**kwargs, **config}).to(dtype)


def _randomised(model):
    """Parameters of order 0.3 instead of BERT's 0.02, so that every path moves the outputs measurably."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def _pair(direction, dtype=torch.float64, **config):
    """(ours, twin) with the same random parameters, copied by load_state_dict(strict=True) in the given direction."""
    if direction == "ours_to_twin":
        ours, twin = _randomised(_build(BertMLM, 0, dtype, **config)), _build(TorchBertMLM, 1, dtype, **config)
        twin.load_state_dict(ours.state_dict(), strict=True)
    else:
        ours, twin = _build(BertMLM, 1, dtype, **config), _randomised(_build(TorchBertMLM, 0, dtype, **config))
        ours.load_state_dict(twin.state_dict(), strict=True)
    return ours, twin


def _inputs():
    """input_ids, token_type_ids, attention_mask (right padding in row 1, left padding in row 2) and labels
    (-100 on most positions and on every padded one)."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    token_type_ids = torch.randint(0, TYPES, (BATCH, SEQ), generator=generator)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -4:] = 0
    attention_mask[2, :3] = 0
    input_ids[attention_mask == 0] = 0  # the pad id
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels[(torch.rand(BATCH, SEQ, generator=generator) < 0.6) | (attention_mask == 0)] = -100
    return input_ids, token_type_ids, attention_mask, labels


def _loss_logits_and_grads(model, inputs, with_labels=True):
    """(loss or None, logits, {parameter name: gradient}) of loss + <logits, fixed cotangent>."""
    input_ids, token_type_ids, attention_mask, labels = inputs
    if with_labels:
        loss, logits = model(input_ids, token_type_ids, attention_mask, labels)
    else:
        loss, logits = None, model(input_ids, token_type_ids, attention_mask)
    cotangent = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7)).to(logits)
    objective = (logits * cotangent).sum() + (0.0 if loss is None else loss)
    names, params = zip(*model.named_parameters(), strict=True)  # the tied decoder weight counted once
    return loss, logits, dict(zip(names, torch.autograd.grad(objective, params), strict=True))


def _assert_same(ours, twin, inputs, with_labels=True):
    loss, logits, grads = _loss_logits_and_grads(ours, inputs, with_labels)
    expected_loss, expected_logits, expected_grads = _loss_logits_and_grads(twin, inputs, with_labels)
    assert_close(logits, expected_logits, atol=ATOL, name="logits")
    if with_labels:
        assert_close(loss, expected_loss, atol=ATOL, name="loss")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], atol=ATOL, name=f"gradient of {name}")


def test_same_seed_gives_the_same_parameters_keys_and_tied_decoder():
    ours, twin = _build(BertMLM, 3, torch.float32), _build(TorchBertMLM, 3, torch.float32)
    ours_state, twin_state = ours.state_dict(), twin.state_dict()
    assert list(ours_state) == list(twin_state)
    for key, value in twin_state.items():
        assert torch.equal(ours_state[key], value), key
    for model in (ours, twin):
        model.double()  # a dtype change keeps the tie
        word = model.embeddings.word_embeddings.weight
        assert model.head.decoder.weight is word and word.dtype == torch.float64
        assert not word[0].any() and not model.head.decoder.bias.any()  # the pad row and the bias start at 0
        assert 0.015 < word[1:].std().item() < 0.025  # BERT's N(0, 0.02)


@pytest.mark.parametrize("direction", ["ours_to_twin", "twin_to_ours"])
def test_matches_twin_in_eval_and_train(direction):
    ours, twin = _pair(direction)
    inputs = _inputs()
    input_ids, token_type_ids, attention_mask, _ = inputs
    for mode in (False, True):  # dropout 0: train differs from eval only in which torch code paths run
        ours.train(mode), twin.train(mode)
        _assert_same(ours, twin, inputs)
        _assert_same(ours, twin, (input_ids, None, None, None), with_labels=False)  # default segments, no mask
        with torch.no_grad():  # the twin's eval layers take torch's fused fast path here
            assert_close(ours(*inputs[:3]), twin(*inputs[:3]), atol=ATOL, name="logits under no_grad")


def _hugging_face_state(state, layers):
    """Our state_dict under Hugging Face's BertForMaskedLM names (the in-projection split into query, key, value)."""
    modules = {"embeddings.word_embeddings": "bert.embeddings.word_embeddings",
               "embeddings.position_embeddings": "bert.embeddings.position_embeddings",
               "embeddings.token_type_embeddings": "bert.embeddings.token_type_embeddings",
               "embeddings.norm": "bert.embeddings.LayerNorm", "head.dense": "cls.predictions.transform.dense",
               "head.norm": "cls.predictions.transform.LayerNorm",
               "head.decoder": "cls.predictions.decoder"}  # fmt: skip
    for i in range(layers):
        ours, theirs = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        modules.update({ours + "self_attn.out_proj": theirs + "attention.output.dense",
                        ours + "norm1": theirs + "attention.output.LayerNorm",
                        ours + "linear1": theirs + "intermediate.dense", ours + "linear2": theirs + "output.dense",
                        ours + "norm2": theirs + "output.LayerNorm"})  # fmt: skip
    hf = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        if module in modules:
            hf[f"{modules[module]}.{kind}"] = value
        else:  # encoder.layers.{i}.self_attn.in_proj_{weight,bias}
            layer = module.removeprefix("encoder.layers.").removesuffix(".self_attn")
            for name, part in zip(("query", "key", "value"), value.chunk(3), strict=True):
                hf[f"bert.encoder.layer.{layer}.attention.self.{name}.{kind.removeprefix('in_proj_')}"] = part
    hf["cls.predictions.bias"] = state["head.decoder.bias"]
    return hf


def test_matches_hugging_face_bert_for_masked_lm():
    """An independent reference for the architecture: transformers' BertForMaskedLM with our weights."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    ours, _ = _pair("ours_to_twin")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                     num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                                     max_position_embeddings=MAX_POSITIONS, type_vocab_size=TYPES,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
                                     layer_norm_eps=1e-12, hidden_act="gelu", attn_implementation="eager")  # fmt: skip
    theirs = transformers.BertForMaskedLM(config).double().eval()
    theirs.load_state_dict(_hugging_face_state(ours.state_dict(), 2), strict=True)
    ours.eval()
    input_ids, token_type_ids, attention_mask, labels = _inputs()
    with torch.no_grad():
        loss, logits = ours(input_ids, token_type_ids, attention_mask, labels)
        expected = theirs(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                          labels=labels)  # fmt: skip
    assert_close(logits, expected.logits, atol=ATOL, name="logits")
    assert_close(loss, expected.loss, atol=ATOL, name="loss")


def test_loaded_state_dict_keeps_the_tie():
    """Loading fills the shared word embedding / decoder weight; both keys are in the state_dict with equal values."""
    ours, twin = _pair("twin_to_ours")
    state = ours.state_dict()
    assert torch.equal(state["head.decoder.weight"], twin.embeddings.word_embeddings.weight)
    assert ours.head.decoder.weight is ours.embeddings.word_embeddings.weight


def test_loss_is_the_mean_cross_entropy_over_labelled_positions():
    ours, _ = _pair("ours_to_twin")
    input_ids, token_type_ids, attention_mask, labels = _inputs()
    loss, logits = ours(input_ids, token_type_ids, attention_mask, labels)
    labelled = labels != -100
    expected = -logits[labelled].log_softmax(-1).gather(-1, labels[labelled][:, None]).mean()
    assert_close(loss, expected, atol=ATOL, name="loss")
    all_ignored = torch.full_like(labels, -100)
    assert torch.isnan(ours(input_ids, labels=all_ignored)[0])  # as torch's cross_entropy: 0 / 0


@pytest.mark.parametrize("labelled", ["one", "most"])
def test_loss_gradients_match_the_twin_with_few_or_most_positions_labelled(labelled):
    """The loss decodes the labelled rows again when they are at most half of all (its backward then takes them
    alone), else uses every row's logits: both give the twin's loss and gradients."""
    ours, twin = _pair("ours_to_twin")
    input_ids, token_type_ids, attention_mask, labels = _inputs()
    if labelled == "one":
        labels = torch.full_like(labels, -100)
        labels[0, 1] = 7
    else:
        labels = torch.randint(0, VOCAB, labels.shape, generator=torch.Generator().manual_seed(5))
        labels[attention_mask == 0] = -100
        assert (labels != -100).float().mean() > 0.5
    ours.train(), twin.train()
    _assert_same(ours, twin, (input_ids, token_type_ids, attention_mask, labels))


def test_padded_tokens_do_not_reach_real_positions():
    ours, _ = _pair("ours_to_twin")
    input_ids, token_type_ids, attention_mask, _ = _inputs()
    changed = input_ids.masked_fill(attention_mask == 0, 7)
    real = attention_mask == 1
    with torch.no_grad():
        logits = ours(input_ids, token_type_ids, attention_mask)
        assert_close(ours(changed, token_type_ids, attention_mask)[real], logits[real], atol=ATOL)
        assert not torch.allclose(ours(changed, token_type_ids)[real], ours(input_ids, token_type_ids)[real])
        assert_close(ours(input_ids, token_type_ids, torch.ones_like(attention_mask)), ours(input_ids, token_type_ids),
                     atol=ATOL)  # fmt: skip


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
LOW_PRECISION = [
    pytest.param("cpu", torch.float32, id="cpu-float32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float32, marks=NEEDS_GPU, id="cuda-float32"),
    pytest.param("cuda", torch.bfloat16, marks=NEEDS_GPU, id="cuda-bfloat16"),
]


@pytest.mark.parametrize("device, dtype", LOW_PRECISION)
def test_low_precision_within_the_error_ratio_of_torch(device, dtype):
    """Against the float64 twin on the CPU, ours may err at most twice (gradients: three times) as much as the
    twin in the same dtype and device. bfloat16 compares the logits and the loss only."""
    ours, twin = (model.to(device) for model in _pair("ours_to_twin", dtype))
    truth_model = _build(TorchBertMLM, 9)
    truth_model.load_state_dict(ours.state_dict())  # the rounded values, held in float64
    inputs = _inputs()
    truth_loss, truth_logits, truth_grads = _loss_logits_and_grads(truth_model, inputs)
    inputs = tuple(t.to(device) for t in inputs)
    loss, logits, grads = _loss_logits_and_grads(ours, inputs)
    baseline_loss, baseline_logits, baseline_grads = _loss_logits_and_grads(twin, inputs)
    assert logits.dtype == dtype
    assert_error_ratio(logits.cpu(), truth_logits, baseline_logits.cpu(), name="logits")
    assert_error_ratio(loss.cpu(), truth_loss, baseline_loss.cpu(), name="loss")
    if dtype == torch.float32:
        for name, grad in grads.items():
            assert_error_ratio(grad.cpu(), truth_grads[name], baseline_grads[name].cpu(), ratio=GRADIENT_RATIO,
                               name=name)  # fmt: skip


def test_dropout_changes_training_outputs_and_replays_under_manual_seed():
    model = _build(BertMLM, 0, dropout=0.3)
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.dropout for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert set(rates) == {0.3} and len(rates) == 1 + 2 * 4  # embeddings; per layer attention + 3 in the layer
    input_ids, token_type_ids, attention_mask, _ = _inputs()
    model.eval()
    plain = model(input_ids, token_type_ids, attention_mask)
    model.train()
    torch.manual_seed(5)
    first = model(input_ids, token_type_ids, attention_mask)
    torch.manual_seed(5)
    assert torch.equal(model(input_ids, token_type_ids, attention_mask), first)
    assert not torch.allclose(first, plain)


def test_embedding_dropout_follows_the_layer_norm():
    """Training zeroes about p of the normalised embeddings and scales the rest by 1 / (1 - p)."""
    model = _build(BertMLM, 0, dropout=0.3)
    input_ids, token_type_ids, _, _ = _inputs()
    plain = model.embeddings.eval()(input_ids, token_type_ids)
    dropped = model.embeddings.train()(input_ids, token_type_ids)
    kept = dropped != 0
    assert 0.2 < 1 - kept.double().mean().item() < 0.4
    assert_close(dropped, torch.where(kept, plain / 0.7, 0.0), atol=ATOL)


def test_fastattn_kernels_run_forward_and_backward():
    ours, _ = _pair("ours_to_twin")
    ours.train()
    input_ids, token_type_ids, attention_mask, labels = _inputs()
    with fastattn.record() as calls:
        ours(input_ids, token_type_ids, attention_mask, labels)[0].backward()
    ops = {c.op for c in calls}
    expected = {"embedding_with_positions", "embedding_scatter", "norm", "norm_backward", "attention",
                "attention_backward", "softmax", "softmax_backward"}  # fmt: skip
    assert expected <= ops, expected - ops
    assert {c.backend for c in calls} <= set(fastattn.backends.BACKENDS), "something ran outside fastattn"


def test_compile_fullgraph_training_step_matches_eager():
    """No graph break with dropout on, and the compiled step draws the same dropout as eager under one seed."""
    torch._dynamo.reset()
    model = _build(BertMLM, 0, torch.float32, dropout=0.1, layers=1).train()
    input_ids, token_type_ids, attention_mask, labels = _inputs()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for run in (compiled, model):
        torch.manual_seed(1)
        loss, _ = run(input_ids, token_type_ids, attention_mask, labels)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (loss, grads), (expected, expected_grads) = results
    assert_close(loss, expected, atol=1e-6, name="loss")
    for i, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
        assert_close(grad, expected_grad, atol=1e-6, name=f"gradient {i}")


def _with(inputs, **changes):
    names = ("input_ids", "token_type_ids", "attention_mask", "labels")
    return {**dict(zip(names, inputs, strict=True)), **changes}


BAD_INPUTS = [
    (r"input_ids holds 53, outside \[0, vocab_size=53\)", IndexError,
     lambda i: _with(i, input_ids=i[0].masked_fill(i[0] == i[0][0, 0], VOCAB))),
    ("input_ids holds -1", IndexError, lambda i: _with(i, input_ids=i[0] - 1)),
    (r"token_type_ids holds 3, outside \[0, type_vocab_size=3\)", IndexError,
     lambda i: _with(i, token_type_ids=i[1] + 1)),
    (r"labels holds 53, outside \[0, vocab_size=53\) or -100", IndexError,
     lambda i: _with(i, labels=i[3].masked_fill(i[3] >= 0, VOCAB))),
    ("input_ids must be an int32 or int64", TypeError, lambda i: _with(i, input_ids=i[0].double())),
    (r"input_ids must be \(batch, seq\)", ValueError, lambda i: _with(i, input_ids=i[0][0])),
    ("max_positions=16", ValueError, lambda i: _with(i, input_ids=i[0].repeat(1, 2), token_type_ids=None,
                                                     attention_mask=None, labels=None)),
    (r"attention_mask must have input_ids' shape \(3, 11\)", ValueError,
     lambda i: _with(i, attention_mask=i[2][:, 1:])),
    ("token_type_ids must have input_ids' shape", ValueError, lambda i: _with(i, token_type_ids=i[1][:2])),
    ("labels must be a Tensor of dtype int64", TypeError, lambda i: _with(i, labels=i[3].int())),
]  # fmt: skip


@pytest.mark.parametrize("match, error, change", BAD_INPUTS, ids=[b[0].split(" ")[0] + str(i)
                                                                   for i, b in enumerate(BAD_INPUTS)])  # fmt: skip
def test_bad_input_raises_naming_the_argument(match, error, change):
    model = _build(BertMLM, 0)
    with pytest.raises(error, match=match):
        model(**change(_inputs()))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(heads=5), "divisible by heads"), (dict(dropout=-0.1), "dropout"), (dict(pad_id=VOCAB), "pad_id"),
     (dict(type_vocab_size=0), "type_vocab_size")],
)  # fmt: skip
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BertMLM(VOCAB, hidden=HIDDEN, **{"heads": HEADS, **kwargs})
