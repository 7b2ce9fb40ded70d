"""The convolution epilogue ``out = maxpool2x2(act(y + bias[c]))``: the torch.library ops ``fastattn::conv_epilogue``
/ ``fastattn::conv_epilogue_backward``, their fake kernels and autograd, backend selection, and the public function
:func:`conv_epilogue`. The convolution itself stays on ATen (oneDNN / cuDNN); this fuses what follows it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn import backends, reference
from fastattn.ops._eager import EagerOp

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the CUDA C++ kernels' (float64 runs on Triton)
ACTIVATIONS = reference.CONV_ACTIVATIONS
NAME = "fastattn.conv_epilogue"


# ---------------------------------------------------------------------------------------------------------
# Input checks: readable errors before any kernel runs.
# ---------------------------------------------------------------------------------------------------------


def _check(y: Tensor, bias: Optional[Tensor], activation: str, pool: bool, name: str) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"{name}: y must be a Tensor, got {type(y).__name__}")
    if y.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: y must be float16, bfloat16, float32 or float64, got {y.dtype}")
    if y.dim() != 4:
        raise ValueError(f"{name}: y must be 4-D (N, C, H, W), got shape {tuple(y.shape)}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if pool and (y.shape[2] < 2 or y.shape[3] < 2):
        raise ValueError(f"{name}: pool=True needs H and W >= 2 (2x2 windows), got y of shape {tuple(y.shape)}")
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{name}: bias must be a Tensor or None, got {type(bias).__name__}")
    dtypes = (y.dtype,) if y.dtype in (torch.float32, torch.float64) else (y.dtype, torch.float32)
    if bias.dtype not in dtypes:
        raise TypeError(f"{name}: bias must be {' or '.join(map(str, dtypes))} (y is {y.dtype}), got {bias.dtype}")
    if bias.device != y.device:
        raise ValueError(f"{name}: bias is on {bias.device} but y is on {y.device}")
    if tuple(bias.shape) != (y.shape[1],):
        raise ValueError(f"{name}: bias must have shape (C,) = ({y.shape[1]},), got {tuple(bias.shape)}")


# ---------------------------------------------------------------------------------------------------------
# Layouts: every output is contiguous in y's layout, NCHW or NHWC (channels_last).
# ---------------------------------------------------------------------------------------------------------


def channels_last(y: Tensor) -> bool:
    """Whether y (N, C, H, W) is laid out NHWC: C > 1 with unit stride, and W's stride is not 1 (the rule
    csrc/conv_epilogue_binding.h's is_channels_last() also follows)."""
    return y.shape[1] > 1 and y.stride(1) == 1 and (y.shape[3] == 1 or y.stride(3) != 1)


def _memory_format(nhwc: bool) -> torch.memory_format:
    return torch.channels_last if nhwc else torch.contiguous_format


def _empty(y: Tensor, shape, nhwc: bool) -> Tensor:
    return torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=_memory_format(nhwc))


def _output_shape(y: Tensor, pool: bool) -> tuple[int, int, int, int]:
    n, c, h, w = y.shape
    return (n, c, h // 2, w // 2) if pool else (n, c, h, w)


def _kernel_layout(t: Tensor, nhwc: bool) -> Tensor:
    """t (N, C, rows, cols) with the inner layout the C++ and CUDA kernels read (csrc/conv_epilogue.h), copied only
    when it has not: unit stride over W (NCHW), or over C with W's stride C (NHWC)."""
    if nhwc:
        dense = t.stride(1) == 1 and (t.shape[3] <= 1 or t.stride(3) == t.shape[1])
        return t if dense else t.contiguous(memory_format=torch.channels_last)
    return t if t.shape[3] <= 1 or t.stride(3) == 1 else t.contiguous()


def _kernel_bias(bias: Optional[Tensor], y: Tensor) -> Optional[Tensor]:
    """The bias as the kernels take it: contiguous (C,) in the compute dtype."""
    return None if bias is None else bias.to(reference.compute_dtype(y.dtype)).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Backends: what each accepts (None = yes, else why not). The CUDA C++ kernels take float16, bfloat16 and float32;
# the cpu and cuda backends both call torch.ops.fastattn_C, whose dispatcher picks the kernel by the device.
# ---------------------------------------------------------------------------------------------------------


def _dtype_check(dtypes):
    def check(y: Tensor, *_) -> Optional[str]:
        return None if y.dtype in dtypes else f"dtype {y.dtype} is not one of {dtypes}"

    return check


CHECKS = {
    "cuda": _dtype_check(GPU_DTYPES),
    "triton": _dtype_check(FLOAT_DTYPES),
    "cpu": _dtype_check(FLOAT_DTYPES),
    "reference": _dtype_check(FLOAT_DTYPES),
}


# ---------------------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------------------


def _conv_epilogue(y: Tensor, bias: Optional[Tensor], activation: str, pool: bool) -> Tensor:
    """``maxpool2x2(act(y + bias[c]))`` of y (N, C, H, W); see :func:`conv_epilogue`."""
    _check(y, bias, activation, pool, NAME)
    name = backends.select("conv_epilogue", y.device, CHECKS, y)
    nhwc = channels_last(y)
    if y.numel() == 0:
        return _empty(y, _output_shape(y, pool), nhwc)
    if name == "reference":
        return reference.conv_epilogue(y, bias, activation, pool).contiguous(memory_format=_memory_format(nhwc))
    if name == "triton":
        from fastattn.triton_kernels.conv_epilogue import conv_epilogue_forward  # noqa: PLC0415

        return conv_epilogue_forward(y, _kernel_bias(bias, y), activation, pool, nhwc)
    return torch.ops.fastattn_C.conv_epilogue_forward(_kernel_layout(y, nhwc), _kernel_bias(bias, y), activation, pool)


conv_epilogue_op = torch.library.custom_op("fastattn::conv_epilogue", _conv_epilogue, mutates_args=())


@conv_epilogue_op.register_fake
def _(y, bias, activation, pool):
    _check(y, bias, activation, pool, NAME)
    return _empty(y, _output_shape(y, pool), channels_last(y))


def _conv_epilogue_backward(
    grad: Tensor, y: Tensor, bias: Optional[Tensor], activation: str, pool: bool, bias_grad: bool
) -> tuple[Tensor, Tensor]:
    """Gradients of ``fastattn::conv_epilogue`` from grad (N, C, H', W') and the forward's y (N, C, H, W): grad_y in
    y's dtype and layout, and grad_bias (C,) in float32 (float64 for float64 y) when ``bias_grad``, else empty."""
    name = backends.select("conv_epilogue_backward", y.device, CHECKS, y)
    nhwc = channels_last(y)
    acc = reference.compute_dtype(y.dtype)
    grad = grad.to(y.dtype)
    if y.numel() == 0:
        grad_y = y.new_zeros(y.shape).contiguous(memory_format=_memory_format(nhwc))
        return grad_y, y.new_zeros((y.shape[1],) if bias_grad else (0,), dtype=acc)
    if name == "reference":
        dz = reference.conv_epilogue_backward(grad, y, bias, activation, pool)
        grad_bias = dz.sum(dim=(0, 2, 3)) if bias_grad else dz.new_empty(0)
        return dz.to(y.dtype).contiguous(memory_format=_memory_format(nhwc)), grad_bias
    if name == "triton":
        from fastattn.triton_kernels.conv_epilogue import conv_epilogue_backward  # noqa: PLC0415

        return conv_epilogue_backward(grad, y, _kernel_bias(bias, y), activation, pool, bias_grad, nhwc)
    return torch.ops.fastattn_C.conv_epilogue_backward(
        _kernel_layout(grad, nhwc), _kernel_layout(y, nhwc), _kernel_bias(bias, y), activation, pool, bias_grad
    )


conv_epilogue_backward_op = torch.library.custom_op(
    "fastattn::conv_epilogue_backward", _conv_epilogue_backward, mutates_args=()
)
run_conv_epilogue_backward = EagerOp(conv_epilogue_backward_op, _conv_epilogue_backward)


@conv_epilogue_backward_op.register_fake
def _(grad, y, bias, activation, pool, bias_grad):
    grad_y = _empty(y, y.shape, channels_last(y))
    return grad_y, y.new_empty((y.shape[1],) if bias_grad else (0,), dtype=reference.compute_dtype(y.dtype))


def _setup_context(ctx, inputs, output):
    y, bias, activation, pool = inputs
    ctx.activation, ctx.pool = activation, pool
    ctx.save_for_backward(y, bias)


def _backward(ctx, grad):
    y, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[1]
    grad_y, grad_bias = run_conv_epilogue_backward(grad, y, bias, ctx.activation, ctx.pool, bias_grad)
    return (
        grad_y if ctx.needs_input_grad[0] else None,
        grad_bias.to(bias.dtype) if bias_grad else None,
        None,
        None,
    )


conv_epilogue_op.register_autograd(_backward, setup_context=_setup_context)
run_conv_epilogue = EagerOp(conv_epilogue_op, _conv_epilogue, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------------


def conv_epilogue(
    y: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = "relu",
    pool: bool = False,
) -> Tensor:
    """What follows a convolution, in one pass over memory: ``F.max_pool2d(act(y + bias[:, None, None]), 2)``.

    Args:
        y: (N, C, H, W) float16, bfloat16, float32 or float64, e.g. ``F.conv2d(x, weight)`` without its bias; NCHW
            or channels_last (any strides).
        bias: None or (C,), in y's dtype (or float32 for 16-bit y).
        activation: ``"relu"``, ``"gelu"`` (exact, erf), ``"gelu_tanh"`` (tanh approximation), ``"silu"``, or
            ``"none"`` / None.
        pool: a 2x2 max pool with stride 2 after the activation, as ``F.max_pool2d(a, 2)``: output
            (N, C, H // 2, W // 2) (a last odd row or column is dropped); in each window the first maximum in the
            order (0,0), (0,1), (1,0), (1,1) wins (a NaN wins over any number), so gradients go where torch's go.

    Returns:
        (N, C, H, W), or (N, C, H // 2, W // 2) with the pool, in y's dtype: channels_last when y is (C > 1 with
        unit stride), else contiguous. Computed in float32 (float64 for float64 y) and rounded once. The backward
        recomputes from y, which is all it saves (with the bias).
    """
    activation = "none" if activation is None else activation
    _check(y, bias, activation, pool, NAME)
    return run_conv_epilogue(y, bias, activation, bool(pool))
