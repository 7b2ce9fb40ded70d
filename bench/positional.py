"""Positional encodings: fastattn's fused kernels on each backend against the plain PyTorch way, eager and
torch.compile.

Inputs are (batch, seq, d) with d swept at a fixed number of elements. Modes (the variant is part of the mode):

- ``sinusoidal forward``: eval, ``x + pe[:seq]`` with the PyTorch tutorial's precomputed table (a buffer) against
  :func:`fastattn.sinusoidal_positional_encoding` computing the sinusoid in the kernel.
- ``sinusoidal+dropout forward`` / ``forward+backward``: training, ``dropout(x * sqrt(d) + pe[:seq], 0.1)``.
- ``learned forward+backward``: ``x + weight[:seq]`` (a learned table) with gradients to x and the table.
- ``embedding+dropout forward`` / ``forward+backward``: GPT-2's input layer, ``dropout(wte[tokens] + wpe[:seq],
  0.1)`` with a 32000-token vocabulary, gradients to both tables, against :func:`fastattn.embedding_with_positions`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import fastattn
from bench import harness
from bench.harness import Case, Provider

DROPOUT = 0.1
VOCAB = 32000

NOTES = (
    "Bytes moved per call (s = element size, N = batch·seq·d): sinusoidal and learned forward = read x + write "
    "out = 2·N·s (the tutorial's table and the learned table, seq·d, stay in cache and are not counted); "
    "forward+backward adds read grad + write dx = 4·N·s, and for the learned table + write its gradient "
    "(seq·d·s). Embedding forward = read the token rows + write out = 2·N·s; forward+backward adds read grad + "
    "write the dense gradients of both tables ((vocab + seq)·d·s). Dropout p = 0.1 in training mode; torch draws "
    "its mask with its own generator, fastattn with Philox inside the kernel (one pass). The sinusoidal kernels "
    "compute sin/cos per element (per tile on the CPU, shared across the batch)."
)


@dataclass(frozen=True)
class Sweep:
    """d values swept at a fixed number of elements, batch 8 (seq = elements // (8 d)), in each dtype."""

    d_values: tuple[int, ...]
    elements: int
    dtypes: tuple[torch.dtype, ...]


SWEEPS = {
    # 2**23 fp32 elements = 32 MiB per tensor, more than the CPU's cache.
    ("cpu", False): Sweep((256, 1024, 4096), 2**23, (torch.float32,)),
    ("cpu", True): Sweep((512,), 2**20, (torch.float32,)),
    # 2**26 elements = 128 MiB per 16-bit tensor, well past the GPU's L2 cache.
    ("cuda", False): Sweep((256, 1024, 4096), 2**26, (torch.bfloat16, torch.float32)),
    ("cuda", True): Sweep((1024,), 2**24, (torch.bfloat16,)),
}
BATCH = 8


def points(device: torch.device, quick: bool) -> list[tuple[tuple[int, int, int], torch.dtype]]:
    sweep = SWEEPS[(device.type, quick)]
    return [((BATCH, sweep.elements // (BATCH * d), d), dtype) for dtype in sweep.dtypes for d in sweep.d_values]


# ---------------------------------------------------------------------------------------------------------
# The workloads: inputs, the torch way and the fastattn way (same signature), what to differentiate.
# ---------------------------------------------------------------------------------------------------------


def tutorial_table(seq: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The PyTorch tutorial's sinusoid table (seq, d), built once as its module does."""
    position = torch.arange(seq, device=device).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d, 2, device=device) * (-math.log(10000.0) / d))
    pe = torch.zeros(seq, d, device=device)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.to(dtype)


@dataclass(frozen=True)
class Workload:
    """A mode: ``inputs(shape, dtype, device)`` -> (args, differentiated args, grad or None); ``torch_fn`` and
    ``fastattn_fn`` take the args; ``passes(shape)``: bytes per call in units of element size."""

    torch_fn: Callable
    fastattn_fn: Callable
    inputs: Callable
    passes: Callable[[tuple[int, int, int]], int]
    differentiate: bool = False


def sinusoidal_inputs(shape, dtype, device, grad=False):
    batch, seq, d = shape
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=grad)
    args = (x, tutorial_table(seq, d, dtype, device))
    return args, (x,), torch.randn(shape, dtype=dtype, device=device) if grad else None


def learned_inputs(shape, dtype, device, grad=False):
    batch, seq, d = shape
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=grad)
    weight = torch.randn(seq, d, dtype=dtype, device=device, requires_grad=grad)
    return (x, weight), (x, weight), torch.randn(shape, dtype=dtype, device=device) if grad else None


def embedding_inputs(shape, dtype, device, grad=False):
    batch, seq, d = shape
    tokens = torch.randint(0, VOCAB, (batch, seq), device=device)
    wte = torch.randn(VOCAB, d, dtype=dtype, device=device, requires_grad=grad)
    wpe = torch.randn(seq, d, dtype=dtype, device=device, requires_grad=grad)
    return (tokens, wte, wpe), (wte, wpe), torch.randn(shape, dtype=dtype, device=device) if grad else None


def torch_sinusoidal(x, pe):
    return x + pe


def fastattn_sinusoidal(x, pe):
    return fastattn.sinusoidal_positional_encoding(x)


def torch_sinusoidal_dropout(x, pe):
    return torch.nn.functional.dropout(x * math.sqrt(x.shape[-1]) + pe, DROPOUT, training=True)


def fastattn_sinusoidal_dropout(x, pe):
    return fastattn.sinusoidal_positional_encoding(x, scale=math.sqrt(x.shape[-1]), dropout_p=DROPOUT)


def torch_learned(x, weight):
    return x + weight[: x.shape[1]]


def fastattn_learned(x, weight):
    return fastattn.learned_positional_encoding(x, weight)


def torch_embedding(tokens, wte, wpe):
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return torch.nn.functional.dropout(wte[tokens] + wpe[positions], DROPOUT, training=True)


def fastattn_embedding(tokens, wte, wpe):
    return fastattn.embedding_with_positions(tokens, wte, wpe, dropout_p=DROPOUT)


def _n(shape) -> int:
    return math.prod(shape)


MODES = {
    "sinusoidal forward": Workload(torch_sinusoidal, fastattn_sinusoidal, sinusoidal_inputs, lambda s: 2 * _n(s)),
    "sinusoidal+dropout forward": Workload(
        torch_sinusoidal_dropout, fastattn_sinusoidal_dropout, sinusoidal_inputs, lambda s: 2 * _n(s)
    ),
    "sinusoidal+dropout forward+backward": Workload(
        torch_sinusoidal_dropout, fastattn_sinusoidal_dropout, sinusoidal_inputs, lambda s: 4 * _n(s), True
    ),
    "learned forward+backward": Workload(
        torch_learned, fastattn_learned, learned_inputs, lambda s: 4 * _n(s) + s[1] * s[2], True
    ),
    "embedding+dropout forward": Workload(torch_embedding, fastattn_embedding, embedding_inputs, lambda s: 2 * _n(s)),
    "embedding+dropout forward+backward": Workload(
        torch_embedding, fastattn_embedding, embedding_inputs, lambda s: 3 * _n(s) + (VOCAB + s[1]) * s[2], True
    ),
}


def call(workload: Workload, fn: Callable, args: tuple, wrt: tuple, grad) -> Callable[[], object]:
    """A zero-argument callable running ``fn(*args)`` (and the backward to ``wrt`` when differentiating)."""
    if workload.differentiate:
        return lambda: torch.autograd.grad(fn(*args), wrt, grad)
    return lambda: fn(*args)


def providers(workload: Workload, shape, dtype, device) -> Iterator[Provider]:
    """torch eager, torch.compile, then fastattn on each backend of the device, on the same inputs."""
    args, wrt, grad = workload.inputs(shape, dtype, device, grad=workload.differentiate)
    yield Provider("torch", call(workload, workload.torch_fn, args, wrt, grad))
    yield Provider("torch.compile", call(workload, harness.compiled(workload.torch_fn), args, wrt, grad))
    yield from harness.fastattn_providers(device, call(workload, workload.fastattn_fn, args, wrt, grad))


@harness.register("positional", notes=NOTES)
def cases(device: torch.device, quick: bool) -> Iterator[Case]:
    """Every mode at every (shape, dtype) point of the device's sweep."""
    for mode_name, workload in MODES.items():
        for shape, dtype in points(device, quick):
            yield Case(
                op="positional",
                mode=mode_name,
                shape=shape,
                dtype=dtype,
                x_label="d",
                x_value=shape[2],
                providers=functools.partial(providers, workload, shape, dtype, device),
                bytes=workload.passes(shape) * dtype.itemsize,
            )
