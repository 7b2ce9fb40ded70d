"""Recurrent layers: LSTM, GRU, tanh/ReLU RNN and the LayerNorm-LSTM, one layer and direction at a time.

:func:`recurrent_layer` runs one direction of one layer over time: the input projections of every step are one
matmul, then the torch.library op ``fastattn::recurrent`` runs the steps on a kernel backend, each the recurrent
matmul and one fused pointwise cell kernel (C++ CPU and CUDA: ``csrc/recurrent_driver.h``; Triton:
``fastattn/triton_kernels/recurrent.py``), and its backward runs through time the same way. CPU inference in float32
or float64 runs in one call of fastattn_C's ``recurrent_inference`` instead: a projection matmul per chunk of steps,
then the steps, the LayerNorm-LSTM's cells applying LN_ih too.
:func:`recurrent` stacks layers and directions as torch.nn.LSTM / GRU / RNN do, with dropout between layers.
Semantics, shapes and parameter names are those of :func:`fastattn.reference.recurrent_layer` /
:func:`fastattn.reference.recurrent`; the ``reference`` backend runs those under autograd.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.compiler import is_compiling as compiling

from fastattn import backends, reference
from fastattn.ops._eager import EagerOp
from fastattn.ops.dropout import dropout
from fastattn.ops.linear import CpuLinear, cpu_ops
from fastattn.ops.norm import layer_norm

KINDS = tuple(reference.RECURRENT_GATES)
KIND_IDS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3, "layernorm_lstm": 4}  # the C++ RecurrentKind
LAYERNORM_LSTM = KIND_IDS["layernorm_lstm"]
CELL_NORMS = ("norm_hh_weight", "norm_hh_bias", "norm_c_weight", "norm_c_bias")  # normalised inside the cell
INFERENCE_NORMS = ("norm_ih_weight", "norm_ih_bias", *CELL_NORMS)  # recurrent_inference's cells also apply LN_ih
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Inference on the CPU in float32 or float64 runs in one call of fastattn_C's recurrent_inference (less overhead
# than the op's). When the projection of every step at once would hold 2^23 values or more (32 MiB in float32), it
# runs the steps in chunks of about this many (step, batch) rows, each chunk's projection in one buffer: the
# one-shot projection writes fresh pages (page faults) and runs its GEMM less efficiently there.
INFERENCE_CHUNK_ROWS = 1024
CHUNKED_MIN_VALUES = 1 << 23
INFERENCE_DTYPES = (torch.float32, torch.float64)  # the cell state stays exact between chunks


# ---------------------------------------------------------------------------------------------------------
# Backends: what each accepts (None = yes, else why not).
# ---------------------------------------------------------------------------------------------------------


def _dtype_check(x: Tensor, *_) -> Optional[str]:
    return None if x.dtype in FLOAT_DTYPES else f"dtype {x.dtype} is not one of {FLOAT_DTYPES}"


def _triton_check(x: Tensor, kind: str, projected: bool, hidden: int) -> Optional[str]:
    """On a GPU, unless forced, Triton takes only the layers its persistent kernels run (every step in one launch):
    its per-step loop pays a Python launch per step, where the CUDA C++ loop pays a C++ one."""
    reason = _dtype_check(x)
    if reason is not None or x.device.type != "cuda" or backends.forced() is not None:
        return reason
    from fastattn.triton_kernels import recurrent as kernels  # noqa: PLC0415

    if kernels.persistent(KIND_IDS[kind], hidden, projected):
        return None
    return (f"the persistent Triton kernels take LSTM/GRU/RNN layers up to hidden {kernels.PERSISTENT_MAX_HIDDEN} "
            "without a projection; the per-step loop runs only when the triton backend is forced")  # fmt: skip


CHECKS = {
    "cuda": _dtype_check,
    "triton": _triton_check,
    "cpu": _dtype_check,
    "reference": lambda *_: None,
}


def _kernels(backend: str):
    """(forward, backward) of a kernel backend, both with the fastattn_C recurrent schemas (csrc/fastattn.cpp):
    fastattn.triton_kernels.recurrent for "triton", else fastattn_C (its CPU or CUDA kernels by device), loading
    fastattn._C first (the op may be called before any backend selection)."""
    if backend == "triton":
        from fastattn.triton_kernels import recurrent as kernels  # noqa: PLC0415

        return kernels.recurrent_forward, kernels.recurrent_backward
    module, error = backends.extension()
    if module is None:
        raise backends.BackendError(f"fastattn.recurrent: the C++ extension is unavailable: {error}")
    return torch.ops.fastattn_C.recurrent_forward, torch.ops.fastattn_C.recurrent_backward


# ---------------------------------------------------------------------------------------------------------
# The op: the time loop of one layer and direction, on its input projections.
# ---------------------------------------------------------------------------------------------------------


def _recurrent(
    backend: str,
    kind: int,
    x_proj: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    lengths: Optional[Tensor],
    reverse: bool,
    save: bool,
    norm_hh_weight: Optional[Tensor],
    norm_hh_bias: Optional[Tensor],
    norm_c_weight: Optional[Tensor],
    norm_c_bias: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out (S, B, P), hstate (S + 1, B, P), cstate (S + 1, B, H) or empty, saved activations or empty) on the
    named kernel backend: see the ``recurrent_forward`` schema in csrc/fastattn.cpp (the norms and eps are the
    LayerNorm-LSTM's)."""
    return _kernels(backend)[0](kind, x_proj, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save, norm_hh_weight,
                                norm_hh_bias, norm_c_weight, norm_c_bias, eps)  # fmt: skip


recurrent_op = torch.library.custom_op("fastattn::recurrent", _recurrent, mutates_args=())


def _saved_width(kind: int, hidden: int) -> int:
    """Saved values per row: csrc/recurrent.h's recurrent_saved_width."""
    if kind == LAYERNORM_LSTM:
        return 9 * hidden + 2
    return 4 * hidden if kind in (KIND_IDS["lstm"], KIND_IDS["gru"]) else 0


@recurrent_op.register_fake
def _(backend, kind, x_proj, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save, *_norms_and_eps):
    (seq, batch, width), proj = x_proj.shape, w_hh.shape[1]
    hidden = width // reference.RECURRENT_GATES[KINDS[kind]]
    compute = reference.compute_dtype(x_proj.dtype)
    saved = _saved_width(kind, hidden)
    return (
        x_proj.new_empty(seq, batch, proj),
        x_proj.new_empty(seq + 1, batch, proj),
        x_proj.new_empty((seq + 1, batch, hidden) if c0 is not None else (0,), dtype=compute),
        x_proj.new_empty(seq if save and saved else 0, batch, saved, dtype=compute),
    )


def _recurrent_backward(
    backend: str,
    kind: int,
    grad_out: Tensor,
    grad_h_n: Optional[Tensor],
    grad_c_n: Optional[Tensor],
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    hstate: Tensor,
    cstate: Tensor,
    saved: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    norm_hh_weight: Optional[Tensor],
    norm_hh_bias: Optional[Tensor],
    norm_c_weight: Optional[Tensor],
    norm_c_bias: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d_x_proj, d_h0, d_c0 or empty, d_w_hh, d_b_hh, d_w_hr or empty, d_norms (10H,) or empty): see the
    ``recurrent_backward`` schema."""
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    return _kernels(backend)[1](
        kind, grad_out, grad_h_n, grad_c_n, w_hh, w_hr, hstate.contiguous(), cstate.contiguous(), saved.contiguous(),
        lengths, reverse, norm_hh_weight, norm_hh_bias, norm_c_weight, norm_c_bias,
    )  # fmt: skip


recurrent_backward_op = torch.library.custom_op("fastattn::recurrent_backward", _recurrent_backward, mutates_args=())
run_recurrent_backward = EagerOp(recurrent_backward_op, _recurrent_backward)


@recurrent_backward_op.register_fake
def _(backend, kind, grad_out, grad_h_n, grad_c_n, w_hh, w_hr, hstate, cstate, saved, lengths, reverse, *_norms):
    seq, batch, proj = grad_out.shape
    width = w_hh.shape[0]
    hidden = width // reference.RECURRENT_GATES[KINDS[kind]]
    return (
        grad_out.new_empty(seq, batch, width),
        grad_out.new_empty(batch, proj),
        grad_out.new_empty((batch, hidden) if cstate.numel() else (0,)),
        grad_out.new_empty(width, proj),
        grad_out.new_empty(width),
        grad_out.new_empty((proj, hidden) if w_hr is not None else (0,)),
        grad_out.new_empty(10 * hidden if kind == LAYERNORM_LSTM else 0),
    )


def _setup_context(ctx, inputs, output):
    backend, kind, x_proj, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save, *norms, _eps = inputs
    _, hstate, cstate, saved = output
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)  # no (S + 1, B, P) zeros for an unused h_n or c_n: _backward takes None
    ctx.backend, ctx.kind, ctx.reverse = backend, kind, reverse
    ctx.has_c0, ctx.has_b_hh = c0 is not None, b_hh is not None
    ctx.save_for_backward(w_hh, w_hr, hstate, cstate, saved, lengths, *norms)


def _backward(ctx, grad_out, grad_hstate, grad_cstate, _grad_saved):
    w_hh, w_hr, hstate, cstate, saved, lengths, *norms = ctx.saved_tensors
    end = 0 if ctx.reverse else -1  # h_n and c_n are the states after the last step run
    grad_h_n = None if grad_hstate is None else grad_hstate[end]
    grad_c_n = None if grad_cstate is None or not grad_cstate.numel() else grad_cstate[end]
    if grad_out is None:
        grad_out = hstate.new_zeros(hstate.shape[0] - 1, *hstate.shape[1:])
    d_x, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr, d_norms = run_recurrent_backward(
        ctx.backend, ctx.kind, grad_out, grad_h_n, grad_c_n, w_hh, w_hr, hstate, cstate, saved, lengths, ctx.reverse,
        *norms,
    )
    hidden = w_hh.shape[0] // 4
    d_norm_parts = d_norms.split([4 * hidden, 4 * hidden, hidden, hidden]) if d_norms.numel() else (None,) * 4
    return (
        None, None, d_x, d_h0, d_c0 if ctx.has_c0 else None, d_w_hh, d_b_hh if ctx.has_b_hh else None,
        d_w_hr if w_hr is not None else None, None, None, None,
        *(d if norm is not None else None for d, norm in zip(d_norm_parts, norms, strict=True)), None,
    )  # fmt: skip


recurrent_op.register_autograd(_backward, setup_context=_setup_context)
run_recurrent = EagerOp(recurrent_op, _recurrent, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------------------
# fastattn_C's CPU-only op recurrent_inference, called directly rather than through a fastattn:: op. Its fake kernel,
# registered on first use, lets fake tensors (FakeTensorMode) pass through it.
# ---------------------------------------------------------------------------------------------------------


def _recurrent_inference_fake(kind: int, x: Tensor, w_ih: Tensor, b_ih, h0: Tensor, c0, w_hh: Tensor, *_, **__):
    """(out (S, B, P), h_n (B, P), c_n (B, H) for the LSTMs, else empty (0,))."""
    gates = reference.RECURRENT_GATES[KINDS[kind]]
    cell = x.new_empty(x.shape[1], w_hh.shape[0] // gates) if gates == 4 else x.new_empty(0)
    return x.new_empty(*x.shape[:2], w_hh.shape[1]), x.new_empty(x.shape[1], w_hh.shape[1]), cell


_FAKES_LOCK = threading.Lock()  # two threads' first calls must not both register
_fakes_registered = False


def _cpu_ops():
    """torch.ops.fastattn_C, with the fake kernels of recurrent_inference and (fastattn.ops.linear)
    recurrent_matmul registered on the first call (the extension must load)."""
    global _fakes_registered
    ops = cpu_ops()
    with _FAKES_LOCK:
        if not _fakes_registered:
            torch.library.register_fake("fastattn_C::recurrent_inference", _recurrent_inference_fake)
            _fakes_registered = True
    return ops


# ---------------------------------------------------------------------------------------------------------
# The input projections of every step: one matmul. On the CPU in float32 through fastattn_C's recurrent_matmul (the
# packed AVX-512 step GEMM, else or for large ones on Intel CPUs oneDNN), with fastattn.ops.linear.CpuLinear's
# autograd formula.
# ---------------------------------------------------------------------------------------------------------


def _input_projection(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x (seq, batch, input) -> x w^T + b (seq, batch, G*H)."""
    # Compiled graphs keep F.linear, which Inductor lowers itself.
    cpu_float32 = x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
    if cpu_float32 and not compiling() and backends.extension()[0] is not None:
        return CpuLinear.apply(x, w, b)
    return F.linear(x, w, b)


# ---------------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------------


def unfused_reason(x: Tensor, kind: str, projected: bool, hidden: int) -> Optional[str]:
    """None when a fused kernel would run this layer on x's device (or a backend is forced), else why each fused
    backend cannot: the drop-in modules then run torch.nn's own code (cuDNN, oneDNN) rather than the reference."""
    if backends.forced() is not None:
        return None
    reasons = []
    for name in backends.PRIORITY.get(x.device.type, ()):
        if name == "reference":
            break
        reason = backends.unavailable_reason(name, x.device)
        if reason is None:
            reason = CHECKS[name](x, kind, projected, hidden) if name in CHECKS else f"no {name} recurrent kernel"
        if reason is None:
            return None
        reasons.append(f"{name}: {reason}")
    return "; ".join(reasons) or f"no fused recurrent kernel for {x.device.type} tensors"


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
    """One direction of one layer: x (seq, batch, input) -> (output (seq, batch, P), h_n (batch, P), c_n (batch, H)
    or None). Arguments as :func:`fastattn.reference.recurrent_layer`; differentiable in every tensor.

    lengths (batch,) may be on the CPU or x's device; it is read on x's device."""
    if kind not in KINDS:
        raise ValueError(f"fastattn.recurrent_layer: kind must be one of {sorted(KINDS)}, got {kind!r}")
    w = {key: weights.get(key) for key in reference.RECURRENT_PARAMS}
    hidden = w["weight_hh"].shape[0] // reference.RECURRENT_GATES[kind]
    name = backends.select("recurrent", x.device, CHECKS, x, kind, w["weight_hr"] is not None, hidden)
    if name == "reference" or x.shape[0] == 0:
        return reference.recurrent_layer(kind, x, h0, c0, weights, lengths, reverse, eps)
    if lengths is not None:
        lengths = torch.as_tensor(lengths).to(device=x.device, dtype=torch.long).contiguous()
    norms = tuple(w[key] for key in CELL_NORMS) if kind == "layernorm_lstm" else (None,) * 4
    leaves = (x, h0, c0, *w.values())
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)
    if not save and name == "cpu" and x.dtype in INFERENCE_DTYPES and not compiling():
        large = x.shape[0] * x.shape[1] * w["weight_hh"].shape[0] >= CHUNKED_MIN_VALUES  # the one-shot projection
        steps = max(1, INFERENCE_CHUNK_ROWS // max(1, x.shape[1])) if large else x.shape[0]
        out, h_n, c_n = _cpu_ops().recurrent_inference(
            KIND_IDS[kind], x, w["weight_ih"], w["bias_ih"], h0, c0, w["weight_hh"], w["bias_hh"], w["weight_hr"],
            lengths, reverse, steps, *(w[key] for key in INFERENCE_NORMS), eps,
        )  # fmt: skip
        return out, h_n, None if c0 is None else c_n
    x_proj, b_hh = _project(kind, x, w, eps)
    out, hstate, cstate, _ = run_recurrent(name, KIND_IDS[kind], x_proj, h0, c0, w["weight_hh"], b_hh, w["weight_hr"],
                                           lengths, reverse, save, *norms, eps)  # fmt: skip
    last = 0 if reverse else -1
    return out, hstate[last], None if c0 is None else cstate[last].to(x.dtype)


def _project(kind: str, x: Tensor, w: dict, eps: float) -> tuple[Tensor, Optional[Tensor]]:
    """(x_proj (seq, batch, G*H), the bias the cell adds): every step's input projection at once."""
    if kind != "layernorm_lstm":
        return _input_projection(x, w["weight_ih"], w["bias_ih"]), w["bias_hh"]
    # LN_ih on the projection; both biases join after the norms.
    x_proj = layer_norm(_input_projection(x, w["weight_ih"], None), (w["weight_hh"].shape[0],), w["norm_ih_weight"],
                        w["norm_ih_bias"], eps)  # fmt: skip
    biases = [b for b in (w["bias_ih"], w["bias_hh"]) if b is not None]
    return x_proj, sum(biases) if biases else None


def recurrent(
    kind: str,
    x: Tensor,
    hx: Optional[Tensor | tuple[Tensor, Tensor]],
    params: dict,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    lengths: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """A stack of recurrent layers as torch.nn.LSTM / GRU / RNN: returns (output, h_n), or (output, (h_n, c_n))
    for the LSTMs. Arguments as :func:`fastattn.reference.recurrent`, except that dropout (on the output of every
    layer but the last, when ``training`` and ``dropout_p > 0``) is drawn by :func:`fastattn.dropout`.

    x: (seq, batch, input), or (batch, seq, input) when batch_first; hx: None, h0 (L*D, batch, P) or (h0, c0) with
    c0 (L*D, batch, H); params: torch.nn's parameter names (``weight_ih_l0``, ... ``_reverse``); lengths: None or
    (batch,) valid steps per sequence (padded steps output 0 and leave the state alone).
    """
    if kind not in KINDS:
        raise ValueError(f"fastattn.recurrent: kind must be one of {sorted(KINDS)}, got {kind!r}")
    return reference.recurrent(kind, x, hx, params, num_layers, bidirectional, batch_first, lengths, eps=eps,
                               layer_fn=recurrent_layer, between=lambda out, _: dropout(out, dropout_p, training))


__all__ = ["recurrent", "recurrent_layer", "unfused_reason"]
