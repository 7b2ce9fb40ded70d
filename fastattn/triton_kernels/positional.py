"""Triton positional-encoding kernels (the maths: csrc/positional.h).

positional_add, over x viewed as (batch, seq, D):

    out[b, s, c] = dropout(x[b, s, c] * scale + PE[pos, c]),   pos = offset + offsets[b] + s

with PE the sinusoid computed in the kernel (PE[p, 2i] = sin(p * f_i), PE[p, 2i + 1] = cos(p * f_i),
f_i = base^(-2i / D)), a gathered table row (learned encodings), or nothing (the backward: dropout(grad * scale)).
For float32 compute the angle is reduced in float64 to the nearest quarter turn and sin/cos of the rest come
from Taylor polynomials, which keeps one float rounding of accuracy at any position; float64 takes sin/cos of
``pos * f_i`` directly.

embedding_forward: out[b, s] = dropout(token_weight[tokens[b, s]] * token_scale + position_weight[pos(b, s)]).

embedding_scatter: acc[index[n]] += scale * grad[n] with atomics into a float32 (float64) buffer, which is
therefore not bitwise deterministic where several entries share a row.

A program covers BLOCK_M rows x BLOCK_D columns. Dropout is elementwise Philox over the rows of the output
(csrc/philox.h). Float scalars reach the kernels as the int64 bits of a float64 (triton_kernels/scalars.py):
Triton passes Python floats as float32, which would round scale and log2(base) (and so every angle) for float64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.triton_kernels.philox import elementwise_keep_rows
from fastattn.triton_kernels.scalars import f64, f64_bits

MIN_BLOCK_ELEMENTS = 2048  # rows are packed until a program holds about this many elements
MAX_BLOCK_D = 1024  # wider rows are split over programs along D
PE_NONE, PE_SINUSOID, PE_TABLE = 0, 1, 2
# Arguments whose values vary from call to call: never specialised (an int equal to 1 would become a constant).
DROPOUT_ARGS = ["seed0", "seed1", "threshold", "drop_scale_bits"]


@triton.jit
def _frequencies(cols, D, log2_base):
    """Radians per position of columns ``cols`` (BLOCK_D,): base^(-2i / D) for columns 2i and 2i + 1, in float64."""
    return tl.exp2(-(2.0 * (cols // 2).to(tl.float64) / D) * log2_base)


@triton.jit
def _sinusoid_f64(pos, cols, D, log2_base):
    """PE (BLOCK_M, BLOCK_D) in float64 at int64 positions ``pos`` (BLOCK_M,) for columns ``cols`` (BLOCK_D,)."""
    angle = pos.to(tl.float64)[:, None] * _frequencies(cols, D, log2_base)[None, :]
    return tl.where((cols % 2)[None, :] == 1, tl.cos(angle), tl.sin(angle))


@triton.jit
def _sinusoid_f32(pos, cols, D, log2_base):
    """PE (BLOCK_M, BLOCK_D) in float32 at int64 positions ``pos`` (BLOCK_M,) for columns ``cols`` (BLOCK_D,)."""
    # t4: the angle in quarter turns. Adding and subtracting 1.5 * 2^52 rounds it to an integer q whose low bits
    # (two's complement) are then the low mantissa bits: the quadrant q mod 4. r = (t4 - q) * pi / 2, |r| <= pi / 4.
    turns = _frequencies(cols, D, log2_base) * tl.full([], 0.15915494309189533577, tl.float64)  # / (2 pi)
    t4 = 4.0 * (pos.to(tl.float64)[:, None] * turns[None, :])
    shifted = t4 + 6755399441055744.0
    q = shifted - 6755399441055744.0
    quadrant = (shifted.to(tl.int64, bitcast=True) & 3).to(tl.int32) + (cols % 2)[None, :]
    r = ((t4 - q) * tl.full([], 1.5707963267948966192, tl.float64)).to(tl.float32)
    r2 = r * r
    sin_r = r + r * r2 * (-1.66666667e-1 + r2 * (8.33333333e-3 + r2 * (-1.98412698e-4 + r2 * 2.75573192e-6)))
    cos_r = 1.0 + r2 * (
        -0.5 + r2 * (4.16666667e-2 + r2 * (-1.38888889e-3 + r2 * (2.48015873e-5 + r2 * -2.75573192e-7)))
    )
    v = tl.where((quadrant & 1) == 1, cos_r, sin_r)  # sin(quadrant * pi / 2 + r)
    return tl.where((quadrant & 2) == 2, -v, v)


@triton.jit(do_not_specialize=["offset", "scale_bits", "log2_base_bits", *DROPOUT_ARGS])
def _positional_add_kernel(
    X,  # input, (B, S, D) with strides (sxb, sxs, 1)
    OUT,  # output, (B, S, D) with strides (sob, sos, 1), x's dtype
    TABLE,  # PE == PE_TABLE: (table_rows, D) with strides (s_table, 1), x's dtype; else unused
    OFFSETS,  # HAS_OFFSETS: (B,) int64 per-sequence position offsets
    n_rows,
    S,
    D,
    table_rows,
    sxb,
    sxs,
    sob,
    sos,
    srb,
    srs,  # the dropout row of (b, s) is b * srb + s * srs
    s_table,
    offset,  # added to every position
    scale_bits,
    log2_base_bits,  # float64 bits: x's scale, log2 of the sinusoid's base
    seed0,
    seed1,
    threshold,
    drop_scale_bits,  # dropout: the seed's 32-bit words, floor(p * 2^32), 1 / (1 - p)
    PE: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOUBLE: tl.constexpr,  # DOUBLE: compute in float64
):
    acc = tl.float64 if DOUBLE else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = tl.program_id(1) * BLOCK_D
    cols = col_start + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    b = rows // S
    s = rows - b * S
    inside = row_ok[:, None] & (cols < D)[None, :]
    x = tl.load(X + (b * sxb + s * sxs)[:, None] + cols[None, :], mask=inside, other=0.0)
    z = x.to(acc) * f64(scale_bits).to(acc)
    if PE != 0:
        pos = offset + s
        if HAS_OFFSETS:
            pos += tl.load(OFFSETS + b, mask=row_ok, other=0)
        if PE == 1:
            if DOUBLE:
                z += _sinusoid_f64(pos, cols, D, f64(log2_base_bits))
            else:
                z += _sinusoid_f32(pos, cols, D, f64(log2_base_bits))
        else:
            in_table = (pos >= 0) & (pos < table_rows)
            t = tl.load(TABLE + (pos * s_table)[:, None] + cols[None, :], mask=inside & in_table[:, None], other=0.0)
            z += tl.where(in_table[:, None], t.to(acc), float("nan"))  # outside the table: NaN, never a stray read
    if DROPOUT:
        kept = elementwise_keep_rows(b * srb + s * srs, col_start, seed0, seed1, threshold, BLOCK_D)
        z = tl.where(kept, z * f64(drop_scale_bits).to(acc), 0.0)
    tl.store(OUT + (b * sob + s * sos)[:, None] + cols[None, :], z.to(OUT.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["offset", "scale_bits", *DROPOUT_ARGS])
def _embedding_forward_kernel(
    TOKENS,  # (B * S,) int64
    POSITIONS,  # HAS_POSITIONS: (B * S,) int64
    OFFSETS,  # HAS_OFFSETS: (B,) int64
    TW,  # token_weight, (vocab, D) with strides (s_tw, 1)
    PW,  # position_weight, (max_positions, D) with strides (s_pw, 1)
    OUT,  # contiguous (B * S, D)
    n_rows,
    S,
    D,
    vocab,
    max_positions,
    s_tw,
    s_pw,
    offset,  # without POSITIONS: the position of (b, s) is offset + offsets[b] + s
    scale_bits,  # float64 bits of token_scale
    seed0,
    seed1,
    threshold,
    drop_scale_bits,
    HAS_POSITIONS: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOUBLE: tl.constexpr,
):
    acc = tl.float64 if DOUBLE else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = tl.program_id(1) * BLOCK_D
    cols = col_start + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    token = tl.load(TOKENS + rows, mask=row_ok, other=0)
    if HAS_POSITIONS:
        pos = tl.load(POSITIONS + rows, mask=row_ok, other=0)
    else:
        b = rows // S
        pos = offset + rows - b * S
        if HAS_OFFSETS:
            pos += tl.load(OFFSETS + b, mask=row_ok, other=0)
    valid = (token >= 0) & (token < vocab) & (pos >= 0) & (pos < max_positions)
    inside = row_ok[:, None] & (cols < D)[None, :]
    gather = inside & valid[:, None]
    t = tl.load(TW + (token * s_tw)[:, None] + cols[None, :], mask=gather, other=0.0).to(acc)
    p = tl.load(PW + (pos * s_pw)[:, None] + cols[None, :], mask=gather, other=0.0).to(acc)
    z = tl.where(valid[:, None], t * f64(scale_bits).to(acc) + p, float("nan"))  # out of range: NaN
    if DROPOUT:
        kept = elementwise_keep_rows(rows, col_start, seed0, seed1, threshold, BLOCK_D)
        z = tl.where(kept, z * f64(drop_scale_bits).to(acc), 0.0)
    tl.store(OUT + (rows * D)[:, None] + cols[None, :], z.to(OUT.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["skip_row", "scale_bits"])
def _embedding_scatter_kernel(
    GRAD,  # (n, D) with strides (s_grad, 1)
    INDEX,  # (n,) int64
    ACC,  # zero-filled contiguous (num_rows, D) float32 (float64 for float64 grad): the sums
    n,
    D,
    num_rows,
    s_grad,
    skip_row,  # a row that gets nothing (padding_idx), or -1
    scale_bits,  # float64 bits of the factor on every entry
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n
    rows = tl.where(row_ok, rows, 0)
    target = tl.load(INDEX + rows, mask=row_ok, other=-1)
    use = row_ok & (target >= 0) & (target < num_rows) & (target != skip_row)
    mask = use[:, None] & (cols < D)[None, :]
    g = tl.load(GRAD + (rows * s_grad)[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC.dtype.element_ty)
    g = g * f64(scale_bits).to(ACC.dtype.element_ty)
    tl.atomic_add(ACC + (tl.where(use, target, 0) * D)[:, None] + cols[None, :], g, mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------------------


def _blocks(n_rows: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for rows of d elements: at least 4 columns (one Philox call)."""
    block_d = min(max(triton.next_power_of_2(max(d, 1)), 4), MAX_BLOCK_D)
    block_m = min(max(1, MIN_BLOCK_ELEMENTS // block_d), triton.next_power_of_2(max(n_rows, 1)))
    return block_m, block_d, max(1, min(8, block_m * block_d // 256))


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, int, int, int]:
    """(seed low word, seed high word, floor(p * 2^32), bits of 1 / (1 - p))."""
    seed &= 2**64 - 1
    return seed & 0xFFFFFFFF, seed >> 32, int(dropout_p * 2**32), f64_bits(1.0 / (1.0 - dropout_p))


def positional_add(
    x: Tensor,
    table: Optional[Tensor],
    offsets: Optional[Tensor],
    offset: int,
    scale: float,
    base: float,
    sinusoid: bool,
    batch_first: bool,
    dropout_p: float,
    seed: int,
) -> Tensor:
    """The op fastattn_C::positional_add (csrc/fastattn.cpp): x (B, S, D), or (S, B, D) when not batch_first,
    unit stride over D. Returns dropout(x * scale + PE) contiguous in x's layout."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    bdim, sdim = (0, 1) if batch_first else (1, 0)
    batch, seq, d = x.shape[bdim], x.shape[sdim], x.shape[2]
    n_rows = batch * seq
    if n_rows == 0 or d == 0:
        return out
    pe = PE_TABLE if table is not None else PE_SINUSOID if sinusoid else PE_NONE
    block_m, block_d, warps = _blocks(n_rows, d)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(d, block_d))
    _positional_add_kernel[grid](
        x, out, x if table is None else table, x if offsets is None else offsets,
        n_rows, seq, d, 0 if table is None else table.shape[0],
        x.stride(bdim), x.stride(sdim), out.stride(bdim), out.stride(sdim),
        out.stride(bdim) // d, out.stride(sdim) // d,
        0 if table is None else table.stride(0),
        offset, f64_bits(scale), f64_bits(math.log2(base) if sinusoid else 0.0),
        *_dropout_args(dropout_p, seed),
        PE=pe, HAS_OFFSETS=offsets is not None, DROPOUT=dropout_p > 0.0,
        BLOCK_M=block_m, BLOCK_D=block_d, DOUBLE=x.dtype == torch.float64,
        num_warps=warps,
    )  # fmt: skip
    return out


def embedding_forward(
    tokens: Tensor,
    token_weight: Tensor,
    position_weight: Tensor,
    positions: Optional[Tensor],
    offsets: Optional[Tensor],
    offset: int,
    token_scale: float,
    dropout_p: float,
    seed: int,
) -> Tensor:
    """The op fastattn_C::embedding_forward: tokens (and positions) contiguous (B, S) int64, the weights (rows, D)
    with unit stride over D. Returns (B, S, D) contiguous."""
    batch, seq = tokens.shape
    d = token_weight.shape[1]
    out = torch.empty(batch, seq, d, dtype=token_weight.dtype, device=token_weight.device)
    n_rows = batch * seq
    if n_rows == 0 or d == 0:
        return out
    block_m, block_d, warps = _blocks(n_rows, d)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(d, block_d))
    _embedding_forward_kernel[grid](
        tokens, tokens if positions is None else positions, tokens if offsets is None else offsets,
        token_weight, position_weight, out,
        n_rows, seq, d, token_weight.shape[0], position_weight.shape[0],
        token_weight.stride(0), position_weight.stride(0),
        offset, f64_bits(token_scale), *_dropout_args(dropout_p, seed),
        HAS_POSITIONS=positions is not None, HAS_OFFSETS=offsets is not None, DROPOUT=dropout_p > 0.0,
        BLOCK_M=block_m, BLOCK_D=block_d, DOUBLE=token_weight.dtype == torch.float64,
        num_warps=warps,
    )  # fmt: skip
    return out


def embedding_scatter(grad: Tensor, index: Tensor, num_rows: int, scale: float, skip_row: int) -> Tensor:
    """The op fastattn_C::embedding_scatter: grad (n, D) with unit stride over D, index (n,) int64 contiguous.
    Returns (num_rows, D) in grad's dtype, summed with float32 (float64) atomics."""
    n, d = grad.shape
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    acc = torch.zeros(num_rows, d, dtype=acc_dtype, device=grad.device)
    if n > 0 and d > 0 and num_rows > 0:
        block_m, block_d, warps = _blocks(n, d)
        grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d))
        _embedding_scatter_kernel[grid](
            grad, index, acc, n, d, num_rows, grad.stride(0), skip_row, f64_bits(scale),
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    return acc.to(grad.dtype)
