"""Softmax and log-softmax: the torch.library ops ``fastattn::softmax`` / ``fastattn::softmax_backward``,
their fake kernels and autograd, backend selection, and the public functions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn import backends, reference
from fastattn.ops._eager import EagerOp
from fastattn.ops._rows import as_2d, as_rows, shaped

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Input checks: readable errors before any kernel runs.
# ---------------------------------------------------------------------------------------------------------


def _check(x: Tensor, mask: Optional[Tensor], causal: bool, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name}: mask must be a Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: mask must be bool (True = keep) or floating point (added), got {mask.dtype}")
        if mask.device != x.device:
            raise ValueError(f"{name}: mask is on {mask.device} but x is on {x.device}")
        if mask.dim() > x.dim() or _broadcast(mask.shape, x.shape) != x.shape:
            raise ValueError(
                f"{name}: mask of shape {tuple(mask.shape)} does not broadcast to x of shape {tuple(x.shape)}"
            )
    if causal and x.dim() < 2:
        raise ValueError(f"{name}: causal=True needs x with at least 2 dims (..., rows, N), got {x.dim()}")


def _broadcast(a: torch.Size, b: torch.Size) -> Optional[torch.Size]:
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------------------------------------
# Backends: what each accepts (None = yes, else why not) and how each runs.
# ---------------------------------------------------------------------------------------------------------


def _dtype_check(dtypes):
    def check(x: Tensor, *_) -> Optional[str]:
        return None if x.dtype in dtypes else f"dtype {x.dtype} is not one of {dtypes}"

    return check


CHECKS = {
    "cuda": _dtype_check(GPU_DTYPES),
    "triton": _dtype_check(FLOAT_DTYPES),
    "cpu": _dtype_check(FLOAT_DTYPES),
    "reference": _dtype_check(FLOAT_DTYPES),
}


def _forward_kernel(name: str):
    if name == "triton":
        from fastattn.triton_kernels.softmax import softmax_forward  # noqa: PLC0415

        return softmax_forward
    if name in ("cpu", "cuda"):
        return torch.ops.fastattn_C.softmax_forward
    return None


def _backward_kernel(name: str):
    if name == "triton":
        from fastattn.triton_kernels.softmax import softmax_backward  # noqa: PLC0415

        return softmax_backward
    if name in ("cpu", "cuda"):
        return torch.ops.fastattn_C.softmax_backward
    return reference.softmax_backward


def _kernel_mask(x: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
    """The mask as kernels take it: bool, x's dtype or float32, expanded (not copied) to x's shape."""
    if mask is None:
        return None
    if mask.dtype not in (torch.bool, x.dtype, torch.float32):
        mask = mask.float()
    return mask.expand(x.shape)


# ---------------------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------------------


def _softmax_rows(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool, log: bool) -> Tensor:
    """Softmax (or log-softmax) of ``x * scale + mask`` over the last dim; see :func:`softmax`."""
    _check(x, mask, causal, "fastattn.softmax")
    name = backends.select("softmax", x.device, CHECKS, x, mask)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    if name == "reference":
        return reference.softmax(x, mask, scale, causal, log).contiguous()
    x_rows, mask_rows = as_rows([x, _kernel_mask(x, mask)], keep_last=causal)
    return shaped(_forward_kernel(name)(x_rows, mask_rows, scale, causal, log), x.shape)


softmax_op = torch.library.custom_op("fastattn::softmax", _softmax_rows, mutates_args=())


@softmax_op.register_fake
def _(x, mask, scale, causal, log):
    _check(x, mask, causal, "fastattn.softmax")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _softmax_backward(grad: Tensor, out: Tensor, scale: float, log: bool) -> Tensor:
    """Gradient of ``fastattn::softmax`` with respect to ``x * scale``'s ``x``, from the output ``out``."""
    name = backends.select("softmax_backward", out.device, CHECKS, out)
    if out.numel() == 0:
        return torch.empty_like(out, memory_format=torch.contiguous_format)
    grad = grad.to(out.dtype)
    return shaped(_backward_kernel(name)(as_2d(grad), out.reshape(-1, out.shape[-1]), scale, log), out.shape)


softmax_backward_op = torch.library.custom_op("fastattn::softmax_backward", _softmax_backward, mutates_args=())
run_softmax_backward = EagerOp(softmax_backward_op, _softmax_backward)


@softmax_backward_op.register_fake
def _(grad, out, scale, log):
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, mask, scale, _, log = inputs
    ctx.scale, ctx.log = scale, log
    ctx.mask_shape = None if mask is None else mask.shape
    ctx.mask_dtype = None if mask is None else mask.dtype
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    needs_x, needs_mask = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x = grad_mask = None
    if needs_mask:
        # d(out)/d(mask) is d(out)/dz: compute dz once, then scale it for x.
        grad_z = run_softmax_backward(grad, out, 1.0, ctx.log)
        grad_mask = grad_z.to(reference.compute_dtype(grad_z.dtype)).sum_to_size(ctx.mask_shape).to(ctx.mask_dtype)
        grad_x = grad_z * ctx.scale if needs_x else None
    elif needs_x:
        grad_x = run_softmax_backward(grad, out, ctx.scale, ctx.log)
    return grad_x, grad_mask, None, None, None


softmax_op.register_autograd(_backward, setup_context=_setup_context)
run_softmax = EagerOp(softmax_op, _softmax_rows, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------------


def _along_last(x: Tensor, dim: int, mask: Optional[Tensor], causal: bool, name: str):
    """Move ``dim`` of x (and of the mask, broadcast to x) to the end; returns (x, mask, undo)."""
    if not isinstance(dim, int):
        raise TypeError(f"{name}: dim must be an int, got {type(dim).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise IndexError(f"{name}: dim {dim} is out of range for x with {x.dim()} dims")
    dim %= ndim
    if x.dim() == 0:
        return x.reshape(1), mask if mask is None else mask.reshape(1), lambda y: y.reshape(())
    if dim == x.dim() - 1:
        return x, mask, lambda y: y
    if causal:
        raise ValueError(f"{name}: causal=True needs dim=-1 (the key dim), got dim={dim}")
    if mask is not None:
        mask = mask.expand(x.shape).movedim(dim, -1)
    return x.movedim(dim, -1), mask, lambda y: y.movedim(-1, dim)


def softmax(
    x: Tensor,
    dim: int = -1,
    *,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    causal: bool = False,
) -> Tensor:
    """Softmax of ``x * scale + mask`` along ``dim``, in one pass over memory.

    Args:
        x: (..., N) float16, bfloat16, float32 or float64 (any strides).
        dim: the dim to normalise over (default the last).
        mask: broadcastable to ``x``. bool: True = keep, False = masked out; float: added to the scores.
        scale: multiplies ``x`` before the mask is added (e.g. ``1/sqrt(head_dim)``).
        causal: mask out the upper triangle of the last two dims (rows Sq = x.shape[-2], columns Sk = N),
            aligned bottom-right so that the last row sees every column::

                Sq=2, Sk=4:  1 1 1 0        Sq=4, Sk=2:  0 0
                             1 1 1 1                     0 0
                                                         1 0
                                                         1 1

    Returns:
        A tensor of x's shape and dtype. Accumulation is in float32 (float64 for float64 input). A row
        whose every entry is masked gives zeros, not NaN; NaN or +inf in a row makes that row NaN, as in
        :func:`torch.softmax`.
    """
    return _softmax(x, dim, mask, scale, causal, False, "fastattn.softmax")


def log_softmax(
    x: Tensor,
    dim: int = -1,
    *,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    causal: bool = False,
) -> Tensor:
    """Log-softmax of ``x * scale + mask`` along ``dim``; arguments as :func:`softmax`.

    A masked entry gives -inf (and zero gradient); a fully masked row gives -inf everywhere, not NaN.
    """
    return _softmax(x, dim, mask, scale, causal, True, "fastattn.log_softmax")


def _softmax(x, dim, mask, scale, causal, log, name):
    _check(x, mask, causal, name)
    x, mask, undo = _along_last(x, dim, mask, causal, name)
    return undo(run_softmax(x, mask, float(scale), bool(causal), log))
