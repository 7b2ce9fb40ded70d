"""fastattn.integrations.huggingface: a transformers BERT patched onto fastattn matches the unpatched model.

Small randomly initialised models (no download); the unpatched model (transformers' default "sdpa") is the
reference: float64 outputs and gradients equal to rounding; on every backend, float32 by the error-ratio rule
(the unpatched float32 model's error against its float64 copy, times 2 for outputs and 3 for gradients).
"""

import copy
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers installed")

import fastattn  # noqa: E402
from fastattn.integrations.huggingface import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    fastattn_attention,
    patch_bert,
    patch_report,
    register,
    unpatch_bert,
)
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio, floor, max_error  # noqa: E402

VOCAB = 97
LAYERS = 2
FLOAT64_ATOL = 1e-10  # float64 differs from the torch model by summation order only (about 1e-15)
# The KV cache's argument and output field: transformers 5.2x renamed past_key_values to cache.
CACHE = "cache" if "cache" in inspect.signature(transformers.BertLMHeadModel.forward).parameters else "past_key_values"


def _config(**overrides):
    settings = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=80,
        max_position_embeddings=32, initializer_range=0.2,  # sharp attention, so a wrong mask shows
    )  # fmt: skip
    return transformers.BertConfig(**{**settings, **overrides})


def _pair(model_class, **overrides):
    """(patched, unpatched) float64 copies of one randomly initialised model, in eval mode."""
    torch.manual_seed(0)
    theirs = model_class(_config(**overrides)).double().eval()
    return patch_bert(copy.deepcopy(theirs)), theirs


def _triple(model_class, device, **overrides):
    """(patched float32, unpatched float64 = the truth, unpatched float32 = the baseline) copies of one model."""
    torch.manual_seed(0)
    truth = model_class(_config(**overrides)).double().eval().to(device)
    baseline = copy.deepcopy(truth).float()
    return patch_bert(copy.deepcopy(baseline)), truth, baseline


def _batch(batch: int, seq: int, padded: bool, left: bool = False):
    """Token ids (batch, seq) and an attention mask (1 = token, 0 = padding): rows after the first padded on the
    right (or left) by 3, 5, ... tokens."""
    generator = torch.Generator().manual_seed(seq)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        for row in range(1, batch):
            mask[row, seq - 2 * row - 1 :] = 0
        mask = mask.flip(1) if left else mask
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _mlm_labels(ids, mask):
    """Labels for some tokens, -100 (ignored) elsewhere and on padding."""
    labels = ids.clone()
    labels[:, ::2] = -100
    return labels.masked_fill(mask == 0, -100)


def _run(model, **inputs):
    """(output, {parameter name: gradient}) of one forward and backward of the loss."""
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    return output, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_run(ours, theirs):
    """float64 runs equal to rounding."""
    (out, grads), (ref_out, ref_grads) = ours, theirs
    assert_close(out.logits, ref_out.logits, atol=FLOAT64_ATOL, name="logits")
    assert_close(out.loss, ref_out.loss, atol=FLOAT64_ATOL, name="loss")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], atol=FLOAT64_ATOL, name=f"grad of {name}")


def _assert_error_ratio_run(ours, truth, baseline):
    """A float32 run within the error-ratio rule of the unpatched float32 run, against the float64 truth."""
    (out, grads), (ref_out, ref_grads), (base_out, base_grads) = ours, truth, baseline
    assert_error_ratio(out.logits, ref_out.logits, base_out.logits, name="logits")
    # Cross entropy moves by at most 2 max|logit change| (its gradient softmax - onehot has L1 norm <= 2), so
    # the loss is held to that bound: a one-number error ratio is mostly luck.
    loss_bound = 2 * max_error(out.logits, ref_out.logits) + floor(torch.float32, ref_out.loss.item())
    assert_close(out.loss, ref_out.loss, atol=loss_bound, name="loss")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_error_ratio(grad, ref_grads[name], base_grads[name], ratio=GRADIENT_RATIO, name=f"grad of {name}")


# ---------------------------------------------------------------------------------------------------------
# Parity with the unpatched model.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq, padded", [(7, False), (13, True)], ids=["seq7", "seq13-padded"])
def test_masked_lm_on_every_backend(backend_device, seq, padded):
    """float32 (which every backend takes) logits, loss and gradients by the error-ratio rule."""
    _, device = backend_device
    models = _triple(transformers.BertForMaskedLM, device)
    ids, mask = (t.to(device) for t in _batch(3, seq, padded))
    inputs = dict(input_ids=ids, attention_mask=mask, labels=_mlm_labels(ids, mask))
    _assert_error_ratio_run(*(_run(m, **inputs) for m in models))


def test_padding_changes_the_output():
    """The padding mask reaches fastattn: padded keys change the unpadded rows' logits unless masked."""
    ours, _ = _pair(transformers.BertForMaskedLM)
    ids, mask = _batch(3, 13, padded=True)
    with torch.no_grad():
        masked = ours(input_ids=ids, attention_mask=mask).logits
        unmasked = ours(input_ids=ids).logits
    assert (masked[1:] - unmasked[1:]).abs().max() > 1e-3
    assert_close(masked[0], unmasked[0], atol=FLOAT64_ATOL, name="unpadded row")


def test_sequence_classification_matches_transformers():
    ours, theirs = _pair(transformers.BertForSequenceClassification, num_labels=3)
    ids, mask = _batch(4, 13, padded=True)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1, 2]))
    _assert_same_run(_run(ours, **inputs), _run(theirs, **inputs))


def test_masked_lm_float64_matches_transformers():
    ours, theirs = _pair(transformers.BertForMaskedLM)
    ids, mask = _batch(3, 13, padded=True)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=_mlm_labels(ids, mask))
    _assert_same_run(_run(ours, **inputs), _run(theirs, **inputs))


@pytest.mark.parametrize("padding", ["right", "left", None], ids=["right-padding", "left-padding", "no-masks"])
def test_decoder_with_cross_attention_matches_transformers(padding):
    """Causal self-attention (a mask, or is_causal when none) and cross-attention to encoder states. With left
    padding the first queries of a padded row see no key: 0 in both models."""
    ours, theirs = _pair(transformers.BertLMHeadModel, is_decoder=True, add_cross_attention=True)
    ids, mask = _batch(3, 13, padded=padding is not None, left=padding == "left")
    encoder_states = torch.randn(3, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    encoder_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    inputs = dict(input_ids=ids, encoder_hidden_states=encoder_states, labels=ids.masked_fill(mask == 0, -100))
    if padding:
        inputs.update(attention_mask=mask, encoder_attention_mask=encoder_mask)
    _assert_same_run(_run(ours, **inputs), _run(theirs, **inputs))


def test_decoder_with_kv_cache_matches_full_sequence():
    """Incremental decoding (a 6-token prefill, a 4-token chunk, then 1 token) equals one full pass."""
    ours, theirs = _pair(transformers.BertLMHeadModel, is_decoder=True)
    ids, _ = _batch(2, 11, padded=False)
    with torch.no_grad():
        full = theirs(input_ids=ids).logits
        cache, pieces = None, []
        for start, stop in ((0, 6), (6, 10), (10, 11)):
            out = ours(input_ids=ids[:, start:stop], use_cache=True, **{CACHE: cache})
            cache = getattr(out, CACHE)
            pieces.append(out.logits)
    assert_close(torch.cat(pieces, dim=1), full, atol=FLOAT64_ATOL, name="cached logits")


def test_train_mode_without_dropout_matches_transformers():
    ours, theirs = _pair(transformers.BertForMaskedLM, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask = _batch(3, 13, padded=True)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=_mlm_labels(ids, mask))
    _assert_same_run(_run(ours.train(), **inputs), _run(theirs.train(), **inputs))


def test_attention_dropout_in_training_is_seeded():
    """Dropout > 0 runs in fastattn's kernel in train mode only, reproducibly under torch.manual_seed."""
    ours, theirs = _pair(transformers.BertForMaskedLM, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    ids, mask = _batch(2, 13, padded=True)

    def logits(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return ours(input_ids=ids, attention_mask=mask).logits

    ours.train()
    first, again, other = logits(1), logits(1), logits(2)
    ours.eval()
    evaluated = logits(1)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3
    assert (first - evaluated).abs().max() > 1e-3
    with torch.no_grad():
        assert_close(evaluated, theirs(input_ids=ids, attention_mask=mask).logits, atol=FLOAT64_ATOL)


# ---------------------------------------------------------------------------------------------------------
# What the patch changes, and what it leaves alone.
# ---------------------------------------------------------------------------------------------------------


def test_fastattn_kernels_run():
    """Every attention and every LayerNorm of the patched model goes through fastattn, forward and backward."""
    ours, _ = _pair(transformers.BertLMHeadModel, is_decoder=True, add_cross_attention=True)
    ids, mask = _batch(2, 7, padded=True)
    encoder_states = torch.randn(2, 5, 64, dtype=torch.float64)
    with fastattn.record() as calls:
        _run(ours, input_ids=ids, attention_mask=mask, encoder_hidden_states=encoder_states, labels=ids)
    ops = [call.op for call in calls]
    attentions, norms = 2 * LAYERS, 1 + 3 * LAYERS + 1  # self + cross; embeddings, 3 per layer, LM head
    assert ops.count("attention") == ops.count("attention_backward") == attentions, ops
    assert ops.count("norm") == ops.count("norm_backward") == norms, ops


def test_patch_keeps_parameters_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(_config()).double().eval()
    before = model.state_dict()
    layer_norms = [name for name, m in model.named_modules() if type(m) is torch.nn.LayerNorm]
    ids, mask = _batch(2, 7, padded=True)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits

    assert patch_bert(model) is model
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)  # shared, not copied
    report = patch_report(model)
    assert report.previous_attn_implementation == "sdpa" and report.layer_norms == layer_norms
    assert all(type(model.get_submodule(name)) is fastattn.LayerNorm for name in layer_norms)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert patch_bert(model) is model and patch_report(model) is report  # patching twice changes nothing

    model.save_pretrained(tmp_path)
    assert ATTN_IMPLEMENTATION not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, atol=FLOAT64_ATOL)

    assert unpatch_bert(model) is model
    assert patch_report(model) is None and model.config._attn_implementation == "sdpa"
    assert all(type(model.get_submodule(name)) is torch.nn.LayerNorm for name in layer_norms)
    assert all(model.state_dict()[k].data_ptr() == before[k].data_ptr() for k in before)


def test_register_lets_a_model_start_on_fastattn():
    register()
    torch.manual_seed(0)
    ours = transformers.BertForMaskedLM(_config(attn_implementation=ATTN_IMPLEMENTATION)).double().eval()
    theirs = copy.deepcopy(ours)
    theirs.set_attn_implementation("sdpa")
    ids, mask = _batch(2, 13, padded=True)
    with fastattn.record() as calls, torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
    assert [call.op for call in calls].count("attention") == LAYERS
    with torch.no_grad():
        assert_close(logits, theirs(input_ids=ids, attention_mask=mask).logits, atol=FLOAT64_ATOL)


# ---------------------------------------------------------------------------------------------------------
# Refusals.
# ---------------------------------------------------------------------------------------------------------


def test_refuses_models_that_are_not_bert():
    with pytest.raises(TypeError, match="model must be a transformers BERT model.*torch.nn.modules.linear.Linear"):
        patch_bert(torch.nn.Linear(4, 4))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10))
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        patch_bert(gpt2)
    assert all(type(m) is not fastattn.LayerNorm for m in gpt2.modules())  # refused before any change


def test_refuses_output_attentions_and_unpatched_models():
    model = transformers.BertModel(_config(attn_implementation="eager", output_attentions=True))
    with pytest.raises(ValueError, match="output_attentions"):
        patch_bert(model)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="was not patched by patch_bert"):
        unpatch_bert(model)


def test_attention_function_refuses_what_it_does_not_compute():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match="softcap"):
        fastattn_attention(torch.nn.Module(), q, q, q, None, softcap=30.0)


def test_fastattn_imports_without_transformers():
    """transformers stays optional: blocked, fastattn and the integration still import, and patching says why."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import fastattn, fastattn.integrations.huggingface as hf\n"
        "try:\n    hf.patch_bert(object())\nexcept ImportError as e:\n    print(e)\n"
    )
    root = Path(fastattn.__file__).parent.parent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "needs transformers: `pip install transformers`" in result.stdout
