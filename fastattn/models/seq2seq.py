"""An encoder-decoder Transformer for sequence-to-sequence tasks, with KV-cached generation.

``Seq2SeqTransformer`` runs on fastattn's modules (fused token + position embedding, fused attention, fused
residual + dropout + LayerNorm); its ``generate`` decodes one token per step against per-layer key/value caches
with :func:`fastattn.attention_with_kvcache`. ``TorchSeq2SeqTransformer`` is its pure torch.nn twin: the same
constructor, the same ``state_dict`` keys, and a ``generate`` that recomputes the whole decoder at every step.

Layout (both): ``src_embed`` / ``tgt_embed`` (``token`` and learned ``position`` embeddings, summed, then dropout)
-> ``encoder`` / ``decoder`` (batch-first Transformer layers, final LayerNorm only when ``norm_first``) ->
``lm_head`` (linear to the target vocabulary).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from fastattn.nn.norm import LayerNorm
from fastattn.nn.positional import TokenAndPositionEmbedding
from fastattn.nn.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from fastattn.ops.attention import attention
from fastattn.ops.decode_linear import decode_linear
from fastattn.ops.kvcache import attention_with_kvcache
from fastattn.ops.linear import linear, module_linear

NextLogits = Callable[[Tensor], Tensor]  # tokens so far (batch, t) -> logits of the next token (batch, vocab)


class _TorchTokenAndPosition(torch.nn.Module):
    """``dropout(token(tokens) + position(offset + s))`` from two ``nn.Embedding``: the twin of
    :class:`fastattn.TokenAndPositionEmbedding` (same ``state_dict`` keys ``token.weight``, ``position.weight``)."""

    def __init__(self, vocab: int, max_positions: int, dim: int, dropout: float = 0.0, padding_idx=None):
        super().__init__()
        self.token = torch.nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.position = torch.nn.Embedding(max_positions, dim)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        """tokens (batch, seq) -> (batch, seq, dim)."""
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        return self.drop(self.token(tokens) + self.position(positions))


class _Seq2SeqBase(torch.nn.Module):
    """The model, built from the module classes a subclass names; forward and uncached generation."""

    embedding_cls: type
    encoder_layer_cls: type
    decoder_layer_cls: type
    encoder_cls: type
    decoder_cls: type
    norm_cls: type

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        d_model: int = 128,
        nhead: int = 4,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        max_len: int = 512,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        norm_first: bool = False,
    ):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        for arg, value, vocab in (("pad_id", pad_id, min(src_vocab, tgt_vocab)), ("bos_id", bos_id, tgt_vocab),
                                  ("eos_id", eos_id, tgt_vocab)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
                raise ValueError(f"{name}: {arg} must be an int in [0, {vocab}), got {value!r}")
        self.src_vocab, self.tgt_vocab, self.max_len = src_vocab, tgt_vocab, max_len
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        ff = 4 * d_model if dim_feedforward is None else dim_feedforward
        layer_args = dict(dim_feedforward=ff, dropout=dropout, batch_first=True, norm_first=norm_first)
        self.src_embed = self.embedding_cls(src_vocab, max_len, d_model, dropout, padding_idx=pad_id)
        self.tgt_embed = self.embedding_cls(tgt_vocab, max_len, d_model, dropout, padding_idx=pad_id)
        self.encoder = self.encoder_cls(
            self.encoder_layer_cls(d_model, nhead, **layer_args), num_encoder_layers,
            norm=self.norm_cls(d_model) if norm_first else None, enable_nested_tensor=False,
        )  # fmt: skip
        self.decoder = self.decoder_cls(
            self.decoder_layer_cls(d_model, nhead, **layer_args), num_decoder_layers,
            norm=self.norm_cls(d_model) if norm_first else None,
        )  # fmt: skip
        self.lm_head = torch.nn.Linear(d_model, tgt_vocab)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """src (batch, S) and tgt (batch, T) token ids, padded with pad_id -> logits (batch, T, tgt_vocab).

        Position t of tgt sees tgt[:, :t + 1] (causal) and every source token that is not padding."""
        self._check_tokens(tgt, "tgt", self.tgt_vocab)
        memory, memory_padding = self.encode(src)
        if memory.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: src and tgt batch sizes differ: {src.shape[0]} and {tgt.shape[0]}"
            )
        return self.decode(tgt, memory, memory_padding, tgt_padding=tgt == self.pad_id)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (batch, S) ids -> (memory (batch, S, d_model), memory padding (batch, S) bool, True = pad)."""
        self._check_tokens(src, "src", self.src_vocab)
        padding = src == self.pad_id
        return self.encoder(self.src_embed(src), src_key_padding_mask=padding), padding

    def decode(self, tgt: Tensor, memory: Tensor, memory_padding: Tensor, tgt_padding: Tensor | None = None) -> Tensor:
        """tgt (batch, T) ids against the encoder's memory -> logits (batch, T, tgt_vocab); causal self-attention,
        ``tgt_padding`` (batch, T) bool (True = pad) or None."""
        seq = tgt.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=tgt.device).triu(1)  # True = not allowed
        hidden = self.decoder(
            self.tgt_embed(tgt), memory, tgt_mask=causal, tgt_key_padding_mask=tgt_padding,
            memory_key_padding_mask=memory_padding, tgt_is_causal=True,
        )  # fmt: skip
        return module_linear(self.lm_head, hidden)

    def _generate(
        self, src: Tensor, max_new_tokens: int, temperature: float, top_k: int | None, generator, use_cache: bool
    ) -> Tensor:
        """generate's body; ``use_cache`` picks the KV-cached decoder (subclasses that have one)."""
        self._check_generate_args(max_new_tokens, temperature, top_k)
        with _inference(self):
            memory, memory_padding = self.encode(src)
            if use_cache:
                next_logits = self._cached_decoder(memory, memory_padding, max_new_tokens)
            else:
                next_logits = lambda tokens: self.decode(tokens, memory, memory_padding)[:, -1]
            start = torch.full((src.shape[0], 1), self.bos_id, dtype=torch.long, device=src.device)
            return _decode_loop(next_logits, start, max_new_tokens, temperature, top_k, generator,
                                self.eos_id, self.pad_id)  # fmt: skip

    def _cached_decoder(self, memory: Tensor, memory_padding: Tensor, max_steps: int) -> NextLogits:
        raise NotImplementedError(f"{type(self).__name__} has no KV cache")

    def _check_tokens(self, tokens: Tensor, arg: str, vocab: int) -> None:
        name = type(self).__name__
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: {arg} must be an int64 (or int32) Tensor of token ids, got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}")  # fmt: skip
        if tokens.dim() != 2 or tokens.shape[0] == 0 or not 1 <= tokens.shape[1] <= self.max_len:
            raise ValueError(f"{name}: {arg} must be (batch, seq) with batch >= 1 and 1 <= seq <= max_len="
                             f"{self.max_len}, got shape {tuple(tokens.shape)}")  # fmt: skip
        if torch.compiler.is_compiling():  # reading values would break the graph; the embedding still checks ids
            return
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()
        if lo < 0 or hi >= vocab:
            raise IndexError(f"{name}: {arg} holds id {lo if lo < 0 else hi}, outside [0, {vocab})")

    def _check_generate_args(self, max_new_tokens: int, temperature: float, top_k: int | None) -> None:
        name = f"{type(self).__name__}.generate"
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"{name}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if 1 + max_new_tokens > self.max_len:
            raise ValueError(f"{name}: 1 + max_new_tokens = {1 + max_new_tokens} tokens exceed max_len={self.max_len}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"{name}: temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"{name}: top_k must be None or an int >= 1, got {top_k!r}")


class Seq2SeqTransformer(_Seq2SeqBase):
    """Encoder-decoder Transformer on fastattn kernels.

    Args:
        src_vocab, tgt_vocab: vocabulary sizes; d_model, nhead, dim_feedforward (default 4 * d_model): layer sizes;
        num_encoder_layers, num_decoder_layers; dropout: on the embeddings and in every layer;
        max_len: the most positions of a source or target sequence (learned position embeddings);
        pad_id (both vocabularies), bos_id, eos_id (target); norm_first: pre-norm layers plus a final LayerNorm.

    forward(src (batch, S) long, tgt (batch, T) long) -> logits (batch, T, tgt_vocab); ``pad_id`` marks padding.
    Padded target positions are computed like real ones (their logits mean nothing); a source row padded throughout
    gives finite logits (the cross-attention's output is then 0) where torch.nn gives NaN.
    """

    embedding_cls = TokenAndPositionEmbedding
    encoder_layer_cls, decoder_layer_cls = TransformerEncoderLayer, TransformerDecoderLayer
    encoder_cls, decoder_cls, norm_cls = TransformerEncoder, TransformerDecoder, LayerNorm

    def generate(
        self,
        src: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Decode from bos_id: src (batch, S) ids -> tokens (batch, 1 + n) long, n <= max_new_tokens.

        The encoder runs once. Each step picks the next token from the last position's logits: the argmax when
        ``temperature`` is 0, else a sample of ``softmax(logits / temperature)`` restricted to the ``top_k`` best
        (Gumbel-max with noise from ``generator``, so a seed fixes the tokens). A row that has emitted eos_id
        continues with pad_id; decoding stops when every row has, or after max_new_tokens steps. Generated tokens
        are never treated as padding. ``use_cache`` keeps each decoder layer's self-attention keys/values
        (batch, heads, max_new_tokens, head_dim) and the memory's cross-attention keys/values, so a step runs only
        the new token; otherwise the whole decoder reruns on the prefix. Runs in eval mode under no_grad and
        restores every module's mode after.
        """
        return self._generate(src, max_new_tokens, temperature, top_k, generator, use_cache)

    def _cached_decoder(self, memory: Tensor, memory_padding: Tensor, max_steps: int) -> NextLogits:
        return _CachedDecoder(self, memory, memory_padding, max_steps)


class TorchSeq2SeqTransformer(_Seq2SeqBase):
    """The pure torch.nn twin of :class:`Seq2SeqTransformer`: same arguments, ``state_dict`` keys and results."""

    embedding_cls = _TorchTokenAndPosition
    encoder_layer_cls, decoder_layer_cls = torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer
    encoder_cls, decoder_cls, norm_cls = torch.nn.TransformerEncoder, torch.nn.TransformerDecoder, torch.nn.LayerNorm

    def generate(
        self,
        src: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """As :meth:`Seq2SeqTransformer.generate` with ``use_cache=False``: the decoder reruns on the prefix."""
        return self._generate(src, max_new_tokens, temperature, top_k, generator, use_cache=False)


# ---------------------------------------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside; every submodule's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _decode_loop(
    next_logits: NextLogits,
    tokens: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    eos_id: int,
    pad_id: int,
) -> Tensor:
    """Extend tokens (batch, 1) one token per step; rows past their eos_id get pad_id; stop when all are."""
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        new = _pick(next_logits(tokens), temperature, top_k, generator).masked_fill(finished, pad_id)  # (batch,)
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        finished |= new == eos_id
        if bool(finished.all()):
            break
    return tokens


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """logits (batch, vocab) -> next ids (batch,): argmax at temperature 0, else a Gumbel-max sample of
    softmax(logits / temperature) over the top_k largest logits (ties with the k-th kept)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (batch, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device)  # float32 whatever the model
    return (scores - torch.log(-torch.log(uniform))).argmax(dim=-1)


class _CachedDecoder:
    """A Seq2SeqTransformer's decoder run one new token at a time (eval mode, no grad).

    Per decoder layer: self-attention key/value caches (batch, heads, max_steps, head_dim), appended in place by
    :func:`fastattn.attention_with_kvcache`, and the cross-attention keys/values of the memory (batch, heads, S,
    head_dim), projected once. Called with the tokens so far (batch, t + 1), it runs token t at position t and
    returns its logits (batch, tgt_vocab); calls must come in order t = 0, 1, ...
    """

    def __init__(self, model: Seq2SeqTransformer, memory: Tensor, memory_padding: Tensor, max_steps: int):
        self.model, self.memory_padding = model, memory_padding
        self.layers = []
        for layer in model.decoder.layers:
            attn = layer.self_attn
            shape = (memory.shape[0], attn.num_heads, max_steps, attn.head_dim)
            self_kv = (memory.new_zeros(shape), memory.new_zeros(shape))
            self.layers.append((layer, self_kv, _memory_kv(layer.multihead_attn, memory)))

    def __call__(self, tokens: Tensor) -> Tensor:
        step = tokens.shape[1] - 1
        lengths = torch.full((tokens.shape[0],), step, dtype=torch.long, device=tokens.device)  # cached keys
        x = self.model.tgt_embed(tokens[:, -1:], offset=step)  # (batch, 1, d_model)
        for layer, self_kv, cross_kv in self.layers:
            x = _decoder_layer_step(layer, x, self_kv, cross_kv, self.memory_padding, lengths)
        if self.model.decoder.norm is not None:
            x = self.model.decoder.norm(x)
        return _step_linear(self.model.lm_head, x[:, 0])


def _decoder_layer_step(
    layer: torch.nn.TransformerDecoderLayer,
    x: Tensor,
    self_kv: tuple[Tensor, Tensor],
    cross_kv: tuple[Tensor, Tensor],
    memory_padding: Tensor,
    lengths: Tensor,
) -> Tensor:
    """One new token x (batch, 1, d_model) through a batch-first decoder layer in eval mode (dropout off), with
    the layer's own parameters and its norm_first order; appends the token's keys/values to ``self_kv``."""

    def self_attention(h: Tensor) -> Tensor:
        return _self_attention_step(layer.self_attn, h, *self_kv, lengths)

    def cross_attention(h: Tensor) -> Tensor:
        return _cross_attention(layer.multihead_attn, h, *cross_kv, memory_padding)

    def feed_forward(h: Tensor) -> Tensor:
        return _step_linear(layer.linear2, layer.activation(_step_linear(layer.linear1, h)))

    if layer.norm_first:
        x = x + self_attention(layer.norm1(x))
        x = x + cross_attention(layer.norm2(x))
        return x + feed_forward(layer.norm3(x))
    x = layer.norm1(x + self_attention(x))
    x = layer.norm2(x + cross_attention(x))
    return layer.norm3(x + feed_forward(x))


def _self_attention_step(
    attn: torch.nn.MultiheadAttention, x: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor
) -> Tensor:
    """x (batch, 1, E) attends to the cached keys and itself; its key/value are written at ``lengths``."""
    qkv = decode_linear(x, attn.in_proj_weight, attn.in_proj_bias).unflatten(-1, (3, attn.num_heads, -1))
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, 1, head_dim)
    out = attention_with_kvcache(q, k_cache, v_cache, lengths, k, v, causal=True)  # (batch, heads, 1, head_dim)
    return _step_linear(attn.out_proj, out.transpose(1, 2).flatten(2))


def _memory_kv(attn: torch.nn.MultiheadAttention, memory: Tensor) -> tuple[Tensor, Tensor]:
    """The cross-attention keys and values of memory (batch, S, E): two (batch, heads, S, head_dim) tensors."""
    e = attn.embed_dim
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[e:]
    kv = linear(memory, attn.in_proj_weight[e:], bias).unflatten(-1, (2, attn.num_heads, -1))
    k, v = kv.permute(2, 0, 3, 1, 4)
    return k.contiguous(), v.contiguous()  # read at every step


def _cross_attention(
    attn: torch.nn.MultiheadAttention, x: Tensor, k: Tensor, v: Tensor, memory_padding: Tensor
) -> Tensor:
    """x (batch, 1, E) attends to the memory's keys/values, skipping its padding."""
    e = attn.embed_dim
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[:e]
    q = decode_linear(x, attn.in_proj_weight[:e], bias).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
    out = attention(q, k, v, key_padding_mask=memory_padding)  # (batch, heads, 1, head_dim)
    return _step_linear(attn.out_proj, out.transpose(1, 2).flatten(2))


def _step_linear(module: torch.nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for a step's few rows, on :func:`fastattn.ops.decode_linear.decode_linear` where
    :func:`fastattn.ops.linear.module_linear` allows."""
    return module_linear(module, x, decode_linear)


__all__ = ["Seq2SeqTransformer", "TorchSeq2SeqTransformer"]
