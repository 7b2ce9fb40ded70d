"""A Transformer encoder that maps a sequence of feature vectors to per-step outputs: :class:`SequenceTransformer`
on fastattn's kernels, and :class:`TorchSequenceTransformer`, its pure torch.nn twin (same constructor, same
``state_dict`` keys, same results).

x (batch, seq, input_dim) -> Linear -> ``* sqrt(d_model) + PE`` (sinusoidal, as the PyTorch tutorial) -> dropout
-> num_layers encoder layers (post-norm; pre-norm with a final LayerNorm when ``norm_first``) -> Linear
-> (batch, seq, num_outputs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastattn.nn.norm import LayerNorm
from fastattn.nn.positional import SinusoidalPositionalEncoding
from fastattn.nn.transformer import TransformerEncoder, TransformerEncoderLayer
from fastattn.ops.linear import module_linear

# Rows of the twin's sinusoid table when max_len is None: the tutorial's default.
TUTORIAL_MAX_LEN = 5000


class SequenceTransformer(nn.Module):
    """Per-step predictions from a Transformer encoder, on fastattn kernels: the input projection's output is
    scaled, given its sinusoidal positions and dropout in one kernel (:class:`fastattn.SinusoidalPositionalEncoding`),
    attention runs in the fused kernel and every residual add + dropout + LayerNorm in one
    (:class:`fastattn.TransformerEncoder`).

    Args:
        input_dim: features per step of the input; num_outputs: features per step of the output.
        d_model, nhead, num_layers: the encoder's width, heads (d_model % nhead == 0) and depth.
        dim_feedforward: the feed-forward width (default 4 * d_model).
        dropout: on the positional encoding's output and inside every layer (attention probabilities included).
        norm_first: pre-norm layers and a final LayerNorm; else post-norm (the original Transformer).
        causal: step i attends only to steps <= i.
        max_len: None (any length) or the number of positions allowed (longer inputs raise IndexError).

    forward(x, key_padding_mask=None): x (batch, seq, input_dim) float; key_padding_mask (batch, seq) bool,
    True = padding (no step attends to it). Returns (batch, seq, num_outputs). Padded steps are computed like real
    ones (they attend to the real steps) and their outputs mean nothing. A step that may attend to no step (its
    whole sequence padded, or with ``causal`` only padding before it) gets attention output 0, as torch's math
    attention path does since torch 2.5.
    """

    def __init__(
        self,
        input_dim: int,
        num_outputs: int,
        d_model: int = 128,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        norm_first: bool = False,
        causal: bool = False,
        max_len: int | None = None,
    ):
        super().__init__()
        check_arguments(type(self).__name__, input_dim, num_outputs, d_model, nhead, num_layers, dim_feedforward,
                        dropout, max_len)  # fmt: skip
        self.input_dim, self.d_model, self.causal = input_dim, d_model, causal
        self.input_proj = nn.Linear(input_dim, d_model)
        self.pos_encoder = SinusoidalPositionalEncoding(d_model, dropout, max_len, batch_first=True,
                                                        scale=math.sqrt(d_model))  # fmt: skip
        layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward or 4 * d_model, dropout, batch_first=True,
                                        norm_first=norm_first)  # fmt: skip
        self.encoder = TransformerEncoder(layer, num_layers, norm=LayerNorm(d_model) if norm_first else None,
                                          enable_nested_tensor=False)  # fmt: skip
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x (batch, seq, input_dim), key_padding_mask (batch, seq) bool or None -> (batch, seq, num_outputs)."""
        check_inputs(type(self).__name__, x, key_padding_mask, self.input_dim)
        h = self.pos_encoder(module_linear(self.input_proj, x))  # (batch, seq, d_model)
        mask = causal_mask(x.shape[1], x.device) if self.causal else None
        h = self.encoder(h, mask=mask, src_key_padding_mask=key_padding_mask, is_causal=self.causal)
        return module_linear(self.head, h)  # (batch, seq, num_outputs)


class TorchSequenceTransformer(nn.Module):
    """The pure torch.nn twin of :class:`SequenceTransformer`: same arguments, ``state_dict`` keys and results
    (dropout draws aside), built from torch.nn.TransformerEncoder and the tutorial's positional table
    (:class:`TutorialPositionalEncoding`, ``max_len`` rows or 5000 when None)."""

    def __init__(
        self,
        input_dim: int,
        num_outputs: int,
        d_model: int = 128,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        norm_first: bool = False,
        causal: bool = False,
        max_len: int | None = None,
    ):
        super().__init__()
        self.d_model, self.causal = d_model, causal
        self.input_proj = nn.Linear(input_dim, d_model)
        self.pos_encoder = TutorialPositionalEncoding(d_model, dropout, max_len or TUTORIAL_MAX_LEN)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward or 4 * d_model, dropout, batch_first=True,
                                           norm_first=norm_first)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model) if norm_first else None,
                                             enable_nested_tensor=False)  # fmt: skip
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        h = self.pos_encoder(self.input_proj(x) * math.sqrt(self.d_model))  # (batch, seq, d_model)
        mask = causal_mask(x.shape[1], x.device) if self.causal else None
        h = self.encoder(h, mask=mask, src_key_padding_mask=key_padding_mask, is_causal=self.causal)
        return self.head(h)


class TutorialPositionalEncoding(nn.Module):
    """``dropout(x + PE[:seq])`` for batch-first x (batch, seq, d_model), PE a (max_len, d_model) sinusoid table as
    in the PyTorch tutorial: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same). The table is built in
    float64 and cast to x's dtype when added; it is a non-persistent buffer (no ``state_dict`` entry)."""

    def __init__(self, d_model: int, dropout: float, max_len: int):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (max_len, 1)
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(position * inv_freq)
        pe[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])  # an odd d_model ends with a sin column
        self.register_buffer("pe", pe, persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x + self.pe[: x.shape[1]].to(x.dtype))


def causal_mask(seq: int, device: torch.device) -> Tensor:
    """(seq, seq) bool, True above the diagonal: step i may not attend to steps j > i (torch.nn's convention)."""
    return torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)


def check_arguments(name: str, input_dim, num_outputs, d_model, nhead, num_layers, dim_feedforward, dropout,
                    max_len) -> None:  # fmt: skip
    """Readable errors for constructor arguments torch.nn would accept or reject obscurely."""
    sizes = dict(input_dim=input_dim, num_outputs=num_outputs, d_model=d_model, nhead=nhead, num_layers=num_layers)
    optional_sizes = dict(dim_feedforward=dim_feedforward, max_len=max_len)
    for arg, value in {**sizes, **{k: v for k, v in optional_sizes.items() if v is not None}}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
    if d_model % nhead:
        raise ValueError(f"{name}: d_model ({d_model}) must be divisible by nhead ({nhead})")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be a float in [0, 1), got {dropout!r}")


def check_inputs(name: str, x, key_padding_mask, input_dim: int) -> None:
    """x must be a float (batch, seq, input_dim) tensor; key_padding_mask None or bool (batch, seq)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3 or x.shape[-1] != input_dim:
        raise ValueError(f"{name}: x must be (batch, seq, input_dim={input_dim}), got shape {tuple(x.shape)}")
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        got = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
        raise TypeError(f"{name}: key_padding_mask must be a bool Tensor (True = padding), got {got}")
    if key_padding_mask.shape != x.shape[:2]:
        raise ValueError(f"{name}: key_padding_mask must be (batch, seq) = {tuple(x.shape[:2])} as x, got shape "
                         f"{tuple(key_padding_mask.shape)}")  # fmt: skip
    if key_padding_mask.device != x.device:
        raise ValueError(f"{name}: key_padding_mask is on {key_padding_mask.device} but x is on {x.device}")


__all__ = ["SequenceTransformer", "TorchSequenceTransformer", "TutorialPositionalEncoding"]
