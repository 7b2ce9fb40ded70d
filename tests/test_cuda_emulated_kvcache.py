"""The CUDA split-KV decoding kernel (csrc/cuda/kvcache_kernel.cu) emulated on the CPU, against the float64
reference (fastattn.reference.attention_kvcache) with the error-ratio rule, on a machine without a GPU.

How: as tests/test_cuda_emulated.py (its docstring says what the emulator shows and what it does not): gen.py
rewrites the unmodified .cu (its swap table for kvcache_kernel.cu), g++ builds it with
tests/cuda_emulator/shim_kvcache.cpp (a C ABI over kvcache_plan and kvcache_forward_cuda) into a library of its
own, and each launcher call runs in a forked child on guarded copies of the tensors. The emulated device's
multiprocessor count and opt-in shared memory are set per call, which reaches planned split counts of 1 and
several, forced split sizes down to 1 key, the single-stage fallback and the refusal when even that does not fit.

Poison: the caches' rows past each sequence's length, the rows' padding (row_pad) and the scratch of the splits'
partials start as NaN, as do the outputs; a kernel that reads a key it must not, or leaves an output unwritten,
shows NaN. The reference sees the same caches without the poison.

What passing shows, besides what the attention kernels' test shows of the emulator: the split and merge kernels'
indexing (GQA / MQA rows of a group in one block, 1, 2 and 4 warps over rows, several row blocks), lengths 0, 1,
S and in between, queries that see no key (out 0, lse -inf), causal and two-sided windows, right-only windows,
ALiBi (per batch and broadcast), (B, S, H, D) caches, rows not 16-byte aligned (element loads), and the launcher's
plan. FASTATTN_EMULATED_KVCACHE_KERNEL=path/kvcache_kernel.cu tests another kernel source instead (mutate.py).
"""

from __future__ import annotations

import ctypes
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cuda_emulator import harness  # tests/cuda_emulator/harness.py (conftest.py puts tests/ on sys.path)
from fastattn import reference
from fastattn.testing import assert_error_ratio


H100_SMEM, H100_SMS, CUDA_ERRORS = harness.H100_SMEM, harness.H100_SMS, harness.CUDA_ERRORS
call_in_child, guarded, output, int64s = harness.call_in_child, harness.guarded, harness.output, harness.int64s
KERNEL = Path(
    os.environ.get("FASTATTN_EMULATED_KVCACHE_KERNEL") or harness.CSRC / "cuda" / "kvcache_kernel.cu"
).resolve()
NAN = float("nan")

if harness.SKIPPED:
    pytestmark = pytest.mark.skip(reason=harness.SKIP_REASON)


# ---------------------------------------------------------------------------------------------------------
# Building and calling the emulated kernel.
# ---------------------------------------------------------------------------------------------------------


def load(library: Path) -> ctypes.CDLL:
    """The library, with the argument types of tests/cuda_emulator/shim_kvcache.cpp's C ABI."""
    lib = ctypes.CDLL(str(library))
    p, i32, i64, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    i64s = ctypes.POINTER(ctypes.c_int64)
    lib.emu_kvcache_args_size.restype = ctypes.c_size_t
    lib.emu_kvcache_args.restype = None
    lib.emu_kvcache_args.argtypes = [p, i32, i64s, p, p, p, i64s, p, i64, p, i64s, f64, i64, i64, i64]
    lib.emu_kvcache_plan.argtypes = [p, p, i32, i32]
    lib.emu_kvcache_forward.argtypes = [p, p, p, p, p, i32, i32, i32]
    return lib


@pytest.fixture(scope="session")
def lib(request) -> ctypes.CDLL:
    """The emulator library, built once per source hash in the pytest cache (or a temporary directory)."""
    shim = harness.EMULATOR / "shim_kvcache.cpp"
    return load(harness.build(harness.cache_directory(request), KERNEL, shim))


class Kvcache:
    """kvcache_plan and kvcache_forward_cuda of one problem on the emulator, taking what fastattn_C::kvcache_forward
    takes (alibi slopes expanded to (B, Hq) float32) and split_size (0: planned). The kernel sees guarded copies of
    every tensor, with the caches' rows from each length on, and any row padding, NaN."""

    DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

    def __init__(self, lib, q, k, v, lengths, alibi, scale, window_left, window_right, split_size):
        self.lib = lib
        self.q, self.k, self.v = (guarded(t, fill=NAN) for t in (q, k, v))
        for b, length in enumerate(lengths.tolist()):
            self.k[b, :, length:] = NAN
            self.v[b, :, length:] = NAN
        self.lengths, self.alibi = guarded(lengths), None if alibi is None else guarded(alibi)
        pointer, strides = harness.pointer, harness.strides
        self.args = ctypes.create_string_buffer(lib.emu_kvcache_args_size())
        lib.emu_kvcache_args(
            self.args, self.DTYPES[q.dtype],
            int64s([q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]]),
            pointer(self.q), pointer(self.k), pointer(self.v),
            int64s(strides(self.q, 3) + strides(self.k, 3) + strides(self.v, 3)),
            pointer(self.lengths), self.lengths.stride(0), pointer(self.alibi), int64s(strides(self.alibi, 2)),
            scale, window_left, window_right, split_size,
        )  # fmt: skip

    def plan(self, sms=H100_SMS, smem_limit=H100_SMEM) -> tuple[int, list[int]]:
        """(cudaError_t, [splits, split_size, scratch_bytes]) of kvcache_plan."""
        plan = guarded(torch.zeros(3, dtype=torch.int64))  # written by the child
        code = call_in_child(self.lib.emu_kvcache_plan, self.args, plan.data_ptr(), sms, smem_limit)
        return code, plan.tolist()

    def forward(self, plan, sms=H100_SMS, smem_limit=H100_SMEM, schedule=0) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(cudaError_t, out, lse) of kvcache_forward_cuda with ``plan`` and a NaN scratch of its size."""
        out = output((*self.q.shape[:3], self.v.shape[3]), self.q.dtype)
        lse = output(self.q.shape[:3], torch.float32)
        scratch = output((plan[2] // 4,), torch.float32) if plan[2] else None
        code = call_in_child(
            self.lib.emu_kvcache_forward, self.args, int64s(plan), harness.pointer(scratch), out.data_ptr(),
            lse.data_ptr(), sms, smem_limit, schedule,
        )  # fmt: skip
        return code, out, lse


# ---------------------------------------------------------------------------------------------------------
# The cases: every dtype x head dim bucket (and odd dims) x n, then the features one at a time with odd sizes.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    batch: int = 2
    heads: int = 2
    kv_heads: int = 1
    n: int = 1  # queries per sequence
    seq_k: int = 100  # the caches' capacity S
    head_dim: int = 64
    head_dim_v: int = 0  # 0: head_dim
    lengths: tuple[int, ...] = ()  # per batch, repeated over the batch; empty: S for every sequence
    lengths_stride: int = 1
    window: tuple[int, int] = (-1, -1)  # (left, right) of each query's position, -1 unbounded; causal is (-1, 0)
    alibi: str = "none"  # none | full (B, Hq) | broadcast (Hq,) expanded over the batch (stride 0)
    layout: str = "bhsd"  # or bshd: q and the caches are (B, S, H, D) tensors viewed as (B, H, S, D)
    row_pad: int = 0  # elements after each row of q, k, v; odd: rows not 16-byte aligned (element loads)
    split_size: int = 0  # keys per split; 0: planned for `sms` multiprocessors
    sms: int = H100_SMS
    smem_limit: int = H100_SMEM  # below the double-buffered tiles, the launcher single-buffers them
    splits: int = 0  # the split count the plan must give (0: not checked)


FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
GRID = [
    Case(f"{str(dtype).removeprefix('torch.')}-d{d}{f'-dv{dv}' if dv != d else ''}-n{n}-gqa4-lengths-S-0-1-77",
         dtype, batch=4, heads=4, n=n, seq_k=150, head_dim=d, head_dim_v=dv, lengths=(150, 0, 1, 77), split_size=64,
         splits=3)
    for dtype in (FP16, BF16, FP32)
    for d, dv in ((40, 40), (64, 64), (72, 24), (128, 128), (256, 256))
    for n in (1, 3, 16)
]  # fmt: skip
CASES = GRID + [
    Case("fp16-d128-n1-mha3-causal-planned-1-split", FP16, heads=3, kv_heads=3, seq_k=200, head_dim=128,
         lengths=(200, 131), window=(-1, 0), splits=1),
    Case("bf16-d128-n4-gqa8-32-rows-causal-split-50", BF16, heads=16, kv_heads=2, n=4, seq_k=130, head_dim=128,
         lengths=(130, 65), window=(-1, 0), split_size=50, splits=3),
    Case("fp16-d64-n8-gqa8-64-rows-window-40-3-split-37", FP16, heads=8, n=8, seq_k=170, lengths=(170, 100),
         window=(40, 3), split_size=37, splits=5),
    Case("fp32-d64-n16-gqa8-128-rows-2-row-blocks-causal", FP32, batch=1, heads=8, n=16, seq_k=90, window=(-1, 0),
         split_size=40, splits=3),
    Case("fp16-d256-n5-mqa7-35-rows-alibi", FP16, batch=1, heads=7, n=5, seq_k=100, head_dim=256, alibi="full",
         split_size=64, splits=2),
    Case("fp32-d256-dv200-n2-mqa12-alibi-broadcast", FP32, heads=12, n=2, seq_k=80, head_dim=256, head_dim_v=200,
         lengths=(80, 3), alibi="broadcast", split_size=32, splits=3),
    Case("bf16-d128-n1-gqa4-alibi-causal-left-window-planned", BF16, heads=8, kv_heads=2, seq_k=300, head_dim=128,
         lengths=(300, 257), alibi="full", window=(100, 0), sms=8, splits=2),
    Case("fp16-d64-n3-window-left-0-right-1", FP16, n=3, seq_k=70, lengths=(70, 2), window=(0, 1), split_size=16,
         splits=5),
    Case("fp16-d64-n3-right-window-only-sees-future", FP16, n=3, seq_k=70, lengths=(60, 2), window=(-1, 5),
         split_size=16, splits=5),
    Case("bf16-d96-n2-gqa2-bshd-strided-lengths", BF16, heads=4, kv_heads=2, n=2, seq_k=140, head_dim=96,
         lengths=(140, 99), lengths_stride=3, layout="bshd", split_size=48, splits=3),
    Case("fp16-d72-dv24-n3-bshd-unaligned-rows", FP16, n=3, seq_k=90, head_dim=72, head_dim_v=24, lengths=(90, 45),
         layout="bshd", row_pad=1, split_size=33, splits=3),
    Case("fp32-d40-n1-unaligned-rows", FP32, seq_k=90, head_dim=40, row_pad=3, split_size=20, splits=5),
    Case("fp16-d128-n1-mha8-planned-3-splits-16-sms", FP16, batch=1, heads=8, kv_heads=8, seq_k=600, head_dim=128,
         lengths=(555,), sms=16, splits=3),
    Case("bf16-d64-n1-mha4-planned-1-split-4-sms", BF16, batch=3, heads=4, kv_heads=4, seq_k=260,
         lengths=(260, 1, 200), sms=4, splits=1),
    Case("fp16-d64-n1-split-size-1", FP16, seq_k=20, lengths=(20, 7), split_size=1, splits=20),
    Case("fp32-d64-n1-capacity-0", FP32, batch=1, seq_k=0, splits=1),
    Case("fp16-d128-n4-lengths-below-n-causal", FP16, n=4, seq_k=50, lengths=(2, 0), window=(-1, 0), split_size=16,
         splits=4),
    Case("fp16-d1-n2", FP16, n=2, seq_k=40, head_dim=1, lengths=(40, 13), split_size=16, splits=3),
    Case("fp32-d136-dv96-n3-single-stage-90k", FP32, n=3, seq_k=100, head_dim=136, head_dim_v=96, split_size=40,
         smem_limit=90 * 1024, splits=3),
    Case("bf16-d256-n1-gqa4-single-stage-110k", BF16, heads=4, seq_k=150, head_dim=256, split_size=64,
         smem_limit=110 * 1024, splits=3),
]  # fmt: skip


def make_problem(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q (B, Hq, n, D), k_cache (B, Hkv, S, D), v_cache (B, Hkv, S, Dv), lengths (B,) int64, alibi slopes."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    batch, dv = case.batch, case.head_dim_v or case.head_dim

    def rows(heads, seq, dim):  # (B, H, S, dim), strided as the case says
        shape = (batch, heads, seq, dim + case.row_pad)
        if case.layout == "bshd":
            return torch.randn(shape[0], seq, heads, shape[3], generator=g).to(case.dtype)[..., :dim].transpose(1, 2)
        return torch.randn(shape, generator=g).to(case.dtype)[..., :dim]

    q = rows(case.heads, case.n, case.head_dim)
    k, v = rows(case.kv_heads, case.seq_k, case.head_dim), rows(case.kv_heads, case.seq_k, dv)
    lengths = [case.lengths[b % len(case.lengths)] if case.lengths else case.seq_k for b in range(batch)]
    lengths = torch.tensor(lengths, dtype=torch.int64).repeat_interleave(case.lengths_stride)[:: case.lengths_stride]
    alibi = None
    if case.alibi == "full":
        alibi = torch.rand(batch, case.heads, generator=g) * 0.3 + 0.01
    elif case.alibi == "broadcast":
        alibi = (torch.rand(case.heads, generator=g) * 0.3 + 0.01).expand(batch, case.heads)
    return q, k, v, lengths, alibi


@pytest.mark.parametrize("schedule", [0, 1], ids=["in-order", "reversed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward(lib, case, schedule):
    """out and lse against the float64 reference, with PyTorch in the case's dtype as the baseline of the
    error-ratio rule, after checking the plan's split count, under each of the emulator's two schedules."""
    q, k, v, lengths, alibi = make_problem(case)
    scale, (left, right) = 1.3 * max(case.head_dim, 1) ** -0.5, case.window
    run = Kvcache(lib, q, k, v, lengths, alibi, scale, left, right, case.split_size)

    code, plan = run.plan(case.sms, case.smem_limit)
    assert code == 0, f"kvcache_plan returned {CUDA_ERRORS.get(code, code)}"
    assert case.splits in (0, plan[0]), f"planned {plan[0]} splits of {plan[1]} keys, expected {case.splits}"
    code, out, lse = run.forward(plan, case.sms, case.smem_limit, schedule)
    assert code == 0, f"kvcache_forward_cuda returned {CUDA_ERRORS.get(code, code)}"

    kw = dict(scale=scale, window_left=left, window_right=right)
    slopes = None if alibi is None else alibi.double()
    truth_out, truth_lse = reference.attention_kvcache(q.double(), k.double(), v.double(), lengths, slopes, **kw)
    base_out, base_lse = reference.attention_kvcache(q, k, v, lengths, alibi, **kw, upcast=False)
    assert_error_ratio(out, truth_out, base_out)
    assert_error_ratio(lse, truth_lse, base_lse, name="lse")


def test_launcher_refusals(lib):
    """kvcache_plan refuses head dims above 256 (cudaErrorInvalidValue); kvcache_forward_cuda refuses a kernel whose
    single-stage tiles still need more shared memory than the device has (float32, head dim 256, 16 rows: 83 KiB
    of an 80 KiB device) with cudaErrorNotSupported, writing nothing."""
    q = torch.randn(1, 1, 1, 257)
    code, _ = Kvcache(lib, q, q, q, torch.tensor([1]), None, 1.0, -1, -1, 0).plan()
    assert code == 1, f"head dim 257: kvcache_plan returned {CUDA_ERRORS.get(code, code)}"

    q = torch.randn(1, 1, 1, 256)
    run = Kvcache(lib, q, q, q, torch.tensor([1]), None, 1.0, -1, -1, 0)
    code, plan = run.plan(smem_limit=80 * 1024)
    assert code == 0, f"kvcache_plan returned {CUDA_ERRORS.get(code, code)}"
    code, out, lse = run.forward(plan, smem_limit=80 * 1024)
    assert code == 801, f"float32 head dim 256 at 80 KiB: {CUDA_ERRORS.get(code, code)}"
    assert out.isnan().all() and lse.isnan().all(), "a refused launch wrote its outputs"
