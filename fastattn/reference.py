"""Plain PyTorch references: the semantics every kernel must match, the ``reference`` backend, and, run in
float64, the ground truth of the tests. Differentiable with autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(rows: int, cols: int, device: torch.device) -> Tensor:
    """Bool (rows, cols), True = keep: row i sees columns j <= i + cols - rows (aligned bottom-right)."""
    i = torch.arange(rows, device=device).unsqueeze(1)
    j = torch.arange(cols, device=device)
    return j <= i + (cols - rows)


def masked_scores(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool, upcast: bool = True) -> Tensor:
    """z = x * scale + mask over the last dim of x, with -inf where a bool mask is False or causal hides.

    Computed in :func:`compute_dtype` (or in x's dtype when not ``upcast``). The gradient of z is zero
    wherever z is -inf (those scores do not depend on x).
    """
    z = (x.to(compute_dtype(x.dtype)) if upcast else x) * scale
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(z.dtype)
    if causal:
        z = z.masked_fill(~causal_mask(x.shape[-2], x.shape[-1], x.device), float("-inf"))
    return z.masked_fill(z == float("-inf"), float("-inf"))


def softmax(
    x: Tensor,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    causal: bool = False,
    log: bool = False,
    upcast: bool = True,
) -> Tensor:
    """Softmax (or log-softmax) of ``x * scale + mask`` over the last dim; returns ``x.dtype``.

    ``x``: (..., N); ``mask``: broadcastable to ``x``, bool (True = keep) or float (added);
    ``causal``: hide column j of row i when j > i + N - x.shape[-2]. A row whose scores are all -inf
    gives softmax 0 and log-softmax -inf; NaN or +inf in a row makes the row NaN, as in torch.
    ``upcast=False`` computes the scores in x's dtype, as a plain PyTorch user would (the tests' baseline).
    """
    z = masked_scores(x, mask, scale, causal, upcast)
    empty = (z == float("-inf")).all(dim=-1, keepdim=True)
    z_safe = z.masked_fill(empty, 0.0)
    if log:
        out = torch.log_softmax(z_safe, dim=-1).masked_fill(empty, float("-inf"))
    else:
        out = torch.softmax(z_safe, dim=-1).masked_fill(empty, 0.0)
    return out.to(x.dtype)


def softmax_backward(grad: Tensor, out: Tensor, scale: float = 1.0, log: bool = False) -> Tensor:
    """Gradient of :func:`softmax` with respect to ``x`` given its output ``out`` and ``grad`` (..., N)."""
    g = grad.to(compute_dtype(out.dtype))
    y = out.to(g.dtype)
    if log:
        dz = g - y.exp() * g.sum(dim=-1, keepdim=True)
        dz = dz.masked_fill(y == float("-inf"), 0.0)
    else:
        dz = y * (g - (g * y).sum(dim=-1, keepdim=True))
    return (dz * scale).to(out.dtype)
