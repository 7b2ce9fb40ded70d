"""LayerNorm and RMSNorm, alone or fused with the dropout + residual add of pre-norm blocks: the torch.library
ops ``fastattn::norm`` / ``fastattn::norm_backward``, their fake kernels and autograd, backend selection, and
the public functions :func:`layer_norm`, :func:`rms_norm` and :func:`dropout_add_norm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from fastattn import backends, reference
from fastattn.ops._eager import EagerOp
from fastattn.ops._random import dropout_seed_tensor, seed_value
from fastattn.ops._rows import as_2d, shaped

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

ShapeLike = Union[int, Sequence[int], torch.Size]


# ---------------------------------------------------------------------------------------------------------
# Input checks: readable errors before any kernel runs.
# ---------------------------------------------------------------------------------------------------------


def _normalized_shape(normalized_shape: ShapeLike, name: str) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{name}: normalized_shape must be a non-empty sequence of ints >= 0, got {normalized_shape}")
    return shape


def _check_tensor(t: Tensor, what: str, x: Tensor, dtypes, shape, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: {what} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: {what} must be {' or '.join(map(str, dtypes))} (input is {x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: {what} is on {t.device} but input is on {x.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: {what} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    shape: tuple[int, ...],
    eps: float,
    dropout_p: float,
    name: str,
) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: input must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(
            f"{name}: normalized_shape {list(shape)} must match the last dims of input, got input of shape "
            f"{tuple(x.shape)}"
        )
    affine_dtypes = (x.dtype,) if x.dtype in (torch.float32, torch.float64) else (x.dtype, torch.float32)
    if weight is not None:
        _check_tensor(weight, "weight", x, affine_dtypes, shape, name)
    if bias is not None:
        _check_tensor(bias, "bias", x, affine_dtypes, shape, name)
        if weight is not None and bias.dtype != weight.dtype:
            raise TypeError(f"{name}: weight ({weight.dtype}) and bias ({bias.dtype}) must have the same dtype")
    if residual is not None:
        _check_tensor(residual, "residual", x, affine_dtypes, x.shape, name)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{name}: eps must be a float >= 0, got {eps!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {dropout_p!r}")


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


def _kernels(name: str):
    """(forward, backward) of a kernel backend, both with the fastattn_C schemas (csrc/fastattn.cpp)."""
    if name == "triton":
        from fastattn.triton_kernels import norm  # noqa: PLC0415

        return norm.norm_forward, norm.norm_backward
    return torch.ops.fastattn_C.norm_forward, torch.ops.fastattn_C.norm_backward


def _reference_forward(x, residual, weight, bias, eps, rms, dropout_p, seed, residual_out_dtype):
    """The reference backend with the kernels' outputs: (out, residual_out or empty, mean or empty, rstd)."""
    keep = reference.elementwise_dropout_mask(seed, dropout_p, *x.shape, x.device) if dropout_p > 0 else None
    out, z = reference.norm(x, residual, weight, bias, eps, rms, keep, dropout_p, residual_out_dtype)
    zw = z.to(reference.compute_dtype(x.dtype))
    mean = zw.mean(dim=-1)
    centred = zw if rms else zw - mean[:, None]
    rstd = torch.rsqrt(centred.pow(2).mean(dim=-1) + eps)
    empty = x.new_empty(0)
    return out, (z if residual_out_dtype is not None else empty), (mean.new_empty(0) if rms else mean), rstd


# ---------------------------------------------------------------------------------------------------------
# The ops. x and residual are (..., N) with the normalised dims flattened into N; weight and bias (N,).
# ---------------------------------------------------------------------------------------------------------


def _output_shapes(x: Tensor, rms: bool, residual_out_dtype: Optional[torch.dtype]):
    rows = x.shape[:-1]
    return x.shape, (x.shape if residual_out_dtype is not None else (0,)), ((0,) if rms else rows), rows


def _norm(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms: bool,
    dropout_p: float,
    seed: Optional[Tensor],
    residual_out_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LayerNorm / RMSNorm of z = dropout(x) + residual over the last dim: (out, residual_out = z or empty,
    mean or empty, rstd); ``seed`` None or a (1,) int64 CPU tensor (ops._random); see :func:`dropout_add_norm`."""
    name = backends.select("norm", x.device, CHECKS, x)
    shapes = _output_shapes(x, rms, residual_out_dtype)
    x2 = as_2d(x)
    residual2 = None if residual is None else as_2d(residual)
    args = (weight, bias, eps, rms, dropout_p, seed_value(seed), residual_out_dtype)
    if x.numel() == 0:
        outputs = _fake_outputs(x, rms, residual_out_dtype)
    elif name == "reference":
        outputs = _reference_forward(x2, residual2, *args)
    else:
        outputs = _kernels(name)[0](x2, residual2, *args)
    return tuple(shaped(t, shape) for t, shape in zip(outputs, shapes, strict=True))


def _fake_outputs(x, rms, residual_out_dtype):
    out_shape, z_shape, mean_shape, rstd_shape = _output_shapes(x, rms, residual_out_dtype)
    stats = reference.compute_dtype(x.dtype)
    return (
        x.new_empty(out_shape),
        x.new_empty(z_shape, dtype=residual_out_dtype or x.dtype),
        x.new_empty(mean_shape, dtype=stats),
        x.new_empty(rstd_shape, dtype=stats),
    )


norm_op = torch.library.custom_op("fastattn::norm", _norm, mutates_args=())


@norm_op.register_fake
def _(x, residual, weight, bias, eps, rms, dropout_p, seed, residual_out_dtype):
    return _fake_outputs(x, rms, residual_out_dtype)


def _norm_backward(
    grad_out: Tensor,
    grad_residual: Optional[Tensor],
    z: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    rms: bool,
    has_bias: bool,
    dropout_p: float,
    seed: Optional[Tensor],
    x_dtype: torch.dtype,
    residual_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``fastattn::norm`` from its normalised input z (..., N): (grad_x, grad_residual_in or empty,
    grad_weight or empty, grad_bias or empty)."""
    name = backends.select("norm_backward", z.device, CHECKS, z)
    seed = seed_value(seed)
    shapes = (z.shape, z.shape if residual_dtype is not None else (0,))
    if z.numel() == 0:
        outputs = _fake_backward(z, weight, has_bias, x_dtype, residual_dtype)
    elif name == "reference":
        outputs = _reference_backward(grad_out, grad_residual, z, weight, eps, rms, has_bias, dropout_p, seed,
                                      x_dtype, residual_dtype)  # fmt: skip
    else:
        n = z.shape[-1]
        outputs = _kernels(name)[1](
            as_2d(grad_out.to(x_dtype)), None if grad_residual is None else as_2d(grad_residual.to(z.dtype)),
            as_2d(z), weight, mean.reshape(-1), rstd.reshape(-1), rms, has_bias, dropout_p, seed, x_dtype,
            residual_dtype,
        )  # fmt: skip
        outputs = outputs[:2] + tuple(t.view(-1) if t.numel() == n else t for t in outputs[2:])
    grad_x, grad_res, grad_w, grad_b = outputs
    return shaped(grad_x, shapes[0]), shaped(grad_res, shapes[1]), grad_w, grad_b


def _reference_backward(grad_out, grad_residual, z, weight, eps, rms, has_bias, dropout_p, seed, x_dtype,
                        residual_dtype):  # fmt: skip
    rows = z.numel() // z.shape[-1]
    keep = None
    if dropout_p > 0:
        keep = reference.elementwise_dropout_mask(seed, dropout_p, rows, z.shape[-1], z.device).view(z.shape)
    grad_x, dz, grad_w, grad_b = reference.norm_backward(grad_out, grad_residual, z, weight, eps, rms, keep, dropout_p)
    affine = weight.dtype if weight is not None else x_dtype
    return (
        grad_x.to(x_dtype),
        dz.to(residual_dtype, copy=True) if residual_dtype is not None else z.new_empty(0, dtype=x_dtype),
        grad_w.to(affine) if weight is not None else z.new_empty(0, dtype=affine),
        grad_b.to(affine) if has_bias else z.new_empty(0, dtype=affine),
    )


def _fake_backward(z, weight, has_bias, x_dtype, residual_dtype):
    affine = weight.dtype if weight is not None else x_dtype
    n = z.shape[-1]
    return (
        z.new_empty(z.shape, dtype=x_dtype),
        z.new_empty(z.shape if residual_dtype is not None else (0,), dtype=residual_dtype or x_dtype),
        z.new_empty((n if weight is not None else 0,), dtype=affine),
        z.new_empty((n if has_bias else 0,), dtype=affine),
    )


norm_backward_op = torch.library.custom_op("fastattn::norm_backward", _norm_backward, mutates_args=())
run_norm_backward = EagerOp(norm_backward_op, _norm_backward)


@norm_backward_op.register_fake
def _(grad_out, grad_residual, z, weight, mean, rstd, eps, rms, has_bias, dropout_p, seed, x_dtype, residual_dtype):
    return _fake_backward(z, weight, has_bias, x_dtype, residual_dtype)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms, dropout_p, seed, residual_out_dtype = inputs
    _, residual_out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.eps, ctx.rms, ctx.dropout_p = eps, rms, dropout_p
    ctx.has_bias, ctx.x_dtype = bias is not None, x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    z = residual_out if residual_out_dtype is not None else x
    ctx.save_for_backward(z, weight, mean, rstd, seed)


def _backward(ctx, grad_out, grad_residual_out, _grad_mean, _grad_rstd):
    z, weight, mean, rstd, seed = ctx.saved_tensors
    grad_residual = grad_residual_out if grad_residual_out is not None and grad_residual_out.numel() else None
    grad_x, grad_res, grad_w, grad_b = run_norm_backward(
        grad_out, grad_residual, z, weight, mean, rstd, ctx.eps, ctx.rms, ctx.has_bias, ctx.dropout_p, seed,
        ctx.x_dtype, ctx.residual_dtype,
    )  # fmt: skip
    return (
        grad_x,
        grad_res if ctx.residual_dtype is not None else None,
        grad_w if weight is not None else None,
        grad_b.to(ctx.bias_dtype) if ctx.has_bias else None,
        None, None, None, None, None,
    )  # fmt: skip


norm_op.register_autograd(_backward, setup_context=_setup_context)
run_norm = EagerOp(norm_op, _norm, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------------


def _flat(t: Optional[Tensor], k: int) -> Optional[Tensor]:
    """t (..., *normalized_shape) with its last k dims flattened into one."""
    if t is None:
        return None
    return t.reshape(*t.shape[: t.dim() - k], -1) if k != 1 else t


def _run(x, residual, normalized_shape, weight, bias, eps, dropout_p, rms, residual_out_dtype, name):
    shape = _normalized_shape(normalized_shape, name)
    _check(x, residual, weight, bias, shape, eps, dropout_p, name)
    k = len(shape)
    outputs = run_norm(
        _flat(x, k), _flat(residual, k), _flat(weight, k), _flat(bias, k), float(eps), rms, float(dropout_p),
        dropout_seed_tensor(dropout_p), residual_out_dtype,
    )  # fmt: skip
    out, residual_out = shaped(outputs[0], x.shape), outputs[1]
    return out, (shaped(residual_out, x.shape) if residual_out_dtype is not None else None)


def layer_norm(
    input: Tensor,  # noqa: A002 (torch's argument name)
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """:func:`torch.nn.functional.layer_norm` in one pass over memory.

    Args:
        input: (..., *normalized_shape) float16, bfloat16, float32 or float64, any strides.
        normalized_shape: the trailing dims normalised over (an int or a sequence).
        weight, bias: normalized_shape, in input's dtype or float32 (for 16-bit input); optional.
        eps: added to the variance.

    Returns:
        ``(input - mean) / sqrt(var + eps) * weight + bias`` in input's dtype (biased variance; statistics in
        float32, float64 for float64 input).
    """
    return _run(input, None, normalized_shape, weight, bias, eps, 0.0, False, None, "fastattn.layer_norm")[0]


def rms_norm(
    input: Tensor,  # noqa: A002
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """:func:`torch.nn.functional.rms_norm` in one pass: ``input / sqrt(mean(input^2) + eps) * weight``.

    Shapes and dtypes as :func:`layer_norm`; ``eps=None`` is ``torch.finfo(input.dtype).eps``, as in torch.
    """
    if eps is None and isinstance(input, Tensor) and input.dtype.is_floating_point:
        eps = torch.finfo(input.dtype).eps
    return _run(input, None, normalized_shape, weight, None, eps, 0.0, True, None, "fastattn.rms_norm")[0]


def dropout_add_norm(
    x: Tensor,
    residual: Optional[Tensor],
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    rms: bool = False,
    residual_in_fp32: bool = False,
) -> tuple[Tensor, Tensor]:
    """The pre-norm block's ``z = dropout(x) + residual; out = norm(z)`` in one kernel; returns ``(out, z)``.

    Args:
        x: (..., *normalized_shape), e.g. a sublayer's output.
        residual: x's shape, in x's dtype or float32; None for the first block (z = dropout(x)).
        normalized_shape, weight, bias, eps: as :func:`layer_norm` (``rms=True``: :func:`rms_norm`, no bias).
        dropout_p: dropout on x, from a seed drawn from torch's CPU generator (reproducible under
            :func:`torch.manual_seed`); the backward regenerates the mask. Pass 0 in eval mode.
        residual_in_fp32: keep z, the new residual, in float32 (else residual's dtype, or x's without one).

    Returns:
        out in x's dtype, and z, the residual stream for the next block (x itself when there is nothing to add,
        no dropout and no change of dtype).
    """
    name = "fastattn.dropout_add_norm"
    if rms and bias is not None:
        raise ValueError(f"{name}: rms=True takes no bias")
    x_dtype = getattr(x, "dtype", None)
    z_dtype = torch.float32 if residual_in_fp32 else getattr(residual, "dtype", x_dtype)
    if residual is None and not dropout_p and z_dtype == x_dtype:
        z_dtype = None  # z is x: nothing to store
    out, z = _run(x, residual, normalized_shape, weight, bias, eps, dropout_p, rms, z_dtype, name)
    return out, (x if z is None else z)
