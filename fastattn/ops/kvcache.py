"""KV-cache decoding attention: the torch.library op ``fastattn::attention_kvcache`` (forward only: decoding is
inference), its backends, and the public :func:`attention_with_kvcache`.

The op's problem: q (B, Hq, n, D) against caches k (B, Hkv, S, D) / v (B, Hkv, S, Dv) that hold ``lengths[b]``
valid keys; query i of batch b sits at position ``lengths[b] - n + i`` (see ``reference.attention_kvcache``).
Backends: split-KV kernels in Triton (``triton_kernels/kvcache.py``) and CUDA C++ (``csrc/cuda/kvcache_kernel.cu``);
on the CPU the C++ attention kernel over the
valid part of the caches with a mask built from the lengths; the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn import backends, reference
from fastattn.ops._eager import EagerOp
from fastattn.ops.attention import (
    FLOAT_DTYPES,
    _check_alibi,
    _check_qkv,
    _check_window,
    _cuda_check,
    _dtype_check,
    _kernel_alibi,
    _last_dim_unit,
)

CHECKS = {
    "cuda": _cuda_check,
    "triton": _dtype_check(FLOAT_DTYPES),
    "cpu": _dtype_check(FLOAT_DTYPES),
    "reference": lambda *_: None,
}


def _attention_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    alibi: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of the module docstring's problem; ``lengths`` (B,) int64."""
    name = backends.select("attention_kvcache", q.device, CHECKS, q, 0.0)
    if name in ("triton", "cuda"):
        alibi = None if alibi is None else alibi.float().expand(q.shape[0], q.shape[1])
        args = (_last_dim_unit(q), _last_dim_unit(k_cache), _last_dim_unit(v_cache), lengths.contiguous(), alibi)
        if name == "cuda":
            return torch.ops.fastattn_C.kvcache_forward(*args, scale, window_left, window_right)
        from fastattn.triton_kernels.kvcache import attention_kvcache  # noqa: PLC0415

        return attention_kvcache(*args, scale, window_left, window_right)
    if q.device.type == "cpu" and lengths.numel() > 0:  # keys past every length are never read (no sync on a CPU)
        used = int(lengths.max())
        k_cache, v_cache = k_cache[:, :, :used], v_cache[:, :, :used]
        if name == "cpu" and q.numel() and used and int(lengths.min()) == used:
            return _cpu_same_length(q, k_cache, v_cache, alibi, scale, window_left, window_right)
    if name == "reference" or q.numel() == 0 or k_cache.shape[2] == 0:
        out, lse = reference.attention_kvcache(q, k_cache, v_cache, lengths, alibi, scale, window_left, window_right)
        return out.contiguous(), lse.contiguous()
    # The C++ kernel with a mask built from the lengths. Decoding one token, each kv head's group of query heads
    # becomes its queries (B, Hkv, group, D), so every key is read once per group (1.5x at 32 heads over 8 kv
    # heads); with more queries the folded rows would reach the kernel's one-vector GEMM, which is slower.
    batch, heads, n, seq = q.shape[0], q.shape[1], q.shape[2], k_cache.shape[2]
    rows = (batch, k_cache.shape[1], heads // k_cache.shape[1] * n) if n == 1 else (batch, heads, n)
    mask = reference.kvcache_scores_bias(
        lengths, n, seq, alibi, heads, window_left, window_right,
        torch.float64 if q.dtype == torch.float64 else torch.float32,
    ).expand(batch, heads, n, seq).reshape(*rows, seq)  # fmt: skip
    out, lse = torch.ops.fastattn_C.attention_forward(
        _last_dim_unit(q.reshape(*rows, q.shape[3])), _last_dim_unit(k_cache), _last_dim_unit(v_cache), mask,
        None, None, scale, 0, -1, -1, 0.0, 0,
    )  # fmt: skip
    return out.reshape(batch, heads, n, -1), lse.reshape(batch, heads, n)


attention_kvcache_op = torch.library.custom_op("fastattn::attention_kvcache", _attention_kvcache, mutates_args=())
run_attention_kvcache = EagerOp(attention_kvcache_op, _attention_kvcache)


def _cpu_same_length(q, k, v, alibi, scale, window_left, window_right):
    """The C++ kernel when every sequence holds all of k's keys: plain attention with the queries at the last
    positions (diagonal = keys - queries), no mask to build. One query sees every key, so each kv head's group
    of query heads can become its queries (read once per group) unless ALiBi or a left window tells them apart."""
    batch, heads, n, seq = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    k, v = _last_dim_unit(k), _last_dim_unit(v)
    if n == 1 and alibi is None and window_left < 0:
        group = (batch, k.shape[1], heads // k.shape[1], q.shape[3])
        out, lse = torch.ops.fastattn_C.attention_forward(
            _last_dim_unit(q.reshape(group)), k, v, None, None, None, scale, 0, -1, -1, 0.0, 0
        )
        return out.reshape(batch, heads, 1, -1), lse.reshape(batch, heads, 1)
    return torch.ops.fastattn_C.attention_forward(
        _last_dim_unit(q), k, v, None, None, _kernel_alibi(alibi, q), scale, seq - n, window_left, window_right, 0.0, 0
    )


@attention_kvcache_op.register_fake
def _(q, k_cache, v_cache, lengths, alibi, scale, window_left, window_right):
    out = q.new_empty((*q.shape[:3], v_cache.shape[-1]))
    return out, q.new_empty(q.shape[:3], dtype=reference.compute_dtype(q.dtype))


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    window: Optional[tuple[int, int]] = None,
    return_lse: bool = False,
):
    """Attention of a few new queries against a key/value cache, appending the new keys and values in place.

    Args:
        q: (batch, heads, n, head_dim), the n newest tokens' queries (decoding: n = 1).
        k_cache, v_cache: (batch, kv_heads, max_seq, head_dim / head_dim_v); entries past each batch's
            length are ignored. kv_heads divides heads (GQA).
        cache_seqlens: (batch,) integers, each cache's length before this call.
        k_new, v_new: (batch, kv_heads, n_new, ...) or None: written into the caches at positions
            ``cache_seqlens[b] .. cache_seqlens[b] + n_new - 1`` (in place) before attending.
        causal: query i sits at position ``length_b - n + i`` of its batch's sequence (length_b = cache_seqlens[b]
            + n_new) and sees the keys up to it; otherwise every valid key.
        scale, alibi_slopes, window, return_lse: as :func:`fastattn.attention`, with positions counted per batch.

    Returns:
        out (batch, heads, n, head_dim_v) and, when ``return_lse``, lse (batch, heads, n). Not differentiable.
    """
    name = "fastattn.attention_with_kvcache"
    _check_qkv(q, k_cache, v_cache, name)
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: cache_seqlens must be an int32 or int64 Tensor")
    if cache_seqlens.shape != (q.shape[0],) or cache_seqlens.device != q.device:
        raise ValueError(f"{name}: cache_seqlens must be ({q.shape[0]},) on {q.device}, "
                         f"got {tuple(cache_seqlens.shape)} on {cache_seqlens.device}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{name}: pass both k_new and v_new, or neither")
    n_new = 0
    if k_new is not None:
        n_new = k_new.shape[2]
        expected = (k_cache.shape[0], k_cache.shape[1], n_new)
        for arg, new, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            if new.shape != (*expected, cache.shape[3]) or new.dtype != cache.dtype or new.device != cache.device:
                raise ValueError(f"{name}: {arg} must be {(*expected, cache.shape[3])} {cache.dtype} on "
                                 f"{cache.device}, got {tuple(new.shape)} {new.dtype} on {new.device}")
    lengths = cache_seqlens.long() + n_new
    if bool(((cache_seqlens < 0) | (lengths > k_cache.shape[2])).any()):
        raise ValueError(f"{name}: cache_seqlens + n_new must lie in [0, {k_cache.shape[2]}] (the caches' length)")
    _check_alibi(alibi_slopes, q, name)
    window_left, window_right = _check_window(window, name)
    if causal:
        window_right = 0 if window_right < 0 else min(window_right, 0)
    if k_new is not None:
        positions = (cache_seqlens.long()[:, None] + torch.arange(n_new, device=q.device))[:, None, :, None]
        for new, cache in ((k_new, k_cache), (v_new, v_cache)):
            cache.scatter_(2, positions.expand_as(new), new)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = run_attention_kvcache(q, k_cache, v_cache, lengths, alibi_slopes, scale, window_left, window_right)
    return (out, lse) if return_lse else out
