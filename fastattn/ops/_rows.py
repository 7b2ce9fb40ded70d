"""Row layouts: view a tensor (..., N) and its broadcast companions as (D0, D1, D2, N) without copying.

Row kernels index rows through three leading dims with per-tensor strides, so broadcast masks (stride 0),
slices and most transposes need no copy. Leading dims are merged where every tensor allows it; only when
more than three remain is a tensor copied to make it contiguous.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

LEADING_DIMS = 3


def _merge(sizes: list[int], strides: list[list[int]], keep_last: bool) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent leading dims whose strides chain in every tensor; drop dims of size 1."""
    out_sizes: list[int] = []
    out_strides: list[list[int]] = [[] for _ in strides]
    last = len(sizes) - 1
    for dim, size in enumerate(sizes):
        protected = keep_last and dim == last
        if size == 1 and not protected:
            continue
        mergeable = (
            out_sizes
            and not protected
            and all(s[-1] == t[dim] * size for s, t in zip(out_strides, strides))
        )
        if mergeable:
            out_sizes[-1] *= size
            for s, t in zip(out_strides, strides):
                s[-1] = t[dim]
        else:
            out_sizes.append(size)
            for s, t in zip(out_strides, strides):
                s.append(t[dim])
    return out_sizes, out_strides


def as_rows(tensors: Sequence[Optional[Tensor]], keep_last: bool = False) -> list[Optional[Tensor]]:
    """View each tensor (all of the same shape (..., N), or None) as (D0, D1, D2, N) in the same row order.

    ``keep_last`` keeps the last leading dim (dim -2) unmerged as D2, so a kernel can read a row's index in
    it (causal masking). The first tensor must have unit stride over N (it is copied otherwise).
    """
    tensors = list(tensors)
    first = tensors[0]
    if first.dim() == 0:
        raise ValueError("as_rows: expected at least one dim")
    if first.shape[-1] > 1 and first.stride(-1) != 1:
        tensors[0] = first.contiguous()
    for copy_index in (None, 0, *range(1, len(tensors))):
        if copy_index is not None and tensors[copy_index] is not None:
            tensors[copy_index] = tensors[copy_index].contiguous()
        present = [t for t in tensors if t is not None]
        sizes, strides = _merge(list(present[0].shape[:-1]), [list(t.stride()[:-1]) for t in present], keep_last)
        if len(sizes) <= LEADING_DIMS:
            break
    pad = LEADING_DIMS - len(sizes)
    shape = [1] * pad + sizes + [present[0].shape[-1]]
    views = iter(
        t.as_strided(shape, [0] * pad + s + [t.stride(-1)], t.storage_offset()) for t, s in zip(present, strides)
    )
    return [None if t is None else next(views) for t in tensors]


def as_2d(t: Tensor) -> Tensor:
    """View (..., N) as (rows, N) with unit stride over N, copying only when no such view exists."""
    t = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def shaped(t: Tensor, shape) -> Tensor:
    """``t.view(shape)``, or t itself when it already has that shape (a view costs microseconds per call)."""
    return t if t.shape == shape else t.view(shape)
