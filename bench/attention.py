"""Attention: fastattn.attention on each backend against torch SDPA (its default choice of backend), the
math path written out in PyTorch, and torch.compile of SDPA.

Inputs are (batch, heads, seq, head_dim) q, k, v. Modes:

- forward: ``out = attention(q, k, v)``.
- forward+backward: ``torch.autograd.grad(attention(q, k, v), (q, k, v), grad)``.

Work: 4·B·H·Sq·Sk·D floating-point operations forward (two matmuls), halved when causal; the backward
costs 2.5x the forward, so forward+backward counts 3.5x.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastattn
from bench import harness
from bench.harness import Case, Provider, Target

WORK = {"forward": 1.0, "forward+backward": 3.5}

NOTES = (
    "FLOPs per call: 4·B·H·S²·D forward (halved when causal); forward+backward 3.5x that. `torch` is "
    "`F.scaled_dot_product_attention` with its default backend choice; `torch-math` is "
    "`softmax(q kᵀ · scale + mask) v` in PyTorch ops; `torch.compile` compiles the SDPA call. On GPU the "
    "tables also give each call's peak memory."
)


@dataclass(frozen=True)
class Point:
    batch: int
    heads: int
    seq: int
    head_dim: int
    dtype: torch.dtype
    causal: bool = False
    float_mask: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.heads, self.seq, self.head_dim

    def flops(self, mode: str) -> int:
        forward = 4 * self.batch * self.heads * self.seq * self.seq * self.head_dim // (2 if self.causal else 1)
        return int(forward * WORK[mode])


VARIANTS = ("plain", "causal", "floatmask")  # registered as attention, attention-causal, attention-floatmask


def points(device: torch.device, quick: bool, variant: str) -> list[Point]:
    flags = dict(causal=variant == "causal", float_mask=variant == "floatmask")
    if device.type == "cpu":
        if quick:
            return [Point(1, 2, 128, 64, torch.float32, **flags)] if variant != "floatmask" else []
        return [Point(4, 8, 512, 64, torch.float32, **flags)]  # the CPU target shape
    if quick:
        return [Point(4, 16, 4096, 128, torch.bfloat16, **flags)] if variant == "plain" else []
    seqs = (4096,) if variant == "floatmask" else (512, 1024, 2048, 4096, 8192, 16384)
    # 16k tokens per batch and a model width of 2048, as FlashAttention's benchmarks
    return [
        Point(16384 // seq, 2048 // head_dim, seq, head_dim, torch.bfloat16, **flags)
        for head_dim in (64, 128)
        for seq in seqs
    ]


def inputs(point: Point, device: torch.device, grad: bool):
    q, k, v = (torch.randn(point.shape, device=device, dtype=point.dtype, requires_grad=grad) for _ in range(3))
    mask = torch.randn(point.seq, point.seq, device=device, dtype=point.dtype) if point.float_mask else None
    return q, k, v, mask


def math_attention(q, k, v, mask, causal):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    if causal:
        hidden = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def sdpa(q, k, v, mask, causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def fastattn_attention(q, k, v, mask, causal):
    return fastattn.attention(q, k, v, attn_mask=mask, causal=causal)


def call(fn, q, k, v, mask, causal, mode):
    if mode == "forward":
        return lambda: fn(q, k, v, mask, causal)
    grad = torch.randn_like(q[..., : v.shape[-1]])
    return lambda: torch.autograd.grad(fn(q, k, v, mask, causal), (q, k, v), grad)


def providers(point: Point, mode: str, device: torch.device) -> Iterator[Provider]:
    q, k, v, mask = inputs(point, device, grad=mode != "forward")
    run = functools.partial(call, q=q, k=k, v=v, mask=mask, causal=point.causal, mode=mode)
    yield Provider("torch", run(sdpa))
    yield Provider("torch-math", run(math_attention))
    yield Provider("torch.compile", run(harness.compiled(sdpa)))
    yield from harness.fastattn_providers(device, run(fastattn_attention))


TARGETS = (  # issue 3: forward >= 1x SDPA and >= 3x the math path; forward+backward >= 1x SDPA
    Target(
        device_type="cpu",
        modes=("forward",),
        providers=("fastattn-cpu",),
        scope="fp32 B4 H8 S512 D64",
        covers=lambda row: row["shape"] == "4x8x512x64",
        min_speedup={"torch": 1.0, "torch-math": 3.0},
    ),
    Target(
        device_type="cpu",
        modes=("forward+backward",),
        providers=("fastattn-cpu",),
        scope="fp32 B4 H8 S512 D64",
        covers=lambda row: row["shape"] == "4x8x512x64",
        min_speedup={"torch": 1.0},
    ),
)


def register(variant: str) -> None:
    name = "attention" if variant == "plain" else f"attention-{variant}"

    def cases(device: torch.device, quick: bool) -> Iterator[Case]:
        for mode in WORK:
            for point in points(device, quick, variant):
                yield Case(
                    op=name,
                    mode=mode,
                    shape=point.shape,
                    dtype=point.dtype,
                    x_label="S",
                    x_value=point.seq,
                    providers=functools.partial(providers, point, mode, device),
                    flops=point.flops(mode),
                )

    harness.register(name, targets=TARGETS if variant == "plain" else (), notes=NOTES)(cases)


for _variant in VARIANTS:
    register(_variant)
