"""KV-cache decoding: fastattn.attention_with_kvcache (n new queries against caches of per-sequence lengths)
against torch SDPA over the whole cache with a mask built from the lengths, and torch.compile of that.

Decoding reads the whole valid part of the caches once per step, so it is memory-bound: GB/s counts the K and
V bytes of the valid keys (plus q and out), and on a GPU the target is a fraction of the copy bandwidth.
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

NOTES = (
    "Causal decoding, every sequence holding `S` keys. GB/s counts the K and V bytes of the valid keys plus q "
    "and out. `torch` is `F.scaled_dot_product_attention` over the whole cache (GQA through `enable_gqa`) "
    "with a bool mask built from the lengths; `torch.compile` compiles that call."
)


@dataclass(frozen=True)
class Point:
    batch: int
    heads: int
    kv_heads: int
    n_queries: int
    seq: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.batch, self.heads, self.kv_heads, self.n_queries, self.seq, self.head_dim

    @property
    def bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        cache = 2 * self.batch * self.kv_heads * self.seq * self.head_dim
        queries = 2 * self.batch * self.heads * self.n_queries * self.head_dim
        return (cache + queries) * itemsize


def points(device: torch.device, quick: bool) -> list[Point]:
    if device.type == "cpu":
        if quick:
            return [Point(2, 4, 2, 1, 256, 64, torch.float32)]
        return [Point(4, 32, 8, 1, 4096, 128, torch.float32), Point(4, 32, 8, 4, 4096, 128, torch.float32)]
    if quick:
        return [Point(8, 32, 8, 1, 8192, 128, torch.bfloat16)]
    return [
        Point(batch, 32, kv_heads, n, seq, 128, torch.bfloat16)
        for batch, seq in ((1, 65536), (8, 8192), (32, 2048))
        for kv_heads in (8, 32)
        for n in (1, 4)
    ]


def inputs(point: Point, device: torch.device):
    make = functools.partial(torch.randn, device=device, dtype=point.dtype)
    q = make(point.batch, point.heads, point.n_queries, point.head_dim)
    k_cache, v_cache = (make(point.batch, point.kv_heads, point.seq, point.head_dim) for _ in range(2))
    lengths = torch.full((point.batch,), point.seq, device=device, dtype=torch.int32)
    return q, k_cache, v_cache, lengths


def sdpa_decoding(q, k_cache, v_cache, lengths):
    """SDPA as a PyTorch user decodes with ragged caches: a bool mask of valid, causal keys per sequence."""
    n, seq = q.shape[2], k_cache.shape[2]
    keys = torch.arange(seq, device=q.device)
    positions = lengths.long()[:, None] - n + torch.arange(n, device=q.device)
    mask = (keys <= positions[:, :, None])[:, None]  # (B, 1, n, S)
    gqa = q.shape[1] != k_cache.shape[1]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=gqa)


def fastattn_decoding(q, k_cache, v_cache, lengths):
    return fastattn.attention_with_kvcache(q, k_cache, v_cache, lengths)


def providers(point: Point, device: torch.device) -> Iterator[Provider]:
    args = inputs(point, device)
    yield Provider("torch", functools.partial(sdpa_decoding, *args))
    yield Provider("torch.compile", functools.partial(harness.compiled(sdpa_decoding), *args))
    yield from harness.fastattn_providers(device, functools.partial(fastattn_decoding, *args))


TARGETS = (  # issue 3: decoding bandwidth-bound, >= 70% of the copy bandwidth on the KV cache
    Target(
        device_type="cuda",
        modes=("forward",),
        providers=("fastattn-triton",),
        scope="bf16 decoding, head dim 128",
        covers=lambda row: True,
        min_speedup={"torch": 1.0},
        min_copy_fraction=0.7,
    ),
)


@harness.register("kvcache", targets=TARGETS, notes=NOTES)
def cases(device: torch.device, quick: bool) -> Iterator[Case]:
    for point in points(device, quick):
        yield Case(
            op="kvcache",
            mode="forward",
            shape=point.shape,
            dtype=point.dtype,
            x_label="S",
            x_value=point.seq,
            providers=functools.partial(providers, point, device),
            bytes=point.bytes,
        )
