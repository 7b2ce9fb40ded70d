"""Triton attention forward: FlashAttention-style, one program per (query block, head, batch).

For query i of head h (batch b), kv head h // (Hq // Hkv) (GQA), the scores are

    s_ij = scale * q_i . k_j + mask_ij + alibi_ij         (float mask added; alibi = -slope * |j - i - diagonal|)
    s_ij = -inf   where a bool mask is False, key j is padding, or j lies outside the window
                  [i + diagonal - window_left, i + diagonal + window_right] (a bound of -1: unbounded)

and out_i = sum_j softmax(s_i)_j v_j, lse_i = log sum_j exp(s_ij). A query that sees no key gets out 0 and
lse -inf. Semantics: fastattn/reference.py, ``attention``.

The program keeps its (BLOCK_M, D) query tile in registers and streams key/value blocks of BLOCK_N keys
through an online softmax, in base 2 with log2(e) folded into the scale (float64: base e, exactly):

    m_new = max(m, rowmax(s))            running max (the max of -inf and -inf is guarded to 0 in exponents)
    p     = exp2(s - m_new)              unnormalised probabilities of this block
    l     = l * exp2(m - m_new) + rowsum(p)
    acc   = acc * exp2(m - m_new) + p v
    out   = acc / l,   lse = (m + log2 l) * ln 2

Only key blocks that meet the query block's window are visited, so causal attention costs about half. The
visited range is split in three: blocks that straddle the window's left edge, blocks wholly inside the window
and the key range (no per-element window or bounds checks), and blocks that straddle the right edge or the
end of the keys. Bool masks, float masks, key padding and alibi apply to every block when present.

Accumulation is in float32 (float64 for float64 inputs); float32 dots use IEEE fp32 (never TF32); p is
rounded to v's dtype before the p v dot, as in FlashAttention. Dropout multiplies p by 1 / (1 - p_drop) or 0
after l is summed, the kept entries drawn by Philox from (seed, b, h, i, j) (csrc/philox.h), so the backward
regenerates them. The float scalars (the scales, 1 / (1 - p_drop)) arrive as integer bits
(triton_kernels/scalars.py), so float64 keeps them exactly.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.triton_kernels.philox import philox
from fastattn.triton_kernels.scalars import scalar, scalar_bits

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * LOG2E); inside kernels as the literal 1.4426950408889634


def _interpreting() -> bool:
    """True when kernels run through the Triton interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


DROPOUT_ARGS = ("drop_seed0", "drop_seed1", "drop_threshold", "drop_scale_bits")  # any value: never specialised
INTERPRETER_BLOCK = 16  # the interpreter's cost is Python per program and per block: small tiles, few of each
SMEM_SLACK = 16 * 1024  # shared memory Triton uses beyond the tiles counted in _shared_memory (layout scratch)


def _shared_memory(block_m, block_n, block_d, block_dv, stages, itemsize, mask_itemsize) -> int:
    """Bytes of shared memory a config needs, roughly: the query tile, ``stages`` buffers of the key, value
    and mask tiles, and SMEM_SLACK."""
    kv = block_n * (block_d + block_dv) * itemsize + block_m * block_n * mask_itemsize
    return block_m * block_d * itemsize + stages * kv + SMEM_SLACK


def _config(
    seq_q: int, block_d: int, block_dv: int, dtype: torch.dtype, mask_itemsize: int, smem_budget: int
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU for padded head dims ``block_d`` / ``block_dv``.

    16-bit inputs: 128x64 tiles up to head dim 128 (8 warps past 64) with 3 stages, 64x32 with 2 stages for
    head dim 256. float32 and float64 tiles are smaller: their dots run without tensor cores and their tiles
    take 2-4x the bytes. BLOCK_M shrinks to the query length (at least 16, the smallest ``tl.dot`` tile) so
    short queries (decoding) do not waste a 128-row tile. Then stages, BLOCK_N and BLOCK_M shrink until the
    tiles fit ``smem_budget`` bytes of shared memory (227 KiB on H100, 163 KiB on A100, 99 KiB on sm_86/89).
    """
    width = max(block_d, block_dv)
    if dtype == torch.float64:
        block_m, block_n, warps, stages = (32, 32, 4, 1) if width <= 64 else (16, 16, 4, 1)
    elif dtype == torch.float32:
        block_m, block_n, warps, stages = (64, 64, 4, 2) if width <= 64 else (64, 32, 4, 2)
        if width > 128:
            block_m, block_n, warps, stages = 32, 32, 4, 1
    elif width <= 128:
        block_m, block_n, warps, stages = 128, 64, 4 if width <= 64 else 8, 3
    else:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    block_m = min(block_m, max(16, triton.next_power_of_2(seq_q)))
    itemsize = torch.empty((), dtype=dtype).element_size()
    while _shared_memory(block_m, block_n, block_d, block_dv, stages, itemsize, mask_itemsize) > smem_budget:
        if stages > 2:
            stages -= 1
        elif block_n > 32:
            block_n //= 2
        elif block_m > 64:
            block_m //= 2
        elif stages > 1:
            stages -= 1
        elif block_n > 16:
            block_n //= 2
        elif block_m > 16:
            block_m //= 2
        else:
            break
    if block_m < 128:
        warps = 4
    return block_m, block_n, warps, stages


def _dropout_args(dropout_p: float, seed: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """The kernels' dropout arguments for ``dtype`` inputs: the seed's low and high 32 bits, floor(p * 2^32) and
    scalar_bits of 1 / (1 - p)."""
    seed &= 2**64 - 1
    return seed & 0xFFFFFFFF, seed >> 32, int(dropout_p * 2**32), scalar_bits(1.0 / (1.0 - dropout_p), dtype)


def _row_strides(t: Tensor) -> tuple[int, int, int]:
    """Strides of the first three dims, 0 over dims of size 1 (their index is always 0): unused strides then
    neither cost a kernel variant nor spoil the alignment."""
    return tuple(0 if size == 1 else stride for size, stride in zip(t.shape[:3], t.stride()[:3]))


def _alignment(strides) -> int:
    """The largest power of two up to 16 dividing every stride (in elements)."""
    align = 16
    while any(s % align for s in strides):
        align //= 2
    return align


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the forward (and, later, the backward and split-KV kernels).
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """``stride`` itself (the host checked ALIGN divides it), written so Triton's alignment analysis knows
    it: then rows of a head dim like 40 or 72 load as 16-byte vectors (and pipeline) instead of scalars."""
    if ALIGN > 1:
        return stride // ALIGN * ALIGN
    else:
        return stride


@triton.jit
def _exp(x, BASE2: tl.constexpr):
    """exp2(x) when scores are in base 2 (log2(e) folded into them), else exp(x)."""
    if BASE2:
        return tl.exp2(x)
    else:
        return tl.exp(x)


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b, accumulated in acc's dtype. fp32 inputs use IEEE fp32 (no TF32). Under the interpreter
    bf16 inputs are cast to fp32 first: its bf16 dot is wrong, while bf16 -> fp32 is exact and fp32 products
    of bf16 values are exact, as on the tensor cores."""
    if INTERPRET:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, out_dtype=acc.dtype)


@triton.jit
def _flags(x, ACC: tl.constexpr, INTERPRET: tl.constexpr):
    """A uint8 flag tile (bool mask, key padding) as int32 nonzero-test input. For float64 on a GPU it passes
    through an opaque move: Triton sizes a dot operand's registers (kWidth) by the narrowest load feeding it,
    and a uint8 load feeding p makes its fp64 MMA path assert ("fp64 don't support largeK MMA", Triton 3.8)."""
    if ACC == tl.float64 and not INTERPRET:
        return tl.inline_asm_elementwise(
            "mov.b32 $0, $1;", "=r,r", [x.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1
        )
    else:
        return x


@triton.jit
def _dropout_keep(
    offs_m,  # (BLOCK_M,) query indices
    start_n,  # the tile's first key, a multiple of 4
    bh,  # b * Hq + h
    seed0, seed1, threshold,  # the seed's 32-bit words; floor(p * 2^32)
    BLOCK_N: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) bool, True where probability (b, h, i, j) survives dropout: word j % 4 of Philox at
    counter (j // 4, i, bh, 0) is >= threshold (csrc/philox.h). One Philox call covers 4 keys."""
    groups = (start_n // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    # Shapes inline: a list bound to a name turns into tensors when compiled (the interpreter does not mind).
    c0 = tl.broadcast_to(groups[None, :], [offs_m.shape[0], BLOCK_N // 4])
    c1 = tl.broadcast_to(offs_m.to(tl.uint32)[:, None], [offs_m.shape[0], BLOCK_N // 4])
    c2 = tl.zeros_like(c0) + bh.to(tl.uint32)
    c3 = tl.zeros_like(c0)
    r0, r1, r2, r3 = philox(c0, c1, c2, c3, seed0.to(tl.uint32), seed1.to(tl.uint32))
    # join appends a dim of 2: [m, g, a, b] = (r0, r2 | r1, r3)[b][a] -> flat key 4g + 2a + b
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [offs_m.shape[0], BLOCK_N])
    return words >= threshold.to(tl.uint32)


@triton.jit
def _key_ranges(
    m_start, Sk, diagonal, window_left, window_right,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The key blocks the queries [m_start, m_start + BLOCK_M) may see, as (lo, full_lo, full_hi, hi), all but
    hi multiples of BLOCK_N: [lo, full_lo) cross the window's left edge, [full_lo, full_hi) every query sees
    whole (no window edge, no key past Sk), [full_hi, hi) cross the right edge or the end of the keys."""
    last_m = m_start + BLOCK_M - 1
    lo = 0
    full_lo = 0
    if HAS_WL:
        lo = tl.maximum(m_start + diagonal - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.maximum(last_m + diagonal - window_left, 0)
        full_lo = (full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    hi = Sk
    full_end = Sk
    if HAS_WR:
        hi = tl.minimum(last_m + diagonal + window_right + 1, Sk)
        full_end = tl.minimum(m_start + diagonal + window_right + 1, Sk)
    hi = tl.maximum(hi, 0)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _alibi_slope(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI: tl.constexpr, BASE2: tl.constexpr, ACC: tl.constexpr):
    """The ALiBi slope of (b, h) in the scores' base (times log2(e) in base 2); 0 without ALiBi."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h * stride_ah).to(ACC)
        if BASE2:
            slope = slope * 1.4426950408889634  # log2(e)
    return slope


@triton.jit
def _load_rows(
    PTR,  # base pointer of a (rows, cols) slice with unit column stride
    rows,  # (R,) row indices
    cols,  # (C,) column indices
    stride_row,
    n_rows, n_cols,
    CHECK_ROWS: tl.constexpr,  # rows may reach n_rows
    CHECK_COLS: tl.constexpr,  # cols may reach n_cols (a padded head dim)
):
    """Load a (R, C) tile, zero outside ``rows < n_rows`` / ``cols < n_cols`` where those are checked."""
    ptrs = PTR + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _score_tile(
    q,  # (BLOCK_M, BLOCK_D) query tile, zero past Sq and D
    k,  # (BLOCK_N, BLOCK_D) key tile, zero past Sk and D
    offs_m,  # (BLOCK_M,) query indices
    offs_n,  # (BLOCK_N,) key indices
    MASK,  # mask at this (batch, head): (Sq, Sk) with strides (stride_mm, stride_mn); uint8 or float
    stride_mm, stride_mn,
    KPAD,  # key padding at this batch: (Sk,) uint8 with stride stride_pn, nonzero = padding
    stride_pn,
    slope,  # alibi slope of this (batch, head), times log2(e) in base 2
    qk_scale,  # scale, times log2(e) in base 2
    Sq, Sk, diagonal, window_left, window_right,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPAD: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,  # window bounds set (window_left / window_right >= 0)
    BOUNDS: tl.constexpr,  # apply the window and the key-length check (off for blocks wholly inside both)
    BASE2: tl.constexpr,  # scores in base 2: float masks and alibi are multiplied by log2(e)
    ACC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_N) score tile s = scale * q k^T + mask + alibi with every hiding rule applied
    (-inf), in ACC, in base 2 when BASE2 (so exp2(s) = exp(natural s))."""
    s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=ACC), INTERPRET) * qk_scale
    if HAS_MASK:
        # Rows past Sq never get stored but must not read past the mask; columns past Sk only in edge blocks.
        in_mask = offs_m[:, None] < Sq
        if BOUNDS:
            in_mask = in_mask & (offs_n[None, :] < Sk)
        mask_ptrs = MASK + offs_m.to(tl.int64)[:, None] * stride_mm + offs_n.to(tl.int64)[None, :] * stride_mn
        mask = tl.load(mask_ptrs, mask=in_mask, other=0)
        if MASK_BOOL:
            s = tl.where(_flags(mask, ACC, INTERPRET) != 0, s, float("-inf"))
        elif BASE2:
            s += mask.to(ACC) * 1.4426950408889634  # log2(e)
        else:
            s += mask.to(ACC)
    if HAS_ALIBI or (BOUNDS and (HAS_WL or HAS_WR)):
        distance = offs_n[None, :] - offs_m[:, None] - diagonal  # j - i - diagonal
        if HAS_ALIBI:
            s -= slope * tl.abs(distance).to(ACC)
        if BOUNDS and HAS_WL:
            s = tl.where(distance >= -window_left, s, float("-inf"))
        if BOUNDS and HAS_WR:
            s = tl.where(distance <= window_right, s, float("-inf"))
    if HAS_KPAD:
        if BOUNDS:
            pad = tl.load(KPAD + offs_n.to(tl.int64) * stride_pn, mask=offs_n < Sk, other=1)
        else:
            pad = tl.load(KPAD + offs_n.to(tl.int64) * stride_pn)
        s = tl.where(_flags(pad, ACC, INTERPRET)[None, :] == 0, s, float("-inf"))
    if BOUNDS:
        s = tl.where(offs_n[None, :] < Sk, s, float("-inf"))
    return s


@triton.jit
def _attend_range(
    acc, l_i, m_i,  # running state: (BLOCK_M, BLOCK_DV) output sum, (BLOCK_M,) probability sum and max
    q,  # (BLOCK_M, BLOCK_D) query tile
    offs_m,  # (BLOCK_M,) query indices
    start, end,  # key range [start, end) visited in blocks of BLOCK_N starting at start
    K, V,  # keys and values at this (batch, kv head): (Sk, D) and (Sk, Dv), row strides stride_kn / stride_vn
    stride_kn, stride_vn,
    MASK, stride_mm, stride_mn, KPAD, stride_pn,
    slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
    bh, drop_seed0, drop_seed1, drop_threshold, drop_scale,  # dropout: b * Hq + h and the kernel's arguments
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPAD: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, BOUNDS: tl.constexpr, BASE2: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The online-softmax loop over key blocks [start, end); returns the updated (acc, l_i, m_i)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, offs_d, stride_kn, Sk, HEAD_DIM, BOUNDS, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
        s = _score_tile(
            q, k, offs_m, offs_n, MASK, stride_mm, stride_mn, KPAD, stride_pn,
            slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
            HAS_MASK, MASK_BOOL, HAS_KPAD, HAS_ALIBI, HAS_WL, HAS_WR, BOUNDS, BASE2, ACC, INTERPRET,
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exponents stay -inf, not NaN
        p = _exp(s - m_safe[:, None], BASE2)  # (BLOCK_M, BLOCK_N)
        alpha = _exp(m_i - m_safe, BASE2)  # rescales the old state to the new max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:  # after the sum: dropout does not change the softmax's normaliser
            keep = _dropout_keep(offs_m, start_n, bh, drop_seed0, drop_seed1, drop_threshold, BLOCK_N)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = _load_rows(V, offs_n, offs_dv, stride_vn, Sk, HEAD_DIM_V, BOUNDS, HEAD_DIM_V != BLOCK_DV)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["qk_scale_bits", *DROPOUT_ARGS])
def _attention_fwd_kernel(
    Q,  # (B, Hq, Sq, D), strides (stride_qb, stride_qh, stride_qm, 1)
    K,  # (B, Hkv, Sk, D), strides (stride_kb, stride_kh, stride_kn, 1)
    V,  # (B, Hkv, Sk, Dv), strides (stride_vb, stride_vh, stride_vn, 1)
    MASK,  # optional (B, Hq, Sq, Sk) view, any strides (0 where broadcast): uint8 (nonzero = attend) or float
    KPAD,  # optional (B, Sk) uint8 view, nonzero = padding
    ALIBI,  # optional (B, Hq) float32 slopes view
    OUT,  # (B, Hq, Sq, Dv) contiguous, q's dtype
    LSE,  # (B, Hq, Sq) contiguous, ACC
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_ab, stride_ah,
    Hq, Sq, Sk,
    kv_group,  # Hq // Hkv: q heads per kv head
    qk_scale_bits,  # scalar_bits of the scale, times log2(e) in base 2
    diagonal,  # query i's "present" is key i + diagonal
    window_left, window_right,  # -1: unbounded
    drop_seed0, drop_seed1,  # dropout: the seed's low and high 32 bits
    drop_threshold,  # floor(dropout_p * 2^32)
    drop_scale_bits,  # scalar_bits of 1 / (1 - dropout_p)
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPAD: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    BASE2: tl.constexpr,  # base-2 exponents (everything but float64)
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,  # D and Dv (constexpr: head-dim masks stay vectorised)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ALIGN: tl.constexpr,  # every q/k/v stride is a multiple of ALIGN elements (lets loads vectorise)
    ACC: tl.constexpr,  # accumulation dtype: float32, or float64 for float64 inputs
    INTERPRET: tl.constexpr,  # running in the Triton interpreter (CPU tensors): see _dot and _flags
):
    qk_scale = scalar(qk_scale_bits, ACC)
    drop_scale = scalar(drop_scale_bits, ACC)
    # The last query blocks come first: under a causal window they see the most keys, so the long
    # programs start early and the short ones fill the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    stride_qb, stride_qh, stride_qm = _aligned(stride_qb, ALIGN), _aligned(stride_qh, ALIGN), _aligned(stride_qm, ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, ALIGN), _aligned(stride_kh, ALIGN), _aligned(stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned(stride_vb, ALIGN), _aligned(stride_vh, ALIGN), _aligned(stride_vn, ALIGN)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    h_kv = h // kv_group

    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, Sq, HEAD_DIM, True,
                   HEAD_DIM != BLOCK_D)
    K += b * stride_kb + h_kv * stride_kh
    V += b * stride_vb + h_kv * stride_vh
    MASK += b * stride_mb + h * stride_mh
    KPAD += b * stride_pb
    slope = _alibi_slope(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI, BASE2, ACC)
    lo, full_lo, full_hi, hi = _key_ranges(
        m_start, Sk, diagonal, window_left, window_right, HAS_WL, HAS_WR, BLOCK_M, BLOCK_N
    )
    bh = b * Hq + h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    if HAS_WL:  # blocks across the window's left edge
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, offs_m, lo, full_lo, K, V, stride_kn, stride_vn,
            MASK, stride_mm, stride_mn, KPAD, stride_pn,
            slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
            bh, drop_seed0, drop_seed1, drop_threshold, drop_scale,
            HAS_MASK, MASK_BOOL, HAS_KPAD, HAS_ALIBI, HAS_WL, HAS_WR, True, BASE2, DROPOUT,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, ACC, INTERPRET,
        )
    # blocks wholly inside the window and the keys
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, offs_m, full_lo, full_hi, K, V, stride_kn, stride_vn,
        MASK, stride_mm, stride_mn, KPAD, stride_pn,
        slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
        bh, drop_seed0, drop_seed1, drop_threshold, drop_scale,
        HAS_MASK, MASK_BOOL, HAS_KPAD, HAS_ALIBI, HAS_WL, HAS_WR, False, BASE2, DROPOUT,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, ACC, INTERPRET,
    )
    # blocks across the window's right edge or the end of the keys
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, offs_m, full_hi, hi, K, V, stride_kn, stride_vn,
        MASK, stride_mm, stride_mn, KPAD, stride_pn,
        slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
        bh, drop_seed0, drop_seed1, drop_threshold, drop_scale,
        HAS_MASK, MASK_BOOL, HAS_KPAD, HAS_ALIBI, HAS_WL, HAS_WR, True, BASE2, DROPOUT,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, ACC, INTERPRET,
    )

    # l_i is 0 exactly when the query saw no key (otherwise its max term is exp(0) = 1): out 0, lse -inf.
    # A NaN score makes l_i NaN and the row NaN, as in the reference.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if BASE2:
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # ln(2)
    else:
        lse = m_i + tl.log(l_safe)
    lse = tl.where(empty, float("-inf"), lse)

    row = (b * Hq + h) * Sq  # first row of this (batch, head) in OUT and LSE
    row_ok = offs_m < Sq
    out_ptrs = OUT + (row + offs_m.to(tl.int64))[:, None] * HEAD_DIM_V + offs_dv[None, :]
    if HEAD_DIM_V == BLOCK_DV:
        tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + row + offs_m, lse, mask=row_ok)


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    key_padding: Optional[Tensor],
    alibi: Optional[Tensor],
    scale: float,
    diagonal: int,
    window_left: int,
    window_right: int,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Attention forward; returns (out, lse).

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv), any strides over the first three dims and
    unit stride over the last; Hkv divides Hq. mask: None or a (B, Hq, Sq, Sk) view (stride 0 where
    broadcast), bool (True = attend) or float (q's dtype or float32, added). key_padding: None or (B, Sk)
    bool, True = padding. alibi: None or (B, Hq) float32 slopes. Query i sees keys j with
    i + diagonal - window_left <= j <= i + diagonal + window_right (-1: unbounded). With ``dropout_p`` > 0 the
    probabilities csrc/philox.h drops for ``seed`` are 0 and the others scaled by 1 / (1 - dropout_p).
    out: (B, Hq, Sq, Dv) contiguous in q's dtype; lse: (B, Hq, Sq) contiguous float32 (float64 for float64).
    """
    batch, heads, seq_q, head_dim = q.shape
    heads_kv, seq_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty((batch, heads, seq_q, head_dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=acc_dtype, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seq_k == 0:
        return out.zero_(), lse.fill_(float("-inf"))

    interpret = _interpreting()
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    if interpret:
        block_m = block_n = INTERPRETER_BLOCK
        num_warps, num_stages = 4, 1
    else:
        budget = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        mask_itemsize = 0 if mask is None else mask.element_size()
        block_m, block_n, num_warps, num_stages = _config(seq_q, block_d, block_dv, q.dtype, mask_itemsize, budget)
    base2 = q.dtype != torch.float64

    if mask is None:
        mask_arg, mask_strides, mask_bool = q, (0, 0, 0, 0), False
    else:
        mask_bool = mask.dtype == torch.bool
        mask_arg, mask_strides = (mask.view(torch.uint8) if mask_bool else mask), mask.stride()
    if key_padding is None:
        pad_arg, pad_strides = q, (0, 0)
    else:
        pad_arg, pad_strides = key_padding.view(torch.uint8), key_padding.stride()
    alibi_arg, alibi_strides = (q, (0, 0)) if alibi is None else (alibi, alibi.stride())

    q_strides, k_strides, v_strides = _row_strides(q), _row_strides(k), _row_strides(v)
    grid = (triton.cdiv(seq_q, block_m), heads, batch)
    _attention_fwd_kernel[grid](
        q, k, v, mask_arg, pad_arg, alibi_arg, out, lse,
        *q_strides,
        *k_strides,
        *v_strides,
        *mask_strides,
        *pad_strides,
        *alibi_strides,
        heads, seq_q, seq_k,
        heads // heads_kv,
        scalar_bits(scale * LOG2E if base2 else scale, q.dtype),
        diagonal, window_left, window_right,
        *_dropout_args(dropout_p, seed, q.dtype),
        HAS_MASK=mask is not None, MASK_BOOL=mask_bool, HAS_KPAD=key_padding is not None,
        HAS_ALIBI=alibi is not None, HAS_WL=window_left >= 0, HAS_WR=window_right >= 0,
        BASE2=base2, DROPOUT=dropout_p > 0,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        ALIGN=_alignment(q_strides + k_strides + v_strides),
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        INTERPRET=interpret,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2): P = exp(S - lse) is recomputed tile by tile from the forward's lse.
#
#     Delta_i = rowsum(dO_i * O_i)              (PyTorch, in ACC)
#     dV = (P Z)^T dO,  dP = (dO V^T) Z,  dS = P * (dP - Delta),  dQ = scale dS K,  dK = scale dS^T Q
#
# with Z the dropout factors (1 / (1 - p) where kept, else 0; 1 without dropout), regenerated from the seed.
#
# One kernel per key block computes dK and dV (looping over the query heads of its kv head, GQA, and over the
# query blocks whose window meets the key block); another per query block computes dQ (looping over the key
# blocks the forward visits). No atomics. The lse handed to the kernels is +inf for queries that saw no key
# (and for rows past Sq, by the load's default), so their P is exactly 0 and their gradients 0, never NaN.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_probs(
    q, k, offs_m, offs_n, lse, MASK, stride_mm, stride_mn, KPAD, stride_pn,
    slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPAD: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, BOUNDS: tl.constexpr, BASE2: tl.constexpr,
    ACC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """P = exp(s - lse) for a (BLOCK_M, BLOCK_N) tile; ``lse`` in the scores' base, +inf for empty rows."""
    s = _score_tile(
        q, k, offs_m, offs_n, MASK, stride_mm, stride_mn, KPAD, stride_pn,
        slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
        HAS_MASK, MASK_BOOL, HAS_KPAD, HAS_ALIBI, HAS_WL, HAS_WR, BOUNDS, BASE2, ACC, INTERPRET,
    )
    return _exp(s - lse[:, None], BASE2)


@triton.jit(do_not_specialize=["qk_scale_bits", "scale_bits", *DROPOUT_ARGS])
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO,  # as in the forward; DO (B, Hq, Sq, Dv) with strides (stride_ob, stride_oh, stride_om, 1)
    MASK, KPAD, ALIBI,
    LSE,  # (B, Hq, Sq) contiguous, ACC, in the scores' base, +inf where the query saw no key
    DELTA,  # (B, Hq, Sq) contiguous, ACC
    DK, DV,  # (B, Hkv, Sk, D) / (B, Hkv, Sk, Dv) contiguous, k's / v's dtype
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_ab, stride_ah,
    Hq, Hkv, Sq, Sk, kv_group,
    qk_scale_bits, scale_bits,  # scalar_bits of the forward's qk_scale and of scale
    diagonal, window_left, window_right,
    drop_seed0, drop_seed1, drop_threshold, drop_scale_bits,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPAD: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, BASE2: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ALIGN: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr,
):
    qk_scale = scalar(qk_scale_bits, ACC)
    scale = scalar(scale_bits, ACC)
    drop_scale = scalar(drop_scale_bits, ACC)
    pid_n = tl.program_id(0)
    stride_qb, stride_qh, stride_qm = _aligned(stride_qb, ALIGN), _aligned(stride_qh, ALIGN), _aligned(stride_qm, ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, ALIGN), _aligned(stride_kh, ALIGN), _aligned(stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned(stride_vb, ALIGN), _aligned(stride_vh, ALIGN), _aligned(stride_vn, ALIGN)
    stride_ob, stride_oh, stride_om = _aligned(stride_ob, ALIGN), _aligned(stride_oh, ALIGN), _aligned(stride_om, ALIGN)
    h_kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)

    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K + b * stride_kb + h_kv * stride_kh, offs_n, offs_d, stride_kn, Sk, HEAD_DIM, True,
                   HEAD_DIM != BLOCK_D)
    v = _load_rows(V + b * stride_vb + h_kv * stride_vh, offs_n, offs_dv, stride_vn, Sk, HEAD_DIM_V, True,
                   HEAD_DIM_V != BLOCK_DV)

    # The queries that may see this key block: query i sees key j when
    # j - diagonal - window_right <= i <= j - diagonal + window_left.
    last_n = n_start + BLOCK_N - 1
    lo = 0
    if HAS_WR:
        lo = tl.maximum(n_start - diagonal - window_right, 0) // BLOCK_M * BLOCK_M
    hi = Sq
    if HAS_WL:
        hi = tl.minimum(last_n - diagonal + window_left + 1, Sq)
    hi = tl.maximum(hi, 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for g in range(0, kv_group):
        h = h_kv * kv_group + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_ob + h * stride_oh
        MASKh = MASK + b * stride_mb + h * stride_mh
        KPADb = KPAD + b * stride_pb
        bh = b * Hq + h
        row = bh * Sq
        slope = _alibi_slope(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI, BASE2, ACC)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(Qh, offs_m, offs_d, stride_qm, Sq, HEAD_DIM, True, HEAD_DIM != BLOCK_D)
            do = _load_rows(DOh, offs_m, offs_dv, stride_om, Sq, HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV)
            lse = tl.load(LSE + row + offs_m, mask=offs_m < Sq, other=float("inf"))
            delta = tl.load(DELTA + row + offs_m, mask=offs_m < Sq, other=0.0)
            p = _bwd_probs(
                q, k, offs_m, offs_n, lse, MASKh, stride_mm, stride_mn, KPADb, stride_pn,
                slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
                HAS_MASK, MASK_BOOL, HAS_KPAD, HAS_ALIBI, HAS_WL, HAS_WR, True, BASE2, ACC, INTERPRET,
            )  # (BLOCK_M, BLOCK_N)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC), INTERPRET)
            if DROPOUT:
                keep = _dropout_keep(offs_m, n_start, bh, drop_seed0, drop_seed1, drop_threshold, BLOCK_N)
                dv = _dot(tl.trans(tl.where(keep, p * drop_scale, 0.0)).to(do.dtype), do, dv, INTERPRET)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                dv = _dot(tl.trans(p).to(do.dtype), do, dv, INTERPRET)
            ds = p * (dp - delta[:, None])
            dk = _dot(tl.trans(ds).to(q.dtype), q, dk, INTERPRET)
    dk = dk * scale

    row_ok = offs_n < Sk
    krow = (b * Hkv + h_kv) * Sk + offs_n.to(tl.int64)
    dk_ptrs = DK + krow[:, None] * HEAD_DIM + offs_d[None, :]
    dv_ptrs = DV + krow[:, None] * HEAD_DIM_V + offs_dv[None, :]
    if HEAD_DIM == BLOCK_D:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if HEAD_DIM_V == BLOCK_DV:
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_range(
    dq, q, do, lse, delta, offs_m, start, end, K, V, stride_kn, stride_vn,
    MASK, stride_mm, stride_mn, KPAD, stride_pn,
    slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
    bh, drop_seed0, drop_seed1, drop_threshold, drop_scale,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPAD: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, BOUNDS: tl.constexpr, BASE2: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dQ (unscaled) accumulated over key blocks [start, end)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, offs_d, stride_kn, Sk, HEAD_DIM, BOUNDS, HEAD_DIM != BLOCK_D)
        v = _load_rows(V, offs_n, offs_dv, stride_vn, Sk, HEAD_DIM_V, BOUNDS, HEAD_DIM_V != BLOCK_DV)
        p = _bwd_probs(
            q, k, offs_m, offs_n, lse, MASK, stride_mm, stride_mn, KPAD, stride_pn,
            slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
            HAS_MASK, MASK_BOOL, HAS_KPAD, HAS_ALIBI, HAS_WL, HAS_WR, BOUNDS, BASE2, ACC, INTERPRET,
        )
        dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=ACC), INTERPRET)
        if DROPOUT:
            keep = _dropout_keep(offs_m, start_n, bh, drop_seed0, drop_seed1, drop_threshold, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, INTERPRET)
    return dq


@triton.jit(do_not_specialize=["qk_scale_bits", "scale_bits", *DROPOUT_ARGS])
def _attention_bwd_dq_kernel(
    Q, K, V, DO, MASK, KPAD, ALIBI, LSE, DELTA,
    DQ,  # (B, Hq, Sq, D) contiguous, q's dtype
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_ab, stride_ah,
    Hq, Sq, Sk, kv_group,
    qk_scale_bits, scale_bits,  # scalar_bits of the forward's qk_scale and of scale
    diagonal, window_left, window_right,
    drop_seed0, drop_seed1, drop_threshold, drop_scale_bits,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPAD: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, BASE2: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ALIGN: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr,
):
    qk_scale = scalar(qk_scale_bits, ACC)
    scale = scalar(scale_bits, ACC)
    drop_scale = scalar(drop_scale_bits, ACC)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    stride_qb, stride_qh, stride_qm = _aligned(stride_qb, ALIGN), _aligned(stride_qh, ALIGN), _aligned(stride_qm, ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, ALIGN), _aligned(stride_kh, ALIGN), _aligned(stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned(stride_vb, ALIGN), _aligned(stride_vh, ALIGN), _aligned(stride_vn, ALIGN)
    stride_ob, stride_oh, stride_om = _aligned(stride_ob, ALIGN), _aligned(stride_oh, ALIGN), _aligned(stride_om, ALIGN)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    h_kv = h // kv_group

    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, Sq, HEAD_DIM, True,
                   HEAD_DIM != BLOCK_D)
    do = _load_rows(DO + b * stride_ob + h * stride_oh, offs_m, offs_dv, stride_om, Sq, HEAD_DIM_V, True,
                    HEAD_DIM_V != BLOCK_DV)
    row = (b * Hq + h) * Sq
    lse = tl.load(LSE + row + offs_m, mask=offs_m < Sq, other=float("inf"))
    delta = tl.load(DELTA + row + offs_m, mask=offs_m < Sq, other=0.0)
    K += b * stride_kb + h_kv * stride_kh
    V += b * stride_vb + h_kv * stride_vh
    MASK += b * stride_mb + h * stride_mh
    KPAD += b * stride_pb
    slope = _alibi_slope(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI, BASE2, ACC)
    lo, full_lo, full_hi, hi = _key_ranges(  # the forward's key ranges
        m_start, Sk, diagonal, window_left, window_right, HAS_WL, HAS_WR, BLOCK_M, BLOCK_N
    )
    bh = b * Hq + h

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if HAS_WL:
        dq = _dq_range(
            dq, q, do, lse, delta, offs_m, lo, full_lo, K, V, stride_kn, stride_vn,
            MASK, stride_mm, stride_mn, KPAD, stride_pn,
            slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
            bh, drop_seed0, drop_seed1, drop_threshold, drop_scale,
            HAS_MASK, MASK_BOOL, HAS_KPAD, HAS_ALIBI, HAS_WL, HAS_WR, True, BASE2, DROPOUT,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, ACC, INTERPRET,
        )
    dq = _dq_range(
        dq, q, do, lse, delta, offs_m, full_lo, full_hi, K, V, stride_kn, stride_vn,
        MASK, stride_mm, stride_mn, KPAD, stride_pn,
        slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
        bh, drop_seed0, drop_seed1, drop_threshold, drop_scale,
        HAS_MASK, MASK_BOOL, HAS_KPAD, HAS_ALIBI, HAS_WL, HAS_WR, False, BASE2, DROPOUT,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, ACC, INTERPRET,
    )
    dq = _dq_range(
        dq, q, do, lse, delta, offs_m, full_hi, hi, K, V, stride_kn, stride_vn,
        MASK, stride_mm, stride_mn, KPAD, stride_pn,
        slope, qk_scale, Sq, Sk, diagonal, window_left, window_right,
        bh, drop_seed0, drop_seed1, drop_threshold, drop_scale,
        HAS_MASK, MASK_BOOL, HAS_KPAD, HAS_ALIBI, HAS_WL, HAS_WR, True, BASE2, DROPOUT,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, ACC, INTERPRET,
    )
    dq = dq * scale

    row_ok = offs_m < Sq
    dq_ptrs = DQ + (row + offs_m.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


def _bwd_config(dtype: torch.dtype, block_d: int, block_dv: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward kernels on a GPU. Not tuned: the dK/dV
    program holds k, v, dk and dv tiles of BLOCK_N rows and streams q and dO, so tiles are smaller than the
    forward's."""
    width = max(block_d, block_dv)
    if dtype == torch.float64:
        return (16, 16, 4, 1) if width > 64 else (32, 32, 4, 1)
    if dtype == torch.float32:
        return (32, 32, 4, 1) if width > 64 else (64, 64, 4, 1)
    if width <= 64:
        return 64, 64, 4, 2
    if width <= 128:
        return 64, 64, 8, 2
    return 32, 32, 4, 1


def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    delta: Tensor,
    mask: Optional[Tensor],
    key_padding: Optional[Tensor],
    alibi: Optional[Tensor],
    scale: float,
    diagonal: int,
    window_left: int,
    window_right: int,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention backward; returns (dq, dk, dv), contiguous, in q's / k's / v's shapes and dtypes.

    Inputs as :func:`attention_forward`; ``grad_out`` (B, Hq, Sq, Dv) with unit stride over the last dim;
    ``lse`` the forward's; ``delta`` (B, Hq, Sq) = rowsum(grad_out * out) - grad_lse, in lse's dtype. Queries
    that saw no key (lse -inf) get zero gradients. ``dropout_p`` and ``seed`` replay the forward's dropout.
    """
    batch, heads, seq_q, head_dim = q.shape
    heads_kv, seq_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if seq_q == 0 or seq_k == 0 or batch == 0 or heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()

    interpret = _interpreting()
    base2 = q.dtype != torch.float64
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    if interpret:
        block_m = block_n = INTERPRETER_BLOCK
        num_warps, num_stages = 4, 1
    else:
        block_m, block_n, num_warps, num_stages = _bwd_config(q.dtype, block_d, block_dv)

    delta = delta.to(acc_dtype).contiguous()  # (B, Hq, Sq)
    lse_k = lse.to(acc_dtype).masked_fill(lse == float("-inf"), float("inf"))
    lse_k = (lse_k * LOG2E if base2 else lse_k).contiguous()

    if mask is None:
        mask_arg, mask_strides, mask_bool = q, (0, 0, 0, 0), False
    else:
        mask_bool = mask.dtype == torch.bool
        mask_arg, mask_strides = (mask.view(torch.uint8) if mask_bool else mask), mask.stride()
    if key_padding is None:
        pad_arg, pad_strides = q, (0, 0)
    else:
        pad_arg, pad_strides = key_padding.view(torch.uint8), key_padding.stride()
    alibi_arg, alibi_strides = (q, (0, 0)) if alibi is None else (alibi, alibi.stride())

    q_strides, k_strides, v_strides = _row_strides(q), _row_strides(k), _row_strides(v)
    o_strides = _row_strides(grad_out)
    common = dict(
        HAS_MASK=mask is not None, MASK_BOOL=mask_bool, HAS_KPAD=key_padding is not None,
        HAS_ALIBI=alibi is not None, HAS_WL=window_left >= 0, HAS_WR=window_right >= 0,
        BASE2=base2, DROPOUT=dropout_p > 0,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        ALIGN=_alignment(q_strides + k_strides + v_strides + o_strides),
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        INTERPRET=interpret,
        num_warps=num_warps, num_stages=num_stages,
    )
    scales = (scalar_bits(scale * LOG2E if base2 else scale, q.dtype), scalar_bits(scale, q.dtype))  # qk, scale
    dropout = _dropout_args(dropout_p, seed, q.dtype)
    strides = (*q_strides, *k_strides, *v_strides, *o_strides, *mask_strides, *pad_strides, *alibi_strides)
    _attention_bwd_dkdv_kernel[(triton.cdiv(seq_k, block_n), heads_kv, batch)](
        q, k, v, grad_out, mask_arg, pad_arg, alibi_arg, lse_k, delta, dk, dv,
        *strides,
        heads, heads_kv, seq_q, seq_k, heads // heads_kv, *scales, diagonal, window_left, window_right,
        *dropout, **common,
    )
    _attention_bwd_dq_kernel[(triton.cdiv(seq_q, block_m), heads, batch)](
        q, k, v, grad_out, mask_arg, pad_arg, alibi_arg, lse_k, delta, dq,
        *strides,
        heads, seq_q, seq_k, heads // heads_kv, *scales, diagonal, window_left, window_right,
        *dropout, **common,
    )
    return dq, dk, dv
