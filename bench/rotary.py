"""Rotary position embeddings: fastattn.apply_rotary (q and k in one launch, angles computed in the kernel) against
the eager reference RoPE as models write it and torch.compile of that.

The eager reference is the Llama / GPT-NeoX chain ``q * cos + rotate_half(q) * sin`` (and the same for k), with
``rotate_half(x) = cat(-x2, x1)`` and cos/sin tables of shape (seq, head_dim) built once outside the timed call (as
a model builds them once per forward for all its layers). Modes:

- forward: rotate q and k.
- forward+backward: rotate q and k, then ``torch.autograd.grad`` of both outputs to q and k with fixed gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import fastattn
from bench import harness
from bench.harness import Case, Provider, Target

NOTES = (
    "Shape label: batch x heads x kv_heads x seq x head_dim; q is (batch, heads, seq, head_dim) and k "
    "(batch, kv_heads, seq, head_dim), rotated over the whole head_dim (half-split layout), positions 0 .. seq-1. "
    "Bytes per call (s = element size, E = elements of q plus k): forward = read q, k + write both = 2·E·s; "
    "forward+backward = 4·E·s (the backward reads the two gradients and writes two). `torch` is the eager "
    "`q * cos + rotate_half(q) * sin` chain with (seq, head_dim) cos/sin tables built outside the timed call; "
    "`torch.compile` compiles that function. fastattn computes the angles in the kernel."
)


@dataclass(frozen=True)
class Point:
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.batch, self.heads, self.kv_heads, self.seq, self.head_dim

    @property
    def elements(self) -> int:
        return self.batch * (self.heads + self.kv_heads) * self.seq * self.head_dim


HEADLINE = Point(4, 32, 8, 2048, 128, torch.float32)

POINTS = {
    ("cpu", False): [HEADLINE, Point(1, 32, 8, 8192, 128, torch.float32), Point(64, 32, 8, 1, 128, torch.float32)],
    ("cpu", True): [Point(1, 8, 2, 512, 128, torch.float32)],
    ("cuda", False): [
        Point(batch, 32, 8, seq, 128, dtype)
        for dtype in (torch.bfloat16, torch.float16)
        for batch, seq in ((4, 4096), (1, 32768), (64, 1))
    ],
    ("cuda", True): [Point(4, 32, 8, 4096, 128, torch.bfloat16)],
}

PASSES = {"forward": 2, "forward+backward": 4}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The eager reference: cos, sin (seq, head_dim) in q's dtype."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def fastattn_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return fastattn.apply_rotary(q, k)


def tables(point: Point, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, point.head_dim, 2, device=device).float() / point.head_dim))
    freqs = torch.arange(point.seq, device=device).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(point.dtype), emb.sin().to(point.dtype)


def call(mode: str, fn, q, k, cos, sin, grads) -> Callable[[], object]:
    if mode == "forward":
        return lambda: fn(q, k, cos, sin)
    return lambda: torch.autograd.grad(fn(q, k, cos, sin), (q, k), grads)


def providers(mode: str, point: Point, device: torch.device) -> Iterator[Provider]:
    """torch eager, torch.compile, then fastattn on each backend of the device, on the same inputs."""
    differentiate = mode == "forward+backward"
    q = torch.randn(point.batch, point.heads, point.seq, point.head_dim, device=device, dtype=point.dtype)
    k = torch.randn(point.batch, point.kv_heads, point.seq, point.head_dim, device=device, dtype=point.dtype)
    q.requires_grad_(differentiate)
    k.requires_grad_(differentiate)
    grads = (torch.randn_like(q), torch.randn_like(k)) if differentiate else None
    cos, sin = tables(point, device)
    yield Provider("torch", call(mode, eager_rope, q, k, cos, sin, grads))
    yield Provider("torch.compile", call(mode, harness.compiled(eager_rope), q, k, cos, sin, grads))
    yield from harness.fastattn_providers(device, call(mode, fastattn_rope, q, k, cos, sin, grads))


TARGETS = (
    Target(
        device_type="cpu",
        modes=("forward", "forward+backward"),
        providers=("fastattn-cpu",),
        scope="fp32 q 4x32x2048x128, k 4x8x2048x128",
        covers=lambda row: row["shape"] == harness.shape_label(HEADLINE.shape) and row["dtype"] == "float32",
        min_speedup={"torch": 3.0},
    ),
    Target(
        device_type="cuda",
        modes=("forward", "forward+backward"),
        providers=("fastattn-triton", "fastattn-cuda"),
        scope="every shape",
        covers=lambda row: True,
        min_speedup={"torch.compile": 1.0},
    ),
)


@harness.register("rotary", targets=TARGETS, notes=NOTES)
def cases(device: torch.device, quick: bool) -> Iterator[Case]:
    for mode in ("forward", "forward+backward"):
        for point in POINTS[(device.type, quick)]:
            yield Case(
                op="rotary",
                mode=mode,
                shape=point.shape,
                dtype=point.dtype,
                x_label="seq",
                x_value=point.seq,
                providers=functools.partial(providers, mode, point, device),
                bytes=PASSES[mode] * point.elements * point.dtype.itemsize,
            )
