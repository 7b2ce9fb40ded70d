"""Rotary position embeddings (RoPE): the torch.library ops ``fastattn::rotary`` (differentiable) and
``fastattn::rotary_`` (in place), backend selection, and the public :func:`apply_rotary`.

The problem (``fastattn.reference.rotary`` holds its semantics): token (b, s) of q (B, Hq, S, D) and k (B, Hk, S, D)
sits at position ``pos = (positions[b, s] or s + offsets[b]) + offset``; pair i < rotary_dim / 2 of each of its
head rows turns by ``theta = pos * base ** (-2i / rotary_dim)``, or by the angle whose cos and sin row ``pos`` of
cached tables holds. The rotation is orthogonal, so the backward is the same op rotating the gradients by
``-theta`` (``inverse``); positions and tables get no gradient.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from fastattn import backends, reference
from fastattn.ops._eager import EagerOp

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_MAX_ROTARY_DIM = 8192  # csrc/cuda/rotary_kernel.h: a block keeps a token's cos and sin in shared memory
TRITON_MAX_ROTARY_DIM = 4096  # a program keeps (tokens, rotary_dim / 2) cos and sin tiles in registers


# ---------------------------------------------------------------------------------------------------------
# Backends: what each accepts (None = yes, else why not) and how each runs.
# ---------------------------------------------------------------------------------------------------------


def _check(dtypes, max_rotary_dim: Optional[int] = None):
    def check(q: Tensor, rotary_dim: int) -> Optional[str]:
        if q.dtype not in dtypes:
            return f"dtype {q.dtype} is not one of {dtypes}"
        if max_rotary_dim is not None and rotary_dim > max_rotary_dim:
            return f"rotary_dim {rotary_dim} is above this backend's {max_rotary_dim}"
        return None

    return check


CHECKS = {
    "cuda": _check(GPU_DTYPES, CUDA_MAX_ROTARY_DIM),
    "triton": _check(FLOAT_DTYPES, TRITON_MAX_ROTARY_DIM),
    "cpu": _check(FLOAT_DTYPES),
    "reference": _check(FLOAT_DTYPES),
}


def _unit_last(x: Tensor) -> Tensor:
    """x itself when its last dim has unit stride, else a contiguous copy (what every kernel reads)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _output_like(x: Tensor) -> Tensor:
    """A fresh output for x: x's layout when it is dense with unit stride over head_dim (e.g. a (B, S, H, D) tensor
    viewed as (B, H, S, D) gives an output viewed the same way), else contiguous."""
    if x.stride(-1) == 1:
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_table_positions(q, positions, offsets, cos, offset) -> None:
    """Every position must pick a row of the tables. Runs in the op, before any kernel: with tensor positions or
    offsets it reads their min and max (on a GPU, one device synchronisation)."""
    if cos is None or q.shape[0] == 0 or q.shape[2] == 0:
        return
    rows = cos.shape[0]
    if positions is not None:
        low, high = int(positions.min()) + offset, int(positions.max()) + offset
    elif offsets is not None:
        low, high = int(offsets.min()) + offset, int(offsets.max()) + offset + q.shape[2] - 1
    else:
        low, high = offset, offset + q.shape[2] - 1
    if low < 0 or high >= rows:
        bad = low if low < 0 else high
        raise ValueError(
            f"fastattn.apply_rotary: position {bad} is outside the cos/sin tables, which hold positions 0 .. {rows - 1}"
        )


def _run(name: str, q, k, q_out, k_out, positions, offsets, cos, sin, offset, rotary_dim, interleaved, base, inverse):
    """Rotate q (and k) into q_out (and k_out), which may be q (and k) themselves."""
    if name == "reference":
        rq, rk = reference.rotary(q, k, positions, offsets, cos, sin, offset, rotary_dim, interleaved, base, inverse)
        q_out.copy_(rq)
        if k is not None:
            k_out.copy_(rk)
        return
    args = (q, k, q_out, k_out, positions, offsets, cos, sin, offset, rotary_dim, interleaved, base, inverse)
    if name == "triton":
        from fastattn.triton_kernels.rotary import rotary as triton_rotary  # noqa: PLC0415

        triton_rotary(*args)
    else:
        torch.ops.fastattn_C.rotary(*args)


# ---------------------------------------------------------------------------------------------------------
# The ops. Their inputs are canonical (see apply_rotary): positions None or (B, S) int64, offsets None or (B,)
# int64 contiguous, cos/sin None or (rows, rotary_dim / 2) in q's compute dtype with unit stride over pairs.
# ---------------------------------------------------------------------------------------------------------


def _rotary(
    q: Tensor,
    k: Optional[Tensor],
    positions: Optional[Tensor],
    offsets: Optional[Tensor],
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    offset: int,
    rotary_dim: int,
    interleaved: bool,
    base: float,
    inverse: bool,
) -> tuple[Tensor, Tensor]:
    """(q rotated, k rotated) in fresh tensors; the second is an empty tensor when k is None."""
    name = backends.select("rotary", q.device, CHECKS, q, rotary_dim)
    _check_table_positions(q, positions, offsets, cos, offset)
    q_out = _output_like(q)
    k_out = q.new_empty(0) if k is None else _output_like(k)
    if q.numel() or (k is not None and k.numel()):
        q_in, k_in = _unit_last(q), None if k is None else _unit_last(k)
        _run(name, q_in, k_in, q_out, None if k is None else k_out, positions, offsets, cos, sin, offset, rotary_dim,
             interleaved, base, inverse)  # fmt: skip
    return q_out, k_out


rotary_op = torch.library.custom_op("fastattn::rotary", _rotary, mutates_args=())


@rotary_op.register_fake
def _(q, k, positions, offsets, cos, sin, offset, rotary_dim, interleaved, base, inverse):
    return _output_like(q), (q.new_empty(0) if k is None else _output_like(k))


def _setup_context(ctx, inputs, output):
    q, k, positions, offsets, cos, sin, offset, rotary_dim, interleaved, base, inverse = inputs
    ctx.save_for_backward(positions, offsets, cos, sin)
    ctx.has_k = k is not None
    ctx.options = (offset, rotary_dim, interleaved, base, inverse)


def _backward(ctx, grad_q, grad_k):
    # The rotation is orthogonal: its transpose, the backward, rotates the gradients by minus the angles.
    positions, offsets, cos, sin = ctx.saved_tensors
    offset, rotary_dim, interleaved, base, inverse = ctx.options
    grad_q, grad_k = run_rotary(
        grad_q, grad_k if ctx.has_k else None, positions, offsets, cos, sin, offset, rotary_dim, interleaved, base,
        not inverse,
    )  # fmt: skip
    return grad_q, grad_k if ctx.has_k else None, None, None, None, None, None, None, None, None, None


rotary_op.register_autograd(_backward, setup_context=_setup_context)
run_rotary = EagerOp(rotary_op, _rotary, _setup_context, _backward)


@torch.library.custom_op("fastattn::rotary_", mutates_args=("q", "k"))
def rotary_inplace_op(
    q: Tensor,
    k: Optional[Tensor],
    positions: Optional[Tensor],
    offsets: Optional[Tensor],
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    offset: int,
    rotary_dim: int,
    interleaved: bool,
    base: float,
    inverse: bool,
) -> None:
    """Rotates q (and k) in place; not differentiable (apply_rotary refuses it under autograd)."""
    name = backends.select("rotary", q.device, CHECKS, q, rotary_dim)
    _check_table_positions(q, positions, offsets, cos, offset)
    if not (q.numel() or (k is not None and k.numel())):
        return
    # A tensor whose last dim is strided is rotated in a contiguous copy, then copied back.
    q_in, k_in = _unit_last(q), None if k is None else _unit_last(k)
    _run(name, q_in, k_in, q_in, k_in, positions, offsets, cos, sin, offset, rotary_dim, interleaved, base, inverse)
    for original, rotated in ((q, q_in), (k, k_in)):
        if original is not None and rotated is not original:
            original.copy_(rotated)


@rotary_inplace_op.register_fake
def _(q, k, positions, offsets, cos, sin, offset, rotary_dim, interleaved, base, inverse):
    return None


# ---------------------------------------------------------------------------------------------------------
# The public function: readable errors before any kernel runs, then canonical inputs for the ops.
# ---------------------------------------------------------------------------------------------------------

NAME = "fastattn.apply_rotary"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_qk(q, k) -> None:
    if not isinstance(q, Tensor):
        raise TypeError(f"{NAME}: q must be a Tensor, got {type(q).__name__}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{NAME}: q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"{NAME}: q must be (batch, heads, seq, head_dim), got shape {tuple(q.shape)}")
    if k is None:
        return
    if not isinstance(k, Tensor):
        raise TypeError(f"{NAME}: k must be a Tensor or None, got {type(k).__name__}")
    if k.dim() != 4:
        raise ValueError(f"{NAME}: k must be (batch, kv_heads, seq, head_dim), got shape {tuple(k.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise TypeError(f"{NAME}: k is {k.dtype} on {k.device} but q is {q.dtype} on {q.device}")
    for dim, what in ((0, "batch"), (2, "seq"), (3, "head_dim")):
        if k.shape[dim] != q.shape[dim]:
            raise ValueError(
                f"{NAME}: q and k must have the same {what} (dim {dim}), got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )


def _check_rotary_dim(q: Tensor, rotary_dim, cos: Optional[Tensor]) -> int:
    head_dim = q.shape[-1]
    if rotary_dim is None:
        rotary_dim = 2 * cos.shape[-1] if cos is not None and cos.dim() == 2 else head_dim
        source = " (from the tables)" if cos is not None else " (head_dim; pass an even rotary_dim)"
    else:
        source = ""
        if not _is_int(rotary_dim):
            raise TypeError(f"{NAME}: rotary_dim must be an int or None, got {type(rotary_dim).__name__}")
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ValueError(f"{NAME}: rotary_dim must be even and positive, got {rotary_dim}{source}")
    if rotary_dim > head_dim:
        raise ValueError(f"{NAME}: rotary_dim {rotary_dim}{source} is larger than head_dim {head_dim}")
    return int(rotary_dim)


def _int_tensor(t, what: str, q: Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{NAME}: {what} must be an int64 (or int32) tensor, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{NAME}: {what} is on {t.device} but q is on {q.device}")


def _canonical_positions(q: Tensor, positions, offset) -> tuple[Optional[Tensor], Optional[Tensor], int]:
    """(positions (B, S) int64 or None, offsets (B,) int64 or None, int offset) from the public arguments."""
    batch, seq = q.shape[0], q.shape[2]
    offsets = None
    if isinstance(offset, Tensor):
        _int_tensor(offset, "offset", q)
        if offset.shape not in ((), (batch,)):
            raise ValueError(f"{NAME}: a tensor offset must be () or (batch,) = ({batch},), got {tuple(offset.shape)}")
        offsets, offset = offset.long().expand(batch).contiguous(), 0
    elif not _is_int(offset):
        raise TypeError(
            f"{NAME}: offset must be an int or an int tensor of shape (batch,), got {type(offset).__name__}"
        )
    if positions is None:
        return None, offsets, int(offset)
    if offsets is not None or offset != 0:
        raise ValueError(f"{NAME}: pass positions or offset, not both")
    if not isinstance(positions, Tensor):
        raise TypeError(f"{NAME}: positions must be a Tensor or None, got {type(positions).__name__}")
    _int_tensor(positions, "positions", q)
    if positions.shape not in ((seq,), (batch, seq)):
        raise ValueError(
            f"{NAME}: positions must be (seq,) = ({seq},) or (batch, seq) = ({batch}, {seq}), "
            f"got {tuple(positions.shape)}"
        )
    return positions.long().expand(batch, seq), None, 0


def _canonical_tables(q: Tensor, cos, sin, rotary_dim: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    if cos is None and sin is None:
        return None, None
    if cos is None or sin is None:
        raise ValueError(f"{NAME}: pass both cos and sin tables, or neither")
    for what, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{NAME}: {what} must be a floating-point Tensor")
        if t.device != q.device:
            raise ValueError(f"{NAME}: {what} is on {t.device} but q is on {q.device}")
        if t.dim() != 2 or t.shape[1] != rotary_dim // 2:
            raise ValueError(
                f"{NAME}: {what} must be (max_positions, rotary_dim // 2) = (*, {rotary_dim // 2}), "
                f"got {tuple(t.shape)}"
            )
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{NAME}: the {what} table gets no gradient; pass it detached (e.g. a buffer)")
    if cos.shape != sin.shape:
        raise ValueError(f"{NAME}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    work = reference.compute_dtype(q.dtype)
    return _unit_last(cos.to(work)), _unit_last(sin.to(work))


def apply_rotary(
    q: Tensor,
    k: Optional[Tensor] = None,
    *,
    positions: Optional[Tensor] = None,
    offset: Union[int, Tensor] = 0,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
    rotary_dim: Optional[int] = None,
    interleaved: bool = False,
    base: float = 10000.0,
    inplace: bool = False,
):
    """Rotary position embeddings (RoPE) of q and k, both rotated by one kernel launch.

    Args:
        q: (batch, heads, seq, head_dim) float16, bfloat16, float32 or float64, any strides (e.g. a
            (batch, seq, heads, head_dim) projection viewed with ``.transpose(1, 2)`` is read in place).
        k: None or (batch, kv_heads, seq, head_dim) of q's dtype; kv_heads may differ from heads (GQA / MQA).
        positions: None, or int64 (or int32) positions of shape (seq,) or (batch, seq) (e.g. packed or
            left-padded sequences). Default: ``offset + arange(seq)``.
        offset: an int added to every position, or a (batch,) int tensor of per-sequence offsets (decoding:
            each sequence's cache length). Not together with ``positions``.
        cos, sin: None (the angles are computed in the kernel), or cached tables of shape
            (max_positions, rotary_dim // 2): row p holds cos and sin of position p's angles (see
            :func:`fastattn.reference.rotary_cos_sin_table`). Every position must lie in [0, max_positions):
            checked before the kernel runs; with tensor positions or offsets that reads their min and max (one
            device synchronisation on a GPU). Tables of another dtype are converted to float32 (float64 for
            float64 q) on every call. They get no gradient.
        rotary_dim: the number of leading features of each head that rotate (even, <= head_dim); the rest pass
            through unchanged. Default: 2 * cos.shape[1] with tables, else head_dim.
        interleaved: pairs (x[2i], x[2i+1]) (GPT-J) instead of (x[i], x[i + rotary_dim/2]) (GPT-NeoX, Llama).
        base: the angles are ``position * base ** (-2i / rotary_dim)`` for pair i, computed in float32 (float64
            for float64 q) from a float64 ``base ** (-2i / rotary_dim)`` rounded once.
        inplace: rotate q and k in place and return them. Not differentiable: refused when autograd would need
            it (grad mode on and q or k requiring grad); use the default out-of-place call there.

    Each pair (x1, x2) becomes (x1 cos - x2 sin, x2 cos + x1 sin), computed in float32 (float64 for float64).
    The output of a non-in-place call has q's (k's) layout when that is dense with unit stride over head_dim.
    Backward: the gradients rotated by minus the angles.

    Returns:
        The rotated q, or (q, k) when k is given.
    """
    _check_qk(q, k)
    if not isinstance(interleaved, bool):
        raise TypeError(f"{NAME}: interleaved must be a bool, got {type(interleaved).__name__}")
    if not isinstance(base, numbers.Real) or isinstance(base, bool) or not 0 < base < float("inf"):
        raise ValueError(f"{NAME}: base must be a positive finite number, got {base!r}")
    rotary_dim = _check_rotary_dim(q, rotary_dim, cos)
    positions, offsets, offset = _canonical_positions(q, positions, offset)
    cos, sin = _canonical_tables(q, cos, sin, rotary_dim)
    args = (positions, offsets, cos, sin, offset, rotary_dim, interleaved, float(base), False)
    if not inplace:
        q_out, k_out = run_rotary(q, k, *args)
        return q_out if k is None else (q_out, k_out)
    if torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
        raise RuntimeError(
            f"{NAME}: inplace=True is not differentiable, and q or k requires grad; call it with inplace=False "
            "(the default) or under torch.no_grad()"
        )
    if k is q:
        raise ValueError(f"{NAME}: inplace=True with k sharing q's memory would rotate it twice")
    rotary_inplace_op(q, k, *args)
    return q if k is None else (q, k)
