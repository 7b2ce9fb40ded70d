"""The convolution epilogue: fastattn.conv_epilogue on each backend against the unfused torch sequence
``F.max_pool2d(act(y + bias[:, None, None]), 2)`` (pool optional), eager and torch.compile.

Inputs are a convolution's output y (N, C, H, W), NCHW or channels_last, and a bias (C,), at the sizes of the seed
CNNs' convolutions (batch 64, 32x32 images) and a larger ResNet-like stage. One op benchmark per variant:

- ``conv_epilogue-relu-pool``: bias + ReLU + 2x2 max pool, NCHW (the seed CNN's blocks);
- ``conv_epilogue-relu-pool-nhwc``: the same on channels_last;
- ``conv_epilogue-gelu``: bias + exact GELU, NCHW, no pool;
- ``conv_epilogue-silu-nhwc``: bias + SiLU, channels_last, no pool.

Modes: forward, and forward+backward (``torch.autograd.grad(out, (y, bias), grad)``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastattn
from bench import harness
from bench.harness import Case, Provider

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}

NOTES = (
    "Bytes moved per call (s = element size; y: N·C·H·W, out: N·C·H'·W', H' = H / 2 with the pool): forward = read y "
    "+ write out; forward+backward = forward + read grad, read y, write grad_y (the fused backward recomputes from "
    "y; torch's unfused backward moves more). The torch baseline is `F.max_pool2d(act(y + bias[:, None, None]), 2)` "
    "(without the pool: `act(y + bias[:, None, None])`), in the input's layout."
)


@dataclass(frozen=True)
class Variant:
    activation: str
    pool: bool
    channels_last: bool


VARIANTS = {
    "conv_epilogue-relu-pool": Variant("relu", True, False),
    "conv_epilogue-relu-pool-nhwc": Variant("relu", True, True),
    "conv_epilogue-gelu": Variant("gelu", False, False),
    "conv_epilogue-silu-nhwc": Variant("silu", False, True),
}

# (N, C, H, W) per device and quick; dtypes.
SHAPES = {
    ("cpu", False): ((64, 32, 32, 32), (64, 64, 16, 16), (32, 64, 56, 56)),
    ("cpu", True): ((16, 32, 32, 32), (16, 64, 16, 16)),
    ("cuda", False): ((256, 32, 32, 32), (256, 64, 56, 56), (256, 128, 28, 28)),
    ("cuda", True): ((64, 64, 56, 56),),
}
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float32)}
MODES = ("forward", "forward+backward")


def torch_epilogue(variant: Variant, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    a = ACTIVATIONS[variant.activation](y + bias[:, None, None])
    return F.max_pool2d(a, 2) if variant.pool else a


def fastattn_epilogue(variant: Variant, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return fastattn.conv_epilogue(y, bias, variant.activation, variant.pool)


def call(mode: str, fn, y: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor):
    if mode == "forward":
        return lambda: fn(y, bias)
    return lambda: torch.autograd.grad(fn(y, bias), (y, bias), grad)


def providers(variant: Variant, mode: str, shape, dtype, device) -> Iterator[Provider]:
    """torch eager, torch.compile, then fastattn on each backend of the device, on the same inputs."""
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    y = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
    bias = torch.randn(shape[1], dtype=dtype, device=device)
    if mode != "forward":
        y.requires_grad_()
        bias.requires_grad_()
    n, c, h, w = shape
    out_shape = (n, c, h // 2, w // 2) if variant.pool else shape
    grad = torch.randn(out_shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
    eager = functools.partial(torch_epilogue, variant)
    yield Provider("torch", call(mode, eager, y, bias, grad))
    yield Provider("torch.compile", call(mode, harness.compiled(eager), y, bias, grad))
    yield from harness.fastattn_providers(device, call(mode, functools.partial(fastattn_epilogue, variant), y, bias,
                                                       grad))  # fmt: skip


def moved_bytes(variant: Variant, mode: str, shape, dtype) -> int:
    y = shape[0] * shape[1] * shape[2] * shape[3]
    out = y // 4 if variant.pool else y
    elements = y + out if mode == "forward" else (y + out) + (out + 2 * y)
    return elements * dtype.itemsize


def _register(name: str, variant: Variant) -> None:
    def cases(device: torch.device, quick: bool) -> Iterator[Case]:
        for mode in MODES:
            for dtype in DTYPES[device.type]:
                for shape in SHAPES[(device.type, quick)]:
                    yield Case(
                        op=name, mode=mode, shape=shape, dtype=dtype, x_label="H", x_value=shape[2],
                        providers=functools.partial(providers, variant, mode, shape, dtype, device),
                        bytes=moved_bytes(variant, mode, shape, dtype),
                    )  # fmt: skip

    harness.register(name, notes=NOTES)(cases)


for _name, _variant in VARIANTS.items():
    _register(_name, _variant)
