"""``fastattn.RotaryEmbedding``: rotary position embeddings (RoPE) of q and k as a module."""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from fastattn import reference
from fastattn.ops.rotary import apply_rotary


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embeddings: ``q, k = rope(q, k, positions=None, offset=0)`` with q (batch, heads, seq,
    head_dim) and k (batch, kv_heads, seq, head_dim); see :func:`fastattn.apply_rotary`.

    Args:
        dim: the number of leading features of each head that rotate (even; the rest pass through).
        base: angles ``position * base ** (-2i / dim)``.
        interleaved: GPT-J pairs (x[2i], x[2i+1]) instead of GPT-NeoX / Llama pairs (x[i], x[i + dim/2]).
        max_positions: None (the default) computes the angles in the kernel, for any position. An int caches
            cos and sin tables of shape (max_positions, dim // 2) in float32 (``cos_cached``, ``sin_cached``) and
            reads them instead; a position at or past max_positions is then an error. The tables are
            non-persistent buffers: ``state_dict()`` stays empty, and ``.to(dtype)`` / ``.half()`` rebuild them
            in float32 (float64 for ``.double()``) rather than rounding them.
        device: where the tables are built.
    """

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        interleaved: bool = False,
        max_positions: Optional[int] = None,
        device: Optional[Union[torch.device, str]] = None,
    ):
        super().__init__()
        if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be a positive even int, got {dim!r}")
        if not isinstance(base, numbers.Real) or isinstance(base, bool) or not 0 < base < float("inf"):
            raise ValueError(f"RotaryEmbedding: base must be a positive finite number, got {base!r}")
        if max_positions is not None and (
            not isinstance(max_positions, numbers.Integral) or isinstance(max_positions, bool) or max_positions <= 0
        ):
            raise ValueError(f"RotaryEmbedding: max_positions must be a positive int or None, got {max_positions!r}")
        self.dim, self.base, self.interleaved = int(dim), float(base), bool(interleaved)
        self.max_positions = None if max_positions is None else int(max_positions)
        cos = sin = None
        if self.max_positions is not None:
            cos, sin = reference.rotary_cos_sin_table(self.max_positions, self.dim, self.base, torch.float32, device)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def forward(
        self,
        q: Tensor,
        k: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
        offset: Union[int, Tensor] = 0,
        inplace: bool = False,
    ):
        """Rotated (q, k), or q alone when k is None; positions and offset as :func:`fastattn.apply_rotary`."""
        return apply_rotary(
            q, k, positions=positions, offset=offset, cos=self.cos_cached, sin=self.sin_cached, rotary_dim=self.dim,
            interleaved=self.interleaved, base=self.base, inplace=inplace,
        )  # fmt: skip

    def _apply(self, fn, recurse=True):
        # Module.to(dtype), .half(), ... cast float buffers; tables rounded to 16 bits would lose most of their
        # precision, so rebuild them in float32 (float64 after .double()) on their new device instead.
        super()._apply(fn, recurse)
        cos = self.cos_cached
        if cos is not None and cos.dtype != torch.float32:
            dtype = torch.float64 if cos.dtype == torch.float64 else torch.float32
            self.cos_cached, self.sin_cached = reference.rotary_cos_sin_table(
                self.max_positions, self.dim, self.base, dtype, cos.device
            )
        return self

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, base={self.base:g}, interleaved={self.interleaved}, max_positions={self.max_positions}"
        )


__all__ = ["RotaryEmbedding"]
