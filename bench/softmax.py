"""Softmax: fastattn.softmax on each backend against torch.softmax, eager and torch.compile.

Inputs are (rows, N) with N swept at a fixed number of elements, plus the issue's headline shape fp32
8192x1024. Modes:

- forward: ``y = softmax(x)``.
- backward: the backward kernel alone, ``dx = y * (grad - sum(grad * y))``: torch's
  ``aten._softmax_backward_data`` against ``fastattn::softmax_backward``.
- forward+backward: ``y = softmax(x)`` then ``torch.autograd.grad(y, x, grad)`` (no ``.grad`` accumulation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import fastattn
from bench import harness
from bench.harness import Case, Provider, Target

# Tensors of (rows, N) read or written per call; bytes = passes * rows * N * element size:
#   forward: read x + write y; backward: read grad + read y + write dx; forward+backward: both.
PASSES = {"forward": 2, "backward": 3, "forward+backward": 5}

NOTES = (
    "Bytes moved per call (s = element size): forward = read x + write y = 2·rows·N·s; "
    "backward = read grad + read y + write dx = 3·rows·N·s; forward+backward = 5·rows·N·s. "
    "The backward mode times the backward kernel alone (`aten._softmax_backward_data` vs "
    "`fastattn::softmax_backward`); forward+backward runs `torch.autograd.grad(softmax(x), x, grad)`."
)

HEADLINE = ((8192, 1024), torch.float32)


@dataclass(frozen=True)
class Sweep:
    """N values swept at a fixed number of elements (rows = elements // N), in each dtype."""

    n_values: tuple[int, ...]
    elements: int
    dtypes: tuple[torch.dtype, ...]
    headline: bool  # also run HEADLINE when the sweep does not contain it


SWEEPS = {
    # 2**23 fp32 elements = 32 MiB per tensor, more than the CPU's cache; contains the headline shape.
    ("cpu", False): Sweep((128, 512, 1024, 2048, 4096, 8192), 2**23, (torch.float32,), headline=True),
    ("cpu", True): Sweep((256, 2048), 2**20, (torch.float32,), headline=False),
    # 2**26 elements = 128 MiB per 16-bit tensor, well past the GPU's L2 cache.
    ("cuda", False): Sweep((128, 512, 1024, 2048, 4096, 8192), 2**26, (torch.bfloat16, torch.float16), headline=True),
    ("cuda", True): Sweep((1024, 4096), 2**24, (torch.bfloat16,), headline=False),
}


def points(device: torch.device, quick: bool) -> list[tuple[tuple[int, int], torch.dtype]]:
    """The (shape, dtype) pairs to run on ``device``."""
    sweep = SWEEPS[(device.type, quick)]
    found = [((sweep.elements // n, n), dtype) for dtype in sweep.dtypes for n in sweep.n_values]
    if sweep.headline and HEADLINE not in found:
        found.append(HEADLINE)
    return found


# ---------------------------------------------------------------------------------------------------------
# What each mode runs.
# ---------------------------------------------------------------------------------------------------------


def torch_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def torch_softmax_backward(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._softmax_backward_data(grad, y, -1, y.dtype)


def fastattn_softmax_backward(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastattn.softmax_backward(grad, y, 1.0, False)


def forward_inputs(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (x,)


def backward_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn_like(x), torch.softmax(x, dim=-1)  # (grad, y), both (rows, N)


def forward_backward_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.requires_grad_(), torch.randn_like(x)  # (x, grad), both (rows, N)


@dataclass(frozen=True)
class Mode:
    """A mode's torch and fastattn functions (same signature), its inputs, and whether to differentiate."""

    torch_fn: Callable
    fastattn_fn: Callable
    inputs: Callable[[torch.Tensor], tuple]
    differentiate: bool = False  # run fn(x), then the backward to x with a fixed grad


MODES = {
    "forward": Mode(torch_softmax, fastattn.softmax, forward_inputs),
    "backward": Mode(torch_softmax_backward, fastattn_softmax_backward, backward_inputs),
    "forward+backward": Mode(torch_softmax, fastattn.softmax, forward_backward_inputs, differentiate=True),
}


def call(mode: Mode, fn: Callable, inputs: tuple) -> Callable[[], object]:
    """A zero-argument callable running ``fn`` on ``inputs`` as ``mode`` says."""
    if mode.differentiate:
        x, grad = inputs
        return lambda: torch.autograd.grad(fn(x), x, grad)
    return lambda: fn(*inputs)


def providers(mode: Mode, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Iterator[Provider]:
    """torch eager, torch.compile, then fastattn on each backend of the device, on the same inputs."""
    inputs = mode.inputs(torch.randn(shape, dtype=dtype, device=device))
    yield Provider("torch", call(mode, mode.torch_fn, inputs))
    yield Provider("torch.compile", call(mode, harness.compiled(mode.torch_fn), inputs))
    yield from harness.fastattn_providers(device, call(mode, mode.fastattn_fn, inputs))


# ---------------------------------------------------------------------------------------------------------
# The targets and the registration.
# ---------------------------------------------------------------------------------------------------------

TARGETS = (
    Target(
        device_type="cpu",
        modes=("forward", "backward"),
        providers=("fastattn-cpu",),
        scope="fp32 8192x1024",
        covers=lambda row: row["shape"] == "8192x1024" and row["dtype"] == "float32",
        min_speedup={"torch": 1.0},
    ),
    Target(
        device_type="cuda",
        modes=("forward", "backward"),
        providers=("fastattn-triton", "fastattn-cuda"),
        scope="rows >= 1024",
        covers=lambda row: int(row["shape"].split("x")[0]) >= 1024,
        min_speedup={"torch": 1.0, "torch.compile": 1.0},
        min_copy_fraction=0.9,
    ),
)


@harness.register("softmax", targets=TARGETS, notes=NOTES)
def cases(device: torch.device, quick: bool) -> Iterator[Case]:
    """Every mode at every (shape, dtype) point of the device's sweep."""
    for mode_name, mode in MODES.items():
        for shape, dtype in points(device, quick):
            rows, n = shape
            yield Case(
                op="softmax",
                mode=mode_name,
                shape=shape,
                dtype=dtype,
                x_label="N",
                x_value=n,
                providers=functools.partial(providers, mode, shape, dtype, device),
                bytes=PASSES[mode_name] * rows * n * dtype.itemsize,
            )
