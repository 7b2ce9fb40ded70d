"""Plain PyTorch references: the semantics every kernel must match, the ``reference`` backend, and, run in
float64, the ground truth of the tests. Differentiable with autograd.
"""

from __future__ import annotations

from typing import Callable, Optional

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


# ---------------------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------------------


def window_allows(distance: Tensor, window_left: int, window_right: int) -> Optional[Tensor]:
    """Bool, True where ``-window_left <= distance <= window_right`` (a bound of -1: none), for ``distance`` =
    key position - query position; None when neither bound is set."""
    if window_left < 0 and window_right < 0:
        return None
    allowed = torch.ones_like(distance, dtype=torch.bool)
    if window_left >= 0:
        allowed &= distance >= -window_left
    if window_right >= 0:
        allowed &= distance <= window_right
    return allowed


def attention_allowed(
    seq_q: int, seq_k: int, diagonal: int, window_left: int, window_right: int, device: torch.device
) -> Optional[Tensor]:
    """Bool (seq_q, seq_k), True = query i may see key j: ``i + diagonal - window_left <= j <= i + diagonal +
    window_right``, a bound of -1 being no bound. None when neither bound is set.

    ``diagonal`` is the key aligned with query i's "present": ``seq_k - seq_q`` for fastattn's causal
    (bottom-right, as FlashAttention), 0 for SDPA's ``is_causal`` (top-left). Causal is ``window_right=0``.
    """
    distance = torch.arange(seq_k, device=device) - torch.arange(seq_q, device=device).unsqueeze(1) - diagonal
    return window_allows(distance, window_left, window_right)


def alibi_bias(slopes: Tensor, seq_q: int, seq_k: int, diagonal: int) -> Tensor:
    """ALiBi: ``-slope * |j - i - diagonal|`` as (batch or 1, heads, seq_q, seq_k) from slopes (heads,) or
    (batch, heads), in float32 (float64 for float64 slopes)."""
    slopes = slopes.reshape(-1, slopes.shape[-1])[:, :, None, None]
    distance = torch.arange(seq_k, device=slopes.device) - torch.arange(seq_q, device=slopes.device)[:, None]
    return -slopes * (distance - diagonal).abs().to(slopes.dtype)


_WORD = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)  # round multipliers
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)  # key schedule increments


def _mul_hi_lo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The high and low 32-bit words of ``a * m`` for int64 ``a`` in [0, 2^32) and a 32-bit constant ``m``,
    without overflowing int64 (m is split into 16-bit halves)."""
    low = a * (m & 0xFFFF)
    high = a * (m >> 16)
    bottom = low + ((high & 0xFFFF) << 16)
    return (high >> 16) + (bottom >> 32), bottom & _WORD


def philox(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 (Salmon et al., SC 2011) of the counters (c0, c1, c2, c3), int64 tensors of 32-bit
    values that broadcast together, under the 64-bit key ``seed``; returns its four 32-bit words as int64.
    The same generator as csrc/philox.h and the Triton kernels."""
    key0, key1 = seed & _WORD, (seed >> 32) & _WORD
    for round_ in range(10):
        if round_ > 0:
            key0, key1 = (key0 + _PHILOX_WEYL[0]) & _WORD, (key1 + _PHILOX_WEYL[1]) & _WORD
        hi0, lo0 = _mul_hi_lo(c0, _PHILOX_MUL[0])
        hi1, lo1 = _mul_hi_lo(c2, _PHILOX_MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """floor(p * 2^32): a probability is dropped iff its 32-bit Philox word is below it."""
    return int(p * 2**32)


def attention_dropout_mask(seed: int, p: float, shape: tuple[int, int, int, int], device: torch.device) -> Tensor:
    """The kept entries (True) of attention dropout with probability ``p`` over (B, Hq, Sq, Sk) probabilities:
    element (b, h, i, j) is kept iff word ``j % 4`` of Philox at counter (j // 4, i, b * Hq + h, 0) is at least
    :func:`dropout_threshold` (csrc/philox.h); every kernel regenerates the same mask from ``seed``."""
    batch, heads, seq_q, seq_k = shape
    groups = torch.arange((seq_k + 3) // 4, device=device)[None, None, :]
    queries = torch.arange(seq_q, device=device)[None, :, None]
    rows = torch.arange(batch * heads, device=device)[:, None, None]
    words = philox(groups, queries, rows, torch.zeros_like(groups), seed)
    bits = torch.stack(torch.broadcast_tensors(*words), dim=-1).flatten(-2)[..., :seq_k]
    return (bits >= dropout_threshold(p)).reshape(shape)


def elementwise_dropout_mask(seed: int, p: float, rows: int, n: int, device: torch.device) -> Tensor:
    """The kept entries (True) of elementwise dropout (norms, positional encodings) with probability ``p`` over a
    (rows, n) tensor: element (r, c) is kept iff word ``c % 4`` of Philox at counter (c // 4, r mod 2^32,
    r // 2^32, 1) is at least :func:`dropout_threshold` (csrc/philox.h)."""
    groups = torch.arange((n + 3) // 4, device=device)[None, :]
    row = torch.arange(rows, device=device)[:, None]
    words = philox(groups, row & _WORD, row >> 32, torch.ones_like(groups), seed)
    bits = torch.stack(torch.broadcast_tensors(*words), dim=-1).flatten(-2)[:, :n]
    return bits >= dropout_threshold(p)


def attention_scores(
    q: Tensor,
    k: Tensor,
    mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    scale: float = 1.0,
    diagonal: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    upcast: bool = True,
) -> Tensor:
    """Scores s = scale * q k^T + mask + alibi, -inf where a bool mask is False, a key is padding or the
    window hides the key. q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D) with Hkv dividing Hq (GQA); mask:
    broadcastable to (B, Hq, Sq, Sk); key_padding_mask: (B, Sk) bool, True = padding. Returns (B, Hq, Sq, Sk)
    in the compute dtype (q's dtype when not ``upcast``)."""
    dtype = compute_dtype(q.dtype) if upcast else q.dtype
    batch, heads, seq_q, _ = q.shape
    seq_k = k.shape[-2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(dtype)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes.to(dtype), seq_q, seq_k, diagonal)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    allowed = attention_allowed(seq_q, seq_k, diagonal, window_left, window_right, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    scale: Optional[float] = None,
    diagonal: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """softmax(scores) v with the scores of :func:`attention_scores`; returns (out, lse).

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv). ``scale`` defaults to 1/sqrt(D).
    ``dropout_mask``: bool (B, Hq, Sq, Sk), True = kept; kept probabilities are scaled by 1 / (1 - dropout_p).
    out: (B, Hq, Sq, Dv) in q's dtype. lse: (B, Hq, Sq), the log-sum-exp of each query's scores in the
    compute dtype (float32, float64 for float64 input). A query that sees no key gets out 0 and lse -inf.
    Differentiable; ``upcast=False`` computes in q's dtype, as a plain PyTorch user would.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = attention_scores(
        q, k, mask, key_padding_mask, alibi_slopes, scale, diagonal, window_left, window_right, upcast
    )
    # A query that sees no key: lse -inf, p 0, and no NaN from logsumexp's gradient over an all -inf row.
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    lse_safe = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1, keepdim=True).masked_fill(empty, 0.0)
    lse = lse_safe.masked_fill(empty, float("-inf")).squeeze(-1)
    p = torch.exp(s - lse_safe)
    if dropout_mask is not None:
        p = p.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.matmul(p, v.to(p.dtype))
    return out.to(q.dtype), lse


def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    scale: Optional[float] = None,
    diagonal: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    dropout_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    grad_lse: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`attention` for ``grad_out`` (B, Hq, Sq, Dv) on out and ``grad_lse`` (B, Hq, Sq)
    on lse, recomputing the probabilities P: dV = P'^T dO, dP' = dO V^T, dS = P * (dP - rowsum(dP * P) +
    grad_lse), dQ = scale dS K, dK = scale dS^T Q, where P' = P * dropout_mask / (1 - p) and
    dP = dP' * dropout_mask / (1 - p); GQA gradients are summed over the query heads that share a kv head."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = compute_dtype(q.dtype)
    s = attention_scores(q, k, mask, key_padding_mask, alibi_slopes, scale, diagonal, window_left, window_right)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0))
    groups = q.shape[1] // k.shape[1]
    k_full, v_full = (t.repeat_interleave(groups, dim=1).to(dtype) for t in (k, v))
    d_out = grad_out.to(dtype)
    keep = None if dropout_mask is None else dropout_mask.to(dtype) / (1.0 - dropout_p)
    p_kept = p if keep is None else p * keep
    dv = p_kept.transpose(-1, -2) @ d_out
    dp = d_out @ v_full.transpose(-1, -2)
    if keep is not None:
        dp = dp * keep
    delta = (dp * p).sum(dim=-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(dtype).unsqueeze(-1)
    ds = p * (dp - delta)
    dq = (ds @ k_full) * scale
    dk = (ds.transpose(-1, -2) @ q.to(dtype)) * scale

    def per_kv_head(t: Tensor) -> Tensor:
        return t.unflatten(1, (k.shape[1], groups)).sum(dim=2)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


def kvcache_scores_bias(
    lengths: Tensor, n_queries: int, max_seq: int, alibi_slopes: Optional[Tensor], heads: int,
    window_left: int, window_right: int, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The mask of KV-cache attention as one (B, 1 or Hq, n, max_seq) tensor: query i of batch b sits at position
    ``lengths[b] - n + i`` and sees keys j < lengths[b] inside its window. Bool (True = attend) without ALiBi;
    with ALiBi, ``-slope * |j - position|`` in ``dtype`` and -inf where hidden."""
    keys = torch.arange(max_seq, device=lengths.device)
    positions = lengths.long()[:, None] - n_queries + torch.arange(n_queries, device=lengths.device)
    distance = (keys - positions[:, :, None])[:, None]  # (B, 1, n, max_seq)
    allowed = (keys < lengths.long()[:, None, None, None]).expand_as(distance)
    window = window_allows(distance, window_left, window_right)
    if window is not None:
        allowed = allowed & window
    if alibi_slopes is None:
        return allowed
    slopes = alibi_slopes.reshape(-1, heads)[:, :, None, None]
    return (-slopes.to(dtype) * distance.abs().to(dtype)).masked_fill(~allowed, float("-inf"))


def attention_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    alibi_slopes: Optional[Tensor] = None,
    scale: Optional[float] = None,
    window_left: int = -1,
    window_right: int = -1,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Attention of n queries per batch against a cache holding ``lengths[b]`` valid keys: q (B, Hq, n, D),
    k_cache (B, Hkv, S, D), v_cache (B, Hkv, S, Dv), lengths (B,) ints; positions and the window as
    :func:`kvcache_scores_bias` (causal is ``window_right=0``). Returns (out, lse) as :func:`attention`."""
    mask = kvcache_scores_bias(
        lengths, q.shape[2], k_cache.shape[2], alibi_slopes, q.shape[1], window_left, window_right,
        compute_dtype(q.dtype) if upcast else q.dtype,
    )
    return attention(q, k_cache, v_cache, mask, scale=scale, upcast=upcast)


# ---------------------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm, with the fused dropout + residual of pre-norm blocks.
# ---------------------------------------------------------------------------------------------------------


def norm(
    x: Tensor,
    residual: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    rms: bool = False,
    keep: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    residual_out_dtype: Optional[torch.dtype] = None,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """LayerNorm (or RMSNorm when ``rms``) over the last dim of z = dropout(x) + residual; returns (out, z).

    x, residual: (..., N); weight, bias: (N,); keep: bool (..., N), the elements dropout keeps (scaled by
    1 / (1 - dropout_p)), None for no dropout. Statistics in :func:`compute_dtype` (x's dtype when not
    ``upcast``); out in x's dtype, z in ``residual_out_dtype`` (default residual's dtype, else x's).
    """
    work = compute_dtype(x.dtype) if upcast else x.dtype
    z = x.to(work)
    if keep is not None:
        z = z * keep * (1.0 / (1.0 - dropout_p))
    if residual is not None:
        z = z + residual.to(work)
    z_dtype = residual_out_dtype or (residual.dtype if residual is not None else x.dtype)
    z = z.to(z_dtype).to(work)  # the stored residual is rounded before the norm reads it, as in the kernels
    centred = z if rms else z - z.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = centred * rstd
    if weight is not None:
        out = out * weight.to(work)
    if bias is not None:
        out = out + bias.to(work)
    return out.to(x.dtype), z.to(z_dtype)


def norm_backward(
    grad_out: Tensor,
    grad_residual: Optional[Tensor],
    z: Tensor,
    weight: Optional[Tensor],
    eps: float,
    rms: bool,
    keep: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`norm` from its input z (..., N): (grad_x, grad_z, grad_weight, grad_bias) in the
    compute dtype; grad_x = grad_z * keep / (1 - p), the weight and bias gradients summed over rows."""
    work = compute_dtype(z.dtype)
    zw = z.to(work)
    centred = zw if rms else zw - zw.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps)
    zhat = centred * rstd
    go = grad_out.to(work)
    g = go * weight.to(work) if weight is not None else go
    dz = g - zhat * (g * zhat).mean(dim=-1, keepdim=True)
    if not rms:
        dz = dz - g.mean(dim=-1, keepdim=True)
    dz = dz * rstd
    if grad_residual is not None:
        dz = dz + grad_residual.to(work)
    grad_x = dz if keep is None else dz * keep * (1.0 / (1.0 - dropout_p))
    rows = tuple(range(z.dim() - 1))
    grad_weight = (go * zhat).sum(dim=rows) if weight is not None else None
    return grad_x, dz, grad_weight, go.sum(dim=rows)


# ---------------------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE).
# ---------------------------------------------------------------------------------------------------------


def rotary_inv_freq(rotary_dim: int, base: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(rotary_dim // 2,) frequencies ``base ** (-2i / rotary_dim)``, computed in float64 as
    ``exp2(-(2i / rotary_dim) * log2(base))`` with the C library's exp2 and log2 (the kernels' formula; torch's
    vectorised exp2 can differ from it by an ulp) and rounded to ``dtype``."""
    import math  # noqa: PLC0415 (kept local to this section of the shared module)

    log2_base = math.log2(base)
    values = [math.exp2(-(i / rotary_dim) * log2_base) for i in range(0, rotary_dim, 2)]
    return torch.tensor(values, dtype=torch.float64, device=device).to(dtype)


def rotary_cos_sin_table(
    max_positions: int, rotary_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32, device=None
) -> tuple[Tensor, Tensor]:
    """Cached tables ``cos``, ``sin`` of shape (max_positions, rotary_dim // 2) in ``dtype``: row p holds the
    angles ``p * inv_freq`` computed in ``dtype`` (the values the kernels compute when given no tables)."""
    angles = torch.arange(max_positions, device=device).to(dtype)[:, None] * rotary_inv_freq(
        rotary_dim, base, dtype, device
    )
    return angles.cos(), angles.sin()


def rotary_positions(
    batch: int, seq: int, positions: Optional[Tensor], offsets: Optional[Tensor], offset: int, device
) -> Tensor:
    """The (batch, seq) int64 position of every token: ``positions`` (broadcast to (batch, seq)) if given, else
    ``arange(seq)`` shifted by ``offsets[b]`` ((batch,) or (): per sequence) when given; plus ``offset``."""
    if positions is not None:
        return positions.long().expand(batch, seq) + offset
    pos = torch.arange(seq, device=device).expand(batch, seq)
    return (pos + offsets.long().reshape(-1, 1) if offsets is not None else pos) + offset


def rotary_angles(
    positions: Tensor,
    rotary_dim: int,
    base: float,
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    dtype: torch.dtype,
    plain: bool = False,
) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles of ``positions`` (batch, seq): (batch, seq, rotary_dim // 2) in ``dtype``, computed
    as ``positions * inv_freq`` in ``dtype`` or gathered from the tables (max_positions, rotary_dim // 2).
    ``plain`` computes inv_freq the way models usually do, ``1 / base ** (arange(0, rotary_dim, 2) / rotary_dim)``
    in ``dtype``, instead of :func:`rotary_inv_freq`."""
    if cos is not None:
        return cos.to(dtype)[positions], sin.to(dtype)[positions]
    if plain:
        exponents = torch.arange(0, rotary_dim, 2, dtype=dtype, device=positions.device) / rotary_dim
        inv_freq = 1.0 / (base**exponents)
    else:
        inv_freq = rotary_inv_freq(rotary_dim, base, dtype, positions.device)
    angles = positions.to(dtype)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def rotary_rotate(
    x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool, inverse: bool = False,
    upcast: bool = True,
) -> Tensor:
    """Rotate the first ``rotary_dim`` features of ``x`` (batch, heads, seq, head_dim) by the angles whose cos
    and sin are (batch, seq, rotary_dim // 2); the other features pass through. Pair i is (x[i], x[i + r/2])
    (half-split, GPT-NeoX) or (x[2i], x[2i+1]) (``interleaved``, GPT-J); each becomes
    (x1 cos - x2 sin, x2 cos + x1 sin). ``inverse`` rotates by minus the angles: the transpose, i.e. the
    backward. Computed in :func:`compute_dtype` (in x's dtype with the cos/sin rounded to it when not
    ``upcast``, as a plain PyTorch model does)."""
    work = compute_dtype(x.dtype) if upcast else x.dtype
    c, s = cos[:, None].to(work), sin[:, None].to(work)  # (batch, 1, seq, r/2)
    if inverse:
        s = -s
    rot = x[..., :rotary_dim].to(work)
    half = rotary_dim // 2
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :half], rot[..., half:])
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    rotated = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def rotary(
    q: Tensor,
    k: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
    offsets: Optional[Tensor] = None,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
    offset: int = 0,
    rotary_dim: Optional[int] = None,
    interleaved: bool = False,
    base: float = 10000.0,
    inverse: bool = False,
    upcast: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """RoPE of q (batch, heads_q, seq, head_dim) and k (batch, heads_k, seq, head_dim) or None, the plain eager
    way; returns (q_out, k_out or None). Positions as :func:`rotary_positions`, angles as
    :func:`rotary_angles` (computed in :func:`compute_dtype` of q), rotation as :func:`rotary_rotate`.
    ``upcast=False`` is the tests' baseline, plain PyTorch as models write it: inv_freq as ``1 / base ** (...)``
    and the angles in float32 (float64 for float64), cos/sin and the rotation in q's dtype."""
    if rotary_dim is None:
        rotary_dim = 2 * cos.shape[-1] if cos is not None else q.shape[-1]
    pos = rotary_positions(q.shape[0], q.shape[2], positions, offsets, offset, q.device)
    c, s = rotary_angles(pos, rotary_dim, base, cos, sin, compute_dtype(q.dtype), plain=not upcast)
    out = [None if x is None else rotary_rotate(x, c, s, rotary_dim, interleaved, inverse, upcast) for x in (q, k)]
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------
# Positional encodings: sinusoidal, learned tables, token + position embeddings.
# ---------------------------------------------------------------------------------------------------------


def sinusoidal_frequencies(dim: int, base: float = 10000.0, device: Optional[torch.device] = None) -> Tensor:
    """(dim,) float64: radians per position of each column, ``base ** (-2i / dim)`` for columns 2i and 2i + 1
    (Python's float power, i.e. the C library's pow, as the C++ kernels)."""
    return torch.tensor([base ** (-2 * (c // 2) / dim) for c in range(dim)], dtype=torch.float64, device=device)


def sinusoidal_table(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """The sinusoidal encoding (..., dim) float64 of int positions (...): ``sin(p * f_i)`` in column 2i and
    ``cos(p * f_i)`` in column 2i + 1, f_i = ``base ** (-2i / dim)``; an odd dim ends with a sin column."""
    angle = positions.to(torch.float64)[..., None] * sinusoidal_frequencies(dim, base, positions.device)
    odd = torch.arange(dim, device=positions.device) % 2 == 1
    return torch.where(odd, torch.cos(angle), torch.sin(angle))


def sequence_positions(
    batch: int, seq: int, offset: int = 0, offsets: Optional[Tensor] = None, batch_first: bool = True,
    device: Optional[torch.device] = None,
) -> Tensor:
    """int64 positions ``offset + offsets[b] + s`` as (batch, seq), or (seq, batch) when not ``batch_first``;
    ``offsets``: None or (batch,) ints."""
    device = offsets.device if offsets is not None else device
    pos = offset + torch.arange(seq, device=device, dtype=torch.int64)[None, :].expand(batch, seq)
    if offsets is not None:
        pos = pos + offsets.to(torch.int64)[:, None]
    return pos if batch_first else pos.t()


def positional_add(
    x: Tensor, pe: Optional[Tensor] = None, scale: float = 1.0, keep: Optional[Tensor] = None,
    dropout_p: float = 0.0, upcast: bool = True,
) -> Tensor:
    """``dropout(x * scale + pe)``: x (..., D); pe broadcastable to x (any float dtype) or None (then this is the
    backward of every encoding, with the forward's scale and mask); keep: bool like x, True = kept (scaled by
    1 / (1 - dropout_p)). Computed in :func:`compute_dtype` (x's dtype when not ``upcast``); returns x's dtype."""
    work = compute_dtype(x.dtype) if upcast else x.dtype
    z = x.to(work) * scale
    if pe is not None:
        z = z + pe.to(work)
    if keep is not None:
        z = z * keep.to(work) / (1.0 - dropout_p)
    return z.to(x.dtype)


def sinusoidal_encoding(
    x: Tensor, positions: Tensor, scale: float = 1.0, base: float = 10000.0, keep: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``dropout(x * scale + PE[positions])`` for x (..., D) and int positions of x's leading shape (...), PE of
    :func:`sinusoidal_table` (float64, rounded once to the compute dtype)."""
    return positional_add(x, sinusoidal_table(positions, x.shape[-1], base), scale, keep, dropout_p)


def learned_encoding(
    x: Tensor, table: Tensor, positions: Tensor, scale: float = 1.0, keep: Optional[Tensor] = None,
    dropout_p: float = 0.0, upcast: bool = True,
) -> Tensor:
    """``dropout(x * scale + table[positions])`` for x (..., D), a (P, D) table and int positions (...);
    differentiable in x and table."""
    return positional_add(x, table[positions], scale, keep, dropout_p, upcast)


def embedding_with_positions(
    tokens: Tensor, token_weight: Tensor, position_weight: Tensor, positions: Tensor, token_scale: float = 1.0,
    keep: Optional[Tensor] = None, dropout_p: float = 0.0, padding_idx: Optional[int] = None, upcast: bool = True,
) -> Tensor:
    """``dropout(token_weight[tokens] * token_scale + position_weight[positions])`` (..., D) for int tokens and
    positions (...); gradients as a pair of :class:`torch.nn.Embedding` (the ``padding_idx`` row of token_weight
    gets none). Computed in :func:`compute_dtype` (the weights' dtype when not ``upcast``)."""
    work = compute_dtype(token_weight.dtype) if upcast else token_weight.dtype
    tok = torch.nn.functional.embedding(tokens, token_weight, padding_idx).to(work) * token_scale
    z = tok + torch.nn.functional.embedding(positions, position_weight).to(work)
    if keep is not None:
        z = z * keep.to(work) / (1.0 - dropout_p)
    return z.to(token_weight.dtype)


def embedding_scatter(grad: Tensor, index: Tensor, num_rows: int, scale: float = 1.0, skip_row: int = -1) -> Tensor:
    """The backward of a gather: (num_rows, D) in grad's dtype, row v = scale * the sum of the rows of grad (n, D)
    whose index (n,) is v (summed in :func:`compute_dtype`); row ``skip_row`` (>= 0) is zero."""
    work = compute_dtype(grad.dtype)
    out = torch.zeros(num_rows, grad.shape[-1], dtype=work, device=grad.device)
    out = out.index_add_(0, index, grad.to(work)) * scale
    if skip_row >= 0:
        out[skip_row] = 0
    return out.to(grad.dtype)


# ---------------------------------------------------------------------------------------------------------
# Recurrent cells and layers: LSTM, GRU, tanh/ReLU RNN (torch.nn's semantics) and the LayerNorm-LSTM.
# Kinds: "lstm", "gru", "rnn_tanh", "rnn_relu", "layernorm_lstm"; H = hidden size, P = the size of h (the
# LSTM's proj_size, else H). Each cell takes the step's input projection, computed for all steps at once.
# ---------------------------------------------------------------------------------------------------------

RECURRENT_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "layernorm_lstm": 4}
RECURRENT_PARAMS = (
    "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr",
    "norm_ih_weight", "norm_ih_bias", "norm_hh_weight", "norm_hh_bias", "norm_c_weight", "norm_c_bias",
)  # fmt: skip


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    out = x @ weight.t()
    return out if bias is None else out + bias


def lstm_cell(
    x_proj: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None, w_hr: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """One torch.nn.LSTM step, gates in the order (i, f, g, o); returns (h', c').

    x_proj: (batch, 4H) = x_t W_ih^T + b_ih; h: (batch, P); c: (batch, H); w_hh: (4H, P); b_hh: (4H,) or None;
    w_hr: (P, H) or None. c' = σ(f) c + σ(i) tanh(g); h' = σ(o) tanh(c'), times w_hr^T when given.
    """
    i, f, g, o = (x_proj + _linear(h, w_hh, b_hh)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w_hr is None else h @ w_hr.t()), c


def gru_cell(x_proj: Tensor, h: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None) -> Tensor:
    """One torch.nn.GRU step, gates in the order (r, z, n); returns h'.

    x_proj: (batch, 3H) = x_t W_ih^T + b_ih; h: (batch, H); w_hh: (3H, H); b_hh: (3H,) or None.
    r = σ(x_r + hh_r), z = σ(x_z + hh_z), n = tanh(x_n + r hh_n) with hh = h W_hh^T + b_hh (so b_hn is inside
    r's product); h' = (1 - z) n + z h.
    """
    x_r, x_z, x_n = x_proj.chunk(3, dim=-1)
    h_r, h_z, h_n = _linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def rnn_cell(
    x_proj: Tensor, h: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None, nonlinearity: str = "tanh"
) -> Tensor:
    """One torch.nn.RNN step: h' = act(x_proj + h W_hh^T + b_hh), act = tanh or relu.

    x_proj: (batch, H) = x_t W_ih^T + b_ih; h: (batch, H); w_hh: (H, H); b_hh: (H,) or None."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    z = x_proj + _linear(h, w_hh, b_hh)
    return torch.tanh(z) if nonlinearity == "tanh" else torch.relu(z)


def _maybe_norm(x: Tensor, affine: Optional[tuple[Optional[Tensor], Optional[Tensor]]], eps: float) -> Tensor:
    """LayerNorm of x over its last dim with affine = (weight or None, bias or None); x itself when None."""
    return x if affine is None else norm(x, weight=affine[0], bias=affine[1], eps=eps)[0]


def layer_norm_lstm_cell(
    x_proj: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh: Tensor,
    bias: Optional[Tensor],
    norm_ih: Optional[tuple[Optional[Tensor], Optional[Tensor]]],
    norm_hh: Optional[tuple[Optional[Tensor], Optional[Tensor]]],
    norm_c: Optional[tuple[Optional[Tensor], Optional[Tensor]]],
    w_hr: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """One LayerNorm-LSTM step as in Ba, Kiros & Hinton 2016 ("Layer Normalization", supplementary,
    layer-normalised LSTM), with torch.nn's gate order (i, f, g, o); returns (h', c').

        gates = LN_ih(x_proj) + LN_hh(h W_hh^T) + bias
        c'    = σ(f) c + σ(i) tanh(g)                     (carried un-normalised)
        h'    = σ(o) tanh(LN_c(c')), times w_hr^T when given

    LN_ih and LN_hh normalise all 4H gate pre-activations of a row together (one mean and variance, not one
    per gate); LN_c normalises the H cells; each with ``eps`` and then its affine pair (weight, bias), either
    of which may be None. A norm given as None is skipped: with all three None this is :func:`lstm_cell` with
    b_ih moved into ``bias``.
    x_proj: (batch, 4H) = x_t W_ih^T (no bias: the norm would not commute with it); h: (batch, P);
    c: (batch, H); w_hh: (4H, P); bias: (4H,) (b_ih + b_hh, Ba et al.'s b) or None; norm_ih, norm_hh
    weights and biases (4H,); norm_c's (H,); w_hr: (P, H) or None.
    """
    gates = _maybe_norm(x_proj, norm_ih, eps) + _maybe_norm(h @ w_hh.t(), norm_hh, eps)
    i, f, g, o = (gates if bias is None else gates + bias).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(_maybe_norm(c, norm_c, eps))
    return (h if w_hr is None else h @ w_hr.t()), c


def _recurrent_step(
    kind: str, x_proj: Tensor, h: Tensor, c: Optional[Tensor], w: dict, eps: float
) -> tuple[Tensor, Optional[Tensor]]:
    """One step of any kind: (h', c'), c' None for the GRU and RNNs."""
    if kind == "lstm":
        return lstm_cell(x_proj, h, c, w["weight_hh"], w["bias_hh"], w["weight_hr"])
    if kind == "layernorm_lstm":
        bias = [b for b in (w["bias_ih"], w["bias_hh"]) if b is not None]
        norms = [(w[f"norm_{n}_weight"], w[f"norm_{n}_bias"]) for n in ("ih", "hh", "c")]
        return layer_norm_lstm_cell(x_proj, h, c, w["weight_hh"], sum(bias) if bias else None, *norms,
                                    w_hr=w["weight_hr"], eps=eps)  # fmt: skip
    if kind == "gru":
        return gru_cell(x_proj, h, w["weight_hh"], w["bias_hh"]), None
    return rnn_cell(x_proj, h, w["weight_hh"], w["bias_hh"], kind[len("rnn_") :]), None


def recurrent_layer(
    kind: str,
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    weights: dict,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One direction of one layer over time; returns (output (seq, batch, P), h_n (batch, P), c_n (batch, H) or
    None for the GRU and RNNs).

    kind: a key of RECURRENT_GATES; x: (seq, batch, input); h0: (batch, P); c0: (batch, H) for the LSTMs, else
    None; weights: this layer and direction's parameters by the names of RECURRENT_PARAMS (torch.nn's without
    the ``_l{k}[_reverse]`` suffix; a missing or None entry means none). The input projections of all steps are
    one matmul (bias_ih included, except for layernorm_lstm, which adds it after the norms). ``reverse`` runs
    from the last step. lengths: None or (batch,) ints: sequence b updates its state only at steps
    t < lengths[b] (so a reverse pass starts at its own last step) and outputs zeros elsewhere, as torch.nn on
    a packed sequence, padded back by pad_packed_sequence.
    """
    w = {name: weights.get(name) for name in RECURRENT_PARAMS}
    x_proj = _linear(x, w["weight_ih"], None if kind == "layernorm_lstm" else w["bias_ih"])  # (seq, batch, G*H)
    live = None if lengths is None else torch.as_tensor(lengths, device=x.device)[:, None]  # (batch, 1)
    h, c = h0, c0
    out = [h0] * x.shape[0]
    for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
        h_new, c_new = _recurrent_step(kind, x_proj[t], h, c, w, eps)
        if live is None:
            h, c, out[t] = h_new, c_new, h_new
        else:
            step_live = t < live
            h = torch.where(step_live, h_new, h)
            c = None if c is None else torch.where(step_live, c_new, c)
            out[t] = torch.where(step_live, h_new, 0.0)
    return torch.stack(out), h, c


def recurrent(
    kind: str,
    x: Tensor,
    hx: Optional[Tensor | tuple[Tensor, Tensor]],
    params: dict,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    lengths: Optional[Tensor] = None,
    dropout_mask: Optional[list[Tensor]] = None,
    dropout_p: float = 0.0,
    eps: float = 1e-5,
    layer_fn: Optional[Callable] = None,
    between: Optional[Callable[[Tensor, int], Tensor]] = None,
) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """A stack of recurrent layers as torch.nn.LSTM / GRU / RNN (and the LayerNorm-LSTM); returns
    (output, h_n), or (output, (h_n, c_n)) for the LSTMs, in x's dtype.

    x: (seq, batch, input), or (batch, seq, input) when batch_first; hx: None (zeros), h0, or (h0, c0) for the
    LSTMs with h0: (L*D, batch, P), c0: (L*D, batch, H), L = num_layers, D = 2 if bidirectional, rows ordered
    layer-major then direction. params: torch.nn's names and layouts, e.g. dict(module.named_parameters()):
    ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` (absent: no bias),
    ``weight_hr_l{k}`` (present: the LSTM projection, P = proj_size), ``norm_{ih,hh,c}_{weight,bias}_l{k}``
    (layernorm_lstm), each with ``_reverse`` appended for the backward direction. Layer k > 0 reads layer
    k - 1's output, the directions concatenated (forward first). dropout_mask: None or num_layers - 1 bool
    tensors shaped like output (True = keep, kept values scaled by 1 / (1 - dropout_p)), applied to the output
    of every layer but the last. lengths: see :func:`recurrent_layer`. output: (seq, batch, D*P), batch first
    when batch_first; h_n: (L*D, batch, P); c_n: (L*D, batch, H).

    layer_fn (default :func:`recurrent_layer`) runs one layer and direction, and between(x (seq, batch, D*P),
    layer) replaces dropout_mask: fastattn.ops.recurrent drives its kernels and dropout through this loop.
    """
    if kind not in RECURRENT_GATES:
        raise ValueError(f"kind must be one of {sorted(RECURRENT_GATES)}, got {kind!r}")
    lstm = RECURRENT_GATES[kind] == 4
    layer_fn = layer_fn or recurrent_layer
    x = x.transpose(0, 1) if batch_first else x  # (seq, batch, input)
    dirs = 2 if bidirectional else 1
    h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
    w_hh = params["weight_hh_l0"]  # (G*H, P)
    if h0 is None:
        h0 = x.new_zeros(num_layers * dirs, x.shape[1], w_hh.shape[1])
    if lstm and c0 is None:
        c0 = x.new_zeros(num_layers * dirs, x.shape[1], w_hh.shape[0] // 4)
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for d in range(dirs):
            suffix, k = f"_l{layer}" + ("_reverse" if d else ""), layer * dirs + d
            weights = {name: params.get(name + suffix) for name in RECURRENT_PARAMS}
            out, h, c = layer_fn(kind, x, h0[k], c0[k] if lstm else None, weights, lengths, d == 1, eps)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if dirs == 1 else torch.cat(outputs, dim=-1)  # (seq, batch, D*P)
        if between is not None and layer < num_layers - 1:
            x = between(x, layer)
        elif dropout_mask is not None and layer < num_layers - 1:
            keep = dropout_mask[layer].transpose(0, 1) if batch_first else dropout_mask[layer]
            x = x * keep * (1.0 / (1.0 - dropout_p))
    output = x.transpose(0, 1) if batch_first else x
    return (output, (torch.stack(h_n), torch.stack(c_n))) if lstm else (output, torch.stack(h_n))


# ---------------------------------------------------------------------------------------------------------
# Convolution epilogue: out = maxpool2x2(act(y + bias[c])) on a convolution's output y (N, C, H, W).
# ---------------------------------------------------------------------------------------------------------

CONV_ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
GELU_TANH_CUBIC = 0.044715  # u = sqrt(2 / pi) * (z + 0.044715 z^3) in the tanh approximation of GELU


def conv_activation(z: Tensor, activation: str) -> Tensor:
    """act(z) for a name of CONV_ACTIVATIONS: identity, ReLU, GELU (exact, ``z * Phi(z)``), GELU with the tanh
    approximation (``0.5 z (1 + tanh(u))``), SiLU (``z * sigmoid(z)``)."""
    if activation == "none":
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation in ("gelu", "gelu_tanh"):
        return torch.nn.functional.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")
    if activation == "silu":
        return torch.nn.functional.silu(z)
    raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")


def conv_activation_backward(z: Tensor, grad: Tensor, activation: str) -> Tensor:
    """``grad * act'(z)``, written out (tested against autograd); ReLU gives 0 where z <= 0 and passes grad elsewhere
    (also at NaN), as torch's ReLU backward does."""
    if activation == "none":
        return grad
    if activation == "relu":
        return torch.where(z <= 0, torch.zeros_like(grad), grad)
    if activation == "gelu":
        pdf = torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5
        return grad * (0.5 * (1 + torch.erf(z * 0.5**0.5)) + z * pdf)
    if activation == "gelu_tanh":
        k = (2 / torch.pi) ** 0.5
        t = torch.tanh(k * (z + GELU_TANH_CUBIC * z**3))
        return grad * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * GELU_TANH_CUBIC * z * z))
    if activation == "silu":
        s = torch.sigmoid(z)
        return grad * s * (1 + z * (1 - s))
    raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")


def _conv_bias_add(y: Tensor, bias: Optional[Tensor], upcast: bool) -> Tensor:
    z = y.to(compute_dtype(y.dtype)) if upcast else y
    return z if bias is None else z + bias.to(z.dtype).view(1, -1, 1, 1)


def conv_epilogue(
    y: Tensor, bias: Optional[Tensor] = None, activation: str = "relu", pool: bool = False, upcast: bool = True
) -> Tensor:
    """``maxpool2x2(act(y + bias[c]))`` of y (N, C, H, W); returns y's dtype.

    bias: None or (C,). pool: ``F.max_pool2d(a, 2)``: 2x2 windows, stride 2, output (N, C, H // 2, W // 2), the
    first maximum in window order (or a NaN) wins. Computed in :func:`compute_dtype`, or in y's dtype when not
    ``upcast`` (the unfused torch.nn sequence, the tests' baseline).
    """
    a = conv_activation(_conv_bias_add(y, bias, upcast), activation)
    return (torch.nn.functional.max_pool2d(a, 2) if pool else a).to(y.dtype)


def conv_epilogue_backward(
    grad: Tensor, y: Tensor, bias: Optional[Tensor], activation: str, pool: bool
) -> Tensor:
    """The gradient of :func:`conv_epilogue` with respect to y (and to ``y + bias``), in :func:`compute_dtype`:
    grad (N, C, H', W') times act'(z) at the element each output came from (max_pool2d's indices), 0 elsewhere
    (also where act'(z) is NaN)."""
    z = _conv_bias_add(y, bias, upcast=True)
    g = grad.to(z.dtype)
    if not pool:
        return conv_activation_backward(z, g, activation)
    _, index = torch.nn.functional.max_pool2d(conv_activation(z, activation), 2, return_indices=True)
    picked = torch.zeros(z.shape, dtype=torch.bool, device=z.device).flatten(2).scatter_(2, index.flatten(2), True)
    g = torch.nn.functional.max_unpool2d(g, index, 2, output_size=z.shape[-2:])
    return torch.where(picked.view(z.shape), conv_activation_backward(z, g, activation), 0.0)
