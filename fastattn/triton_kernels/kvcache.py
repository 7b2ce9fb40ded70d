"""Triton KV-cache decoding attention: split-KV ("flash-decoding").

A few new queries per sequence (decoding: 1; speculative or chunked: up to 16) attend to a long cache. A
plain attention kernel would run one short program per (batch, head) and leave most of a GPU idle, so the
keys are cut into splits:

1. ``_kvcache_split_kernel``, one program per (split, batch, kv head, block of rows): the rows are every query of
   every query head that shares the kv head (GQA: the group's heads x n queries), so each key and value is
   read once per group. It streams the split's keys through an online softmax and writes a partial result
   normalised within the split: out_s and lse_s (-inf where the split holds no key the query sees).
2. ``_kvcache_combine_kernel``, one program per (batch, head, query): lse = log sum_s exp(lse_s) and
   out = sum_s exp(lse_s - lse) out_s.

Query i of batch b sits at position ``pos = lengths[b] - n + i`` and sees keys j < lengths[b] with
``-window_left <= j - pos <= window_right`` (-1: unbounded; causal is window_right = 0); ALiBi adds
``-slope * |j - pos|``. Splits are planned on the cache's capacity, not on lengths (which live on the device):
a split past a sequence's length returns at once. Semantics: fastattn/reference.py, ``attention_kvcache``.
The scale arrives as integer bits (triton_kernels/scalars.py), so float64 keeps it exactly.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.triton_kernels.attention import (
    LOG2E, _aligned, _alignment, _dot, _exp, _interpreting, _load_rows, _row_strides,
)
from fastattn.triton_kernels.scalars import scalar, scalar_bits

MAX_ROWS = 64  # rows (group heads x queries) per program; more rows take more programs
INTERPRETER_SPLIT = 32  # keys per split under the interpreter: several splits even for short test caches


@triton.jit(do_not_specialize=["qk_scale_bits"])
def _kvcache_split_kernel(
    Q,  # (B, Hq, n, D), strides (stride_qb, stride_qh, stride_qm, 1)
    K,  # (B, Hkv, S, D), strides (stride_kb, stride_kh, stride_kn, 1)
    V,  # (B, Hkv, S, Dv), strides (stride_vb, stride_vh, stride_vn, 1)
    LENGTHS,  # (B,) int64: valid keys per sequence
    ALIBI,  # optional (B, Hq) float32 slopes view
    O_PART,  # (splits, B, Hq, n, Dv) contiguous, ACC: each split's normalised output
    LSE_PART,  # (splits, B, Hq, n) contiguous, ACC: each split's natural log-sum-exp
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ab, stride_ah,
    B, Hq, n_queries, kv_group, row_blocks, split_size,
    qk_scale_bits,  # scalar_bits of the scale, times log2(e) in base 2
    window_left, window_right,  # -1: unbounded
    HAS_ALIBI: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, BASE2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ALIGN: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr,
):
    qk_scale = scalar(qk_scale_bits, ACC)
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h_kv = tl.program_id(2) // row_blocks
    stride_qb, stride_qh, stride_qm = _aligned(stride_qb, ALIGN), _aligned(stride_qh, ALIGN), _aligned(stride_qm, ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, ALIGN), _aligned(stride_kh, ALIGN), _aligned(stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned(stride_vb, ALIGN), _aligned(stride_vh, ALIGN), _aligned(stride_vn, ALIGN)

    # Row r of the group: query head h_kv * group + r // n, query r % n.
    rows = (tl.program_id(2) % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < kv_group * n_queries
    heads = (h_kv * kv_group + rows // n_queries).to(tl.int64)
    query = (rows % n_queries).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + query[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    length = tl.load(LENGTHS + b)
    position = length - n_queries + query  # (BLOCK_M,)
    # This split's keys, cut to those some query sees (the first query sits at length - n).
    start = split * split_size
    end = tl.minimum(start + split_size, length)
    if HAS_WL:
        start = tl.maximum(start, length - n_queries - window_left)
    slope = tl.zeros([BLOCK_M], dtype=ACC)
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + heads * stride_ah, mask=row_ok, other=0.0).to(ACC)
        if BASE2:
            slope = slope * 1.4426950408889634  # log2(e)

    K += b * stride_kb + h_kv * stride_kh
    V += b * stride_vb + h_kv * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, offs_d, stride_kn, end, HEAD_DIM, True, HEAD_DIM != BLOCK_D)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC), INTERPRET) * qk_scale
        distance = offs_n[None, :] - position[:, None]  # key position - query position
        visible = offs_n[None, :] < end
        if HAS_WL:
            visible = visible & (distance >= -window_left)
        if HAS_WR:
            visible = visible & (distance <= window_right)
        if HAS_ALIBI:
            s -= slope[:, None] * tl.abs(distance).to(ACC)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp(s - m_safe[:, None], BASE2)
        alpha = _exp(m_i - m_safe, BASE2)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(V, offs_n, offs_dv, stride_vn, end, HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if BASE2:
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # ln(2)
    else:
        lse = m_i + tl.log(l_safe)
    part = ((split * B + b) * Hq + heads) * n_queries + query  # (BLOCK_M,) rows of O_PART / LSE_PART
    tl.store(LSE_PART + part, tl.where(empty, float("-inf"), lse), mask=row_ok)
    o_ptrs = O_PART + part[:, None] * HEAD_DIM_V + offs_dv[None, :]
    tl.store(o_ptrs, acc / l_safe[:, None], mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _kvcache_combine_kernel(
    O_PART, LSE_PART,  # as written by _kvcache_split_kernel
    OUT,  # (B, Hq, n, Dv) contiguous, q's dtype
    LSE,  # (B, Hq, n) contiguous, ACC
    n_rows,  # B * Hq * n
    n_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(LSE_PART + splits * n_rows + row, mask=splits < n_splits, other=float("-inf"))
    top = tl.max(lse_s, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # no split saw a key: weights exp(-inf) = 0
    weight = tl.exp(lse_s - top)
    total = tl.sum(weight, axis=0)
    o_ptrs = O_PART + (splits[:, None] * n_rows + row) * HEAD_DIM_V + offs_dv[None, :]
    o_s = tl.load(o_ptrs, mask=(splits[:, None] < n_splits) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    empty = total == 0.0
    out = tl.sum(weight[:, None] * o_s, axis=0) / tl.where(empty, 1.0, total)
    tl.store(OUT + row * HEAD_DIM_V + offs_dv, out.to(OUT.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(LSE + row, tl.where(empty, float("-inf"), top + tl.log(tl.where(empty, 1.0, total))))


def _split_size(max_seq: int, programs: int, block_n: int, device: torch.device) -> int:
    """Keys per split: enough splits for about two programs per multiprocessor, each at least 4 key blocks."""
    if _interpreting():
        return INTERPRETER_SPLIT
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(max_seq, 4 * block_n)))
    return triton.cdiv(triton.cdiv(max_seq, splits), block_n) * block_n


def attention_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    alibi: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    split_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Decoding attention; returns (out, lse).

    q: (B, Hq, n, D); k_cache: (B, Hkv, S, D); v_cache: (B, Hkv, S, Dv), unit stride over the last dim, Hkv
    dividing Hq; lengths: (B,) int64 on q's device, each <= S; alibi: None or (B, Hq) float32 slopes. Query i
    of batch b sits at position lengths[b] - n + i (see the module docstring). ``split_size`` (keys per split,
    a multiple of 16) overrides the plan. out: (B, Hq, n, Dv) contiguous in q's dtype; lse: (B, Hq, n)
    float32 (float64 for float64), -inf for a query that sees no key (its out is 0).
    """
    batch, heads, n_queries, head_dim = q.shape
    heads_kv, max_seq, head_dim_v = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty((batch, heads, n_queries, head_dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n_queries), dtype=acc_dtype, device=q.device)
    if out.numel() == 0:
        return out, lse
    if max_seq == 0:
        return out.zero_(), lse.fill_(float("-inf"))

    interpret = _interpreting()
    group = heads // heads_kv
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    block_m = min(MAX_ROWS, max(16, triton.next_power_of_2(group * n_queries)))
    block_n = 16 if interpret else (32 if q.dtype == torch.float64 or max(block_d, block_dv) > 128 else 64)
    row_blocks = triton.cdiv(group * n_queries, block_m)
    if split_size is None:
        split_size = _split_size(max_seq, batch * heads_kv * row_blocks, block_n, q.device)
    n_splits = triton.cdiv(max_seq, split_size)
    base2 = q.dtype != torch.float64

    o_part = torch.empty((n_splits, batch, heads, n_queries, head_dim_v), dtype=acc_dtype, device=q.device)
    lse_part = torch.empty((n_splits, batch, heads, n_queries), dtype=acc_dtype, device=q.device)
    alibi_arg, alibi_strides = (q, (0, 0)) if alibi is None else (alibi, alibi.stride())
    strides = (_row_strides(q), _row_strides(k_cache), _row_strides(v_cache))
    qk_scale = scalar_bits(scale * LOG2E if base2 else scale, q.dtype)
    _kvcache_split_kernel[(n_splits, batch, heads_kv * row_blocks)](
        q, k_cache, v_cache, lengths, alibi_arg, o_part, lse_part,
        *strides[0], *strides[1], *strides[2], *alibi_strides,
        batch, heads, n_queries, group, row_blocks, split_size, qk_scale,
        window_left, window_right,
        HAS_ALIBI=alibi is not None, HAS_WL=window_left >= 0, HAS_WR=window_right >= 0, BASE2=base2,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        ALIGN=_alignment(strides[0] + strides[1] + strides[2]),
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        INTERPRET=interpret,
        num_warps=4, num_stages=1 if interpret else 2,
    )  # fmt: skip
    _kvcache_combine_kernel[(batch * heads * n_queries,)](
        o_part, lse_part, out, lse, batch * heads * n_queries, n_splits,
        HEAD_DIM_V=head_dim_v, BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_DV=block_dv,
    )  # fmt: skip
    return out, lse
