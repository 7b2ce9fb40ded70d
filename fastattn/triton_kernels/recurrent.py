"""Triton recurrent cells: the pointwise part of one LSTM / GRU / tanh or ReLU RNN / LayerNorm-LSTM step, forward
and backward, and the time loops that run them: the Python twin of csrc/recurrent_driver.h, with the outputs of
the fastattn_C ``recurrent_forward`` / ``recurrent_backward`` ops, so that fastattn.ops.recurrent's autograd serves
both.

Small LSTM, GRU and RNN layers (``persistent``) run every step in one launch of a persistent kernel per
direction and pass; the others run a step as one torch matmul (``h_prev W_hh^T``; in the backward ``d_hh W_hh``)
and one Triton launch: for the plain kinds one program per (row, block of hidden units), for the LayerNorm-LSTM,
whose norms reduce over a row (4H for LN_hh, H for LN_c), one program per row looping over it in blocks. The cell
math, the saved values and the rows that are not live (``lengths``) are those of csrc/recurrent.h and
csrc/cpu/recurrent_kernel.cpp: the state of such a row carries over, its output is 0, its gradients pass through.
Arithmetic in float32 (float64 for float64 inputs); tanh is written with ``tl.exp`` (the interpreter has no
libdevice).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn import backends
from fastattn.triton_kernels.scalars import scalar, scalar_bits

LSTM, GRU, RNN_TANH, RNN_RELU, LAYERNORM_LSTM = range(5)  # csrc/recurrent.h's RecurrentKind
GATES = (4, 3, 1, 1, 4)
MAX_BLOCK = 1024
# The persistent kernels hold (rows x hidden) tiles of h, c and the gates in registers and stage W_hh's gate tiles
# in shared memory: with 8 warps and tiles of 64, nothing spills but a few bytes in float64 and shared memory stays
# under 48 KiB; tiles of 128 spill and their backward needs more shared memory than an H100 has
# (scripts/triton_compile.py reports both).
PERSISTENT_MAX_HIDDEN = 64
PERSISTENT_ROWS = 16  # rows per persistent program (tl.dot's smallest M)
STEP_ARGS = ["step"]  # varies from launch to launch: never specialised (0, 1, 16, ... would each compile anew)


def saved_width(kind: int, hidden: int) -> int:
    """Saved values per row (csrc/recurrent.h's recurrent_saved_width)."""
    if kind == LAYERNORM_LSTM:
        return 9 * hidden + 2
    return 4 * hidden if kind in (LSTM, GRU) else 0


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _emulate_rounding(dtype: torch.dtype) -> bool:
    """Whether the kernels round to bfloat16 by hand (see _narrow): under the interpreter only."""
    return dtype == torch.bfloat16 and backends.triton_interpreting()


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Device helpers.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _tanh(v):
    """tanh through exp(-2|v|) <= 1: no overflow, absolute error of a few units in the last place."""
    e = tl.exp(-2.0 * tl.abs(v))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(v < 0.0, -t, t)


@triton.jit
def _narrow(v, PTR, RNE: tl.constexpr):
    """v in PTR's element type. RNE: a float32 -> bfloat16 rounding to nearest even done by hand, for the Triton
    interpreter, whose conversion truncates half the time (a bias that grows over the steps of a recurrence)."""
    if RNE:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v.to(PTR.dtype.element_ty)


@triton.jit
def _live(LENGTHS, r, step, HAS_LENGTHS: tl.constexpr):
    """Whether row r runs this step (a 0-d boolean)."""
    if HAS_LENGTHS:
        live = step < tl.load(LENGTHS + r)
    else:
        live = step >= 0
    return live


@triton.jit
def _load(PTR, offsets, mask, ACC: tl.constexpr):
    return tl.load(PTR + offsets, mask=mask, other=0.0).to(ACC)


@triton.jit
def _pre(X, HH, B_HH, offsets, mask, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """x + hh (+ b_hh) at one gate's offsets."""
    pre = _load(X, offsets, mask, ACC) + _load(HH, offsets, mask, ACC)
    if HAS_BIAS:
        pre += _load(B_HH, offsets, mask, ACC)
    return pre


@triton.jit
def _affine(PTR, offsets, mask, absent, HAS: tl.constexpr, ACC: tl.constexpr):
    """An affine parameter of the LayerNorm-LSTM at offsets, or ``absent`` (1 for a weight, 0 for a bias)."""
    if HAS:
        v = _load(PTR, offsets, mask, ACC)
    else:
        v = tl.zeros_like(offsets.to(ACC)) + absent
    return v


@triton.jit
def _row_mean(PTR, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.zeros((BLOCK,), ACC)
    for start in range(0, n, BLOCK):
        k = start + tl.arange(0, BLOCK)
        total += _load(PTR, k, k < n, ACC)
    return tl.sum(total, axis=0) / n


@triton.jit
def _row_rstd(PTR, n, mean, eps, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """1 / sqrt(var + eps) of a row of n values with the given mean (two-pass variance)."""
    total = tl.zeros((BLOCK,), ACC)
    for start in range(0, n, BLOCK):
        k = start + tl.arange(0, BLOCK)
        d = tl.where(k < n, _load(PTR, k, k < n, ACC) - mean, 0.0)
        total += d * d
    return 1.0 / tl.sqrt(tl.sum(total, axis=0) / n + eps)


# ---------------------------------------------------------------------------------------------------------
# Forward cells.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _save4(SV, H, j, m, live, s0, s1, s2, s3):
    """Four saved rows of H values at SV (0 on rows not live)."""
    tl.store(SV + j, tl.where(live, s0, 0.0), mask=m)
    tl.store(SV + H + j, tl.where(live, s1, 0.0), mask=m)
    tl.store(SV + 2 * H + j, tl.where(live, s2, 0.0), mask=m)
    tl.store(SV + 3 * H + j, tl.where(live, s3, 0.0), mask=m)


@triton.jit
def _store_h(H_NEW, OUT, out_stride, r, j, m, H, h, h_prev, live, PROJECT: tl.constexpr, RNE: tl.constexpr):
    """h_new = h (rows not live: h_prev) and out = h_new (rows not live: 0); with a projection h_new = h on every
    row and no out (the driver projects and carries the state over)."""
    if PROJECT:
        tl.store(H_NEW + r * H + j, _narrow(h, H_NEW, RNE), mask=m)
    else:
        h_new = _narrow(tl.where(live, h, h_prev), H_NEW, RNE)
        tl.store(H_NEW + r * H + j, h_new, mask=m)
        tl.store(OUT + r * out_stride + j, tl.where(live, h_new, 0.0).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _cell(p0, p1, p2, p3, x_n, h_prev, c_prev, KIND: tl.constexpr):
    """One step of the plain cells on gate values: LSTM p0..p3 = the pre-activations of i, f, g, o; GRU p0, p1 those
    of r and z, p2 = h_prev W_hn^T + b_hn and x_n the n gate's input; RNN p0. Returns (h', c' (c_prev but for the
    LSTM), the four saved values: LSTM i, f, g, o after their activations, GRU r, z, n and p2)."""
    c = c_prev
    if KIND == 0:
        s0, s1, s2, s3 = _sigmoid(p0), _sigmoid(p1), _tanh(p2), _sigmoid(p3)
        c = s1 * c_prev + s0 * s2
        h = s3 * _tanh(c)
    elif KIND == 1:
        s0, s1, s3 = _sigmoid(p0), _sigmoid(p1), p2
        s2 = _tanh(x_n + s0 * p2)
        h = (1.0 - s1) * s2 + s1 * h_prev
    else:
        if KIND == 2:
            h = _tanh(p0)
        else:
            h = tl.where(p0 < 0.0, 0.0, p0)  # NaN stays NaN
        s0, s1, s2, s3 = h, h, h, h  # nothing saved
    return h, c, s0, s1, s2, s3


@triton.jit(do_not_specialize=STEP_ARGS)
def _cell_forward(
    X, x_stride, HH, B_HH, H_PREV, C_PREV, C_NEW, H_NEW, OUT, out_stride, SAVED, LENGTHS, step, H,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, PROJECT: tl.constexpr,
    SAVE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, RNE: tl.constexpr,
):  # fmt: skip
    """LSTM, GRU, RNN: program (row r, block of hidden units)."""
    r = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = j < H
    G: tl.constexpr = 4 if KIND == 0 else (3 if KIND == 1 else 1)
    live = _live(LENGTHS, r, step, HAS_LENGTHS)
    x, hh = X + r * x_stride, HH + r * G * H
    if PROJECT:  # h has P columns: the driver carries it over
        h_prev = tl.zeros((BLOCK,), ACC)
    else:
        h_prev = _load(H_PREV + r * H, j, m, ACC)
    p0 = _pre(x, hh, B_HH, j, m, HAS_BIAS, ACC)
    p1, p2, p3, x_n, c_prev = p0, p0, p0, p0, p0  # what the kind does not use
    if G > 1:
        p1 = _pre(x, hh, B_HH, H + j, m, HAS_BIAS, ACC)
    if KIND == 0:
        p2, p3 = _pre(x, hh, B_HH, 2 * H + j, m, HAS_BIAS, ACC), _pre(x, hh, B_HH, 3 * H + j, m, HAS_BIAS, ACC)
        c_prev = _load(C_PREV + r * H, j, m, ACC)
    elif KIND == 1:
        p2 = _load(hh, 2 * H + j, m, ACC)
        if HAS_BIAS:
            p2 += _load(B_HH, 2 * H + j, m, ACC)
        x_n = _load(x, 2 * H + j, m, ACC)
    h, c, s0, s1, s2, s3 = _cell(p0, p1, p2, p3, x_n, h_prev, c_prev, KIND)
    if KIND == 0:
        tl.store(C_NEW + r * H + j, tl.where(live, c, c_prev), mask=m)
    if SAVE:
        _save4(SAVED + r * 4 * H, H, j, m, live, s0, s1, s2, s3)
    _store_h(H_NEW, OUT, out_stride, r, j, m, H, h, h_prev, live, PROJECT, RNE)


@triton.jit
def _ln_gate(
    x, hh, B_HH, NHW, NHB, offsets, m, mean, rstd,
    HAS_BIAS: tl.constexpr, HAS_NHW: tl.constexpr, HAS_NHB: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """(x + LN_hh(hh) + b, the normalised hh) at one gate's offsets of a LayerNorm-LSTM row."""
    hat = (_load(hh, offsets, m, ACC) - mean) * rstd
    pre = _load(x, offsets, m, ACC) + hat * _affine(NHW, offsets, m, 1.0, HAS_NHW, ACC)
    pre += _affine(NHB, offsets, m, 0.0, HAS_NHB, ACC)
    if HAS_BIAS:
        pre += _load(B_HH, offsets, m, ACC)
    return pre, hat


@triton.jit(do_not_specialize=[*STEP_ARGS, "eps_bits"])  # eps as bits (triton_kernels/scalars.py)
def _layernorm_lstm_forward(
    X, x_stride, HH, B_HH, NHW, NHB, NCW, NCB, H_PREV, C_PREV, C_NEW, H_NEW, OUT, out_stride, SAVED, LENGTHS,
    step, H, eps_bits,
    HAS_BIAS: tl.constexpr, HAS_NHW: tl.constexpr, HAS_NHB: tl.constexpr, HAS_NCW: tl.constexpr,
    HAS_NCB: tl.constexpr, HAS_LENGTHS: tl.constexpr, PROJECT: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, RNE: tl.constexpr,
):  # fmt: skip
    """One program per row: LN_hh's statistics over 4H, then the gates and c' (and c''s mean), then LN_c's
    deviation and h. Saved: i, f, g, o (4H), hh normalised (4H), c' normalised (H), 1/std of hh and of c'."""
    r = tl.program_id(0)
    GH = 4 * H
    eps = scalar(eps_bits, ACC)
    live = _live(LENGTHS, r, step, HAS_LENGTHS)
    x, hh, sv = X + r * x_stride, HH + r * GH, SAVED + r * (9 * H + 2)
    mean = _row_mean(hh, GH, ACC, BLOCK)
    rstd = _row_rstd(hh, GH, mean, eps, ACC, BLOCK)
    c_total = tl.zeros((BLOCK,), ACC)
    for start in range(0, H, BLOCK):
        j = start + tl.arange(0, BLOCK)
        m = j < H
        pre_i, hat_i = _ln_gate(x, hh, B_HH, NHW, NHB, j, m, mean, rstd, HAS_BIAS, HAS_NHW, HAS_NHB, ACC)
        pre_f, hat_f = _ln_gate(x, hh, B_HH, NHW, NHB, H + j, m, mean, rstd, HAS_BIAS, HAS_NHW, HAS_NHB, ACC)
        pre_g, hat_g = _ln_gate(x, hh, B_HH, NHW, NHB, 2 * H + j, m, mean, rstd, HAS_BIAS, HAS_NHW, HAS_NHB, ACC)
        pre_o, hat_o = _ln_gate(x, hh, B_HH, NHW, NHB, 3 * H + j, m, mean, rstd, HAS_BIAS, HAS_NHW, HAS_NHB, ACC)
        i, f, g = _sigmoid(pre_i), _sigmoid(pre_f), _tanh(pre_g)
        c_prev = _load(C_PREV + r * H, j, m, ACC)
        c = f * c_prev + i * g
        tl.store(C_NEW + r * H + j, tl.where(live, c, c_prev), mask=m)
        c_total += tl.where(m, c, 0.0)
        if SAVE:
            _save4(sv, H, j, m, live, i, f, g, _sigmoid(pre_o))
            _save4(sv + GH, H, j, m, live, hat_i, hat_f, hat_g, hat_o)
    c_mean = tl.sum(c_total, axis=0) / H
    tl.debug_barrier()  # c' is read back below by other threads
    c_rstd = _row_rstd(C_NEW + r * H, H, c_mean, eps, ACC, BLOCK)
    for start in range(0, H, BLOCK):
        j = start + tl.arange(0, BLOCK)
        m = j < H
        c_hat = (_load(C_NEW + r * H, j, m, ACC) - c_mean) * c_rstd
        pre_o, _ = _ln_gate(x, hh, B_HH, NHW, NHB, 3 * H + j, m, mean, rstd, HAS_BIAS, HAS_NHW, HAS_NHB, ACC)
        cn = c_hat * _affine(NCW, j, m, 1.0, HAS_NCW, ACC) + _affine(NCB, j, m, 0.0, HAS_NCB, ACC)
        h = _sigmoid(pre_o) * _tanh(cn)
        if PROJECT:  # h has P columns: the driver carries it over
            h_prev = h
        else:
            h_prev = _load(H_PREV + r * H, j, m, ACC)
        _store_h(H_NEW, OUT, out_stride, r, j, m, H, h, h_prev, live, PROJECT, RNE)
        if SAVE:
            tl.store(sv + 2 * GH + j, tl.where(live, c_hat, 0.0), mask=m)
    if SAVE:
        tl.store(sv + 2 * GH + H, tl.where(live, rstd, 0.0))
        tl.store(sv + 2 * GH + H + 1, tl.where(live, c_rstd, 0.0))


# ---------------------------------------------------------------------------------------------------------
# Backward cells.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _store_live(PTR, v, m, live, RNE: tl.constexpr):
    """v in PTR's dtype (0 on rows not live)."""
    tl.store(PTR, _narrow(tl.where(live, v, 0.0), PTR, RNE), mask=m)


@triton.jit
def _store4(PTR, H, j, m, live, v0, v1, v2, v3, RNE: tl.constexpr):
    """Four gate rows of H values in PTR's dtype (0 on rows not live)."""
    _store_live(PTR + j, v0, m, live, RNE)
    _store_live(PTR + H + j, v1, m, live, RNE)
    _store_live(PTR + 2 * H + j, v2, m, live, RNE)
    _store_live(PTR + 3 * H + j, v3, m, live, RNE)


@triton.jit
def _dh(GRAD_OUT, grad_out_stride, DH, r, j, m, H, HAS_GRAD_OUT: tl.constexpr, ACC: tl.constexpr):
    """(dh_in, the gradient reaching h': dh_in plus the output's gradient)."""
    dh_in = _load(DH + r * H, j, m, ACC)
    dh = dh_in
    if HAS_GRAD_OUT:
        dh += _load(GRAD_OUT + r * grad_out_stride, j, m, ACC)
    return dh_in, dh


@triton.jit
def _cell_grad(dh, dc, s0, s1, s2, s3, c_prev, c_new, h_prev, h_new, KIND: tl.constexpr):
    """Gradients of one plain step from dh (reaching h', the output's included), dc (reaching c', LSTM) and the
    saved values s0..s3: (the four gate rows of d_hh, GRU's gradient of x_n, dc_prev, the gradient of h_prev not
    through W_hh). d_hh is the gradient of the pre-activations (= of x, except GRU's n gate: of hh_n + b_hn)."""
    zero = tl.zeros_like(dh)
    d0, d1, d2, d3, dx_n, dc_prev, passed = zero, zero, zero, zero, zero, dc, zero
    if KIND == 0:
        tc = _tanh(c_new)
        dcj = dc + dh * s3 * (1.0 - tc * tc)
        d0, d1 = dcj * s2 * s0 * (1.0 - s0), dcj * c_prev * s1 * (1.0 - s1)
        d2, d3 = dcj * s0 * (1.0 - s2 * s2), dh * tc * s3 * (1.0 - s3)
        dc_prev = dcj * s1
    elif KIND == 1:
        dx_n = dh * (1.0 - s1) * (1.0 - s2 * s2)
        d0, d1, d2 = dx_n * s3 * s0 * (1.0 - s0), dh * (h_prev - s2) * s1 * (1.0 - s1), dx_n * s0
        passed = dh * s1
    elif KIND == 2:
        d0 = dh * (1.0 - h_new * h_new)
    else:
        d0 = tl.where(h_new > 0.0, dh, 0.0)
    return d0, d1, d2, d3, dx_n, dc_prev, passed


@triton.jit(do_not_specialize=STEP_ARGS)
def _cell_backward(
    GRAD_OUT, grad_out_stride, DH, DC, DC_PREV, SAVED, C_PREV, C_NEW, H_PREV, H_NEW, D_HH, D_X, d_x_stride,
    DH_PASS, LENGTHS, step, H,
    KIND: tl.constexpr, HAS_GRAD_OUT: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_PASS: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, RNE: tl.constexpr,
):  # fmt: skip
    """LSTM, GRU, RNN: program (row r, block of hidden units). DC_PREV may be DC (each element is read before the
    same thread writes it)."""
    r = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = j < H
    G: tl.constexpr = 4 if KIND == 0 else (3 if KIND == 1 else 1)
    live = _live(LENGTHS, r, step, HAS_LENGTHS)
    dh_in, dh = _dh(GRAD_OUT, grad_out_stride, DH, r, j, m, H, HAS_GRAD_OUT, ACC)
    sv, d_hh = SAVED + r * 4 * H, D_HH + r * G * H
    s0, s1, s2, s3, dc, c_prev, c_new, h_prev, h_new = dh, dh, dh, dh, dh, dh, dh, dh, dh  # what the kind does not use
    if G > 1:
        s0, s1 = _load(sv, j, m, ACC), _load(sv, H + j, m, ACC)
        s2, s3 = _load(sv, 2 * H + j, m, ACC), _load(sv, 3 * H + j, m, ACC)
    if KIND == 0:
        dc = _load(DC + r * H, j, m, ACC)
        c_prev, c_new = _load(C_PREV + r * H, j, m, ACC), _load(C_NEW + r * H, j, m, ACC)
    elif KIND == 1:
        h_prev = _load(H_PREV + r * H, j, m, ACC)
    else:
        h_new = _load(H_NEW + r * H, j, m, ACC)
    d0, d1, d2, d3, dx_n, dc_prev, passed = _cell_grad(dh, dc, s0, s1, s2, s3, c_prev, c_new, h_prev, h_new, KIND)
    _store_live(d_hh + j, d0, m, live, RNE)
    if G > 1:
        _store_live(d_hh + H + j, d1, m, live, RNE)
        _store_live(d_hh + 2 * H + j, d2, m, live, RNE)
    if KIND == 0:
        _store_live(d_hh + 3 * H + j, d3, m, live, RNE)
        tl.store(DC_PREV + r * H + j, tl.where(live, dc_prev, dc), mask=m)
    elif KIND == 1:
        d_x = D_X + r * d_x_stride
        _store_live(d_x + j, d0, m, live, RNE)
        _store_live(d_x + H + j, d1, m, live, RNE)
        _store_live(d_x + 2 * H + j, dx_n, m, live, RNE)
    if HAS_PASS:
        tl.store(DH_PASS + r * H + j, _narrow(tl.where(live, passed, dh_in), DH_PASS, RNE), mask=m)


@triton.jit
def _ln_c_backward(sv, NCW, NCB, dh, r, j, m, H, HAS_NCW: tl.constexpr, HAS_NCB: tl.constexpr, ACC: tl.constexpr):
    """Through h = o tanh(cn), cn = LN_c(c') = c_hat w + b: (the gradient of cn, of c_hat, c_hat, tanh(cn), o)."""
    GH = 4 * H
    o, c_hat = _load(sv, 3 * H + j, m, ACC), _load(sv, 2 * GH + j, m, ACC)
    cw = _affine(NCW, j, m, 1.0, HAS_NCW, ACC)
    tcn = _tanh(c_hat * cw + _affine(NCB, j, m, 0.0, HAS_NCB, ACC))
    d_cn = dh * o * (1.0 - tcn * tcn)
    return d_cn, d_cn * cw, c_hat, tcn, o


@triton.jit
def _ln_hh_terms(d_pre, NHW, HH_HAT, offsets, m, HAS_NHW: tl.constexpr, ACC: tl.constexpr):
    """(d_hat = d_pre w, hat = the saved normalised hh) at offsets of the 4H row: LN_hh's backward is made of
    these, their means and mean(d_hat hat)."""
    return d_pre * _affine(NHW, offsets, m, 1.0, HAS_NHW, ACC), _load(HH_HAT, offsets, m, ACC)


@triton.jit(do_not_specialize=STEP_ARGS)
def _layernorm_lstm_backward(
    GRAD_OUT, grad_out_stride, DH, DC, DC_PREV, SAVED, C_PREV, NHW, NCW, NCB, D_HH, D_X, d_x_stride, D_CN, D_PRE,
    DH_PASS, LENGTHS, step, H,
    HAS_NHW: tl.constexpr, HAS_NCW: tl.constexpr, HAS_NCB: tl.constexpr, HAS_GRAD_OUT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_PASS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, RNE: tl.constexpr,
):  # fmt: skip
    """One program per row, three passes: LN_c's backward sums; the gates' pre-activation gradients d_pre (into
    d_x, and in the compute type into the D_PRE scratch row) with dc_prev and LN_hh's backward sums; then d_hh
    through LN_hh. LayerNorm's backward: d_in = rstd (d_hat - mean(d_hat) - hat mean(d_hat hat))."""
    r = tl.program_id(0)
    GH = 4 * H
    live = _live(LENGTHS, r, step, HAS_LENGTHS)
    sv = SAVED + r * (9 * H + 2)
    rstd_hh, rstd_c = tl.load(sv + 2 * GH + H), tl.load(sv + 2 * GH + H + 1)
    sum_d, sum_dh = tl.zeros((BLOCK,), ACC), tl.zeros((BLOCK,), ACC)
    for start in range(0, H, BLOCK):
        j = start + tl.arange(0, BLOCK)
        m = j < H
        dh_in, dh = _dh(GRAD_OUT, grad_out_stride, DH, r, j, m, H, HAS_GRAD_OUT, ACC)
        d_cn, d_hat, c_hat, _, _ = _ln_c_backward(sv, NCW, NCB, dh, r, j, m, H, HAS_NCW, HAS_NCB, ACC)
        tl.store(D_CN + r * H + j, tl.where(live, d_cn, 0.0), mask=m)
        if HAS_PASS:
            tl.store(DH_PASS + r * H + j, _narrow(tl.where(live, 0.0, dh_in), DH_PASS, RNE), mask=m)
        sum_d += d_hat
        sum_dh += d_hat * c_hat
    mean_d, mean_dh = tl.sum(sum_d, axis=0) / H, tl.sum(sum_dh, axis=0) / H
    sum_t, sum_th = tl.zeros((BLOCK,), ACC), tl.zeros((BLOCK,), ACC)
    d_x, d_pre = D_X + r * d_x_stride, D_PRE + r * GH
    for start in range(0, H, BLOCK):
        j = start + tl.arange(0, BLOCK)
        m = j < H
        _, dh = _dh(GRAD_OUT, grad_out_stride, DH, r, j, m, H, HAS_GRAD_OUT, ACC)
        _, d_hat, c_hat, tcn, o = _ln_c_backward(sv, NCW, NCB, dh, r, j, m, H, HAS_NCW, HAS_NCB, ACC)
        i, f, g = _load(sv, j, m, ACC), _load(sv, H + j, m, ACC), _load(sv, 2 * H + j, m, ACC)
        dc = _load(DC + r * H, j, m, ACC)
        dcj = dc + rstd_c * (d_hat - mean_d - c_hat * mean_dh)
        d_i, d_f = dcj * g * i * (1.0 - i), dcj * _load(C_PREV + r * H, j, m, ACC) * f * (1.0 - f)
        d_g, d_o = dcj * i * (1.0 - g * g), dh * tcn * o * (1.0 - o)
        tl.store(DC_PREV + r * H + j, tl.where(live, dcj * f, dc), mask=m)
        _store4(d_x, H, j, m, live, d_i, d_f, d_g, d_o, RNE)
        _store4(d_pre, H, j, m, live, d_i, d_f, d_g, d_o, False)
        t0, hat0 = _ln_hh_terms(d_i, NHW, sv + GH, j, m, HAS_NHW, ACC)
        t1, hat1 = _ln_hh_terms(d_f, NHW, sv + GH, H + j, m, HAS_NHW, ACC)
        t2, hat2 = _ln_hh_terms(d_g, NHW, sv + GH, 2 * H + j, m, HAS_NHW, ACC)
        t3, hat3 = _ln_hh_terms(d_o, NHW, sv + GH, 3 * H + j, m, HAS_NHW, ACC)
        sum_t += t0 + t1 + t2 + t3
        sum_th += t0 * hat0 + t1 * hat1 + t2 * hat2 + t3 * hat3
    mean_t, mean_th = tl.sum(sum_t, axis=0) / GH, tl.sum(sum_th, axis=0) / GH
    tl.debug_barrier()  # D_PRE is read back below by other threads
    for start in range(0, GH, BLOCK):
        k = start + tl.arange(0, BLOCK)
        mk = k < GH
        d_hat, hat = _ln_hh_terms(_load(d_pre, k, mk, ACC), NHW, sv + GH, k, mk, HAS_NHW, ACC)
        d_hh = rstd_hh * (d_hat - mean_t - hat * mean_th)
        _store_live(D_HH + r * GH + k, d_hh, mk, live, RNE)


# ---------------------------------------------------------------------------------------------------------
# Persistent kernels: every step of a block of BM rows in one launch. Rows are independent through time, so a
# program keeps its rows' h (and c, or dh and dc backward) in registers and multiplies by W_hh with tl.dot each
# step, reading W_hh from L2: no launch and no torch.mm per step, for the small, launch-bound layers (H <=
# PERSISTENT_MAX_HIDDEN, no projection, not the LayerNorm-LSTM). Same outputs as the per-step loop; h (and dh)
# are rounded to the layer's dtype after every step as the per-step loop stores them, and the products are
# accumulated in float32 (float64) from operands in the layer's dtype.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _gate_product(v, W, g, H, kk, nn, wm, TRANSPOSED: tl.constexpr, DOT: tl.constexpr):
    """v (BM, BH) times gate g's block of W_hh (G*H, H): v W_g^T (forward), or v W_g (TRANSPOSED, backward)."""
    if TRANSPOSED:  # tile[k, n] = W[g*H + k, n]
        w = tl.load(W + (g * H + kk) * H + nn, mask=wm, other=0.0)
    else:  # tile[k, n] = W[g*H + n, k]
        w = tl.load(W + (g * H + nn) * H + kk, mask=wm, other=0.0)
    return tl.dot(v.to(DOT), w.to(DOT), input_precision="ieee")


@triton.jit
def _bias_row(B_HH, g, H, cols, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Gate g's b_hh as a (1, BH) row, or zeros."""
    if HAS_BIAS:
        b = tl.load(B_HH + g * H + cols, mask=cols < H, other=0.0).to(ACC)
    else:
        b = cols.to(ACC) * 0.0
    return b[None, :]


@triton.jit
def _program_tiles(LENGTHS, S, B, H, HAS_LENGTHS: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
    """A persistent program's rows (BM,) and hidden units (BH,), where both are in range (BM, BH), the (k, n)
    indices of a W_hh gate tile and where they are in range, the offsets of its (BM, BH) tile in a (B, H) slab, and
    its rows' lengths (S without lengths)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BH)
    kk, nn = cols[:, None], cols[None, :]
    if HAS_LENGTHS:
        length = tl.load(LENGTHS + rows, mask=rows < B, other=0)
    else:
        length = rows * 0 + S
    inside = (rows[:, None] < B) & (cols[None, :] < H)
    return rows, cols, inside, kk, nn, (kk < H) & (nn < H), rows[:, None] * H + cols[None, :], length


@triton.jit(do_not_specialize=["S"])  # one compilation for every sequence length
def _sequence_forward(
    X, sx_t, sx_b, W_HH, B_HH, HSTATE, CSTATE, OUT, SAVED, LENGTHS, S, B, H,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr,
    REVERSE: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, RNE: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    """LSTM, GRU, RNN over all S steps for rows [pid BM, pid BM + BM): X (S, B, G*H) with strides (sx_t, sx_b, 1);
    HSTATE (S + 1, B, H), CSTATE, OUT, SAVED (S, B, 4H) contiguous, as the per-step loop fills them."""
    G: tl.constexpr = 4 if KIND == 0 else (3 if KIND == 1 else 1)
    STATE = HSTATE.dtype.element_ty
    rows, cols, inside, kk, nn, wm, slab, length = _program_tiles(LENGTHS, S, B, H, HAS_LENGTHS, BM, BH)
    h = tl.load(HSTATE + S * REVERSE * B * H + slab, mask=inside, other=0.0).to(ACC)
    c = h
    if KIND == 0:
        c = tl.load(CSTATE + S * REVERSE * B * H + slab, mask=inside, other=0.0).to(ACC)
    for k in range(S):
        t = S - 1 - k if REVERSE else k
        after = t + 1 - REVERSE
        live = (t < length)[:, None]
        x = X + t * sx_t + rows[:, None] * sx_b + cols[None, :]
        p0 = _gate_product(h, W_HH, 0, H, kk, nn, wm, False, DOT) + _bias_row(B_HH, 0, H, cols, HAS_BIAS, ACC)
        p0 += tl.load(x, mask=inside, other=0.0).to(ACC)
        p1, p2, p3, x_n = p0, p0, p0, p0  # what the kind does not use
        if G > 1:
            p1 = _gate_product(h, W_HH, 1, H, kk, nn, wm, False, DOT) + _bias_row(B_HH, 1, H, cols, HAS_BIAS, ACC)
            p1 += tl.load(x + H, mask=inside, other=0.0).to(ACC)
            p2 = _gate_product(h, W_HH, 2, H, kk, nn, wm, False, DOT) + _bias_row(B_HH, 2, H, cols, HAS_BIAS, ACC)
            x_n = tl.load(x + 2 * H, mask=inside, other=0.0).to(ACC)
        if KIND == 0:
            p2 += x_n
            p3 = _gate_product(h, W_HH, 3, H, kk, nn, wm, False, DOT) + _bias_row(B_HH, 3, H, cols, HAS_BIAS, ACC)
            p3 += tl.load(x + 3 * H, mask=inside, other=0.0).to(ACC)
        h_cell, c_cell, s0, s1, s2, s3 = _cell(p0, p1, p2, p3, x_n, h, c, KIND)
        h_cell = _narrow(h_cell, HSTATE, RNE)
        h = tl.where(live, h_cell.to(ACC), h)
        c = tl.where(live, c_cell, c)
        tl.store(HSTATE + after * B * H + slab, h.to(STATE), mask=inside)
        tl.store(OUT + t * B * H + slab, tl.where(live, h_cell, 0.0).to(STATE), mask=inside)
        if KIND == 0:
            tl.store(CSTATE + after * B * H + slab, c, mask=inside)
        if SAVE:
            sv = SAVED + t * B * 4 * H + rows[:, None] * 4 * H + cols[None, :]
            tl.store(sv, tl.where(live, s0, 0.0), mask=inside)
            tl.store(sv + H, tl.where(live, s1, 0.0), mask=inside)
            tl.store(sv + 2 * H, tl.where(live, s2, 0.0), mask=inside)
            tl.store(sv + 3 * H, tl.where(live, s3, 0.0), mask=inside)


@triton.jit(do_not_specialize=["S"])  # one compilation for every sequence length
def _sequence_backward(
    GRAD_OUT, sg_t, sg_b, DH, DC, W_HH, HSTATE, CSTATE, SAVED, LENGTHS, D_HH, D_X, S, B, H,
    KIND: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
    BH: tl.constexpr, RNE: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Backward through all S steps of _sequence_forward for rows [pid BM, pid BM + BM): GRAD_OUT (S, B, H) with
    strides (sg_t, sg_b, 1); DH (B, H) and DC (B, H, compute type) hold the gradients of h_n and c_n and are
    overwritten with those of h0 and c0; D_HH (S, B, G*H) and, for the GRU, D_X as the per-step loop fills them."""
    G: tl.constexpr = 4 if KIND == 0 else (3 if KIND == 1 else 1)
    STATE = HSTATE.dtype.element_ty
    rows, cols, inside, kk, nn, wm, slab, length = _program_tiles(LENGTHS, S, B, H, HAS_LENGTHS, BM, BH)
    gates = rows[:, None] * (G * H) + cols[None, :]  # offsets of gate 0 in a (B, G*H) slab
    dh = tl.load(DH + slab, mask=inside, other=0.0).to(ACC)
    dc = dh
    if KIND == 0:
        dc = tl.load(DC + slab, mask=inside, other=0.0).to(ACC)
    for k in range(S):
        t = k if REVERSE else S - 1 - k
        before, after = t + REVERSE, t + 1 - REVERSE
        live = (t < length)[:, None]
        dh_total = dh + tl.load(GRAD_OUT + t * sg_t + rows[:, None] * sg_b + cols[None, :], mask=inside, other=0.0)
        sv = SAVED + t * B * 4 * H + rows[:, None] * 4 * H + cols[None, :]
        s0, s1, s2, s3, c_prev, c_new, h_prev, h_new = dh, dh, dh, dh, dh, dh, dh, dh  # what the kind does not use
        if G > 1:
            s0, s1 = tl.load(sv, mask=inside, other=0.0), tl.load(sv + H, mask=inside, other=0.0)
            s2, s3 = tl.load(sv + 2 * H, mask=inside, other=0.0), tl.load(sv + 3 * H, mask=inside, other=0.0)
        if KIND == 0:
            c_prev = tl.load(CSTATE + before * B * H + slab, mask=inside, other=0.0)
            c_new = tl.load(CSTATE + after * B * H + slab, mask=inside, other=0.0)
        elif KIND == 1:
            h_prev = tl.load(HSTATE + before * B * H + slab, mask=inside, other=0.0).to(ACC)
        else:
            h_new = tl.load(HSTATE + after * B * H + slab, mask=inside, other=0.0).to(ACC)
        d0, d1, d2, d3, dx_n, dc_prev, passed = _cell_grad(dh_total.to(ACC), dc, s0, s1, s2, s3, c_prev, c_new,
                                                           h_prev, h_new, KIND)  # fmt: skip
        # rows not live: no gradient into the step, dh and dc pass through
        d0 = _narrow(tl.where(live, d0, 0.0), D_HH, RNE)
        d_hh = D_HH + t * B * G * H + gates
        tl.store(d_hh, d0, mask=inside)
        back = _gate_product(d0, W_HH, 0, H, kk, nn, wm, True, DOT)
        if G > 1:
            d1 = _narrow(tl.where(live, d1, 0.0), D_HH, RNE)
            d2 = _narrow(tl.where(live, d2, 0.0), D_HH, RNE)
            tl.store(d_hh + H, d1, mask=inside)
            tl.store(d_hh + 2 * H, d2, mask=inside)
            back += _gate_product(d1, W_HH, 1, H, kk, nn, wm, True, DOT)
            back += _gate_product(d2, W_HH, 2, H, kk, nn, wm, True, DOT)
        if KIND == 0:
            d3 = _narrow(tl.where(live, d3, 0.0), D_HH, RNE)
            tl.store(d_hh + 3 * H, d3, mask=inside)
            back += _gate_product(d3, W_HH, 3, H, kk, nn, wm, True, DOT)
            dc = tl.where(live, dc_prev, dc)
        elif KIND == 1:
            d_x = D_X + t * B * G * H + gates
            tl.store(d_x, d0, mask=inside)
            tl.store(d_x + H, d1, mask=inside)
            tl.store(d_x + 2 * H, _narrow(tl.where(live, dx_n, 0.0), D_X, RNE), mask=inside)
        passed = _narrow(tl.where(live, passed, dh), D_HH, RNE).to(ACC)
        dh = _narrow(passed + back, D_HH, RNE).to(ACC)  # as the per-step loop's addmm rounds it
    tl.store(DH + slab, dh.to(STATE), mask=inside)
    if KIND == 0:
        tl.store(DC + slab, dc, mask=inside)


# ---------------------------------------------------------------------------------------------------------
# The time loops (csrc/recurrent_driver.h's, in Python): hstate (S + 1, B, P) holds the state before step t at
# t + reverse and after it at t + 1 - reverse; cstate (S + 1, B, H) likewise for c, in the compute type.
# ---------------------------------------------------------------------------------------------------------


def _block(hidden: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(max(hidden, 16)))


def _or(t: Optional[Tensor], dummy: Tensor) -> Tensor:
    """t, or any tensor for a pointer the kernel does not read (its HAS_ flag is off)."""
    return dummy if t is None else t


def persistent(kind: int, hidden: int, project: bool) -> bool:
    """Whether a layer runs on the persistent kernels (every step in one launch)."""
    return kind in (LSTM, GRU, RNN_TANH, RNN_RELU) and not project and hidden <= PERSISTENT_MAX_HIDDEN


def _persistent_args(batch: int, hidden: int, dtype: torch.dtype) -> tuple[tuple[int], dict]:
    """(grid, the meta-parameters both persistent kernels share)."""
    grid = (triton.cdiv(batch, PERSISTENT_ROWS),)
    # the matmuls' operand type: the layer's, but float32 for bfloat16 under the interpreter, whose bfloat16 tl.dot
    # is wrong (the operands are bfloat16 values either way)
    dot = tl.float32 if _emulate_rounding(dtype) else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                                                       torch.float32: tl.float32, torch.float64: tl.float64}[dtype]
    return grid, dict(BM=PERSISTENT_ROWS, BH=triton.next_power_of_2(max(hidden, 16)), ACC=_acc(dtype),
                      RNE=_emulate_rounding(dtype), DOT=dot, num_stages=1, num_warps=8)  # fmt: skip


def _steps(seq: int, reverse: bool):
    """(t, index of the state before step t, index after it) in the order the steps run."""
    rev = int(reverse)
    for k in range(seq):
        t = seq - 1 - k if reverse else k
        yield t, t + rev, t + 1 - rev


def recurrent_forward(
    kind: int,
    x_proj: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    lengths: Optional[Tensor],
    reverse: bool,
    save: bool,
    norm_hh_weight: Optional[Tensor],
    norm_hh_bias: Optional[Tensor],
    norm_c_weight: Optional[Tensor],
    norm_c_bias: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out (S, B, P), hstate (S + 1, B, P), cstate (S + 1, B, H) or empty, saved (S, B, W) or empty) of x_proj
    (S, B, G*H) (unit stride over its last dim), as fastattn_C's recurrent_forward."""
    seq, batch, width = x_proj.shape
    hidden, proj = width // GATES[kind], w_hh.shape[1]
    compute, acc = _compute(x_proj.dtype), _acc(x_proj.dtype)
    lstm, project = kind in (LSTM, LAYERNORM_LSTM), w_hr is not None
    out = x_proj.new_empty(seq, batch, proj)
    hstate = x_proj.new_empty(seq + 1, batch, proj)
    hstate[seq * int(reverse)].copy_(h0)
    cstate = x_proj.new_empty((seq + 1, batch, hidden) if lstm else (0,), dtype=compute)
    if lstm:
        cstate[seq * int(reverse)].copy_(c0)
    saved = x_proj.new_empty(seq if save and saved_width(kind, hidden) else 0, batch, saved_width(kind, hidden),
                             dtype=compute)  # fmt: skip
    hh = x_proj.new_empty(batch, width)
    h_pre = x_proj.new_empty(batch, hidden) if project else None
    b = None if b_hh is None else b_hh.contiguous()
    norms = [None if n is None else n.contiguous() for n in (norm_hh_weight, norm_hh_bias, norm_c_weight, norm_c_bias)]
    if persistent(kind, hidden, project):
        grid, meta = _persistent_args(batch, hidden, x_proj.dtype)
        _sequence_forward[grid](
            x_proj, x_proj.stride(0), x_proj.stride(1), w_hh.contiguous(), _or(b, hh), hstate,
            cstate if lstm else hstate, out, saved if saved.numel() else hstate, _or(lengths, hh), seq, batch, hidden,
            KIND=kind, HAS_BIAS=b is not None, HAS_LENGTHS=lengths is not None, SAVE=saved.numel() > 0,
            REVERSE=int(reverse), **meta,
        )  # fmt: skip
        return out, hstate, cstate, saved
    block = _block(hidden)
    fixed = dict(x_stride=x_proj.stride(1), out_stride=proj, H=hidden, HAS_BIAS=b is not None,
                 HAS_LENGTHS=lengths is not None, PROJECT=project, SAVE=saved.numel() > 0, ACC=acc, BLOCK=block,
                 RNE=_emulate_rounding(x_proj.dtype))  # fmt: skip
    for t, before, after in _steps(seq, reverse):
        h_prev = hstate[before]
        torch.mm(h_prev, w_hh.t(), out=hh)
        common = dict(fixed, step=t)
        c_prev, c_new = (cstate[before], cstate[after]) if lstm else (hh, hh)
        h_new = h_pre if project else hstate[after]
        saved_t = saved[t] if saved.numel() else hh
        if kind == LAYERNORM_LSTM:
            _layernorm_lstm_forward[(batch,)](
                X=x_proj[t], HH=hh, B_HH=_or(b, hh), NHW=_or(norms[0], hh), NHB=_or(norms[1], hh),
                NCW=_or(norms[2], hh), NCB=_or(norms[3], hh), H_PREV=h_prev, C_PREV=c_prev, C_NEW=c_new,
                H_NEW=h_new, OUT=out[t], SAVED=saved_t, LENGTHS=_or(lengths, hh), eps_bits=scalar_bits(eps, compute),
                HAS_NHW=norms[0] is not None, HAS_NHB=norms[1] is not None, HAS_NCW=norms[2] is not None,
                HAS_NCB=norms[3] is not None, **common,
            )  # fmt: skip
        else:
            _cell_forward[(batch, triton.cdiv(hidden, block))](
                X=x_proj[t], HH=hh, B_HH=_or(b, hh), H_PREV=h_prev, C_PREV=c_prev, C_NEW=c_new, H_NEW=h_new,
                OUT=out[t], SAVED=saved_t, LENGTHS=_or(lengths, hh), KIND=kind, **common,
            )  # fmt: skip
        if project:
            _project_step(hstate, out, h_pre, w_hr, h_prev, lengths, t, after)
    return out, hstate, cstate, saved


def _project_step(hstate, out, h_pre, w_hr, h_prev, lengths, t, after) -> None:
    """With a projection: h' = h_pre W_hr^T, kept only on live rows (the others carry h_prev), out = h' or 0."""
    h_next = torch.mm(h_pre, w_hr.t())
    if lengths is None:
        hstate[after].copy_(h_next)
        out[t].copy_(h_next)
        return
    live = lengths.gt(t).unsqueeze(1)
    hstate[after].copy_(torch.where(live, h_next, h_prev))
    out[t].copy_(h_next * live)


def recurrent_backward(
    kind: int,
    grad_out: Tensor,
    grad_h_n: Optional[Tensor],
    grad_c_n: Optional[Tensor],
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    hstate: Tensor,
    cstate: Tensor,
    saved: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    norm_hh_weight: Optional[Tensor],
    norm_hh_bias: Optional[Tensor],
    norm_c_weight: Optional[Tensor],
    norm_c_bias: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d_x_proj, d_h0, d_c0 or empty, d_w_hh, d_b_hh, d_w_hr or empty, d_norms (10H,) or empty), as fastattn_C's
    recurrent_backward, from grad_out (S, B, P) (unit stride over P) and the forward's contiguous states."""
    seq, batch, proj = grad_out.shape
    width = w_hh.shape[0]
    hidden = width // GATES[kind]
    if saved.shape[0] != seq and saved_width(kind, hidden):
        raise RuntimeError("recurrent_backward: the forward did not save its activations (save=False)")
    dtype, compute, acc = grad_out.dtype, _compute(grad_out.dtype), _acc(grad_out.dtype)
    layernorm, lstm, project = kind == LAYERNORM_LSTM, kind in (LSTM, LAYERNORM_LSTM), w_hr is not None
    d_hh = grad_out.new_empty(seq, batch, width)
    d_x = grad_out.new_empty(seq, batch, width) if kind in (GRU, LAYERNORM_LSTM) else d_hh
    d_cn = grad_out.new_empty(seq, batch, hidden, dtype=compute) if layernorm else None
    d_pre = grad_out.new_empty(batch, width, dtype=compute) if layernorm else None
    dh = grad_out.new_zeros(batch, proj) if grad_h_n is None else grad_h_n.to(dtype).contiguous().clone()
    dc = None
    if lstm and grad_c_n is None:
        dc = grad_out.new_zeros(batch, hidden, dtype=compute)
    elif lstm:
        dc = grad_c_n.to(compute).contiguous().clone()
    d_hp = grad_out.new_zeros(seq, batch, proj) if project else None
    norm_hh_weight, norm_c_weight, norm_c_bias = (None if n is None else n.contiguous()
                                                  for n in (norm_hh_weight, norm_c_weight, norm_c_bias))  # fmt: skip
    if persistent(kind, hidden, project):
        grid, meta = _persistent_args(batch, hidden, dtype)
        _sequence_backward[grid](
            grad_out, grad_out.stride(0), grad_out.stride(1), dh, _or(dc, dh), w_hh.contiguous(), hstate,
            cstate if lstm else hstate, saved if saved.numel() else hstate, _or(lengths, dh), d_hh, d_x, seq, batch,
            hidden, KIND=kind, HAS_LENGTHS=lengths is not None, REVERSE=int(reverse), **meta,
        )  # fmt: skip
    else:
        passed = grad_out.new_empty(batch, proj)
        fixed = dict(grad_out_stride=grad_out.stride(1), d_x_stride=width, DH_PASS=passed,
                     LENGTHS=_or(lengths, passed), H=hidden, HAS_GRAD_OUT=not project, HAS_LENGTHS=lengths is not None,
                     HAS_PASS=not project, ACC=acc, BLOCK=_block(hidden), RNE=_emulate_rounding(dtype))  # fmt: skip
        for t, before, after in reversed(list(_steps(seq, reverse))):
            live = None if lengths is None else lengths.gt(t).unsqueeze(1)
            dh_cell = dh
            if project:  # the output's gradient joins dh on live rows, then goes through W_hr to the cell's h
                dh_total = dh + grad_out[t]
                if live is not None:
                    dh_total = torch.where(live, dh_total, dh)
                d_hp[t].copy_(dh_total if live is None else dh_total * live)
                dh = dh_total
                dh_cell = torch.mm(dh_total, w_hr)
            common = dict(fixed, GRAD_OUT=grad_out[t], DH=dh_cell, DC=_or(dc, dh), DC_PREV=_or(dc, dh),
                          SAVED=saved[t] if saved.numel() else dh, C_PREV=cstate[before] if lstm else dh,
                          D_HH=d_hh[t], D_X=d_x[t], step=t)  # fmt: skip
            if layernorm:
                _layernorm_lstm_backward[(batch,)](
                    NHW=_or(norm_hh_weight, dh), NCW=_or(norm_c_weight, dh), NCB=_or(norm_c_bias, dh), D_CN=d_cn[t],
                    D_PRE=d_pre, HAS_NHW=norm_hh_weight is not None, HAS_NCW=norm_c_weight is not None,
                    HAS_NCB=norm_c_bias is not None, **common,
                )  # fmt: skip
            else:
                _cell_backward[(batch, triton.cdiv(hidden, fixed["BLOCK"]))](
                    C_NEW=cstate[after] if lstm else dh, H_PREV=hstate[before], H_NEW=hstate[after], KIND=kind,
                    **common,
                )  # fmt: skip
            if project:  # rows not live pass dh on untouched
                carry = torch.zeros_like(dh) if live is None else dh * live.logical_not()
                dh = torch.addmm(carry, d_hh[t], w_hh)
            else:
                dh = torch.addmm(passed, d_hh[t], w_hh)
    rev = int(reverse)
    d_w_hh = d_hh.view(seq * batch, width).t().mm(hstate.narrow(0, rev, seq).reshape(seq * batch, proj))
    d_b_hh = (d_x if layernorm else d_hh).view(seq * batch, width).sum(0, dtype=compute).to(dtype)
    d_w_hr = grad_out.new_empty(0)
    if project:  # h_pre = o tanh(c'), or o tanh(LN_c(c')): zero on rows not live (o saved as 0)
        cell = _cell_norm_output(saved, norm_c_weight, norm_c_bias, hidden) if layernorm else cstate[1 - rev :][:seq]
        h_pre = (saved[..., 3 * hidden : 4 * hidden] * cell.tanh()).to(dtype)
        d_w_hr = d_hp.view(seq * batch, proj).t().mm(h_pre.reshape(seq * batch, hidden))
    d_c0 = dc.to(dtype) if lstm else grad_out.new_empty(0)
    d_norms = _cell_norm_gradients(d_x, d_cn, saved, hidden).to(dtype) if layernorm else grad_out.new_empty(0)
    return d_x, dh, d_c0, d_w_hh, d_b_hh, d_w_hr, d_norms


def _cell_norm_output(saved: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], hidden: int) -> Tensor:
    """LN_c's output (S, B, H) from the saved normalised c' and its affine pair."""
    cn = saved[..., 8 * hidden : 9 * hidden]
    cn = cn if weight is None else cn * weight.to(cn.dtype)
    return cn if bias is None else cn + bias.to(cn.dtype)


def _cell_norm_gradients(d_x: Tensor, d_cn: Tensor, saved: Tensor, hidden: int) -> Tensor:
    """The LayerNorm-LSTM's norm gradients (10H,): LN_hh's weight and bias, LN_c's weight and bias (as
    csrc/recurrent_driver.h's cell_norm_gradients)."""
    d_pre = d_x.to(d_cn.dtype)
    hh_hat, c_hat = saved[..., 4 * hidden : 8 * hidden], saved[..., 8 * hidden : 9 * hidden]
    return torch.cat([(d_pre * hh_hat).sum((0, 1)), d_pre.sum((0, 1)), (d_cn * c_hat).sum((0, 1)), d_cn.sum((0, 1))])
