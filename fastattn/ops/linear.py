"""``fastattn.linear``: ``F.linear`` with the large float32 CPU products on fastattn_C's packed AVX-512 GEMM.

The Transformer modules' projections and feed-forward layers multiply thousands of rows by weights of a few hundred
to a few thousand columns. On CPUs with AVX-512 other than Intel's (whose two 512-bit FMA units oneDNN's blocked
GEMM keeps busier), fastattn_C's ``recurrent_matmul``, the recurrent layers' packed kernel (``csrc/cpu/step_gemm.h``:
the weight packed into 32-column panels on each call, 8 x 32 of the output in registers over K), runs them 5-30%
faster than ATen's addmm (MKL) on one or two threads (2-core AMD EPYC Zen 4, from 512 rows; from 16k rows 1.3-1.5x).
Every other call runs ``F.linear``: fewer rows, narrow outputs, other dtypes or devices, torch.compile (Inductor
lowers linears itself), tensor subclasses, dispatch modes and functorch transforms. :func:`fastattn.record` lists
the kernel's calls (op ``linear``, backend ``cpu``); the ``fastattn`` logger says at DEBUG why a call ran F.linear.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import backends
from fastattn.ops._eager import plain_eager

MIN_ROWS = 512  # fewer rows: MKL's small-matrix path is about as fast (0.9-1.1x)
MIN_OUT_FEATURES = 32  # one whole weight panel (16 columns ran at 0.6-0.8x)
MIN_IN_FEATURES = 32


# ---------------------------------------------------------------------------------------------------------
# fastattn_C's recurrent_matmul (a @ b + bias), with its fake kernel registered on first use.
# ---------------------------------------------------------------------------------------------------------


def _matmul_fake(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[1])


_FAKE_LOCK = threading.Lock()  # two threads' first calls must not both register
_fake_registered = False


def cpu_ops():
    """torch.ops.fastattn_C, with recurrent_matmul's fake kernel registered on the first call (the extension must
    load), so that fake tensors (FakeTensorMode) pass through it."""
    global _fake_registered
    with _FAKE_LOCK:
        if not _fake_registered:
            module, reason = backends.extension()
            if module is None:
                raise RuntimeError(reason)
            torch.library.register_fake("fastattn_C::recurrent_matmul", _matmul_fake)
            _fake_registered = True
    return torch.ops.fastattn_C


class CpuLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` on fastattn_C's recurrent_matmul (CPU float32; the kernel, oneDNN or ATen's mm as
    csrc/cpu/recurrent.cpp decides), with the gradient of x on it too. Under ``create_graph`` the backward runs
    torch's differentiable mm instead, so that gradients of gradients exist."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        out = cpu_ops().recurrent_matmul(x.reshape(-1, x.shape[-1]), w.t(), b)
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_2d.mm(w) if torch.is_grad_enabled() else cpu_ops().recurrent_matmul(grad_2d, w, None)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


# ---------------------------------------------------------------------------------------------------------
# When the kernel runs.
# ---------------------------------------------------------------------------------------------------------

_availability: dict[Optional[str], bool] = {}


def kernel_available() -> bool:
    """The extension loads and its packed GEMM takes large products on this CPU (AVX-512F and not Intel, or
    FASTATTN_CPU_STEP_GEMM=1; =0 turns it off): ``python -m fastattn.info`` says which."""
    setting = os.environ.get("FASTATTN_CPU_STEP_GEMM")  # read each call, as the extension does
    if setting not in _availability:
        module = backends.extension()[0]
        info = module.build_info() if module is not None else {}
        _availability[setting] = bool(info.get("cpu_step_gemm") and info.get("cpu_step_gemm_large"))
    return _availability[setting]


def _refusal(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[str]:
    """Why this call runs ``F.linear`` (None: it runs the kernel); the cheap shape checks come first, as most
    small calls stop there."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)) or weight.dim() != 2 or x.dim() == 0:
        return "not a (..., K) input and (N, K) weight"
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        return "shapes do not match: F.linear says how"
    if x.numel() < MIN_ROWS * in_features or out_features < MIN_OUT_FEATURES or in_features < MIN_IN_FEATURES:
        return f"the kernel takes {MIN_ROWS}+ rows, {MIN_OUT_FEATURES}+ outputs and {MIN_IN_FEATURES}+ inputs"
    if not (x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32):
        return "the kernel runs float32 CPU tensors"
    if bias is not None and not (isinstance(bias, Tensor) and bias.shape == (out_features,) and bias.is_cpu
                                 and bias.dtype == torch.float32):  # fmt: skip
        return "the kernel takes a float32 CPU bias of shape (N,)"
    if not plain_eager((x, weight, bias)) or torch._C._are_functorch_transforms_active():
        return "traced, subclassed or transformed calls run F.linear"
    if not kernel_available():
        return "no packed GEMM for large products on this CPU (python -m fastattn.info)"
    return None


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) or None -> (..., N), with gradients.

    CPU float32 products of at least MIN_ROWS rows, MIN_OUT_FEATURES outputs and MIN_IN_FEATURES inputs run on the
    packed AVX-512 GEMM where the CPU takes it (see the module docstring), recorded by :func:`fastattn.record`;
    everything else, and every error, is ``F.linear``'s (logged at DEBUG with the reason). Results agree with
    F.linear's to float32 rounding (the kernel sums K in blocks of 128).
    """
    if torch.compiler.is_compiling():  # Inductor lowers F.linear itself; nothing to log from a graph
        return F.linear(x, weight, bias)
    reason = _refusal(x, weight, bias)
    if reason is None:
        backends.report_run("linear", "cpu")
        return CpuLinear.apply(x, weight, bias)
    if backends.logger.isEnabledFor(logging.DEBUG):
        backends.logger.debug("linear ran F.linear: %s", reason)
    return F.linear(x, weight, bias)


def module_linear(module: torch.nn.Module, x: Tensor, fn=linear) -> Tensor:
    """``module(x)``, through ``fn(x, module.weight, module.bias)`` (:func:`linear` by default) when ``module`` runs
    ``nn.Linear``'s own forward and has no forward hooks; otherwise its own forward (overrides and hooks still run)."""
    plain = isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward
    if plain and not (module._forward_hooks or module._forward_pre_hooks):
        return fn(x, module.weight, module.bias)
    return module(x)


__all__ = ["linear", "module_linear"]
