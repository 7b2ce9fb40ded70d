"""``fastattn.dropout``: dropout drawn from Philox in the kernel instead of a stored mask.

The positional-add kernels compute ``dropout(x * scale + PE)``; with scale 1 and no PE they are a plain dropout in
one pass over memory. The seed comes from torch's CPU generator (reproducible under :func:`torch.manual_seed`),
and the backward regenerates the mask from it: nothing the size of x is kept for autograd. The draws differ from
:func:`torch.nn.functional.dropout`'s, as with every fused dropout in fastattn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops._random import dropout_seed_tensor
from fastattn.ops.positional import FLOAT_DTYPES, run_positional_add


def dropout(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:  # noqa: A002 (torch's name)
    """:func:`torch.nn.functional.dropout` (not in place): each element of ``input`` (any shape, float16,
    bfloat16, float32 or float64) kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``, else 0.
    Returns ``input`` itself when not ``training`` or ``p == 0``."""
    name = "fastattn.dropout"
    if not isinstance(input, Tensor) or input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: input must be a float16, bfloat16, float32 or float64 Tensor, got "
                        f"{getattr(input, 'dtype', type(input).__name__)}")  # fmt: skip
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: p must be a probability in [0, 1], got {p!r}")
    if not training or p == 0.0:
        return input
    if p == 1.0 or input.numel() == 0:
        return torch.zeros_like(input)
    rows = input.reshape(1, -1, input.shape[-1] if input.dim() else 1)  # (batch 1, rows, last dim)
    out = run_positional_add(rows, None, None, 0, 1.0, 1.0, False, True, float(p), dropout_seed_tensor(p))
    return out.view(input.shape)
