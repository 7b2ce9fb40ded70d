"""Attention: the torch.library ops ``fastattn::attention`` / ``fastattn::attention_backward``, their fake
kernels and autograd, backend selection, and the public functions :func:`attention` and
:func:`scaled_dot_product_attention`.

Every kernel sees one canonical problem (see ``csrc/attention.h``): q (B, Hq, Sq, D), k (B, Hkv, Sk, D),
v (B, Hkv, Sk, Dv) with unit stride over the last dim; an optional (B, Hq, Sq, Sk) mask view (stride 0 where
broadcast); an optional (B, Sk) key-padding view; optional (B, Hq) ALiBi slopes; and a window
``[i + diagonal - window_left, i + diagonal + window_right]`` of keys per query i (a bound of -1: none).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn import backends, reference
from fastattn.ops._eager import EagerOp
from fastattn.ops._random import dropout_seed_tensor, seed_value

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------------
# Input checks: readable errors before any kernel runs.
# ---------------------------------------------------------------------------------------------------------


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, name: str) -> None:
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {arg} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{name}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"{name}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"{name}: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must agree on heads and seq")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{name}: the query heads ({q.shape[1]}) must be a multiple of the key/value heads ({k.shape[1]})"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: q and k head dims differ: {q.shape[-1]} and {k.shape[-1]}")
    for arg, t in (("q/k", q), ("v", v)):
        if t.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"{name}: {arg} head dim {t.shape[-1]} is above the supported {MAX_HEAD_DIM}")


def _check_mask(mask: Optional[Tensor], q: Tensor, seq_k: int, name: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: attn_mask must be a Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: attn_mask must be bool (True = attend) or floating point (added), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{name}: attn_mask is on {mask.device} but q is on {q.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], seq_k)
    if mask.dim() > 4 or _broadcast(mask.shape, target) != torch.Size(target):
        raise ValueError(f"{name}: attn_mask of shape {tuple(mask.shape)} does not broadcast to {target}")
    if mask.requires_grad:
        raise ValueError(f"{name}: gradients with respect to attn_mask are not supported; pass attn_mask.detach()")


def _check_key_padding(key_padding_mask: Optional[Tensor], q: Tensor, seq_k: int, name: str) -> None:
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError(f"{name}: key_padding_mask must be a bool Tensor (True = padding), got "
                        f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
    if key_padding_mask.shape != (q.shape[0], seq_k):
        raise ValueError(f"{name}: key_padding_mask must be (batch, seq_k) = {(q.shape[0], seq_k)}, "
                         f"got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"{name}: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def _check_alibi(alibi_slopes: Optional[Tensor], q: Tensor, name: str) -> None:
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, Tensor) or not alibi_slopes.is_floating_point():
        raise TypeError(f"{name}: alibi_slopes must be a floating-point Tensor")
    if alibi_slopes.shape not in ((q.shape[1],), (q.shape[0], q.shape[1])):
        raise ValueError(f"{name}: alibi_slopes must be (heads,) or (batch, heads) = {(q.shape[0], q.shape[1])}, "
                         f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"{name}: alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
    if alibi_slopes.requires_grad:
        raise ValueError(f"{name}: gradients with respect to alibi_slopes are not supported")


def _check_window(window, name: str) -> tuple[int, int]:
    if window is None:
        return -1, -1
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)):
        raise TypeError(f"{name}: window must be None or (left, right) ints, -1 for unbounded; got {window!r}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"{name}: window bounds must be >= 0, or -1 for unbounded; got {window!r}")
    return left, right


def _check_dropout(dropout_p, name: str) -> None:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _broadcast(a: torch.Size, b) -> Optional[torch.Size]:
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------------------------------------
# Backends: what each accepts (None = yes, else why not) and how each runs.
# ---------------------------------------------------------------------------------------------------------


def _dtype_check(dtypes):
    def check(q: Tensor, dropout_p: float) -> Optional[str]:
        return None if q.dtype in dtypes else f"dtype {q.dtype} is not one of {dtypes}"

    return check


CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cuda_check(q: Tensor, dropout_p: float) -> Optional[str]:
    """The CUDA C++ kernels (mma.sync, ldmatrix, cp.async) need sm_80 or newer and take 16- and 32-bit floats."""
    if q.dtype not in CUDA_DTYPES:
        return f"dtype {q.dtype} is not one of {CUDA_DTYPES}"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "the CUDA C++ attention kernels need compute capability 8.0 or newer"
    return None


FORWARD_CHECKS = {
    "cuda": _cuda_check,
    "triton": _dtype_check(FLOAT_DTYPES),
    "cpu": _dtype_check(FLOAT_DTYPES),
    "reference": _dtype_check(FLOAT_DTYPES),
}
BACKWARD_CHECKS = {
    "cuda": _cuda_check,
    "triton": _dtype_check(FLOAT_DTYPES),
    "cpu": _dtype_check(FLOAT_DTYPES),
    "reference": lambda *_: None,
}


def _forward_kernel(name: str):
    if name == "triton":
        from fastattn.triton_kernels.attention import attention_forward  # noqa: PLC0415

        return attention_forward
    return torch.ops.fastattn_C.attention_forward


def _backward_kernel(name: str):
    if name == "triton":
        from fastattn.triton_kernels.attention import attention_backward  # noqa: PLC0415

        return attention_backward
    return torch.ops.fastattn_C.attention_backward


def _last_dim_unit(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _kernel_mask(mask: Optional[Tensor], q: Tensor, seq_k: int) -> Optional[Tensor]:
    """The mask as kernels take it: bool, q's dtype or float32, expanded (not copied) to (B, Hq, Sq, Sk)."""
    if mask is None:
        return None
    if mask.dtype not in (torch.bool, q.dtype, torch.float32):
        mask = mask.float()
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], seq_k)


def _kernel_alibi(alibi: Optional[Tensor], q: Tensor) -> Optional[Tensor]:
    return None if alibi is None else alibi.float().expand(q.shape[0], q.shape[1])


def _dropout_mask(p: float, seed: int, shape, device: torch.device) -> Optional[Tensor]:
    """The kept entries (True) of the dropout with probability ``p`` drawn from ``seed``; None without dropout."""
    return None if p == 0.0 else reference.attention_dropout_mask(seed, p, shape, device)


# ---------------------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------------------


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    key_padding: Optional[Tensor],
    alibi: Optional[Tensor],
    scale: float,
    diagonal: int,
    window_left: int,
    window_right: int,
    dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """(out, lse) of the canonical problem in the module docstring; see :func:`attention`. ``seed``: None or the
    (1,) int64 CPU tensor of the dropout seed (ops._random)."""
    seed = seed_value(seed)
    name = backends.select("attention", q.device, FORWARD_CHECKS, q, dropout_p)
    seq_k = k.shape[2]
    if name == "reference" or q.numel() == 0 or seq_k == 0:
        shape = (q.shape[0], q.shape[1], q.shape[2], seq_k)
        out, lse = reference.attention(
            q, k, v, mask, key_padding, alibi, scale, diagonal, window_left, window_right,
            _dropout_mask(dropout_p, seed, shape, q.device), dropout_p,
        )  # fmt: skip
        return out.contiguous(), lse.contiguous()
    return _forward_kernel(name)(
        _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), _kernel_mask(mask, q, seq_k), key_padding,
        _kernel_alibi(alibi, q), scale, diagonal, window_left, window_right, dropout_p, seed,
    )  # fmt: skip


attention_op = torch.library.custom_op("fastattn::attention", _attention, mutates_args=())


@attention_op.register_fake
def _(q, k, v, mask, key_padding, alibi, scale, diagonal, window_left, window_right, dropout_p, seed):
    out = q.new_empty((*q.shape[:3], v.shape[-1]))
    lse = q.new_empty(q.shape[:3], dtype=reference.compute_dtype(q.dtype))
    return out, lse


def _attention_backward(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    key_padding: Optional[Tensor],
    alibi: Optional[Tensor],
    scale: float,
    diagonal: int,
    window_left: int,
    window_right: int,
    dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``fastattn::attention`` for the incoming gradients of out and lse (None: zero)."""
    seed = seed_value(seed)
    name = backends.select("attention_backward", q.device, BACKWARD_CHECKS, q, dropout_p)
    seq_k = k.shape[2]
    if name == "reference" or q.numel() == 0 or seq_k == 0:
        shape = (q.shape[0], q.shape[1], q.shape[2], seq_k)
        grads = reference.attention_backward(
            grad_out, q, k, v, mask, key_padding, alibi, scale, diagonal, window_left, window_right,
            _dropout_mask(dropout_p, seed, shape, q.device), dropout_p, grad_lse,
        )  # fmt: skip
        return tuple(g.contiguous() for g in grads)
    # delta = rowsum(dO * O) - dlse: the row term of dS = P * (dP - delta)
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(lse.dtype)
    return _backward_kernel(name)(
        grad_out, _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), lse, delta,
        _kernel_mask(mask, q, seq_k), key_padding, _kernel_alibi(alibi, q), scale, diagonal, window_left,
        window_right, dropout_p, seed,
    )  # fmt: skip


attention_backward_op = torch.library.custom_op("fastattn::attention_backward", _attention_backward, mutates_args=())
run_attention_backward = EagerOp(attention_backward_op, _attention_backward)


@attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, *_):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, key_padding, alibi = inputs[:6]
    ctx.save_for_backward(q, k, v, *output, mask, key_padding, alibi, inputs[-1])
    ctx.arguments = inputs[6:-1]


def _backward(ctx, grad_out, grad_lse):
    *tensors, seed = ctx.saved_tensors
    grads = run_attention_backward(grad_out.contiguous(), grad_lse, *tensors, *ctx.arguments, seed)
    return (*grads, None, None, None, None, None, None, None, None, None)


attention_op.register_autograd(_backward, setup_context=_setup_context)
run_attention = EagerOp(attention_op, _attention, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    window: Optional[tuple[int, int]] = None,
    return_lse: bool = False,
):
    """Fused attention ``softmax(q k^T * scale + mask + alibi) v`` without an Sq x Sk tensor in the kernels.

    Args:
        q: (batch, heads, seq_q, head_dim); k: (batch, kv_heads, seq_k, head_dim); v: (batch, kv_heads, seq_k,
            head_dim_v). kv_heads must divide heads (GQA / MQA: query head h uses kv head h // (heads //
            kv_heads)). float16, bfloat16, float32 or float64; head dims up to 256; any strides.
        attn_mask: broadcastable to (batch, heads, seq_q, seq_k). bool: True = attend (as in SDPA);
            float: added to the scores.
        key_padding_mask: (batch, seq_k) bool, True = a padding key that no query attends to (as in
            :class:`torch.nn.MultiheadAttention`).
        causal: query i sees keys j <= i + seq_k - seq_q, i.e. aligned bottom-right (as FlashAttention; the
            last query sees every key)::

                seq_q=2, seq_k=4:  1 1 1 0        seq_q=4, seq_k=2:  0 0
                                   1 1 1 1                           0 0
                                                                     1 0
                                                                     1 1

            (:func:`scaled_dot_product_attention` keeps SDPA's top-left alignment for ``is_causal``.)
        dropout_p: dropout on the attention probabilities inside the kernel: element (b, h, i, j) is kept by a
            Philox draw from a seed taken from torch's CPU generator (reproducible under
            :func:`torch.manual_seed`; :func:`fastattn.reference.attention_dropout_mask` rebuilds the mask);
            the backward regenerates the same mask instead of storing it.
        scale: multiplies q k^T; default 1 / sqrt(head_dim).
        alibi_slopes: (heads,) or (batch, heads); adds ``-slope * |j - i - (seq_k - seq_q)|``.
        window: (left, right): query i sees keys j with ``-left <= j - i - (seq_k - seq_q) <= right``; -1 is
            unbounded. ``causal`` sets right to 0.
        return_lse: also return the log-sum-exp of each query's scores, (batch, heads, seq_q), float32
            (float64 for float64 inputs).

    Returns:
        out (batch, heads, seq_q, head_dim_v) in q's dtype, and lse when ``return_lse``. Softmax statistics
        are kept in float32 (float64 for float64). A query that sees no key gets out 0 (lse -inf) and zero
        gradients, never NaN.
    """
    name = "fastattn.attention"
    _check_qkv(q, k, v, name)
    seq_k = k.shape[2]
    _check_mask(attn_mask, q, seq_k, name)
    _check_key_padding(key_padding_mask, q, seq_k, name)
    _check_alibi(alibi_slopes, q, name)
    window_left, window_right = _check_window(window, name)
    _check_dropout(dropout_p, name)
    if causal:
        window_right = 0 if window_right < 0 else min(window_right, 0)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = run_attention(
        q, k, v, attn_mask, key_padding_mask, alibi_slopes, scale, seq_k - q.shape[2], window_left, window_right,
        float(dropout_p), dropout_seed_tensor(dropout_p),
    )  # fmt: skip
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`: same arguments, same semantics.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) with the same leading dims (3-D
    inputs have no head dim); ``attn_mask`` broadcastable to (..., Hq, L, S), bool (True = attend) or float
    (added); ``is_causal`` hides key j from query i when j > i (top-left alignment, as SDPA) and may not be
    combined with ``attn_mask``; ``enable_gqa`` lets Hkv divide Hq. Returns (..., Hq, L, Ev); a query whose
    keys are all masked gets 0, never NaN.
    """
    name = "fastattn.scaled_dot_product_attention"
    if is_causal and attn_mask is not None:
        raise ValueError(f"{name}: attn_mask must be None when is_causal=True (as in SDPA)")
    for arg, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() < 3:
            raise ValueError(f"{name}: {arg} must be a Tensor with at least 3 dims (..., seq, dim)")
    if not (query.dim() == key.dim() == value.dim() and query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        raise ValueError(
            f"{name}: query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} "
            "must share their leading dims"
        )
    if query.dim() == 3:
        q, k, v = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        mask = None if attn_mask is None else _leading_mask(attn_mask, query.dim())
    else:
        lead = query.shape[:-3]
        q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (query, key, value))
        mask = None if attn_mask is None else _flatten_mask(attn_mask, lead, query.shape[-3:-1], key.shape[-2])
    if not enable_gqa and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"{name}: query has {q.shape[1]} heads but key/value have {k.shape[1]}; pass enable_gqa=True for GQA"
        )
    _check_qkv(q, k, v, name)
    seq_k = k.shape[2]
    _check_mask(mask, q, seq_k, name)
    _check_dropout(dropout_p, name)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    causal_right = 0 if is_causal else -1
    out, _ = run_attention(
        q, k, v, mask, None, None, scale, 0, -1, causal_right, float(dropout_p), dropout_seed_tensor(dropout_p)
    )
    return out.squeeze(1) if query.dim() == 3 else out.reshape(*query.shape[:-1], v.shape[-1])


def _leading_mask(mask: Tensor, dim: int) -> Tensor:
    """An SDPA mask for 3-D inputs (broadcastable to (N, L, S)) as (N or 1, 1, L, S)."""
    return mask.unsqueeze(-3) if mask.dim() == dim else mask


def _flatten_mask(mask: Tensor, lead: torch.Size, heads_and_l: torch.Size, seq_k: int) -> Tensor:
    """An SDPA mask broadcastable to (*lead, H, L, S) as a view broadcastable to (prod(lead), H, L, S)."""
    full = mask.expand(*lead, *heads_and_l, seq_k)
    return full.reshape(-1, *heads_and_l, seq_k) if len(lead) != 1 else full
