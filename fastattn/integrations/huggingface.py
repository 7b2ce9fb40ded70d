"""Run Hugging Face ``transformers`` BERT models on fastattn's attention and LayerNorm.

:func:`patch_bert` switches a BERT model in place:

- attention through transformers' own extension point: :func:`register` adds :func:`fastattn_attention` to
  ``transformers.AttentionInterface`` as the implementation ``"fastattn"``, with the mask builder of ``"sdpa"``
  (a 4-D bool mask, True = attend, or None when no key is masked), and the model is switched with
  ``model.set_attn_implementation("fastattn")``. This covers encoder self-attention with padding, the
  decoder's causal self-attention (with or without a KV cache) and cross-attention;
- every :class:`torch.nn.LayerNorm` in the model becomes a :class:`fastattn.LayerNorm` sharing its parameters.

Parameters, buffers and state_dict keys do not change, so ``save_pretrained`` writes the same checkpoint (the
attention implementation is not saved in the config). Attention dropout runs inside fastattn's kernel with its
own random stream: training matches the unpatched model in distribution, not bit for bit.

``transformers`` is imported inside the functions: fastattn imports and works without it.

Example::

    from fastattn.integrations.huggingface import patch_bert

    model = patch_bert(BertForMaskedLM.from_pretrained("google-bert/bert-base-uncased"))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.nn.norm import LayerNorm
from fastattn.ops.attention import scaled_dot_product_attention

ATTN_IMPLEMENTATION = "fastattn"

# Attention-interface arguments some transformers models pass that fastattn_attention does not implement.
_UNSUPPORTED = ("softcap", "position_bias", "s_aux")


@dataclass
class PatchReport:
    """What :func:`patch_bert` changed in a model."""

    previous_attn_implementation: str  # the model's attention implementation before, restored by unpatch_bert
    layer_norms: list[str]  # names of the modules now computed by fastattn.LayerNorm


def _transformers():
    try:
        import transformers  # noqa: PLC0415
    except ImportError as error:
        raise ImportError("fastattn.integrations.huggingface needs transformers: `pip install transformers`") from error
    for name in ("AttentionInterface", "AttentionMaskInterface"):
        if not hasattr(transformers, name):
            raise ImportError(
                f"transformers {transformers.__version__} has no {name}; fastattn's integration needs a newer "
                "transformers (tested with 5.18 and 5.25)"
            )
    return transformers


def fastattn_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-interface function computed by :func:`fastattn.scaled_dot_product_attention`.

    Args:
        module: the calling attention module; its ``is_causal`` is the default for ``is_causal``.
        query: (batch, heads, seq_q, head_dim); key: (batch, kv_heads, seq_k, head_dim); value: (batch,
            kv_heads, seq_k, head_dim_v); kv_heads divides heads.
        attention_mask: None or broadcastable to (batch, heads, seq_q, seq_k): bool (True = attend) or float
            (added to the scores). A query that sees no key gets 0.
        dropout: dropout probability on the attention weights (transformers passes 0 outside training).
        scaling: multiplies q k^T; default 1 / sqrt(head_dim).
        is_causal: overrides ``module.is_causal``. As in transformers' ``"sdpa"``, it applies only when
            ``attention_mask`` is None and seq_q > 1 (otherwise the mask holds the pattern), aligned top-left.

    Returns:
        (out (batch, seq_q, heads, head_dim_v), None): the attention weights are never formed.
    """
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"fastattn_attention: `{name}` is not supported; use another attn_implementation for this model"
            )
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(causal) and attention_mask is None and query.shape[2] > 1
    out = scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="fastattn"`` available to every transformers model (idempotent).

    After this, a model that uses transformers' attention interface can also be loaded onto fastattn's
    attention directly: ``BertModel.from_pretrained(name, attn_implementation="fastattn")`` (its LayerNorms
    stay torch's until :func:`patch_bert`).
    """
    transformers = _transformers()
    from transformers.masking_utils import sdpa_mask  # noqa: PLC0415

    transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, fastattn_attention)
    transformers.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def patch_bert(model):
    """Run a transformers BERT model on fastattn's attention and LayerNorm, in place.

    Args:
        model: a ``transformers.BertPreTrainedModel`` (BertModel, BertForMaskedLM, BertLMHeadModel with or
            without cross-attention, BertForSequenceClassification, ...). Other models are refused: the
            integration is tested on BERT only. A model already patched is returned as it is.

    Returns:
        ``model``, switched to ``attn_implementation="fastattn"`` and with every :class:`torch.nn.LayerNorm`
        replaced by a :class:`fastattn.LayerNorm` sharing its parameters; :func:`patch_report` says what
        changed and :func:`unpatch_bert` undoes it.

    Raises:
        TypeError: ``model`` is not a transformers BERT model.
        ValueError: the model's config asks for ``output_attentions``, which needs the attention weights.
        RuntimeError: the model did not switch to the ``"fastattn"`` attention implementation.
    """
    transformers = _transformers()
    if not isinstance(model, transformers.BertPreTrainedModel):
        raise TypeError(
            "patch_bert: model must be a transformers BERT model (a transformers.BertPreTrainedModel such as "
            f"BertModel or BertForMaskedLM), got {type(model).__module__}.{type(model).__qualname__}"
        )
    if patch_report(model) is not None:
        return model
    if model.config.output_attentions:
        raise ValueError(
            "patch_bert: model.config.output_attentions is True, but fastattn never forms the attention "
            "weights; set it to False (or keep attn_implementation='eager' to inspect them)"
        )
    previous = model.config._attn_implementation
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise RuntimeError(
            f"patch_bert: {type(model).__name__} kept attn_implementation={model.config._attn_implementation!r}; "
            "its attention does not go through transformers' AttentionInterface in this transformers version"
        )
    names = _torch_layer_norms(model)
    _set_class(model, names, LayerNorm)
    model._fastattn_patch = PatchReport(previous, names)
    return model


def unpatch_bert(model):
    """Undo :func:`patch_bert`: the previous attention implementation and torch LayerNorms (same parameters).

    Raises:
        ValueError: ``model`` was not patched by :func:`patch_bert`.
    """
    report = patch_report(model)
    if report is None:
        raise ValueError(f"unpatch_bert: this {type(model).__name__} was not patched by patch_bert")
    model.set_attn_implementation(report.previous_attn_implementation)
    _set_class(model, report.layer_norms, torch.nn.LayerNorm)
    del model._fastattn_patch
    return model


def patch_report(model) -> PatchReport | None:
    """What :func:`patch_bert` changed in ``model``, or None if it is not patched."""
    return getattr(model, "_fastattn_patch", None)


def _torch_layer_norms(model: torch.nn.Module) -> list[str]:
    """Names of the plain torch.nn.LayerNorm modules (subclasses may compute something else)."""
    return [name for name, module in model.named_modules() if type(module) is torch.nn.LayerNorm]


def _set_class(model: torch.nn.Module, names: list[str], cls: type) -> None:
    """Give the named modules class ``cls`` (LayerNorm <-> fastattn.LayerNorm: same state, another forward)."""
    for name in names:
        model.get_submodule(name).__class__ = cls


__all__ = [
    "ATTN_IMPLEMENTATION",
    "PatchReport",
    "fastattn_attention",
    "patch_bert",
    "patch_report",
    "register",
    "unpatch_bert",
]
