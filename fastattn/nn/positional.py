"""Positional-encoding modules: ``fastattn.SinusoidalPositionalEncoding`` (drop-in for the PyTorch tutorial's
``PositionalEncoding``), ``fastattn.LearnedPositionalEmbedding`` and ``fastattn.TokenAndPositionEmbedding``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn import reference
from fastattn.ops.positional import (
    Offset,
    embedding_with_positions,
    learned_positional_encoding,
    sinusoidal_positional_encoding,
)

# Rows of a loaded tutorial ``pe`` buffer compared with the sinusoid, and the tolerance (a float16 buffer is
# within half a float16 ulp there; torch's float32 table within 1e-5).
_PE_CHECK_ROWS, _PE_CHECK_ATOL = 256, 1e-3


class SinusoidalPositionalEncoding(torch.nn.Module):
    """``dropout(x * scale + PE[offset + s])``, the sinusoidal encoding computed in the kernel: a drop-in for the
    ``PositionalEncoding`` of the PyTorch transformer tutorial (same constructor arguments and defaults, input
    (seq, batch, d_model) unless ``batch_first``), with no table and no length limit.

    Args:
        d_model: the feature size d (odd sizes work: the last column is a sin).
        dropout: dropout probability in training mode.
        max_len: None (default: any position), or the number of positions to allow: a position at or past it
            raises IndexError, as the tutorial's table would fail.
        batch_first: x is (batch, seq, d_model) instead of (seq, batch, d_model).
        scale: multiplies x first (e.g. ``math.sqrt(d_model)``); base: the wavelength base.

    ``state_dict()`` is empty. Loading a tutorial checkpoint works: its ``pe`` buffer is accepted after checking that
    it holds this sinusoid (its first rows within 1e-3), then dropped.
    """

    def __init__(
        self,
        d_model: int,
        dropout: float = 0.1,
        max_len: Optional[int] = None,
        batch_first: bool = False,
        scale: float = 1.0,
        base: float = 10000.0,
    ):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"SinusoidalPositionalEncoding: d_model must be a positive int, got {d_model!r}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"SinusoidalPositionalEncoding: max_len must be None or a positive int, got {max_len!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SinusoidalPositionalEncoding: dropout must be in [0, 1), got {dropout!r}")
        self.d_model, self.dropout, self.max_len = d_model, float(dropout), max_len
        self.batch_first, self.scale, self.base = batch_first, float(scale), float(base)

    def forward(self, x: Tensor, offset: Offset = 0) -> Tensor:
        """x: (seq, batch, d_model), or (batch, seq, d_model) when batch_first; offset: an int or (batch,) ints."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"SinusoidalPositionalEncoding: x has {x.shape[-1]} features, expected {self.d_model}")
        if self.max_len is not None:
            seq = x.shape[1] if self.batch_first and x.dim() == 3 else x.shape[0]
            last = offset + seq - 1 if not isinstance(offset, Tensor) else int(offset.max()) + seq - 1
            if last >= self.max_len:
                raise IndexError(f"SinusoidalPositionalEncoding: position {last} is past max_len={self.max_len}")
        return sinusoidal_positional_encoding(
            x, scale=self.scale, offset=offset, dropout_p=self.dropout if self.training else 0.0,
            batch_first=self.batch_first, base=self.base,
        )  # fmt: skip

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        pe = state_dict.pop(prefix + "pe", None)
        if pe is not None:
            table = pe.reshape(pe.shape[0], -1) if pe.dim() == 3 and pe.shape[1] == 1 else pe.squeeze(0)
            rows = min(table.shape[0], _PE_CHECK_ROWS) if table.dim() == 2 else 0
            expected = reference.sinusoidal_table(torch.arange(rows), self.d_model, self.base)
            if (
                table.dim() != 2
                or table.shape[1] != self.d_model
                or not torch.allclose(table[:rows].double().cpu(), expected, atol=_PE_CHECK_ATOL, rtol=0.0)
            ):
                error_msgs.append(f"{prefix}pe: a positional-encoding table of shape {tuple(pe.shape)} that is not the "
                                  f"sinusoid of d_model={self.d_model}, base={self.base:g}")  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, dropout={self.dropout}, max_len={self.max_len}, "
                f"batch_first={self.batch_first}, scale={self.scale:g}, base={self.base:g}")  # fmt: skip


class LearnedPositionalEmbedding(torch.nn.Module):
    """``dropout(x * scale + weight[offset + s])``: a learned position embedding added to x in one pass.

    ``weight`` is (max_positions, embedding_dim), initialised N(0, 1) as :class:`torch.nn.Embedding`, whose
    ``state_dict`` (``{'weight'}``) this module shares: it loads from ``nn.Embedding(max_positions, embedding_dim)``.
    Input (batch, seq, embedding_dim) (``batch_first``, the default) or (seq, batch, embedding_dim); positions at or
    past max_positions raise IndexError.
    """

    def __init__(
        self,
        max_positions: int,
        embedding_dim: int,
        *,
        dropout: float = 0.0,
        batch_first: bool = True,
        scale: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LearnedPositionalEmbedding: dropout must be in [0, 1), got {dropout!r}")
        self.max_positions, self.embedding_dim = max_positions, embedding_dim
        self.dropout, self.batch_first, self.scale = float(dropout), batch_first, float(scale)
        self.weight = torch.nn.Parameter(torch.empty(max_positions, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.weight)

    def forward(self, x: Tensor, offset: Offset = 0) -> Tensor:
        return learned_positional_encoding(
            x, self.weight, scale=self.scale, offset=offset, dropout_p=self.dropout if self.training else 0.0,
            batch_first=self.batch_first,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (f"{self.max_positions}, {self.embedding_dim}, dropout={self.dropout}, batch_first={self.batch_first}, "
                f"scale={self.scale:g}")  # fmt: skip


class TokenAndPositionEmbedding(torch.nn.Module):
    """``dropout(token(tokens) * token_scale + position(positions))`` in one fused gather, with ``token`` and
    ``position`` plain :class:`torch.nn.Embedding` submodules: the ``state_dict`` keys are ``token.weight`` and
    ``position.weight``, so it loads from (and initialises like) a pair of ``nn.Embedding``.

    forward(tokens (batch, seq) or (seq,), offset=0, positions=None) -> (*tokens.shape, dim); see
    :func:`fastattn.embedding_with_positions` (positions default to ``offset + s``; out-of-range tokens or
    positions raise IndexError; ``padding_idx`` gets no gradient).
    """

    def __init__(
        self,
        vocab: int,
        max_positions: int,
        dim: int,
        dropout: float = 0.0,
        padding_idx: Optional[int] = None,
        *,
        token_scale: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TokenAndPositionEmbedding: dropout must be in [0, 1), got {dropout!r}")
        self.token = torch.nn.Embedding(vocab, dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self.position = torch.nn.Embedding(max_positions, dim, device=device, dtype=dtype)
        self.dropout, self.token_scale = float(dropout), float(token_scale)

    def forward(self, tokens: Tensor, offset: Offset = 0, positions: Optional[Tensor] = None) -> Tensor:
        return embedding_with_positions(
            tokens, self.token.weight, self.position.weight, offset=offset, positions=positions,
            token_scale=self.token_scale, dropout_p=self.dropout if self.training else 0.0,
            padding_idx=self.token.padding_idx,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, token_scale={self.token_scale:g}"


__all__ = ["LearnedPositionalEmbedding", "SinusoidalPositionalEncoding", "TokenAndPositionEmbedding"]
