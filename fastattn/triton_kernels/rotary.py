"""Triton rotary position embedding (RoPE) kernel: q and k rotated in one launch.

Token (b, s) sits at position ``pos = (positions[b, s] or s + offsets[b]) + offset``; pair i < P = rotary_dim / 2
of each of its head rows, (x[i], x[i + P]) (half-split, GPT-NeoX) or (x[2i], x[2i + 1]) (interleaved, GPT-J),
turns by theta = pos * inv_freq[i]:

    inv_freq[i] = exp2(-(2i / rotary_dim) * log2(base))     (float64, rounded to the compute type)
    x1' = x1 cos(theta) - x2 sin(theta),   x2' = x2 cos(theta) + x1 sin(theta)

or takes cos and sin from row ``pos`` of cached tables (a row outside the tables gives NaN; callers check).
``inverse`` rotates by -theta: the transposed rotation, which is the backward. Features rotary_dim .. D - 1 pass
through (copied when the output is a fresh tensor). Arithmetic in float32 (float64 for float64 inputs).

A program takes BLOCK_S tokens of one batch and a group of heads of the list "q's heads, then k's heads": it
computes the tokens' (BLOCK_S, P) cos and sin once and rotates each head's (BLOCK_S, rotary_dim) tile with them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE_ELEMENTS = 2048  # tokens x pairs per tile


@triton.jit
def _rotate_heads(
    IN, OUT,  # the head's rows of the program's tokens: IN + in_rows[t] + column, OUT + out_rows[t] + column
    in_rows, out_rows,  # (BLOCK_S,) int64 row offsets
    cos, sin,  # (BLOCK_S, BLOCK_P) in ACC; sin already negated for the inverse rotation
    pairs, keep,  # (BLOCK_P,) pair indices; (BLOCK_S, BLOCK_P) in-bounds mask
    tok_ok,  # (BLOCK_S,) token in bounds
    P, R, D,  # pairs, rotary_dim, head_dim
    INTERLEAVED: tl.constexpr, COPY_REST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
    ACC: tl.constexpr,
):
    if INTERLEAVED:
        c1 = 2 * pairs
        c2 = 2 * pairs + 1
    else:
        c1 = pairs
        c2 = pairs + P
    x1 = tl.load(IN + in_rows[:, None] + c1[None, :], mask=keep, other=0.0).to(ACC)
    x2 = tl.load(IN + in_rows[:, None] + c2[None, :], mask=keep, other=0.0).to(ACC)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    tl.store(OUT + out_rows[:, None] + c1[None, :], y1.to(OUT.dtype.element_ty), mask=keep)
    tl.store(OUT + out_rows[:, None] + c2[None, :], y2.to(OUT.dtype.element_ty), mask=keep)
    if COPY_REST:  # features R .. D - 1 of a fresh output
        for start in range(R, D, BLOCK_T):
            cols = start + tl.arange(0, BLOCK_T)
            ok = tok_ok[:, None] & (cols[None, :] < D)
            v = tl.load(IN + in_rows[:, None] + cols[None, :], mask=ok)
            tl.store(OUT + out_rows[:, None] + cols[None, :], v, mask=ok)


@triton.jit
def _rotary_kernel(
    Q, Q_OUT,  # q (B, HQ, S, D) with strides (sq_b, sq_h, sq_s, 1); its output with (so_q_b, so_q_h, so_q_s, 1)
    K, K_OUT,  # k (B, HK, S, D) and its output likewise (any tensor when HK = 0)
    POSITIONS,  # (B, S) int64 with strides (sp_b, sp_s), when HAS_POSITIONS
    OFFSETS,  # (B,) int64, when HAS_OFFSETS
    COS, SIN,  # (table_rows, P) in ACC with row strides s_cos, s_sin, when HAS_TABLES
    S, HQ, HK, P, R, D,  # seq, heads of q and k, pairs = R / 2, rotary_dim, head_dim
    sq_b, sq_h, sq_s, so_q_b, so_q_h, so_q_s,
    sk_b, sk_h, sk_s, so_k_b, so_k_h, so_k_s,
    sp_b, sp_s,
    table_rows, s_cos, s_sin,
    offset,  # added to every position
    s_blocks,  # ceil(S / BLOCK_S): program_id(0) = b * s_blocks + token block
    heads_per_program,  # program_id(1) takes heads [g * heads_per_program, ...) of "q's heads, then k's"
    LOG2_BASE: tl.constexpr,  # log2(base), a compile-time float64 (a runtime float argument would be float32)
    HAS_POSITIONS: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_TABLES: tl.constexpr,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, COPY_Q: tl.constexpr, COPY_K: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // s_blocks).to(tl.int64)
    s = (pid % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    tok_ok = s < S
    s = tl.where(tok_ok, s, 0).to(tl.int64)
    pairs = tl.arange(0, BLOCK_P)
    keep = tok_ok[:, None] & (pairs[None, :] < P)

    # The tokens' positions, then the (BLOCK_S, BLOCK_P) cos and sin of their angles.
    if HAS_POSITIONS:
        pos = tl.load(POSITIONS + b * sp_b + s * sp_s, mask=tok_ok, other=0)
    else:
        pos = s
        if HAS_OFFSETS:
            pos += tl.load(OFFSETS + b)
    pos += offset
    if HAS_TABLES:
        found = keep & ((pos >= 0) & (pos < table_rows))[:, None]
        cos = tl.load(COS + pos[:, None] * s_cos + pairs[None, :], mask=found, other=float("nan")).to(ACC)
        sin = tl.load(SIN + pos[:, None] * s_sin + pairs[None, :], mask=found, other=float("nan")).to(ACC)
    else:
        inv_freq = tl.exp2(-((2 * pairs).to(tl.float64) / R) * LOG2_BASE).to(ACC)
        theta = pos.to(ACC)[:, None] * inv_freq[None, :]
        cos = tl.cos(theta)
        sin = tl.sin(theta)
    if INVERSE:
        sin = -sin

    # Rotate the program's heads: q's first, then k's.
    h_begin = tl.program_id(1).to(tl.int64) * heads_per_program
    for j in range(0, heads_per_program):
        h = h_begin + j
        if h < HQ:
            _rotate_heads(
                Q + b * sq_b + h * sq_h, Q_OUT + b * so_q_b + h * so_q_h, s * sq_s, s * so_q_s,
                cos, sin, pairs, keep, tok_ok, P, R, D,
                INTERLEAVED, COPY_Q, BLOCK_S, BLOCK_T, ACC,
            )  # fmt: skip
        elif h < HQ + HK:
            hk = h - HQ
            _rotate_heads(
                K + b * sk_b + hk * sk_h, K_OUT + b * so_k_b + hk * so_k_h, s * sk_s, s * so_k_s,
                cos, sin, pairs, keep, tok_ok, P, R, D,
                INTERLEAVED, COPY_K, BLOCK_S, BLOCK_T, ACC,
            )  # fmt: skip


def _blocks(seq: int, pairs: int, rest: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_P, BLOCK_T): tokens per program, the padded pair count, pass-through columns per step."""
    block_p = triton.next_power_of_2(pairs)
    block_s = max(1, min(triton.next_power_of_2(max(seq, 1)), TILE_ELEMENTS // block_p))
    block_t = max(1, min(triton.next_power_of_2(max(rest, 1)), TILE_ELEMENTS // block_s))
    return block_s, block_p, block_t


def _head_groups(device: torch.device, programs: int, heads: int) -> int:
    """Split the heads over programs only when the tokens alone would leave the GPU idle (decoding)."""
    if device.type != "cuda":
        return 1
    wanted = triton.cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, max(programs, 1))
    return max(1, min(wanted, heads))


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def rotary(
    q: Tensor,
    k: Optional[Tensor],
    q_out: Tensor,
    k_out: Optional[Tensor],
    positions: Optional[Tensor],
    offsets: Optional[Tensor],
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    offset: int,
    rotary_dim: int,
    interleaved: bool,
    base: float,
    inverse: bool,
) -> None:
    """Writes the rotated q and k into q_out and k_out (which may be q and k: in place). Layouts as
    ``fastattn_C::rotary`` (csrc/fastattn.cpp): (B, H, S, D) with unit stride over D, positions (B, S) int64,
    offsets (B,) int64, tables (rows, rotary_dim / 2) in the compute dtype with unit stride over pairs."""
    batch, heads_q, seq, head_dim = q.shape
    heads_k = 0 if k is None else k.shape[1]
    if k is None:
        k, k_out = q, q_out
    pairs = rotary_dim // 2
    block_s, block_p, block_t = _blocks(seq, pairs, head_dim - rotary_dim)
    s_blocks = triton.cdiv(seq, block_s)
    groups = _head_groups(q.device, batch * s_blocks, heads_q + heads_k)
    heads_per_program = triton.cdiv(heads_q + heads_k, groups)
    grid = (batch * s_blocks, triton.cdiv(heads_q + heads_k, heads_per_program))
    rest = head_dim > rotary_dim
    _rotary_kernel[grid](
        q, q_out, k, k_out,
        q if positions is None else positions,
        q if offsets is None else offsets,
        q if cos is None else cos, q if sin is None else sin,
        seq, heads_q, heads_k, pairs, rotary_dim, head_dim,
        *_strides3(q), *_strides3(q_out), *_strides3(k), *_strides3(k_out),
        *((0, 0) if positions is None else positions.stride()),
        0 if cos is None else cos.shape[0], 0 if cos is None else cos.stride(0), 0 if sin is None else sin.stride(0),
        offset, s_blocks, heads_per_program,
        LOG2_BASE=math.log2(base),
        HAS_POSITIONS=positions is not None, HAS_OFFSETS=offsets is not None, HAS_TABLES=cos is not None,
        INTERLEAVED=interleaved, INVERSE=inverse,
        COPY_Q=rest and q_out.data_ptr() != q.data_ptr(), COPY_K=rest and k_out.data_ptr() != k.data_ptr(),
        BLOCK_S=block_s, BLOCK_P=block_p, BLOCK_T=block_t,
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
        num_warps=4,
    )  # fmt: skip
