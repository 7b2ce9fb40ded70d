"""The CUDA attention kernels (csrc/cuda/attention_kernel.cu) emulated on the CPU, against the float64 reference
with the error-ratio rule, on a machine without a GPU.

How: tests/cuda_emulator/gen.py rewrites the unmodified .cu for g++, swapping only its inline-PTX wrappers
(cp.async, ldmatrix, mma.sync m16n8k16, ex2.approx) and its kernel launch for the emulations in
tests/cuda_emulator/emu.h: every CUDA thread is a fiber, __syncthreads and every warp collective a barrier;
shuffles, ldmatrix and mma move data as the PTX ISA's fragment layouts say; shared memory starts as NaN and ends
at an inaccessible page. g++ builds that with tests/cuda_emulator/shim.cpp (a C ABI over the launchers) into a
shared library, cached in the pytest cache under a hash of its sources. The tests call it through ctypes on
copies of CPU tensors that end at an inaccessible page too, each call in a forked child, so that a crash, a
deadlock or a hang fails one test with the emulator's report of the block and thread.

What passing shows: the kernels' indexing, tiling and bounds (no access outside a tensor or shared memory),
the fragment layouts their register code assumes, masking (bool, same-dtype and float32 masks, broadcast masks,
key padding, windows, both causal alignments), ALiBi, the online softmax, GQA, dropout bit for bit, strided and
unaligned layouts, the launcher's choices (head dim buckets, single-buffered tiles when shared memory is short)
and that the barriers and cp.async waits suffice, under two fixed schedules of the threads (emu.h, Schedule:
in order with copies landing as late as allowed, reversed with copies landing at once).

What it does not show: freedom from races under the hardware's real scheduling (the emulator runs two legal
interleavings, and the blocks one at a time), performance, register spills or occupancy, that nvcc compiles
the kernels (tests/test_build.py), or the hardware's numerics (ex2.approx's error, the tensor cores' summation
order, the device's expf and logf). Those need a GPU.

Needs g++ and the CUDA toolkit's headers (CUDA_HOME, else /usr/local/cuda) and fails without them, unless
FASTATTN_SKIP_CUDA=1 skips the CUDA kernels on purpose. FASTATTN_EMULATED_KERNEL=path.cu tests another kernel
source instead (the mutation check, tests/cuda_emulator/mutate.py, uses it).
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
from fastattn.testing import GRADIENT_RATIO, assert_error_ratio


H100_SMEM, CUDA_ERRORS = harness.H100_SMEM, harness.CUDA_ERRORS
call_in_child, guarded, output, int64s = harness.call_in_child, harness.guarded, harness.output, harness.int64s
KERNEL = Path(os.environ.get("FASTATTN_EMULATED_KERNEL") or harness.CSRC / "cuda" / "attention_kernel.cu").resolve()

if harness.SKIPPED:
    pytestmark = pytest.mark.skip(reason=harness.SKIP_REASON)


# ---------------------------------------------------------------------------------------------------------
# Building and calling the emulated kernels.
# ---------------------------------------------------------------------------------------------------------


def load(library: Path) -> ctypes.CDLL:
    """The library, with the argument types of tests/cuda_emulator/shim.cpp's C ABI."""
    lib = ctypes.CDLL(str(library))
    p, i32, i64, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    i64s = ctypes.POINTER(ctypes.c_int64)
    lib.emu_forward_args_size.restype = ctypes.c_size_t
    lib.emu_forward_args.restype = None
    lib.emu_forward_args.argtypes = [
        p, i32, i64s, p, p, p, i64s, i32, p, i64s, p, i64s, p, i64s, f64, i64, i64, i64, f64, ctypes.c_uint64
    ]  # fmt: skip
    lib.emu_attention_forward.argtypes = [p, p, p, i32, i32]
    lib.emu_attention_backward.argtypes = [p, p, i64s, p, p, p, p, p, i32, i32]
    return lib


@pytest.fixture(scope="session")
def lib(request) -> ctypes.CDLL:
    """The emulator library, built once per source hash in the pytest cache (or a temporary directory)."""
    return load(harness.build(harness.cache_directory(request), KERNEL, harness.EMULATOR / "shim.cpp"))


class Kernels:
    """attention_forward_cuda and attention_backward_cuda of one problem on the emulator, taking what
    fastattn_C::attention_forward takes (the mask expanded to (B, Hq, Sq, Sk), alibi slopes to (B, Hq) float32).
    The kernels see guarded copies of every tensor. ``schedule``: emu::Schedule, 0 in order, 1 reversed."""

    DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

    def __init__(self, lib, q, k, v, mask, key_padding, alibi, scale, diagonal, window_left, window_right, p, seed):
        self.lib = lib
        self.q, self.k, self.v, self.mask, self.key_padding, self.alibi = (
            None if t is None else guarded(t) for t in (q, k, v, mask, key_padding, alibi)
        )
        kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2 if mask.dtype == q.dtype else 3
        pointer = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        strides = lambda t, n: [0] * n if t is None else list(t.stride()[:n])  # noqa: E731
        self.args = ctypes.create_string_buffer(lib.emu_forward_args_size())
        lib.emu_forward_args(
            self.args, self.DTYPES[q.dtype],
            int64s([q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]]),
            pointer(self.q), pointer(self.k), pointer(self.v),
            int64s(strides(self.q, 3) + strides(self.k, 3) + strides(self.v, 3)),
            kind, pointer(self.mask), int64s(strides(self.mask, 4)),
            pointer(self.key_padding), int64s(strides(self.key_padding, 2)),
            pointer(self.alibi), int64s(strides(self.alibi, 2)),
            scale, diagonal, window_left, window_right, p, seed,
        )  # fmt: skip

    def forward(self, smem_limit=H100_SMEM, schedule=0):
        """(out, lse), after checking that the launcher returned cudaSuccess."""
        out = output((*self.q.shape[:3], self.v.shape[3]), self.q.dtype)
        lse = output(self.q.shape[:3], torch.float32)
        code = call_in_child(
            self.lib.emu_attention_forward, self.args, out.data_ptr(), lse.data_ptr(), smem_limit, schedule
        )
        assert code == 0, f"attention_forward_cuda returned {CUDA_ERRORS.get(code, code)}"
        return out, lse

    def backward(self, grad_out, lse, delta, smem_limit=H100_SMEM, schedule=0):
        """(dq, dk, dv) for the forward's lse and delta = rowsum(dO * out) - dlse."""
        grad_out, lse, delta = guarded(grad_out), guarded(lse), guarded(delta.contiguous())
        dq, dk, dv = (output(t.shape, t.dtype) for t in (self.q, self.k, self.v))
        code = call_in_child(
            self.lib.emu_attention_backward, self.args, grad_out.data_ptr(), int64s(grad_out.stride()[:3]),
            lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), smem_limit, schedule,
        )  # fmt: skip
        assert code == 0, f"attention_backward_cuda returned {CUDA_ERRORS.get(code, code)}"
        return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# The cases: what the kernels take, crossed so that each feature meets odd sizes, every dtype and head dim
# bucket (64, 128, 256), the kernels with and without the features path, and more than one tile each way.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    batch: int = 1
    heads: int = 2
    kv_heads: int = 1
    seq_q: int = 17
    seq_k: int = 23
    head_dim: int = 64
    head_dim_v: int = 0  # 0: head_dim
    diagonal: int = 0  # query i's "present" is key i + diagonal (bottom-right causal: seq_k - seq_q)
    window: tuple[int, int] = (-1, -1)  # (left, right) of the diagonal, -1 unbounded; causal is (-1, 0)
    mask: str = "none"  # none | bool | same (the input's dtype) | float32 (with some -inf)
    mask_broadcast: str = ""  # the dims of (b, h, q, k) the mask is expanded over (stride 0)
    key_padding: str = "none"  # none | random | batch0 (random, and every key of batch 0)
    alibi: bool = False
    dropout_p: float = 0.0
    layout: str = "bhsd"  # or bshd: q, k, v, grad_out are (B, S, H, D) tensors viewed as (B, H, S, D)
    row_pad: int = 0  # elements after each row of q, k, v, grad_out; odd: rows not 16-byte aligned (no cp.async)
    smem_limit: int = H100_SMEM  # below a kernel's double-buffered tiles, the launcher single-buffers them


FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
CASES = [
    Case("fp16-d64-gqa2", FP16, seq_q=20, seq_k=30),
    Case("fp32-d64-gqa2", FP32, seq_q=20, seq_k=30),
    Case("bf16-d40-b2-gqa-causal-bottom-right-sq70-sk45", BF16, batch=2, heads=4, kv_heads=2, seq_q=70, seq_k=45,
         head_dim=40, diagonal=45 - 70, window=(-1, 0)),
    Case("fp16-d72-dv24-window-boolmask-padding-alibi-dropout", FP16, heads=3, seq_q=130, seq_k=75, head_dim=72,
         head_dim_v=24, diagonal=5, window=(20, 6), mask="bool", key_padding="random", alibi=True, dropout_p=0.3),
    Case("fp32-d136-dv96-float32mask-alibi-dropout", FP32, kv_heads=2, seq_q=21, seq_k=33, head_dim=136,
         head_dim_v=96, mask="float32", alibi=True, dropout_p=0.2),
    Case("bf16-d256-sq1-sk1", BF16, seq_q=1, seq_k=1, head_dim=256),
    Case("fp16-d36-dv20-bshd-unaligned-samemask", FP16, batch=2, seq_q=19, seq_k=66, head_dim=36, head_dim_v=20,
         layout="bshd", row_pad=1, mask="same"),
    Case("fp16-d64-padding-all-of-batch0", FP16, batch=2, seq_q=9, seq_k=70, key_padding="batch0"),
    Case("bf16-d32-sk0", BF16, seq_q=5, seq_k=0, head_dim=32),
    Case("fp16-d128-single-buffered-boolmask-broadcast-hq", FP16, seq_q=40, seq_k=150, head_dim=128, mask="bool",
         mask_broadcast="hq", smem_limit=80 * 1024),
    # Query 32, the first of the dK/dV kernel's second query tile, is the last to see key 63 of its first key tile.
    Case("fp32-d8-dv3-left-window-edge-on-tile-edge", FP32, seq_q=33, seq_k=90, head_dim=8, head_dim_v=3,
         diagonal=41, window=(10, -1)),
    Case("bf16-d96-causal-top-left-dropout", BF16, seq_q=50, seq_k=50, head_dim=96, window=(-1, 0), dropout_p=0.5),
    Case("fp16-d200-dv130-gqa3-causal", FP16, heads=3, seq_q=33, seq_k=40, head_dim=200, head_dim_v=130,
         diagonal=7, window=(-1, 0)),
    Case("fp32-d256-window-dropout-single-buffered", FP32, seq_q=18, seq_k=40, head_dim=256, window=(5, 5),
         dropout_p=0.1, smem_limit=110 * 1024),
    Case("fp16-d1-sq300", FP16, seq_q=300, seq_k=7, head_dim=1),
    Case("bf16-d128-gqa-causal-bottom-right-big", BF16, seq_q=300, seq_k=260, head_dim=128, diagonal=260 - 300,
         window=(-1, 0)),
    Case("fp16-d64-samemask-broadcast-bhq-alibi-left-window-big", FP16, seq_q=200, seq_k=333, mask="same",
         mask_broadcast="bhq", alibi=True, window=(100, -1)),
    Case("fp32-d64-dv48-bshd-big", FP32, batch=2, kv_heads=2, seq_q=150, seq_k=201, head_dim_v=48, layout="bshd"),
    Case("fp32-d120-causal-dropout-big", FP32, seq_q=97, seq_k=130, head_dim=120, diagonal=33, window=(-1, 0),
         dropout_p=0.25),
    Case("bf16-d256-window-float32mask-broadcast-b-big", BF16, seq_q=150, seq_k=170, head_dim=256, diagonal=20,
         window=(40, 40), mask="float32", mask_broadcast="b"),
]  # fmt: skip
DROPOUT_SEED = 0x1234_5678_9ABC


def make_problem(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """q, k, v, grad_out and the keyword arguments of reference.attention for a case."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    batch, heads, seq_q, seq_k, dv = case.batch, case.heads, case.seq_q, case.seq_k, case.head_dim_v or case.head_dim

    def rows(heads, seq, dim):  # (B, H, S, dim), strided as the case says
        shape = (batch, heads, seq, dim + case.row_pad)
        if case.layout == "bshd":
            return torch.randn(shape[0], seq, heads, shape[3], generator=g).to(case.dtype)[..., :dim].transpose(1, 2)
        return torch.randn(shape, generator=g).to(case.dtype)[..., :dim]

    q, k = rows(heads, seq_q, case.head_dim), rows(case.kv_heads, seq_k, case.head_dim)
    v = rows(case.kv_heads, seq_k, dv)
    full = (batch, heads, seq_q, seq_k)
    shape = [1 if dim in case.mask_broadcast else n for dim, n in zip("bhqk", full)]
    mask = None
    if case.mask == "bool":
        mask = torch.rand(shape, generator=g) > 0.2
    elif case.mask == "same":
        mask = (torch.rand(shape, generator=g) * 4 - 2).to(case.dtype)
    elif case.mask == "float32":
        mask = torch.randn(shape, generator=g).masked_fill(torch.rand(shape, generator=g) < 0.1, -torch.inf)
    padding = None
    if case.key_padding != "none":
        padding = torch.rand(batch, seq_k, generator=g) < 0.2
        padding[0] |= case.key_padding == "batch0"
    alibi = (torch.rand(heads, generator=g) * 0.5 + 0.01).expand(batch, heads) if case.alibi else None
    keep = reference.attention_dropout_mask(DROPOUT_SEED, case.dropout_p, full, torch.device("cpu"))
    kwargs = dict(
        mask=None if mask is None else mask.expand(full), key_padding_mask=padding, alibi_slopes=alibi,
        scale=1.3 * case.head_dim**-0.5, diagonal=case.diagonal, window_left=case.window[0],
        window_right=case.window[1], dropout_mask=keep if case.dropout_p else None, dropout_p=case.dropout_p,
    )  # fmt: skip
    return q, k, v, rows(heads, seq_q, dv), kwargs


@pytest.mark.parametrize("schedule", [0, 1], ids=["in-order", "reversed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_and_backward(lib, case, schedule):
    """out and lse, then dq, dk, dv (delta = rowsum(dO * out) from the kernel's out, as fastattn/ops/attention.py
    computes it, with no lse gradient) against the float64 reference, with PyTorch in the case's dtype as the
    baseline of the error-ratio rule, under each of the emulator's two schedules."""
    q, k, v, grad_out, kw = make_problem(case)
    run = Kernels(
        lib, q, k, v, kw["mask"], kw["key_padding_mask"], kw["alibi_slopes"], kw["scale"], kw["diagonal"],
        kw["window_left"], kw["window_right"], kw["dropout_p"], DROPOUT_SEED,
    )  # fmt: skip

    out, lse = run.forward(case.smem_limit, schedule)
    truth_out, truth_lse = reference.attention(q.double(), k.double(), v.double(), **kw)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    base_out, base_lse = reference.attention(*leaves, **kw, upcast=False)
    assert_error_ratio(out, truth_out, base_out)
    assert_error_ratio(lse, truth_lse, base_lse, name="lse")

    delta = (grad_out.float() * out.float()).sum(-1)
    grads = run.backward(grad_out, lse, delta, case.smem_limit, schedule)
    truth = reference.attention_backward(grad_out.double(), q.double(), k.double(), v.double(), **kw)
    baseline = torch.autograd.grad(base_out, leaves, grad_out)
    for name, ours, true, base in zip(("dq", "dk", "dv"), grads, truth, baseline):
        assert_error_ratio(ours, true, base, ratio=GRADIENT_RATIO, name=name)


@pytest.mark.parametrize("dtype", [FP16, FP32], ids=lambda d: str(d).removeprefix("torch."))
def test_dropout_mask_bit_for_bit(lib, dtype):
    """Every kernel keeps exactly reference.attention_dropout_mask's entries. With q = k = v = I (N x N), every
    probability is positive and out = P * Z, nonzero exactly where the mask keeps. With delta = 0 (not a real
    gradient: the kernels take any delta), dS = P * dO * Z, so dq = scale dS K = scale dS and dk = scale dS^T Q
    = scale dS^T show the masks the dQ and the dK/dV kernels draw. N = 100 spans several tiles of each kernel."""
    n, p, shape = 100, 0.3, (2, 2, 100, 100)
    eye = torch.eye(n, dtype=dtype).expand(shape)
    grad_out = (1 + torch.rand(shape, generator=torch.Generator().manual_seed(0))).to(dtype)  # no zeros
    run = Kernels(lib, eye, eye, eye, None, None, None, n**-0.5, 0, -1, -1, p, DROPOUT_SEED)
    keep = reference.attention_dropout_mask(DROPOUT_SEED, p, shape, torch.device("cpu"))

    out, lse = run.forward()
    dq, dk, _ = run.backward(grad_out, lse, torch.zeros(shape[:3]))
    for name, kept in (("out", out != 0), ("dq", dq != 0), ("dk", dk.transpose(-1, -2) != 0)):
        wrong = (kept != keep).nonzero().tolist()
        assert not wrong, f"{name}: {len(wrong)} entries disagree with the mask, the first at (b, h, i, j) {wrong[0]}"


def test_launcher_refusals(lib):
    """Head dims above 256 are refused (cudaErrorInvalidValue), and so is a kernel whose single-buffered tiles
    still need more shared memory than the device has (cudaErrorNotSupported)."""
    for head_dim, smem_limit, expected in ((257, H100_SMEM, 1), (256, 48 * 1024, 801)):
        q = torch.randn(1, 1, 4, head_dim, dtype=FP16)
        run = Kernels(lib, q, q, q, None, None, None, 1.0, 0, -1, -1, 0.0, 0)
        out, lse = output(q.shape, q.dtype), output(q.shape[:3], torch.float32)
        code = call_in_child(lib.emu_attention_forward, run.args, out.data_ptr(), lse.data_ptr(), smem_limit, 0)
        assert code == expected, f"head dim {head_dim}: {CUDA_ERRORS.get(code, code)}"
