"""A BERT encoder with its masked-language-model head: :class:`BertMLM` on fastattn's kernels, and
:class:`TorchBertMLM`, its pure torch.nn twin (same constructor, same ``state_dict`` keys, same results).

input_ids (batch, seq) -> word + position + segment embeddings -> LayerNorm -> dropout -> ``layers`` post-norm
encoder layers (GELU) -> MLM head: dense -> GELU -> LayerNorm -> decoder (its weight *is* the word embedding) + bias
-> logits (batch, seq, vocab_size). Initialised as BERT: weights N(0, 0.02), biases 0, LayerNorms 1 and 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.nn.norm import LayerNorm
from fastattn.nn.transformer import TransformerEncoder, TransformerEncoderLayer
from fastattn.ops.linear import module_linear
from fastattn.ops.norm import dropout_add_norm
from fastattn.ops.positional import embedding_with_positions
from fastattn.ops.softmax import log_softmax

IGNORE_INDEX = -100  # labels equal to it add nothing to the loss
INIT_STD = 0.02
INDEX_DTYPES = (torch.int32, torch.int64)

Output = Tensor | tuple[Tensor, Tensor]


class BertMLM(nn.Module):
    """BERT for masked-language modelling on fastattn kernels: the word + position gather runs in one kernel
    (:func:`fastattn.embedding_with_positions`), the segment add and the embedding LayerNorm in another
    (:func:`fastattn.dropout_add_norm`), the encoder layers on the fused attention and add + dropout + LayerNorm
    kernels (:class:`fastattn.TransformerEncoderLayer`), and the loss on :func:`fastattn.log_softmax`.

    Args:
        vocab_size: tokens; hidden, heads, layers: width, attention heads (hidden % heads == 0) and depth.
        intermediate: the feed-forward width (default 4 * hidden).
        max_positions: the longest input; type_vocab_size: segments (token_type_ids lie in [0, type_vocab_size)).
        dropout: after the embeddings, on the attention probabilities and inside every layer.
        layer_norm_eps: every LayerNorm's epsilon; pad_id: the word embedding's padding row (zero at
            initialisation, no gradient from the embedding lookup), or None.

    forward(input_ids, token_type_ids=None, attention_mask=None, labels=None): input_ids (batch, seq) int;
    token_type_ids (batch, seq) int (default all 0); attention_mask (batch, seq), 1 = real token, 0 = padding
    (no token attends to it; the padded positions still get logits, which mean nothing); labels (batch, seq) int64,
    IGNORE_INDEX (-100) where no loss is wanted. Returns logits (batch, seq, vocab_size), or (loss, logits) with
    labels, loss the mean cross-entropy over the labelled positions (NaN when there are none, as torch's).

    ``state_dict`` holds the tied tensor under both ``embeddings.word_embeddings.weight`` and
    ``head.decoder.weight``. Given the same weights (renamed, the attention in-projection split into query, key and
    value), logits and loss equal those of Hugging Face's ``BertForMaskedLM`` with ``hidden_act="gelu"``.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int = 128,
        heads: int = 4,
        layers: int = 2,
        intermediate: int | None = None,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        pad_id: int | None = 0,
    ):
        super().__init__()
        check_arguments(type(self).__name__, vocab_size, hidden, heads, layers, intermediate, max_positions,
                        type_vocab_size, dropout, layer_norm_eps, pad_id)  # fmt: skip
        self.vocab_size, self.max_positions, self.type_vocab_size = vocab_size, max_positions, type_vocab_size
        self.embeddings = Embeddings(vocab_size, hidden, max_positions, type_vocab_size, dropout, layer_norm_eps,
                                     pad_id)  # fmt: skip
        layer = TransformerEncoderLayer(hidden, heads, intermediate or 4 * hidden, dropout, activation="gelu",
                                        layer_norm_eps=layer_norm_eps, batch_first=True, norm_first=False)  # fmt: skip
        self.encoder = TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = MaskedLMHead(hidden, vocab_size, layer_norm_eps)
        self.head.decoder.weight = self.embeddings.word_embeddings.weight
        init_bert_weights(self)

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Output:
        """(batch, seq) inputs -> logits (batch, seq, vocab_size), or (loss, logits) when labels are given."""
        check_inputs(self, input_ids, token_type_ids, attention_mask, labels)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        padding = None if attention_mask is None else attention_mask == 0  # (batch, seq), True = padding
        x = self.embeddings(input_ids, token_type_ids)  # (batch, seq, hidden)
        z = self.head.transform(self.encoder(x, src_key_padding_mask=padding))  # (batch, seq, hidden)
        logits = module_linear(self.head.decoder, z)  # (batch, seq, vocab_size)
        if labels is None:
            return logits
        return self._loss(z.flatten(0, 1), logits.flatten(0, 1), labels.flatten()), logits

    def _loss(self, z: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
        """The mean cross-entropy over the labelled rows of z (rows, hidden), logits (rows, vocab_size) = its
        decoding, labels (rows,). When at most half the rows are labelled (BERT labels 15%), the log-softmax runs
        on the labelled rows' logits alone, decoded again from z, so that the loss's backward through the decoder
        and the log-softmax takes those rows only; compiled graphs keep to every row (static shapes)."""
        if not torch.compiler.is_compiling():
            picked = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # on a GPU, one synchronisation
            if 2 * picked.numel() <= labels.numel():
                logits, labels = module_linear(self.head.decoder, z[picked]), labels[picked]
        return F.nll_loss(log_softmax(logits, dim=-1), labels, ignore_index=IGNORE_INDEX)


class TorchBertMLM(nn.Module):
    """The pure torch.nn twin of :class:`BertMLM`: same arguments, initialisation, ``state_dict`` keys and results
    (dropout draws aside), from nn.Embedding, nn.LayerNorm, nn.TransformerEncoder and F.cross_entropy."""

    def __init__(
        self,
        vocab_size: int,
        hidden: int = 128,
        heads: int = 4,
        layers: int = 2,
        intermediate: int | None = None,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        pad_id: int | None = 0,
    ):
        super().__init__()
        self.embeddings = TorchEmbeddings(vocab_size, hidden, max_positions, type_vocab_size, dropout, layer_norm_eps,
                                          pad_id)  # fmt: skip
        layer = nn.TransformerEncoderLayer(hidden, heads, intermediate or 4 * hidden, dropout, activation="gelu",
                                           layer_norm_eps=layer_norm_eps, batch_first=True,
                                           norm_first=False)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = TorchMaskedLMHead(hidden, vocab_size, layer_norm_eps)
        self.head.decoder.weight = self.embeddings.word_embeddings.weight
        init_bert_weights(self)

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Output:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        padding = None if attention_mask is None else attention_mask == 0
        logits = self.head(self.encoder(self.embeddings(input_ids, token_type_ids), src_key_padding_mask=padding))
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX), logits


class Embeddings(nn.Module):
    """``dropout(LayerNorm(word[ids] + position[s] + token_type[types]))`` in two fused kernels; the tables and
    the norm are the torch.nn modules of :class:`TorchEmbeddings` (same ``state_dict``)."""

    def __init__(self, vocab_size, hidden, max_positions, type_vocab_size, dropout, layer_norm_eps, pad_id):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.norm = LayerNorm(hidden, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(batch, seq) ids and segments -> (batch, seq, hidden)."""
        words = embedding_with_positions(input_ids, self.word_embeddings.weight, self.position_embeddings.weight,
                                         padding_idx=self.word_embeddings.padding_idx)  # fmt: skip
        segments = self.token_type_embeddings(token_type_ids)  # (batch, seq, hidden)
        norm = self.norm
        x = dropout_add_norm(segments, words, norm.normalized_shape, norm.weight, norm.bias, eps=norm.eps)[0]
        return self.dropout(x)


class TorchEmbeddings(nn.Module):
    """:class:`Embeddings` in plain torch.nn."""

    def __init__(self, vocab_size, hidden, max_positions, type_vocab_size, dropout, layer_norm_eps, pad_id):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.norm(x + self.token_type_embeddings(token_type_ids)))


class MaskedLMHead(nn.Module):
    """decoder(norm(gelu(dense(x)))): (..., hidden) -> (..., vocab_size) logits, the norm fastattn's. The owner
    ties ``decoder.weight`` to its word embedding."""

    def __init__(self, hidden: int, vocab_size: int, layer_norm_eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = LayerNorm(hidden, eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return module_linear(self.decoder, self.transform(x))

    def transform(self, x: Tensor) -> Tensor:
        """norm(gelu(dense(x))): the decoder's input, (..., hidden)."""
        return self.norm(F.gelu(module_linear(self.dense, x)))


class TorchMaskedLMHead(nn.Module):
    """:class:`MaskedLMHead` in plain torch.nn."""

    def __init__(self, hidden: int, vocab_size: int, layer_norm_eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


@torch.no_grad()
def init_bert_weights(model: nn.Module) -> None:
    """BERT's initialisation, module by module in ``modules()`` order: Linear, Embedding and attention in-projection
    weights N(0, INIT_STD) (an embedding's padding row then 0), biases 0, LayerNorm weight 1 and bias 0. The MLM
    decoder's weight is the word embedding, drawn once as such; only its bias is set (0)."""
    decoder = model.head.decoder
    for module in model.modules():
        if module is decoder:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=INIT_STD)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=INIT_STD)
            nn.init.zeros_(module.in_proj_bias)


def check_arguments(name: str, vocab_size, hidden, heads, layers, intermediate, max_positions, type_vocab_size,
                    dropout, layer_norm_eps, pad_id) -> None:  # fmt: skip
    """Readable errors for constructor arguments torch.nn would accept or reject obscurely."""
    sizes = dict(vocab_size=vocab_size, hidden=hidden, heads=heads, layers=layers, max_positions=max_positions,
                 type_vocab_size=type_vocab_size)  # fmt: skip
    if intermediate is not None:
        sizes["intermediate"] = intermediate
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
    if hidden % heads:
        raise ValueError(f"{name}: hidden ({hidden}) must be divisible by heads ({heads})")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be a float in [0, 1), got {dropout!r}")
    if isinstance(layer_norm_eps, bool) or not isinstance(layer_norm_eps, (int, float)) or layer_norm_eps < 0:
        raise ValueError(f"{name}: layer_norm_eps must be a float >= 0, got {layer_norm_eps!r}")
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size):
        raise ValueError(f"{name}: pad_id must be None or an int in [0, vocab_size={vocab_size}), got {pad_id!r}")


def check_inputs(model: BertMLM, input_ids, token_type_ids, attention_mask, labels) -> None:
    """Shapes, dtypes and (outside torch.compile, where reading values would break the graph) index ranges."""
    name = type(model).__name__
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in INDEX_DTYPES:
        got = getattr(input_ids, "dtype", type(input_ids).__name__)
        raise TypeError(f"{name}: input_ids must be an int32 or int64 Tensor, got {got}")
    if input_ids.dim() != 2:
        raise ValueError(f"{name}: input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > model.max_positions:
        raise ValueError(f"{name}: input_ids has {input_ids.shape[1]} positions, more than "
                         f"max_positions={model.max_positions}")  # fmt: skip
    shape = tuple(input_ids.shape)
    for arg, t, dtypes in (("token_type_ids", token_type_ids, INDEX_DTYPES), ("labels", labels, (torch.int64,)),
                           ("attention_mask", attention_mask, None)):  # fmt: skip
        if t is None:
            continue
        if not isinstance(t, Tensor) or (dtypes is not None and t.dtype not in dtypes):
            expected = " of dtype " + " or ".join(str(d).removeprefix("torch.") for d in dtypes) if dtypes else ""
            raise TypeError(f"{name}: {arg} must be a Tensor{expected}, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: {arg} must have input_ids' shape {shape}, got {tuple(t.shape)}")
        if t.device != input_ids.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but input_ids is on {input_ids.device}")
    if torch.compiler.is_compiling():
        return
    check_range(input_ids, f"[0, vocab_size={model.vocab_size})", model.vocab_size, "input_ids", name)
    if token_type_ids is not None:
        allowed = f"[0, type_vocab_size={model.type_vocab_size})"
        check_range(token_type_ids, allowed, model.type_vocab_size, "token_type_ids", name)
    if labels is not None:
        allowed = f"[0, vocab_size={model.vocab_size}) or {IGNORE_INDEX}"
        check_range(labels.masked_fill(labels == IGNORE_INDEX, 0), allowed, model.vocab_size, "labels", name)


def check_range(ids: Tensor, allowed: str, high: int, arg: str, name: str) -> None:
    """IndexError unless every entry of ids lies in [0, high): one aminmax (a GPU synchronises once)."""
    if ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    if lo < 0 or hi >= high:
        raise IndexError(f"{name}: {arg} holds {lo if lo < 0 else hi}, outside {allowed}")


__all__ = ["BertMLM", "TorchBertMLM"]
