"""Positional encodings: the torch.library ops ``fastattn::positional_add``, ``fastattn::embedding_with_positions``
and ``fastattn::embedding_scatter``, their fake kernels and autograd, backend selection, and the public functions
:func:`sinusoidal_positional_encoding`, :func:`learned_positional_encoding`, :func:`embedding_with_positions` and
:func:`alibi_slopes`.

Every kernel computes ``dropout(x * scale + PE[pos])`` (or token + position embeddings) in one pass; see
``csrc/positional.h`` for the maths. Indices (tokens, positions) are range-checked in Python inside the ops,
before any kernel: an ``aminmax`` over the index tensor, which on a GPU costs one device synchronisation per call
(when the positions come from an int ``offset`` the check needs no data at all). The C++ CPU kernels check again as
they gather; the GPU kernels write NaN rather than read outside a table.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from fastattn import backends, reference
from fastattn.ops._eager import EagerOp
from fastattn.ops._random import dropout_seed_tensor, seed_value
from fastattn.ops._rows import as_2d

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)

Offset = Union[int, Tensor]


# ---------------------------------------------------------------------------------------------------------
# Input checks: readable errors before any kernel runs.
# ---------------------------------------------------------------------------------------------------------


def _check_float(t, arg: str, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: {arg} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: {arg} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_number(value, arg: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name}: {arg} must be a finite number, got {value!r}")
    return float(value)


def _check_dropout(dropout_p, name: str) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _check_index_tensor(t, shape, device: torch.device, arg: str, name: str) -> Tensor:
    """An integer tensor of ``shape`` on ``device``, as contiguous int64."""
    if not isinstance(t, Tensor) or t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: {arg} must be an int32 or int64 Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: {arg} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: {arg} is on {t.device} but the input is on {device}")
    return t.to(torch.int64).contiguous()


def _check_offset(offset, batch: Optional[int], device: torch.device, name: str) -> tuple[int, Optional[Tensor]]:
    """(int offset, per-sequence offsets or None) from ``offset``: an int, or an int tensor of shape (batch,)."""
    if isinstance(offset, Tensor):
        if batch is None:
            raise ValueError(f"{name}: a per-sequence offset tensor needs an input with a batch dim")
        return 0, _check_index_tensor(offset, (batch,), device, "offset", name)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{name}: offset must be an int or an int Tensor of shape (batch,), got {offset!r}")
    return offset, None


def _check_range(values: Tensor, low: int, high: int, what: str, name: str) -> None:
    """Raise IndexError unless every value lies in [low, high). Reads the data: one aminmax (a GPU synchronises)."""
    if values.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(values)).tolist()  # one device-to-host copy
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        raise IndexError(f"{name}: {what} {bad} is out of range [{low}, {high})")


def _check_positions(
    positions: Optional[Tensor], offsets: Optional[Tensor], offset: int, seq: int, rows: int, name: str
) -> None:
    """Positions (given, or offset + offsets[b] + s for s < seq) inside a table of ``rows`` rows."""
    if seq == 0:
        return
    if positions is not None:
        _check_range(positions, 0, rows, "position", name)
        return
    lo = hi = 0
    if offsets is not None and offsets.numel() > 0:
        lo, hi = torch.stack(torch.aminmax(offsets)).tolist()
    first, last = offset + lo, offset + hi + seq - 1
    if first < 0 or last >= rows:
        bad = first if first < 0 else last
        raise IndexError(
            f"{name}: position {bad} (offset + s) is out of range [0, {rows}), the rows of the "
            "position table (max_positions)"
        )


# ---------------------------------------------------------------------------------------------------------
# Backends: what each accepts (None = yes, else why not) and how each runs.
# ---------------------------------------------------------------------------------------------------------


def _dtype_check(dtypes):
    def check(t: Tensor) -> Optional[str]:
        return None if t.dtype in dtypes else f"dtype {t.dtype} is not one of {dtypes}"

    return check


CHECKS = {
    "cuda": _dtype_check(GPU_DTYPES),
    "triton": _dtype_check(FLOAT_DTYPES),
    "cpu": _dtype_check(FLOAT_DTYPES),
    "reference": _dtype_check(FLOAT_DTYPES),
}


def _kernel(backend: str, op: str):
    if backend == "triton":
        from fastattn.triton_kernels import positional  # noqa: PLC0415

        return getattr(positional, op)
    return getattr(torch.ops.fastattn_C, op)


def _last_dim_unit(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _keep(dropout_p: float, seed: int, shape, device: torch.device) -> Optional[Tensor]:
    """The dropout mask (bool, ``shape``) of the kernels for rows = the leading dims flattened, n = shape[-1]."""
    if dropout_p == 0.0:
        return None
    rows = math.prod(shape[:-1])
    return reference.elementwise_dropout_mask(seed, dropout_p, rows, shape[-1], device).view(shape)


def _batch_seq(x: Tensor, batch_first: bool) -> tuple[int, int]:
    return (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])


# ---------------------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------------------


def _positional_add(
    x: Tensor,
    table: Optional[Tensor],
    offsets: Optional[Tensor],
    offset: int,
    scale: float,
    base: float,
    sinusoid: bool,
    batch_first: bool,
    dropout_p: float,
    seed: Optional[Tensor],
) -> Tensor:
    """``dropout(x * scale + PE[pos])`` for x (batch, seq, D) (seq-first when not ``batch_first``) and
    pos = offset + offsets[b] + s; PE = ``table`` rows, else the sinusoid of ``base`` when ``sinusoid``, else 0.
    ``seed``: None, or a (1,) int64 CPU tensor (the 64-bit Philox seed). Returns a tensor contiguous in x's layout."""
    name = backends.select("positional_add", x.device, CHECKS, x)
    seed_int = seed_value(seed)
    batch, seq = _batch_seq(x, batch_first)
    if table is not None:
        _check_positions(None, offsets, offset, seq, table.shape[0], "fastattn.learned_positional_encoding")
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    if name == "reference":
        pos = reference.sequence_positions(batch, seq, offset, offsets, batch_first, x.device)
        pe = None
        if table is not None:
            pe = table[pos]
        elif sinusoid:
            pe = reference.sinusoidal_table(pos, x.shape[-1], base)
        keep = _keep(dropout_p, seed_int, x.shape, x.device)
        return reference.positional_add(x, pe, scale, keep, dropout_p).contiguous()
    return _kernel(name, "positional_add")(
        _last_dim_unit(x), _last_dim_unit(table), offsets, offset, scale, base, sinusoid, batch_first, dropout_p,
        seed_int,
    )  # fmt: skip


positional_add_op = torch.library.custom_op("fastattn::positional_add", _positional_add, mutates_args=())


@positional_add_op.register_fake
def _(x, table, offsets, offset, scale, base, sinusoid, batch_first, dropout_p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _embedding_scatter(grad: Tensor, index: Tensor, num_rows: int, scale: float, skip_row: int) -> Tensor:
    """(num_rows, D) in grad's dtype: row v = scale * the sum of the rows of grad (n, D) with index (n,) = v; row
    ``skip_row`` (>= 0) zero. The backward of an embedding gather (dense, as :class:`torch.nn.Embedding`)."""
    name = backends.select("embedding_scatter", grad.device, CHECKS, grad)
    if name == "reference":
        return reference.embedding_scatter(grad, index, num_rows, scale, skip_row).contiguous()
    return _kernel(name, "embedding_scatter")(as_2d(grad), index.contiguous(), num_rows, scale, skip_row)


embedding_scatter_op = torch.library.custom_op("fastattn::embedding_scatter", _embedding_scatter, mutates_args=())
run_embedding_scatter = EagerOp(embedding_scatter_op, _embedding_scatter)


@embedding_scatter_op.register_fake
def _(grad, index, num_rows, scale, skip_row):
    return grad.new_empty(num_rows, grad.shape[-1])


def _positional_setup_context(ctx, inputs, output):
    x, table, offsets, offset, scale, base, _, batch_first, dropout_p, seed = inputs
    ctx.save_for_backward(offsets, seed)
    ctx.table_rows = None if table is None else table.shape[0]
    ctx.arguments = (offset, scale, base, batch_first, dropout_p)


def _positional_backward(ctx, grad):
    offsets, seed = ctx.saved_tensors
    offset, scale, base, batch_first, dropout_p = ctx.arguments
    grad_x = grad_table = None
    if ctx.needs_input_grad[0]:
        if scale == 1.0 and dropout_p == 0.0:
            grad_x = grad  # the identity: no pass over memory
        else:
            grad_x = run_positional_add(grad, None, None, 0, scale, base, False, batch_first, dropout_p, seed)
    if ctx.table_rows is not None and ctx.needs_input_grad[1]:
        kept = grad if dropout_p == 0.0 else run_positional_add(grad, None, None, 0, 1.0, base, False, batch_first,
                                                               dropout_p, seed)  # fmt: skip
        batch, seq = _batch_seq(grad, batch_first)
        if offsets is None:
            # Every sequence covers rows offset .. offset + seq - 1: their gradient is the batch sum (one read of
            # the gradient, deterministic), the other rows zero.
            summed = kept.sum(dim=0 if batch_first else 1, dtype=reference.compute_dtype(kept.dtype))
            grad_table = kept.new_zeros(ctx.table_rows, kept.shape[-1])
            grad_table[offset : offset + seq] = summed
        else:
            pos = reference.sequence_positions(batch, seq, offset, offsets, batch_first, grad.device)
            grad_table = run_embedding_scatter(as_2d(kept), pos.reshape(-1), ctx.table_rows, 1.0, -1)
    return grad_x, grad_table, None, None, None, None, None, None, None, None


positional_add_op.register_autograd(_positional_backward, setup_context=_positional_setup_context)
run_positional_add = EagerOp(positional_add_op, _positional_add, _positional_setup_context, _positional_backward)


def _embedding(
    tokens: Tensor,
    token_weight: Tensor,
    position_weight: Tensor,
    positions: Optional[Tensor],
    offsets: Optional[Tensor],
    offset: int,
    token_scale: float,
    padding_idx: int,
    dropout_p: float,
    seed: Optional[Tensor],
) -> Tensor:
    """``dropout(token_weight[tokens] * token_scale + position_weight[pos])`` (batch, seq, D) for int64 tokens
    (batch, seq) and pos = positions (batch, seq), else offset + offsets[b] + s. ``padding_idx`` (-1: none) only
    matters to the backward: that row of token_weight gets no gradient. ``seed`` as ``fastattn::positional_add``'s."""
    name = backends.select("embedding_with_positions", token_weight.device, CHECKS, token_weight)
    seed_int = seed_value(seed)
    _check_range(tokens, 0, token_weight.shape[0], "token", "fastattn.embedding_with_positions")
    _check_positions(positions, offsets, offset, tokens.shape[1], position_weight.shape[0],
                     "fastattn.embedding_with_positions")  # fmt: skip
    if name == "reference" or tokens.numel() == 0:
        batch, seq = tokens.shape
        pos = (
            positions
            if positions is not None
            else reference.sequence_positions(batch, seq, offset, offsets, device=tokens.device)
        )
        keep = _keep(dropout_p, seed_int, (batch, seq, token_weight.shape[1]), tokens.device)
        return reference.embedding_with_positions(tokens, token_weight, position_weight, pos, token_scale, keep,
                                                  dropout_p).contiguous()  # fmt: skip
    return _kernel(name, "embedding_forward")(
        tokens, _last_dim_unit(token_weight), _last_dim_unit(position_weight), positions, offsets, offset,
        token_scale, dropout_p, seed_int,
    )  # fmt: skip


embedding_op = torch.library.custom_op("fastattn::embedding_with_positions", _embedding, mutates_args=())


@embedding_op.register_fake
def _(tokens, token_weight, position_weight, positions, offsets, offset, token_scale, padding_idx, dropout_p, seed):
    return token_weight.new_empty(*tokens.shape, token_weight.shape[1])


def _embedding_setup_context(ctx, inputs, output):
    tokens, token_weight, position_weight, positions, offsets, offset, token_scale, padding_idx, dropout_p, seed = (
        inputs
    )
    ctx.save_for_backward(tokens, positions, offsets, seed)
    ctx.rows = (token_weight.shape[0], position_weight.shape[0])
    ctx.arguments = (offset, token_scale, padding_idx, dropout_p)


def _embedding_backward(ctx, grad):
    tokens, positions, offsets, seed = ctx.saved_tensors
    offset, token_scale, padding_idx, dropout_p = ctx.arguments
    vocab, max_positions = ctx.rows
    kept = grad if dropout_p == 0.0 else run_positional_add(grad, None, None, 0, 1.0, 1.0, False, True, dropout_p, seed)
    kept = as_2d(kept)
    grad_token = grad_position = None
    if ctx.needs_input_grad[1]:
        grad_token = run_embedding_scatter(kept, tokens.reshape(-1), vocab, token_scale, padding_idx)
    if ctx.needs_input_grad[2]:
        if positions is None and offsets is None:  # rows offset .. offset + seq - 1: a batch sum, as for learned
            seq = tokens.shape[1]
            summed = kept.view(*tokens.shape, -1).sum(dim=0, dtype=reference.compute_dtype(kept.dtype))
            grad_position = kept.new_zeros(max_positions, kept.shape[-1])
            grad_position[offset : offset + seq] = summed
        else:
            if positions is None:
                positions = reference.sequence_positions(*tokens.shape, offset, offsets, device=tokens.device)
            grad_position = run_embedding_scatter(kept, positions.reshape(-1), max_positions, 1.0, -1)
    return None, grad_token, grad_position, None, None, None, None, None, None, None


embedding_op.register_autograd(_embedding_backward, setup_context=_embedding_setup_context)
run_embedding = EagerOp(embedding_op, _embedding, _embedding_setup_context, _embedding_backward)


# ---------------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------------


def _check_x(x, name: str) -> None:
    _check_float(x, "x", name)
    if x.dim() not in (2, 3):
        raise ValueError(f"{name}: x must be (batch, seq, d), (seq, batch, d) or (seq, d), got shape {tuple(x.shape)}")


def sinusoidal_positional_encoding(
    x: Tensor,
    *,
    scale: float = 1.0,
    offset: Offset = 0,
    dropout_p: float = 0.0,
    batch_first: bool = True,
    base: float = 10000.0,
) -> Tensor:
    """``dropout(x * scale + PE)`` with the sinusoidal encoding of "Attention is all you need" computed in the
    kernel (no table, no length limit), in one pass over x.

    Args:
        x: (batch, seq, d) when ``batch_first``, else (seq, batch, d) (the PyTorch tutorial's layout); or (seq, d).
            float16, bfloat16, float32 or float64; any strides.
        scale: multiplies x first (e.g. ``sqrt(d)``).
        offset: the position of the first step: an int (decoding: the tokens already seen), or an int tensor
            (batch,) of per-sequence offsets. Step s of sequence b is at position ``offset + s`` (``offset[b] + s``);
            any integer, negative included.
        dropout_p: elementwise dropout of the sum, Philox from a seed drawn from torch's CPU generator (reproducible
            under :func:`torch.manual_seed`); element (r, c) of the output viewed as (rows, d) is kept as
            :func:`fastattn.reference.elementwise_dropout_mask` says.
        base: PE[p, 2i] = sin(p * base^(-2i/d)), PE[p, 2i + 1] = cos(p * base^(-2i/d)); an odd d ends with a sin.

    Returns:
        A tensor of x's shape and dtype, contiguous. Computed in float32 (float64 for float64) with the angle
        reduced in float64, so that PE stays within about one float32 rounding at any position (torch's float32
        table is off by 7e-3 at position 10^5).
    """
    name = "fastattn.sinusoidal_positional_encoding"
    _check_x(x, name)
    scale = _check_number(scale, "scale", name)
    base = _check_number(base, "base", name)
    if base <= 0.0:
        raise ValueError(f"{name}: base must be positive, got {base}")
    dropout_p = _check_dropout(dropout_p, name)
    if x.dim() == 2:
        offset, offsets = _check_offset(offset, None, x.device, name)
        return run_positional_add(x.unsqueeze(0), None, None, offset, scale, base, True, True, dropout_p,
                                 dropout_seed_tensor(dropout_p)).squeeze(0)  # fmt: skip
    batch, _ = _batch_seq(x, bool(batch_first))
    offset, offsets = _check_offset(offset, batch, x.device, name)
    return run_positional_add(x, None, offsets, offset, scale, base, True, bool(batch_first), dropout_p,
                             dropout_seed_tensor(dropout_p))  # fmt: skip


def learned_positional_encoding(
    x: Tensor,
    weight: Tensor,
    *,
    scale: float = 1.0,
    offset: Offset = 0,
    dropout_p: float = 0.0,
    batch_first: bool = True,
) -> Tensor:
    """``dropout(x * scale + weight[pos])``, a learned position embedding added in one pass over x.

    Args:
        x: (batch, seq, d) when ``batch_first``, else (seq, batch, d); or (seq, d). Any strides.
        weight: (max_positions, d) in x's dtype, on x's device.
        scale, offset, dropout_p: as :func:`sinusoidal_positional_encoding`; every position ``offset + s`` must
            lie in [0, max_positions) (IndexError otherwise).

    Returns:
        A tensor of x's shape and dtype. Gradients flow to x and to weight (dense: a scatter-add of the output's
        gradient over the positions, as :class:`torch.nn.Embedding`).
    """
    name = "fastattn.learned_positional_encoding"
    _check_x(x, name)
    _check_float(weight, "weight", name)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: weight must be (max_positions, {x.shape[-1]}), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"{name}: weight ({weight.dtype}, {weight.device}) must match x ({x.dtype}, {x.device})")
    scale = _check_number(scale, "scale", name)
    dropout_p = _check_dropout(dropout_p, name)
    squeeze = x.dim() == 2
    if squeeze:
        x, batch_first = x.unsqueeze(0), True
    batch, seq = _batch_seq(x, bool(batch_first))
    offset, offsets = _check_offset(offset, None if squeeze else batch, x.device, name)
    if offsets is None:
        _check_positions(None, None, offset, seq, weight.shape[0], name)
    out = run_positional_add(x, weight, offsets, offset, scale, 10000.0, False, bool(batch_first), dropout_p,
                            dropout_seed_tensor(dropout_p))  # fmt: skip
    return out.squeeze(0) if squeeze else out


def embedding_with_positions(
    tokens: Tensor,
    token_weight: Tensor,
    position_weight: Tensor,
    *,
    offset: Offset = 0,
    positions: Optional[Tensor] = None,
    token_scale: float = 1.0,
    dropout_p: float = 0.0,
    padding_idx: Optional[int] = None,
) -> Tensor:
    """Token embedding gather + position embedding add (+ dropout) in one pass:
    ``dropout(token_weight[tokens] * token_scale + position_weight[positions])``.

    Args:
        tokens: (batch, seq) or (seq,) int32/int64, each in [0, vocab).
        token_weight: (vocab, d); position_weight: (max_positions, d), same dtype and device; any row strides.
        offset: without ``positions``, step s of sequence b is at position ``offset + s``: an int, or an int tensor
            (batch,) of per-sequence offsets.
        positions: int tensor of tokens' shape, each in [0, max_positions); excludes a nonzero ``offset``.
        token_scale: multiplies the token embedding (e.g. ``sqrt(d)``).
        dropout_p: elementwise dropout of the sum (rows = the tokens, as :func:`sinusoidal_positional_encoding`).
        padding_idx: as :class:`torch.nn.Embedding`: that row of token_weight gets no gradient.

    Returns:
        (*tokens.shape, d) in the weights' dtype. Gradients to both tables are dense scatter-adds. On the CPU each
        table row sums its entries in entry order on one thread (deterministic for any thread count); the GPU
        kernels (Triton, CUDA) use float32 atomics, so rows shared by several tokens may differ in the last bits
        from run to run. Tokens or positions out of range raise IndexError (checked in Python: one ``aminmax``
        over the indices, a device synchronisation on a GPU).
    """
    name = "fastattn.embedding_with_positions"
    for arg, weight in (("token_weight", token_weight), ("position_weight", position_weight)):
        _check_float(weight, arg, name)
        if weight.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D (rows, d), got shape {tuple(weight.shape)}")
    if position_weight.shape[1] != token_weight.shape[1]:
        raise ValueError(
            f"{name}: token_weight and position_weight must share d, got {token_weight.shape[1]} "
            f"and {position_weight.shape[1]}"
        )
    if position_weight.dtype != token_weight.dtype or position_weight.device != token_weight.device:
        raise TypeError(
            f"{name}: position_weight ({position_weight.dtype}, {position_weight.device}) must match "
            f"token_weight ({token_weight.dtype}, {token_weight.device})"
        )
    if not isinstance(tokens, Tensor) or tokens.dim() not in (1, 2):
        raise ValueError(
            f"{name}: tokens must be a (batch, seq) or (seq,) Tensor, got "
            f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}"
        )
    squeeze = tokens.dim() == 1
    tokens_2d = tokens.unsqueeze(0) if squeeze else tokens
    tokens_2d = _check_index_tensor(tokens_2d, tokens_2d.shape, token_weight.device, "tokens", name)
    if positions is not None:
        if isinstance(offset, Tensor) or offset != 0:
            raise ValueError(f"{name}: pass positions or offset, not both")
        positions = positions.unsqueeze(0) if squeeze and isinstance(positions, Tensor) else positions
        positions = _check_index_tensor(positions, tokens_2d.shape, token_weight.device, "positions", name)
        offset, offsets = 0, None
    else:
        offset, offsets = _check_offset(offset, None if squeeze else tokens_2d.shape[0], token_weight.device, name)
        if offsets is None:
            _check_positions(None, None, offset, tokens_2d.shape[1], position_weight.shape[0], name)
    vocab = token_weight.shape[0]
    if padding_idx is None:
        padding_idx = -1
    elif isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not -vocab <= padding_idx < vocab:
        raise ValueError(f"{name}: padding_idx must be None or an int in [{-vocab}, {vocab}), got {padding_idx!r}")
    else:
        padding_idx %= vocab
    token_scale = _check_number(token_scale, "token_scale", name)
    dropout_p = _check_dropout(dropout_p, name)
    out = run_embedding(tokens_2d, token_weight, position_weight, positions, offsets, offset, token_scale, padding_idx,
                       dropout_p, dropout_seed_tensor(dropout_p))  # fmt: skip
    return out.squeeze(0) if squeeze else out


def alibi_slopes(heads: int, *, device: Optional[Union[torch.device, str]] = None) -> Tensor:
    """The ALiBi head slopes of Press et al., "Train Short, Test Long" (ICLR 2022), float32 (heads,), for
    ``fastattn.attention(..., alibi_slopes=...)``.

    For n a power of two, head h (0-based) gets ``2^(-8 (h + 1) / n)``: a geometric sequence from 2^(-8/n) down to
    2^-8 (8 heads: 1/2, 1/4, ..., 1/256). Otherwise, with m the largest power of two below n, the first m heads
    take the slopes for m and the other n - m heads take every other slope for 2m, starting with the first:
    ``2^(-8 (2j + 1) / (2m))`` for j = 0 .. n - m - 1 (the paper's reference code).
    """
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"fastattn.alibi_slopes: heads must be a positive int, got {heads!r}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    m = 1 << (heads.bit_length() - 1)
    slopes = power_of_two(m) + power_of_two(2 * m)[0::2][: heads - m]
    return torch.tensor(slopes, dtype=torch.float32, device=device)
