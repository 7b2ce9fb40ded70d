"""Triton softmax / log-softmax kernels, forward and backward.

Forward, per row of z = x * scale + mask (masked entries -inf):

    m = max_j z_j,   l = sum_j exp(z_j - m),   softmax_j = exp(z_j - m) / l,   log-softmax_j = z_j - m - log l

A row that fits one block (N <= MAX_FUSED_N) is loaded once; a longer row takes two passes: an online pass
keeps the running max and rescales the running sum (l <- l * exp(m_old - m_new) + ...), then a write pass.
Short rows are packed several to a program (BLOCK_M rows x BLOCK_N columns) so no lanes idle.

Backward, with y the forward output and g the incoming gradient:

    softmax:      dx_j = scale * y_j * (g_j - sum_k g_k y_k)
    log-softmax:  dx_j = scale * (g_j - exp(y_j) * sum_k g_k),   0 where y_j = -inf

All arithmetic is in float32 (float64 for float64 inputs); ``scale`` arrives as integer bits
(triton_kernels/scalars.py), so float64 keeps it exactly.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.triton_kernels.scalars import scalar, scalar_bits

MAX_FUSED_N = 16384  # the longest row kept in registers in one pass
MIN_BLOCK_ELEMENTS = 2048  # short rows are packed until a program holds at least this many elements


def _blocks(n: int) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, single pass) for rows of length n."""
    if n > MAX_FUSED_N:
        return 1, 4096, False
    block_n = triton.next_power_of_2(n)
    return max(1, MIN_BLOCK_ELEMENTS // block_n), block_n, True


def _num_warps(block_elements: int) -> int:
    return max(1, min(16, block_elements // 512))


@triton.jit
def _row_offsets(rows, D1, D2, S0, S1, S2):
    """Memory offsets of flattened row indices (int64) in a (D0, D1, D2, N) view with leading strides S*."""
    i2 = rows % D2
    i1 = (rows // D2) % D1
    i0 = rows // (D1 * D2)
    return i0 * S0 + i1 * S1 + i2 * S2


@triton.jit
def _scores(
    X, MASK, x_rows, m_rows, i2, cols, keep, scale, causal_shift, sm_n,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr, ACC: tl.constexpr,
):
    """z for a (BLOCK_M, BLOCK_N) tile: x * scale + mask, -inf where masked or out of bounds."""
    z = tl.load(X + x_rows[:, None] + cols[None, :], mask=keep, other=0.0).to(ACC) * scale
    if HAS_MASK:
        m = tl.load(MASK + m_rows[:, None] + cols[None, :] * sm_n, mask=keep, other=0)
        if MASK_BOOL:
            keep = keep & (m != 0)
        else:
            z += m.to(ACC)
    if CAUSAL:
        keep = keep & (cols[None, :] <= i2[:, None] + causal_shift)
    return tl.where(keep, z, float("-inf"))


@triton.jit(do_not_specialize=["scale_bits"])
def _softmax_fwd_kernel(
    X,  # input, (D0, D1, D2, N) with strides (sx0, sx1, sx2, 1)
    MASK,  # optional mask, (D0, D1, D2, N) with strides (sm0, sm1, sm2, sm_n); uint8 (nonzero = keep) or float
    OUT,  # output, contiguous (D0 * D1 * D2, N)
    n_rows, N, D1, D2,
    sx0, sx1, sx2,
    sm0, sm1, sm2, sm_n,
    scale_bits,  # scalar_bits of the scale that multiplies x before the mask is added
    causal_shift,  # N - D2: row i2 keeps columns j <= i2 + causal_shift
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr, LOG: tl.constexpr,
    SINGLE_PASS: tl.constexpr,  # the whole row fits one BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    scale = scalar(scale_bits, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    x_rows = _row_offsets(rows, D1, D2, sx0, sx1, sx2)
    m_rows = _row_offsets(rows, D1, D2, sm0, sm1, sm2)
    i2 = rows % D2
    out_rows = rows * N
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        keep = row_ok[:, None] & (cols[None, :] < N)
        z = _scores(X, MASK, x_rows, m_rows, i2, cols, keep, scale, causal_shift, sm_n,
                    HAS_MASK, MASK_BOOL, CAUSAL, ACC)
        m = tl.max(z, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a fully masked row: keep exp() finite
        e = tl.exp(z - m_safe[:, None])
        l = tl.sum(e, axis=1)
    else:
        m = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        l = tl.zeros([BLOCK_M], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            keep = row_ok[:, None] & (c[None, :] < N)
            z = _scores(X, MASK, x_rows, m_rows, i2, c, keep, scale, causal_shift, sm_n,
                        HAS_MASK, MASK_BOOL, CAUSAL, ACC)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # never -inf - -inf
            l = l * tl.exp(m - m_new_safe) + tl.sum(tl.exp(z - m_new_safe[:, None]), axis=1)
            m = m_new
        m_safe = tl.where(m == float("-inf"), 0.0, m)

    # l == 0 exactly when every score is -inf; a NaN or +inf score makes l NaN and the row NaN.
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    if LOG:
        lse = m_safe + tl.log(l_safe)
    else:
        inv_l = tl.where(empty, 0.0, 1.0 / l_safe)

    if SINGLE_PASS:
        if LOG:
            y = tl.where(empty[:, None], float("-inf"), z - lse[:, None])
        else:
            y = e * inv_l[:, None]
        tl.store(OUT + out_rows[:, None] + cols[None, :], y.to(OUT.dtype.element_ty), mask=keep)
    else:
        for start in range(0, N, BLOCK_N):
            c = start + cols
            keep = row_ok[:, None] & (c[None, :] < N)
            z = _scores(X, MASK, x_rows, m_rows, i2, c, keep, scale, causal_shift, sm_n,
                        HAS_MASK, MASK_BOOL, CAUSAL, ACC)
            if LOG:
                y = tl.where(empty[:, None], float("-inf"), z - lse[:, None])
            else:
                y = tl.exp(z - m_safe[:, None]) * inv_l[:, None]
            tl.store(OUT + out_rows[:, None] + c[None, :], y.to(OUT.dtype.element_ty), mask=keep)


@triton.jit
def _backward_terms(y, g, LOG: tl.constexpr):
    """Per-element products whose row sum the backward needs: g*y (softmax) or g (log-softmax)."""
    if LOG:
        return g
    return g * y


@triton.jit
def _backward_value(y, g, total, scale, LOG: tl.constexpr):
    if LOG:
        dx = tl.where(y == float("-inf"), 0.0, g - tl.exp(y) * total[:, None])
    else:
        dx = y * (g - total[:, None])
    return dx * scale


@triton.jit(do_not_specialize=["scale_bits"])
def _softmax_bwd_kernel(
    GRAD,  # incoming gradient, (R, N) with strides (s_grad, 1)
    OUT,  # forward output y, contiguous (R, N)
    DX,  # gradient of x, contiguous (R, N)
    n_rows, N, s_grad,
    scale_bits,  # scalar_bits of the forward's scale
    LOG: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    scale = scalar(scale_bits, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    cols = tl.arange(0, BLOCK_N)
    g_rows = rows * s_grad
    y_rows = rows * N

    total = tl.zeros([BLOCK_M], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        keep = row_ok[:, None] & (c[None, :] < N)
        y = tl.load(OUT + y_rows[:, None] + c[None, :], mask=keep, other=0.0).to(ACC)
        g = tl.load(GRAD + g_rows[:, None] + c[None, :], mask=keep, other=0.0).to(ACC)
        total += tl.sum(_backward_terms(y, g, LOG), axis=1)
        if SINGLE_PASS:
            dx = _backward_value(y, g, total, scale, LOG)
            tl.store(DX + y_rows[:, None] + c[None, :], dx.to(DX.dtype.element_ty), mask=keep)
    if not SINGLE_PASS:
        for start in range(0, N, BLOCK_N):
            c = start + cols
            keep = row_ok[:, None] & (c[None, :] < N)
            y = tl.load(OUT + y_rows[:, None] + c[None, :], mask=keep, other=0.0).to(ACC)
            g = tl.load(GRAD + g_rows[:, None] + c[None, :], mask=keep, other=0.0).to(ACC)
            dx = _backward_value(y, g, total, scale, LOG)
            tl.store(DX + y_rows[:, None] + c[None, :], dx.to(DX.dtype.element_ty), mask=keep)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def softmax_forward(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool, log: bool) -> Tensor:
    """x, mask: (D0, D1, D2, N) views (see fastattn.ops._rows); returns a contiguous (D0, D1, D2, N) tensor."""
    d0, d1, d2, n = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = d0 * d1 * d2
    block_m, block_n, single = _blocks(n)
    if mask is None:
        mask_arg, mask_strides, mask_bool = x, (0, 0, 0, 0), False
    else:
        mask_bool = mask.dtype == torch.bool
        mask_arg, mask_strides = (mask.view(torch.uint8) if mask_bool else mask), mask.stride()
    grid = (triton.cdiv(n_rows, block_m),)
    _softmax_fwd_kernel[grid](
        x, mask_arg, out,
        n_rows, n, d1, d2,
        *x.stride()[:3],
        *mask_strides,
        scalar_bits(scale, x.dtype), n - d2,
        HAS_MASK=mask is not None, MASK_BOOL=mask_bool, CAUSAL=causal, LOG=log,
        SINGLE_PASS=single, BLOCK_M=block_m, BLOCK_N=block_n, ACC=_acc(x.dtype),
        num_warps=_num_warps(block_m * block_n),
    )
    return out


def softmax_backward(grad: Tensor, out: Tensor, scale: float, log: bool) -> Tensor:
    """grad: (R, N) with unit stride over N; out: contiguous (R, N). Returns dx, contiguous (R, N)."""
    n_rows, n = out.shape
    dx = torch.empty_like(out)
    block_m, block_n, single = _blocks(n)
    grid = (triton.cdiv(n_rows, block_m),)
    _softmax_bwd_kernel[grid](
        grad, out, dx,
        n_rows, n, grad.stride(0),
        scalar_bits(scale, out.dtype),
        LOG=log, SINGLE_PASS=single, BLOCK_M=block_m, BLOCK_N=block_n, ACC=_acc(out.dtype),
        num_warps=_num_warps(block_m * block_n),
    )
    return dx
