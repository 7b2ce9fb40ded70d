"""``fastattn.MultiheadAttention``: drop-in for :class:`torch.nn.MultiheadAttention` on the fused attention kernel."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import backends
from fastattn.nn._drop_in import DropIn
from fastattn.ops._random import dropout_seed_tensor
from fastattn.ops.attention import run_attention
from fastattn.ops.linear import linear


class MultiheadAttention(DropIn, torch.nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` whose attention runs in fastattn's fused kernel.

    Same constructor (embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first),
    parameters, ``state_dict`` keys, initialisation and forward arguments as torch's; returns
    ``(attn_output, attn_weights)`` like torch:

    - ``need_weights=False`` (what torch's Transformer layers pass): the fused kernel; ``attn_weights`` is None.
      Dropout on the attention probabilities is drawn inside the kernel (its own Philox stream, reproducible
      under :func:`torch.manual_seed`, but not torch's draws).
    - ``need_weights=True`` (torch's default): the weights must be formed, which the fused kernel never does, so
      torch's own implementation runs; :func:`fastattn.record` and the ``fastattn`` logger (INFO) show it.
      Likewise for an ``attn_mask`` that requires grad (the kernel gives masks no gradient).

    Masks follow torch: ``attn_mask`` (L, S) or (N * num_heads, L, S), bool True = *not* allowed, float added;
    ``key_padding_mask`` (N, S), bool True = ignore, float added; ``is_causal`` is a hint that ``attn_mask`` is
    the causal mask (the kernel then skips the masked blocks instead of reading the mask). A query that can see
    no key gets attention output 0 (so the out projection's bias), as torch's SDPA path does (its
    ``need_weights=True`` path gives NaN).
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """query (L, N, E_q), key (S, N, E_k), value (S, N, E_v) (N first when ``batch_first``; no N for
        unbatched input) -> attn_output of query's shape and, with ``need_weights``, the attention weights
        (N, L, S), or (N, num_heads, L, S) when not ``average_attn_weights``."""
        why_torch = _needs_torch(need_weights, attn_mask)
        if why_torch:
            backends.report_fallback("multihead_attention", "torch.nn", why_torch)
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        check_mask_dtype(key_padding_mask, "key_padding_mask")
        check_mask_dtype(attn_mask, "attn_mask")
        if not is_batched:
            query, key, value = _map_keeping_identity(lambda t: t.unsqueeze(0), query, key, value)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = _map_keeping_identity(lambda t: t.transpose(0, 1), query, key, value)
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal)  # (N, H, L, D)
        batch, heads, seq_q, _ = out.shape
        if is_batched and not self.batch_first:
            out = out.permute(2, 0, 1, 3).reshape(seq_q, batch, self.embed_dim)  # (L, N, E)
        else:
            out = out.transpose(1, 2).reshape(batch, seq_q, self.embed_dim)  # (N, L, E)
        out = linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if is_batched else out.squeeze(0)), None

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> Tensor:
        """Batch-first query (N, L, E), key and value (N, S, E_k / E_v) -> the heads' outputs (N, H, L, D)."""
        batch, seq_q, embed = query.shape
        if embed != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed}")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(
                f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}"
            )
        q, k, v = self._project(query, key, value)  # (N, H, L, D), (N, H, S, D), (N, H, S, D)
        mask = None if is_causal else _kernel_mask(attn_mask, batch, self.num_heads, seq_q, k.shape[2])
        padding = key_padding_mask
        extra_keys = [self.bias_k is not None, self.add_zero_attn].count(True)
        if self.bias_k is not None:
            k, v = (torch.cat([t, b.view(1, self.num_heads, 1, -1).expand(batch, -1, -1, -1)], dim=2)
                    for t, b in ((k, self.bias_k), (v, self.bias_v)))  # fmt: skip
        if self.add_zero_attn:
            k, v = (torch.cat([t, t.new_zeros(batch, self.num_heads, 1, t.shape[-1])], dim=2) for t in (k, v))
        if extra_keys:  # keys every query may attend
            mask = None if mask is None else F.pad(mask, (0, extra_keys), value=mask.dtype == torch.bool)
            padding = None if padding is None else F.pad(padding, (0, extra_keys), value=0)
        if padding is not None and padding.shape != (batch, k.shape[2]):
            raise AssertionError(
                f"expecting key_padding_mask shape of {(batch, k.shape[2])}, but got {tuple(padding.shape)}"
            )
        if padding is not None and padding.dtype != torch.bool:  # an additive padding mask joins the float mask
            padding_scores = padding.view(batch, 1, 1, -1).to(query.dtype)
            mask = padding_scores if mask is None else _as_scores(mask, query.dtype) + padding_scores
            padding = None
        dropout_p = self.dropout if self.training else 0.0
        out, _ = run_attention(
            q, k, v, mask, padding, None, q.shape[-1] ** -0.5, 0, -1, 0 if is_causal else -1, dropout_p,
            dropout_seed_tensor(dropout_p),
        )  # fmt: skip
        return out

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The in-projections as (N, heads, seq, head_dim) views: one GEMM for self-attention (query is key is
        value), two for shared keys and values (key is value), three otherwise, as torch."""
        heads, embed = self.num_heads, self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if self._qkv_same_embed_dim and query is key and key is value:
            qkv = linear(query, w, b).unflatten(-1, (3, heads, -1))  # (N, L, 3, H, D)
            return tuple(t.transpose(1, 2) for t in qkv.unbind(2))  # unbind: its backward is one stack
        if self._qkv_same_embed_dim:
            w_q, w_kv = w.split([embed, 2 * embed])
            b_q, b_kv = (None, None) if b is None else b.split([embed, 2 * embed])
            if key is value:
                q = linear(query, w_q, b_q)
                k, v = linear(key, w_kv, b_kv).unflatten(-1, (2, heads, -1)).unbind(2)  # (N, S, H, D) each
                return _heads(q, heads), k.transpose(1, 2), v.transpose(1, 2)
            weights = w.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if b is None else b.chunk(3)
        return tuple(
            _heads(linear(x, wi, bi), heads) for x, wi, bi in zip((query, key, value), weights, biases, strict=True)
        )


def _needs_torch(need_weights: bool, attn_mask: Optional[Tensor]) -> Optional[str]:
    if need_weights:
        return "need_weights=True asks for the attention weights, which the fused kernel never forms"
    if attn_mask is not None and attn_mask.requires_grad:
        return "attn_mask requires grad, and the fused kernel gives masks no gradient"
    return None


def check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    """torch.nn's check of a mask's dtype: bool or floating point."""
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise AssertionError(f"only bool and floating types of {name} are supported")


def _map_keeping_identity(fn, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``fn`` of each tensor, computed once per distinct tensor, so that ``is`` still tells self-attention."""
    q = fn(query)
    k = q if key is query else fn(key)
    v = k if value is key else (q if value is query else fn(value))
    return q, k, v


def _heads(x: Tensor, heads: int) -> Tensor:
    """(N, S, H * D) -> a (N, H, S, D) view."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _kernel_mask(mask: Optional[Tensor], batch: int, heads: int, seq_q: int, seq_k: int) -> Optional[Tensor]:
    """torch's attn_mask ((L, S) or (N * H, L, S); bool True = not allowed) as the kernel's, broadcastable to
    (N, H, L, S) with bool True = attend."""
    if mask is None:
        return None
    if mask.dim() == 2:
        if mask.shape != (seq_q, seq_k):
            raise RuntimeError(f"The shape of the 2D attn_mask is {mask.shape}, but should be {(seq_q, seq_k)}.")
        mask = mask.view(1, 1, seq_q, seq_k)
    elif mask.dim() == 3:
        if mask.shape != (batch * heads, seq_q, seq_k):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {mask.shape}, but should be {(batch * heads, seq_q, seq_k)}."
            )
        mask = mask.view(batch, heads, seq_q, seq_k)
    else:
        raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
    return mask.logical_not() if mask.dtype == torch.bool else mask


def _as_scores(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A kernel mask (bool True = attend, or float) as additive scores."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


__all__ = ["MultiheadAttention"]
