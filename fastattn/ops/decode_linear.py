"""The linear layers of a decoding step: :func:`decode_linear`, ``F.linear`` for inputs of a few rows.

A step of cached decoding multiplies one token per sequence (a few rows) by each weight matrix of the model, so
its cost is reading the weights. On the CPU, fastattn_C's ``decode_linear`` kernel
(``csrc/cpu/decode_linear_kernel.h``) reads each weight row once, in place, as dot products over K; ATen's mm
runs such products at a fraction of that bandwidth. Everything else runs ``F.linear``, reported through
:func:`fastattn.record` and the ``fastattn`` logger with the reason.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import backends

MAX_ROWS = 16  # csrc/cpu/decode_linear_kernel.h: kDecodeLinearMaxRows


def _kernel_refusal(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[str]:
    """Why the CPU kernel cannot run this call (None: it can). Runs at every step of decoding: cheap checks."""
    no_bias = bias is None
    if not (x.is_cpu and weight.is_cpu and (no_bias or bias.is_cpu)):
        return "the decode_linear kernel runs CPU tensors"
    if not (x.dtype == weight.dtype == torch.float32 and (no_bias or bias.dtype == torch.float32)):
        return "the decode_linear kernel runs float32"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (not no_bias and bias.requires_grad)):
        return "the decode_linear kernel has no backward"
    if x.dim() == 0 or x.shape[-1] == 0 or x.numel() > MAX_ROWS * x.shape[-1]:
        return f"the decode_linear kernel takes 1 to {MAX_ROWS} rows of a nonempty last dim"
    if weight.dim() != 2 or weight.stride(1) != 1 or not (no_bias or bias.dim() == 1):
        return "the decode_linear kernel reads a (N, K) weight with unit stride over K and a (N,) bias"
    if x.shape[-1] != weight.shape[1] or not (no_bias or bias.shape[0] == weight.shape[0]):
        return "shapes do not match: F.linear says how"
    return backends.extension()[1]


def decode_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K) with at most MAX_ROWS rows in all, weight (N, K), bias (N,) or
    None -> (..., N). Inference only (without gradients) on the CPU kernel; other inputs run ``F.linear``."""
    reason = _kernel_refusal(x, weight, bias)
    if reason is not None:
        backends.report_fallback("decode_linear", "torch", reason)
        return F.linear(x, weight, bias)
    backends.report_run("decode_linear", "cpu")
    rows = x.reshape(-1, x.shape[-1])
    return torch.ops.fastattn_C.decode_linear(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])


__all__ = ["decode_linear", "MAX_ROWS"]
