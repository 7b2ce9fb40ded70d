"""LayerNorm, RMSNorm and the fused dropout + residual + LayerNorm of pre-norm blocks: fastattn on each backend
against torch eager and torch.compile.

Inputs are (rows, N) with N (the hidden size) swept at a fixed number of elements, plus the issue's headline
shape fp32 8192x1024. Weight and bias are (N,). Modes:

- forward: the op alone;
- forward+backward: the op, then ``torch.autograd.grad`` of its output to x, weight and bias (and the residual).

The fused op's torch baseline is the unfused sequence ``z = F.dropout(x, 0.1) + residual; F.layer_norm(z)``,
returning (out, z) as fastattn.dropout_add_norm does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastattn
from bench import harness
from bench.harness import Case, Provider, Target

DROPOUT_P = 0.1
HEADLINE = ((8192, 1024), torch.float32)


@dataclass(frozen=True)
class NormOp:
    """One benchmarked op: the torch and fastattn functions (same signature) of (x, residual, weight, bias),
    and the (rows, N) tensors each mode reads and writes."""

    torch_fn: Callable
    fastattn_fn: Callable
    passes: dict[str, int]
    residual: bool = False
    bias: bool = True


def _torch_dropout_add_layer_norm(x, residual, weight, bias):
    z = F.dropout(x, DROPOUT_P) + residual
    return F.layer_norm(z, z.shape[-1:], weight, bias), z


def _fastattn_dropout_add_layer_norm(x, residual, weight, bias):
    return fastattn.dropout_add_norm(x, residual, x.shape[-1], weight, bias, dropout_p=DROPOUT_P)


OPS = {
    # forward: read x, write out; backward: read grad, x, write dx.
    "layer_norm": NormOp(
        lambda x, r, w, b: F.layer_norm(x, x.shape[-1:], w, b),
        lambda x, r, w, b: fastattn.layer_norm(x, x.shape[-1:], w, b),
        {"forward": 2, "forward+backward": 5},
    ),
    "rms_norm": NormOp(
        lambda x, r, w, b: F.rms_norm(x, x.shape[-1:], w),
        lambda x, r, w, b: fastattn.rms_norm(x, x.shape[-1:], w),
        {"forward": 2, "forward+backward": 5},
        bias=False,
    ),
    # forward: read x, residual, write out, z; backward: read grad, z, write dx, dresidual.
    "dropout_add_layer_norm": NormOp(
        _torch_dropout_add_layer_norm,
        _fastattn_dropout_add_layer_norm,
        {"forward": 4, "forward+backward": 8},
        residual=True,
    ),
}

NOTES = (
    "Bytes moved per call (s = element size, weights not counted): layer_norm and rms_norm forward = read x + "
    "write out = 2·rows·N·s, forward+backward = 5·rows·N·s (backward reads grad and x, writes dx); "
    "dropout_add_layer_norm forward = read x, residual + write out, z = 4·rows·N·s, forward+backward = 8·rows·N·s. "
    f"dropout_add_layer_norm's torch baseline is F.dropout(x, {DROPOUT_P}) + residual, then F.layer_norm. "
    "forward+backward runs torch.autograd.grad of the output to x, weight and bias (and the residual)."
)


@dataclass(frozen=True)
class Sweep:
    n_values: tuple[int, ...]
    elements: int
    dtypes: tuple[torch.dtype, ...]
    headline: bool


SWEEPS = {
    ("cpu", False): Sweep((256, 1024, 4096, 16384), 2**23, (torch.float32,), headline=True),
    ("cpu", True): Sweep((256, 2048), 2**20, (torch.float32,), headline=False),
    ("cuda", False): Sweep((256, 512, 1024, 2048, 4096, 8192, 16384), 2**26, (torch.bfloat16, torch.float32), True),
    ("cuda", True): Sweep((1024, 4096), 2**24, (torch.bfloat16,), headline=False),
}


def points(device: torch.device, quick: bool) -> list[tuple[tuple[int, int], torch.dtype]]:
    sweep = SWEEPS[(device.type, quick)]
    found = [((sweep.elements // n, n), dtype) for dtype in sweep.dtypes for n in sweep.n_values]
    if sweep.headline and HEADLINE not in found:
        found.append(HEADLINE)
    return found


def call(op: NormOp, mode: str, fn: Callable, inputs: tuple) -> Callable[[], object]:
    """A zero-argument callable running ``fn`` on ``inputs`` (forward) or it and its backward."""
    if mode == "forward":
        return lambda: fn(*inputs)
    leaves = [t for t in inputs if t is not None]

    def forward_backward():
        outputs = fn(*inputs)
        first = outputs[0] if isinstance(outputs, tuple) else outputs
        return torch.autograd.grad(first, leaves, torch.ones_like(first))

    return forward_backward


def providers(op: NormOp, mode: str, shape, dtype, device) -> Iterator[Provider]:
    """torch eager, torch.compile, then fastattn on each backend of the device, on the same inputs."""
    grad = mode != "forward"
    rows, n = shape
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=grad)
    residual = torch.randn(shape, dtype=dtype, device=device, requires_grad=grad) if op.residual else None
    weight = torch.randn(n, dtype=dtype, device=device, requires_grad=grad)
    bias = torch.randn(n, dtype=dtype, device=device, requires_grad=grad) if op.bias else None
    inputs = (x, residual, weight, bias)
    yield Provider("torch", call(op, mode, op.torch_fn, inputs))
    yield Provider("torch.compile", call(op, mode, harness.compiled(op.torch_fn), inputs))
    yield from harness.fastattn_providers(device, call(op, mode, op.fastattn_fn, inputs))


def _targets(op_name: str) -> tuple[Target, ...]:
    """The issue's goals: CPU fp32 8192x1024 (LayerNorm >= 1.0x, RMSNorm >= 2x, fused >= 1.3x torch); GPU: >= 1.0x
    torch and torch.compile at every hidden size, >= 90% of the copy bandwidth from hidden 1024."""
    cpu_speedup = {"layer_norm": 1.0, "rms_norm": 2.0, "dropout_add_layer_norm": 1.3}[op_name]
    return (
        Target(
            device_type="cpu",
            modes=("forward", "forward+backward"),
            providers=("fastattn-cpu",),
            scope="fp32 8192x1024",
            covers=lambda row: row["shape"] == "8192x1024" and row["dtype"] == "float32",
            min_speedup={"torch": cpu_speedup},
        ),
        Target(
            device_type="cuda",
            modes=("forward", "forward+backward"),
            providers=("fastattn-triton", "fastattn-cuda"),
            scope="hidden 256-16384",
            covers=lambda row: True,
            min_speedup={"torch": 1.0, "torch.compile": 1.0},
        ),
        Target(
            device_type="cuda",
            modes=("forward",),
            providers=("fastattn-triton", "fastattn-cuda"),
            scope="hidden >= 1024",
            covers=lambda row: int(row["shape"].split("x")[1]) >= 1024,
            min_speedup={},
            min_copy_fraction=0.9,
        ),
    )


def _register(op_name: str) -> None:
    op = OPS[op_name]

    def cases(device: torch.device, quick: bool) -> Iterator[Case]:
        for mode in op.passes:
            for shape, dtype in points(device, quick):
                rows, n = shape
                yield Case(
                    op=op_name, mode=mode, shape=shape, dtype=dtype, x_label="N", x_value=n,
                    providers=functools.partial(providers, op, mode, shape, dtype, device),
                    bytes=op.passes[mode] * rows * n * dtype.itemsize,
                )  # fmt: skip

    harness.register(op_name, targets=_targets(op_name), notes=NOTES)(cases)


for _name in OPS:
    _register(_name)
