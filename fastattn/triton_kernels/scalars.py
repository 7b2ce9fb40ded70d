"""Float scalars for the Triton kernels, passed without rounding.

Triton's launcher passes a Python float argument as a float32, which rounds scales, eps and dropout factors
for float64 kernels (the interpreter keeps float64, so CPU tests never see it). The kernels therefore take a
float scalar as integer bits, list that argument in ``@triton.jit(do_not_specialize=[...])`` (an int equal to
1 or divisible by 16 would otherwise be specialised) and decode it once at the top:

- ``scalar_bits(value, dtype)`` / ``scalar(bits, ACC)``: the bits of a float64 (int64) for float64 inputs, else
  of a float32 (int32, rounded as Triton's launcher rounds a float). A float32 kernel then gets a float32 by a
  bitcast, with the same code as a float argument; decoding float64 bits there would cost a conversion and a
  register kept live.
- ``f64_bits(value)`` / ``f64(bits)``: always float64, for kernels that need float64 values in every dtype.
"""

import math
import struct

import torch
import triton
import triton.language as tl


def f64_bits(value: float) -> int:
    """The bits of ``value`` as a float64, read as an int64 (decoded in the kernels by ``f64``)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def f32_bits(value: float) -> int:
    """The bits of ``value`` rounded to the nearest float32 (inf past its range), read as an int32."""
    try:
        packed = struct.pack("<f", float(value))
    except OverflowError:  # finite but past float32's range
        packed = struct.pack("<f", math.copysign(math.inf, value))
    return struct.unpack("<i", packed)[0]


def scalar_bits(value: float, dtype: torch.dtype) -> int:
    """``value`` for a kernel on ``dtype`` inputs (decoded by ``scalar``): float64 bits for float64, else float32
    bits."""
    return f64_bits(value) if dtype == torch.float64 else f32_bits(value)


@triton.jit
def f64(bits):
    """The float64 whose bits are the integer ``bits`` (int32 for the few values whose bits fit it, e.g. 0.0)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def scalar(bits, ACC: tl.constexpr):
    """The float in ACC (float64 or float32) that ``scalar_bits`` packed."""
    if ACC == tl.float64:
        return f64(bits)
    else:
        return bits.to(tl.int32).to(tl.float32, bitcast=True)
