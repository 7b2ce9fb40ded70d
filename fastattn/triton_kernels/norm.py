"""Triton LayerNorm / RMSNorm kernels with the fused dropout + residual of pre-norm blocks (csrc/norm.h has
the math), forward and backward.

Forward, per row: z = dropout(x) + residual (stored when asked), then the statistics and the normalised row.
A row that fits one block (N <= MAX_FUSED_N) is read once, several short rows to a program; a longer row
takes a statistics pass (chunk means and squared deviations merged as in Chan et al.) and a write pass.

Backward: a persistent grid of G programs, each walking row blocks pid, pid + G, ... in the forward's
layout (several short rows at once, a long row in two passes) for dz and grad_x, and grad_weight / grad_bias
as per-program partial sums in a (G, N) float32 (float64) workspace that one torch sum reduces: no atomics.

eps and the dropout factor 1 / (1 - p) arrive as integer bits (triton_kernels/scalars.py), so float64 keeps them
exactly.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn import backends, reference
from fastattn.triton_kernels.philox import elementwise_keep_rows
from fastattn.triton_kernels.scalars import scalar, scalar_bits

MAX_FUSED_N = 8192  # the longest row kept in registers in one pass
LOOP_BLOCK_N = 4096  # the chunk of a longer row
MIN_BLOCK_ELEMENTS = 2048  # short rows are packed until a program holds at least this many elements
# Arguments whose values vary from call to call: never specialised (an int equal to 1 would become a constant).
DROPOUT_ARGS = ["seed0", "seed1", "threshold", "drop_scale_bits"]


def _blocks(n: int) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, single pass) for rows of length n; BLOCK_N >= 4 for the dropout's Philox groups."""
    if n > MAX_FUSED_N:
        return 1, LOOP_BLOCK_N, False
    block_n = max(4, triton.next_power_of_2(n))
    return max(1, MIN_BLOCK_ELEMENTS // block_n), block_n, True


def _num_warps(block_elements: int) -> int:
    return max(1, min(16, block_elements // 512))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _load_z(
    X, RES, rows, row_ok, start, N, s_x, s_res, seed0, seed1, threshold, drop_scale,
    HAS_RES: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """z = dropout(x) + residual for rows x columns [start, start + BLOCK_N), 0 outside the rows and columns;
    and the in-bounds mask."""
    c = start + tl.arange(0, BLOCK_N)
    inside = row_ok[:, None] & (c[None, :] < N)
    z = tl.load(X + rows[:, None] * s_x + c[None, :], mask=inside, other=0.0).to(ACC)
    if DROPOUT:
        keep = elementwise_keep_rows(rows, start, seed0, seed1, threshold, BLOCK_N)
        z = tl.where(keep, z * drop_scale, 0.0)
    if HAS_RES:
        z += tl.load(RES + rows[:, None] * s_res + c[None, :], mask=inside, other=0.0).to(ACC)
    return z, inside


@triton.jit(do_not_specialize=["eps_bits", *DROPOUT_ARGS])
def _norm_fwd_kernel(
    X,  # (R, N), row stride s_x, unit stride over N
    RES,  # residual (R, N), row stride s_res (unused without HAS_RES)
    W, B,  # weight, bias: (N,)
    OUT,  # contiguous (R, N)
    Z,  # residual_out = z, contiguous (R, N) (unused without STORE_Z)
    MEAN, RSTD,  # (R,)
    n_rows, N, s_x, s_res,
    eps_bits,  # scalar_bits of eps
    seed0, seed1, threshold,  # dropout: the seed's 32-bit words, floor(p * 2^32)
    drop_scale_bits,  # scalar_bits of 1 / (1 - p)
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_Z: tl.constexpr,
    RMS: tl.constexpr, DROPOUT: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    eps = scalar(eps_bits, ACC)
    drop_scale = scalar(drop_scale_bits, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        z, inside = _load_z(X, RES, rows, row_ok, 0, N, s_x, s_res, seed0, seed1, threshold, drop_scale,
                            HAS_RES, DROPOUT, ACC, BLOCK_N)
        if STORE_Z:
            zq = z.to(Z.dtype.element_ty)
            tl.store(Z + rows[:, None] * N + cols[None, :], zq, mask=inside)
            z = zq.to(ACC)  # normalise what is stored, as the backward will read it
        if RMS:
            mean = tl.zeros([BLOCK_M], dtype=ACC)
        else:
            mean = tl.sum(z, axis=1) / N
        zc = tl.where(inside, z - mean[:, None], 0.0)
        m2 = tl.sum(zc * zc, axis=1)
    else:
        # One pass of statistics: each chunk's mean and squared deviations, merged (Chan et al.).
        count = tl.zeros([BLOCK_M], dtype=ACC)
        mean = tl.zeros([BLOCK_M], dtype=ACC)
        m2 = tl.zeros([BLOCK_M], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            z, inside = _load_z(X, RES, rows, row_ok, start, N, s_x, s_res, seed0, seed1, threshold, drop_scale,
                                HAS_RES, DROPOUT, ACC, BLOCK_N)
            if STORE_Z:
                zq = z.to(Z.dtype.element_ty)
                tl.store(Z + rows[:, None] * N + c[None, :], zq, mask=inside)
                z = zq.to(ACC)
            n_chunk = tl.minimum(N - start, BLOCK_N).to(ACC)
            if RMS:
                m2 += tl.sum(z * z, axis=1)
            else:
                chunk_mean = tl.sum(z, axis=1) / n_chunk
                d = tl.where(inside, z - chunk_mean[:, None], 0.0)
                delta = chunk_mean - mean
                total = count + n_chunk
                mean += delta * (n_chunk / total)
                m2 += tl.sum(d * d, axis=1) + delta * delta * (count * n_chunk / total)
                count = total
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    if not RMS:
        tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)

    for start in range(0, N, BLOCK_N):
        c = start + cols
        if not SINGLE_PASS:
            if STORE_Z:
                inside = row_ok[:, None] & (c[None, :] < N)
                z = tl.load(Z + rows[:, None] * N + c[None, :], mask=inside, other=0.0).to(ACC)
            else:  # no residual and no dropout: z is x
                z, inside = _load_z(X, RES, rows, row_ok, start, N, s_x, s_res, seed0, seed1, threshold, drop_scale,
                                    False, False, ACC, BLOCK_N)
        y = (z - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y *= tl.load(W + c, mask=c < N, other=0.0).to(ACC)[None, :]
        if HAS_B:
            y += tl.load(B + c, mask=c < N, other=0.0).to(ACC)[None, :]
        tl.store(OUT + rows[:, None] * N + c[None, :], y.to(OUT.dtype.element_ty), mask=inside)


@triton.jit
def _dz_terms(Z, GO, W, rows, row_ok, c, N, s_z, s_go, mean, rstd, HAS_W: tl.constexpr, ACC: tl.constexpr):
    """For rows x columns c: (zhat, g = grad_out * weight, grad_out, in-bounds mask), 0 outside."""
    inside = row_ok[:, None] & (c[None, :] < N)
    z = tl.load(Z + rows[:, None] * s_z + c[None, :], mask=inside, other=0.0).to(ACC)
    go = tl.load(GO + rows[:, None] * s_go + c[None, :], mask=inside, other=0.0).to(ACC)
    zhat = tl.where(inside, (z - mean[:, None]) * rstd[:, None], 0.0)
    g = go
    if HAS_W:
        g = go * tl.load(W + c, mask=c < N, other=0.0).to(ACC)[None, :]
    return zhat, g, go, inside


@triton.jit
def _store_dz(
    GRES, DRES, DX, zhat, g, sum_g, sum_gz, rstd, rows, start, inside, N, s_gres,
    seed0, seed1, threshold, drop_scale,
    HAS_GRES: tl.constexpr, HAS_DRES: tl.constexpr, RMS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """dz (+ grad_residual) for rows x columns [start, start + BLOCK_N): stored as the residual's gradient,
    then masked and scaled by the dropout as x's."""
    c = start + tl.arange(0, BLOCK_N)
    dz = g - zhat * (sum_gz / N)[:, None]
    if not RMS:
        dz -= (sum_g / N)[:, None]
    dz *= rstd[:, None]
    if HAS_GRES:
        dz += tl.load(GRES + rows[:, None] * s_gres + c[None, :], mask=inside, other=0.0).to(ACC)
    if HAS_DRES:
        tl.store(DRES + rows[:, None] * N + c[None, :], dz.to(DRES.dtype.element_ty), mask=inside)
    if DROPOUT:
        keep = elementwise_keep_rows(rows, start, seed0, seed1, threshold, BLOCK_N)
        dz = tl.where(keep, dz * drop_scale, 0.0)
    tl.store(DX + rows[:, None] * N + c[None, :], dz.to(DX.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def _norm_bwd_kernel(
    GO,  # grad_out (R, N), row stride s_go
    GRES,  # grad of residual_out (R, N), row stride s_gres (unused without HAS_GRES)
    Z,  # the normalised input z (R, N), row stride s_z
    W, MEAN, RSTD,
    DX,  # grad_x, contiguous (R, N)
    DRES,  # grad of the residual input, contiguous (R, N) (unused without HAS_DRES)
    DW_PART, DB_PART,  # (G, N) partial sums of grad_weight / grad_bias, one row per program
    n_rows, N, s_go, s_gres, s_z,
    seed0, seed1, threshold, drop_scale_bits,  # the forward's dropout arguments
    HAS_GRES: tl.constexpr, HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    RMS: tl.constexpr, DROPOUT: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    drop_scale = scalar(drop_scale_bits, ACC)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for block in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = tl.full([BLOCK_M], block, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        rows = tl.where(row_ok, rows, 0)
        rstd = tl.load(RSTD + rows)
        if RMS:
            mean = tl.zeros([BLOCK_M], dtype=ACC)
        else:
            mean = tl.load(MEAN + rows)
        if SINGLE_PASS:
            zhat, g, go, inside = _dz_terms(Z, GO, W, rows, row_ok, cols, N, s_z, s_go, mean, rstd, HAS_W, ACC)
            _store_dz(GRES, DRES, DX, zhat, g, tl.sum(g, axis=1), tl.sum(g * zhat, axis=1), rstd, rows, 0, inside,
                      N, s_gres, seed0, seed1, threshold, drop_scale,
                      HAS_GRES, HAS_DRES, RMS, DROPOUT, BLOCK_N, ACC)
            if HAS_W:
                dw += go * zhat
            if HAS_B:
                db += go
        else:  # BLOCK_M == 1
            sum_g = tl.zeros([BLOCK_M], dtype=ACC)
            sum_gz = tl.zeros([BLOCK_M], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                zhat, g, go, inside = _dz_terms(Z, GO, W, rows, row_ok, start + cols, N, s_z, s_go, mean, rstd,
                                                HAS_W, ACC)
                sum_g += tl.sum(g, axis=1)
                sum_gz += tl.sum(g * zhat, axis=1)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                zhat, g, go, inside = _dz_terms(Z, GO, W, rows, row_ok, c, N, s_z, s_go, mean, rstd, HAS_W, ACC)
                _store_dz(GRES, DRES, DX, zhat, g, sum_g, sum_gz, rstd, rows, start, inside,
                          N, s_gres, seed0, seed1, threshold, drop_scale,
                          HAS_GRES, HAS_DRES, RMS, DROPOUT, BLOCK_N, ACC)
                # This program's own workspace row: no other program touches it.
                part = pid * N + c[None, :]
                if HAS_W:
                    tl.store(DW_PART + part, tl.load(DW_PART + part, mask=inside) + go * zhat, mask=inside)
                if HAS_B:
                    tl.store(DB_PART + part, tl.load(DB_PART + part, mask=inside) + go, mask=inside)
    if SINGLE_PASS:
        inside = cols < N
        if HAS_W:
            tl.store(DW_PART + pid * N + cols, tl.sum(dw, axis=0), mask=inside)
        if HAS_B:
            tl.store(DB_PART + pid * N + cols, tl.sum(db, axis=0), mask=inside)


def _dropout_args(dropout_p: float, seed: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(seed low word, seed high word, threshold floor(p * 2^32), scalar_bits of 1 / (1 - p)) for ``dtype``
    inputs; zeros without dropout."""
    if dropout_p == 0.0:
        return 0, 0, 0, scalar_bits(1.0, dtype)
    seed0, seed1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    return seed0, seed1, int(dropout_p * 2**32), scalar_bits(1.0 / (1.0 - dropout_p), dtype)


def norm_forward(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms: bool,
    dropout_p: float,
    seed: int,
    residual_out_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Triton twin of ``fastattn_C::norm_forward`` (schema in csrc/fastattn.cpp): x, residual (R, N) with
    unit stride over N; returns (out, residual_out or empty, mean or empty, rstd)."""
    n_rows, n = x.shape
    stats = reference.compute_dtype(x.dtype)
    out = torch.empty((n_rows, n), dtype=x.dtype, device=x.device)
    store_z = residual_out_dtype is not None
    z = torch.empty((n_rows, n) if store_z else (0,), dtype=residual_out_dtype or x.dtype, device=x.device)
    mean = torch.empty((0 if rms else n_rows,), dtype=stats, device=x.device)
    rstd = torch.empty((n_rows,), dtype=stats, device=x.device)
    block_m, block_n, single = _blocks(n)
    _norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x, x if residual is None else residual,
        x if weight is None else weight, x if bias is None else bias,
        out, z if store_z else out, rstd if rms else mean, rstd,
        n_rows, n, x.stride(0), 0 if residual is None else residual.stride(0), scalar_bits(eps, x.dtype),
        *_dropout_args(dropout_p, seed, x.dtype),
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, STORE_Z=store_z,
        RMS=rms, DROPOUT=dropout_p > 0.0, SINGLE_PASS=single,
        BLOCK_M=block_m, BLOCK_N=block_n, ACC=_acc(x.dtype), num_warps=_num_warps(block_m * block_n),
    )  # fmt: skip
    return out, z, mean, rstd


def _programs(row_blocks: int, device: torch.device) -> int:
    """The persistent backward grid: a few programs per SM on a GPU, a handful under the interpreter."""
    if device.type == "cuda":
        per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        per_device = 8 if backends.triton_interpreting() else 64
    return max(1, min(row_blocks, per_device))


def norm_backward(
    grad_out: Tensor,
    grad_residual: Optional[Tensor],
    z: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    rms: bool,
    has_bias: bool,
    dropout_p: float,
    seed: int,
    x_dtype: torch.dtype,
    residual_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Triton twin of ``fastattn_C::norm_backward``: returns (grad_x, grad_residual_in or empty,
    grad_weight or empty, grad_bias or empty)."""
    n_rows, n = z.shape
    device = z.device
    acc = reference.compute_dtype(x_dtype)
    affine = weight.dtype if weight is not None else x_dtype
    dx = torch.empty((n_rows, n), dtype=x_dtype, device=device)
    dres = torch.empty((n_rows, n) if residual_dtype else (0,), dtype=residual_dtype or x_dtype, device=device)
    block_m, block_n, single = _blocks(n)
    programs = _programs(triton.cdiv(n_rows, block_m), device)
    # The looped kernel adds into its workspace row, so it starts from zeros; the single pass overwrites it.
    make = torch.empty if single else torch.zeros
    dw_part = make((programs, n) if weight is not None else (0,), dtype=acc, device=device)
    db_part = make((programs, n) if has_bias else (0,), dtype=acc, device=device)
    if n_rows > 0:
        _norm_bwd_kernel[(programs,)](
            grad_out, grad_out if grad_residual is None else grad_residual, z,
            z if weight is None else weight, rstd if rms else mean, rstd,
            dx, dx if residual_dtype is None else dres,
            dx if weight is None else dw_part, dx if not has_bias else db_part,
            n_rows, n, grad_out.stride(0), 0 if grad_residual is None else grad_residual.stride(0), z.stride(0),
            *_dropout_args(dropout_p, seed, x_dtype),
            HAS_GRES=grad_residual is not None, HAS_DRES=residual_dtype is not None,
            HAS_W=weight is not None, HAS_B=has_bias, RMS=rms, DROPOUT=dropout_p > 0.0, SINGLE_PASS=single,
            BLOCK_M=block_m, BLOCK_N=block_n, ACC=_acc(x_dtype), num_warps=_num_warps(block_m * block_n),
        )  # fmt: skip
    else:
        dw_part.zero_(), db_part.zero_()
    dw = dw_part.sum(0).to(affine) if weight is not None else dw_part.to(affine)
    db = db_part.sum(0).to(affine) if has_bias else db_part.to(affine)
    return dx, dres, dw, db
