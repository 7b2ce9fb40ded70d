"""Triton convolution epilogue kernels, forward and backward.

Forward, per output element of y (N, C, H, W) with z = y + bias[c]:

    out[n, c, i, j] = act(z[n, c, i, j])                                    without the pool
    out[n, c, i, j] = max over the window (2i + di, 2j + dj) of act(z)      with the pool, di, dj in {0, 1}

where the window's elements are taken in torch's order (0,0), (0,1), (1,0), (1,1) and the first maximum wins (a
NaN replaces any maximum: the last NaN wins), as in torch's max_pool2d. Backward, with g the incoming gradient:
grad_y = g * act'(z) at the element each output came from, 0 elsewhere; the caller zeroes the last row and column a
floor-sized pool leaves out, and sums g * act'(z) over (N, H, W) for the bias.

Activations (ACT): 0 none, 1 relu, 2 gelu (``z Phi(z)``, Phi from ``tl.math.erf``), 3 gelu_tanh
(``z sigmoid(2u)``, u = sqrt(2/pi) (z + 0.044715 z^3), which is ``0.5 z (1 + tanh u)``), 4 silu (``z sigmoid(z)``);
sigmoid is written with ``tl.exp``. Each program handles BLOCK outputs in the output's memory order (NCHW or NHWC),
reading y and g through their strides, so any input layout works without a copy. Arithmetic in float32 (float64
for float64 inputs).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn import reference

ACTIVATION_CODES = {name: code for code, name in enumerate(reference.CONV_ACTIVATIONS)}
BLOCK = 1024


@triton.jit
def _sigmoid_and_slope(v):
    """sigmoid(v) and its slope s (1 - s), with 1 - s = e s for v >= 0 (no cancellation when s is near 1)."""
    e = tl.exp(-v)
    s = 1.0 / (1.0 + e)
    return s, s * tl.where(e > 1.0, 1.0 - s, e * s)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        a = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN
    elif ACT == 2:
        a = z * (0.5 + 0.5 * tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        a = z / (1.0 + tl.exp(-1.5957691216057308 * (z + 0.044715 * z * z * z)))
    elif ACT == 4:
        a = z / (1.0 + tl.exp(-z))
    else:
        a = z
    return a


@triton.jit
def _act_backward(z, g, ACT: tl.constexpr):
    """g * act'(z); relu gives 0 where z <= 0 and passes g elsewhere (also at NaN), as torch's relu backward."""
    if ACT == 1:
        d = tl.where(z <= 0.0, 0.0, g)
    elif ACT == 2:
        cdf = 0.5 + 0.5 * tl.math.erf(z * 0.7071067811865476)
        d = g * (cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z))
    elif ACT == 3:
        s, slope = _sigmoid_and_slope(1.5957691216057308 * (z + 0.044715 * z * z * z))
        d = g * (s + 2.0 * z * slope * 0.7978845608028654 * (1.0 + 0.134145 * z * z))
    elif ACT == 4:
        s, slope = _sigmoid_and_slope(z)
        d = g * (s + z * slope)
    else:
        d = g
    return d


@triton.jit
def _replaces(v, m):
    """Whether v takes over as a window's maximum m: strictly larger (ties keep the first), or NaN."""
    return (v > m) | (v != v)


@triton.jit
def _output_index(idx, C, OH, OW, CHANNELS_LAST: tl.constexpr):
    """(n, c, i, j) of flat output indices in NCHW or NHWC order."""
    if CHANNELS_LAST:
        c = idx % C
        j = (idx // C) % OW
        i = (idx // (C * OW)) % OH
        n = idx // (C * OW * OH)
    else:
        j = idx % OW
        i = (idx // OW) % OH
        c = (idx // (OW * OH)) % C
        n = idx // (OW * OH * C)
    return n, c, i, j


@triton.jit
def _z(Y, offsets, b, keep, ACC: tl.constexpr):
    return tl.load(Y + offsets, mask=keep, other=0.0).to(ACC) + b


@triton.jit
def _conv_epilogue_fwd_kernel(
    Y,  # input (N, C, H, W) with strides (sy0, sy1, sy2, sy3)
    BIAS,  # (C,) bias, or Y when HAS_BIAS is False
    OUT,  # output (N, C, OH, OW), contiguous in NCHW or NHWC (CHANNELS_LAST) order
    total, C, OH, OW,  # total = N * C * OH * OW
    sy0, sy1, sy2, sy3,
    ACT: tl.constexpr, POOL: tl.constexpr, HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = idx < total
    n, c, i, j = _output_index(idx, C, OH, OW, CHANNELS_LAST)
    if HAS_BIAS:
        b = tl.load(BIAS + c, mask=keep, other=0.0).to(ACC)
    else:
        b = 0.0
    if POOL:
        at = n * sy0 + c * sy1 + 2 * i * sy2 + 2 * j * sy3  # the window's element (0, 0)
        m = _act(_z(Y, at, b, keep, ACC), ACT)
        a = _act(_z(Y, at + sy3, b, keep, ACC), ACT)
        m = tl.where(_replaces(a, m), a, m)
        a = _act(_z(Y, at + sy2, b, keep, ACC), ACT)
        m = tl.where(_replaces(a, m), a, m)
        a = _act(_z(Y, at + sy2 + sy3, b, keep, ACC), ACT)
        out = tl.where(_replaces(a, m), a, m)
    else:
        out = _act(_z(Y, n * sy0 + c * sy1 + i * sy2 + j * sy3, b, keep, ACC), ACT)
    tl.store(OUT + idx, out.to(OUT.dtype.element_ty), mask=keep)


@triton.jit
def _conv_epilogue_bwd_kernel(
    GRAD,  # incoming gradient (N, C, OH, OW) with strides (sg0, sg1, sg2, sg3)
    Y,  # the forward's input (N, C, H, W) with strides (sy0, sy1, sy2, sy3)
    BIAS,  # (C,) bias, or Y when HAS_BIAS is False
    DY,  # gradient of y (N, C, H, W) with strides (sd0, sd1, sd2, sd3)
    DZ,  # when STORE_DZ: g * act'(z) of each output's element, (N, C, OH, OW) contiguous like the output, in ACC
    total, C, OH, OW,  # total = N * C * OH * OW: one program element per output
    sg0, sg1, sg2, sg3,
    sy0, sy1, sy2, sy3,
    sd0, sd1, sd2, sd3,
    ACT: tl.constexpr, POOL: tl.constexpr, HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    STORE_DZ: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = idx < total
    n, c, i, j = _output_index(idx, C, OH, OW, CHANNELS_LAST)
    if HAS_BIAS:
        b = tl.load(BIAS + c, mask=keep, other=0.0).to(ACC)
    else:
        b = 0.0
    g = tl.load(GRAD + n * sg0 + c * sg1 + i * sg2 + j * sg3, mask=keep, other=0.0).to(ACC)
    dt = DY.dtype.element_ty
    if POOL:
        at = n * sy0 + c * sy1 + 2 * i * sy2 + 2 * j * sy3
        z00 = _z(Y, at, b, keep, ACC)
        z01 = _z(Y, at + sy3, b, keep, ACC)
        z10 = _z(Y, at + sy2, b, keep, ACC)
        z11 = _z(Y, at + sy2 + sy3, b, keep, ACC)
        a01 = _act(z01, ACT)
        m = _act(z00, ACT)
        s01 = _replaces(a01, m)
        m = tl.where(s01, a01, m)
        a10 = _act(z10, ACT)
        s10 = _replaces(a10, m)
        m = tl.where(s10, a10, m)
        s11 = _replaces(_act(z11, ACT), m)
        z = tl.where(s11, z11, tl.where(s10, z10, tl.where(s01, z01, z00)))
        d = _act_backward(z, g, ACT)
        zero = tl.zeros_like(d)
        d_at = n * sd0 + c * sd1 + 2 * i * sd2 + 2 * j * sd3
        tl.store(DY + d_at, tl.where(s01 | s10 | s11, zero, d).to(dt), mask=keep)
        tl.store(DY + d_at + sd3, tl.where(s01 & ~(s10 | s11), d, zero).to(dt), mask=keep)
        tl.store(DY + d_at + sd2, tl.where(s10 & ~s11, d, zero).to(dt), mask=keep)
        tl.store(DY + d_at + sd2 + sd3, tl.where(s11, d, zero).to(dt), mask=keep)
    else:
        z = _z(Y, n * sy0 + c * sy1 + i * sy2 + j * sy3, b, keep, ACC)
        d = _act_backward(z, g, ACT)
        tl.store(DY + n * sd0 + c * sd1 + i * sd2 + j * sd3, d.to(dt), mask=keep)
    if STORE_DZ:
        tl.store(DZ + idx, d, mask=keep)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def conv_epilogue_forward(
    y: Tensor, bias: Optional[Tensor], activation: str, pool: bool, channels_last: bool
) -> Tensor:
    """y (N, C, H, W), any strides; bias None or (C,). Returns out (N, C, H', W') contiguous in NHWC order when
    ``channels_last``, else NCHW."""
    n, c, h, w = y.shape
    oh, ow = (h // 2, w // 2) if pool else (h, w)
    out = torch.empty((n, c, oh, ow), dtype=y.dtype, device=y.device, memory_format=_memory_format(channels_last))
    total = out.numel()
    _conv_epilogue_fwd_kernel[(triton.cdiv(total, BLOCK),)](
        y, y if bias is None else bias, out,
        total, c, oh, ow,
        *y.stride(),
        ACT=ACTIVATION_CODES[activation], POOL=pool, HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last,
        BLOCK=BLOCK, ACC=_acc(y.dtype), num_warps=4,
    )  # fmt: skip
    return out


def conv_epilogue_backward(
    grad: Tensor, y: Tensor, bias: Optional[Tensor], activation: str, pool: bool, bias_grad: bool,
    channels_last: bool,
) -> tuple[Tensor, Tensor]:
    """grad (N, C, H', W') and y (N, C, H, W), any strides. Returns grad_y (N, C, H, W) in y's dtype, contiguous
    in NHWC order when ``channels_last`` else NCHW, and grad_bias (C,) in float32 (float64 for float64 y) when
    ``bias_grad``, else an empty tensor."""
    n, c, h, w = y.shape
    oh, ow = grad.shape[-2:]
    dy = torch.empty_like(y, memory_format=_memory_format(channels_last))
    if pool:
        dy[:, :, 2 * oh :].zero_()  # the row and column a floor-sized pool leaves out
        dy[:, :, :, 2 * ow :].zero_()
    total = grad.numel()
    acc = reference.compute_dtype(y.dtype)
    # The bias gradient sums g * act'(z): from dy itself in float32 / float64, else from the unrounded values (an
    # output-sized buffer in float32), so that it does not sum the rounding errors of a 16-bit dy.
    store_dz = bias_grad and y.dtype != acc
    dz = torch.empty((n, c, oh, ow), dtype=acc, device=y.device, memory_format=_memory_format(channels_last)) \
        if store_dz else dy
    _conv_epilogue_bwd_kernel[(triton.cdiv(total, BLOCK),)](
        grad, y, y if bias is None else bias, dy, dz,
        total, c, oh, ow,
        *grad.stride(), *y.stride(), *dy.stride(),
        ACT=ACTIVATION_CODES[activation], POOL=pool, HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last,
        STORE_DZ=store_dz, BLOCK=BLOCK, ACC=_acc(y.dtype), num_warps=4,
    )  # fmt: skip
    if not bias_grad:
        return dy, dy.new_empty(0, dtype=acc)
    return dy, dz.sum(dim=(0, 2, 3), dtype=acc)
