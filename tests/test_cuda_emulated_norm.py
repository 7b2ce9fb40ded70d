"""The CUDA LayerNorm / RMSNorm kernels (csrc/cuda/norm_kernel.cu) emulated on the CPU, against the float64 references
(fastattn.reference.norm and norm_backward) with the error-ratio rule, on a machine without a GPU.

How: as tests/test_cuda_emulated.py (its docstring says what the emulator shows and what it does not): gen.py rewrites
the unmodified .cu (its swap table for norm_kernel.cu), g++ builds it with tests/cuda_emulator/shim_norm.cpp (a C ABI
over norm_forward_cuda, norm_backward_plan and norm_backward_cuda) into a library of its own, and each launcher call
runs in a forked child on guarded copies of the tensors. The emulated device's multiprocessor count and opt-in
shared memory are set per case: few multiprocessors make the persistent backward blocks visit several rows each,
little shared memory sends the backward to its long-row kernels.

Poison: the row padding of every strided input, the outputs and the backward's workspace start as NaN; a kernel that
reads past a row, or leaves an output or a partial sum unwritten, shows NaN (or crashes on the guard page).

What passing shows: every kernel shape of both passes (forward: warp per row with 1, 2, 4 chunks a lane, blocks of
64 .. 1024 threads, the looped kernel at 65537 columns; backward: warp per row and blocks of 64 .. 1024 threads,
persistent over several rows, the long-row kernels, the partial sums), for float16, bfloat16 and float32 with
float32 residuals, residual_out and weights beside 16-bit x, LayerNorm and RMSNorm with and without weight and bias,
rows of 1, 7, 100 .. 65537 columns, strided rows (aligned: vector accesses; unaligned: element accesses), a weight
that does not start 16-byte aligned, dropout bit for bit against reference.elementwise_dropout_mask, and the
gradient of residual_out flowing back.
FASTATTN_EMULATED_NORM_KERNEL=path/norm_kernel.cu tests another kernel source instead.
"""

from __future__ import annotations

import ctypes
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from cuda_emulator import harness  # tests/cuda_emulator/harness.py (conftest.py puts tests/ on sys.path)
from fastattn import reference
from fastattn.testing import GRADIENT_RATIO, assert_error_ratio

H100_SMEM, H100_SMS, CUDA_ERRORS = harness.H100_SMEM, harness.H100_SMS, harness.CUDA_ERRORS
call_in_child, guarded, output, int64s = harness.call_in_child, harness.guarded, harness.output, harness.int64s
KERNEL = Path(os.environ.get("FASTATTN_EMULATED_NORM_KERNEL") or harness.CSRC / "cuda" / "norm_kernel.cu").resolve()
NAN = float("nan")
EPS = 1e-5
FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
CODES = {FP16: 0, BF16: 1, FP32: 2, FP64: 3}  # fastattn::Dtype

if harness.SKIPPED:
    pytestmark = pytest.mark.skip(reason=harness.SKIP_REASON)


# ---------------------------------------------------------------------------------------------------------
# Building and calling the emulated kernels.
# ---------------------------------------------------------------------------------------------------------


def load(library: Path) -> ctypes.CDLL:
    """The library, with the argument types of tests/cuda_emulator/shim_norm.cpp's C ABI."""
    lib = ctypes.CDLL(str(library))
    p, i32, i64, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    lib.emu_norm_forward_args_size.restype = ctypes.c_size_t
    lib.emu_norm_backward_args_size.restype = ctypes.c_size_t
    lib.emu_norm_forward_args.restype = None
    lib.emu_norm_forward_args.argtypes = [p, p, p, p, p, p, p, p, p, p, p, p, f64, i32, f64, i64]
    lib.emu_norm_forward.argtypes = [p, i32, i32, i32]
    lib.emu_norm_backward_args.restype = None
    lib.emu_norm_backward_args.argtypes = [p, p, p, p, p, p, p, p, p, p, p, p, p, p, i32, f64, i64]
    lib.emu_norm_backward_plan.argtypes = [p, p, i32, i32]
    lib.emu_norm_backward.argtypes = [p, p, p, i32, i32, i32]
    return lib


@pytest.fixture(scope="session")
def lib(request) -> ctypes.CDLL:
    """The emulator library, built once per source hash in the pytest cache (or a temporary directory)."""
    shim = harness.EMULATOR / "shim_norm.cpp"
    return load(harness.build(harness.cache_directory(request), KERNEL, shim))


def ints(values) -> ctypes.Array:
    return (ctypes.c_int * len(values))(*values)


def row_strided(t: torch.Tensor, pad: int) -> torch.Tensor:
    """A guarded copy of the 2-D t whose rows are `pad` elements apart beyond their length, the padding NaN."""
    if pad == 0:
        return guarded(t)
    wide = torch.full((t.shape[0], t.shape[1] + pad), NAN, dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return guarded(wide, fill=NAN)[:, : t.shape[1]]


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A guarded copy of the 1-D t starting one element past a 16-byte boundary."""
    buffer = guarded(torch.cat([torch.full((1,), NAN, dtype=t.dtype), t]))
    return buffer[1:]


# ---------------------------------------------------------------------------------------------------------
# The cases.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    rows: int
    n: int
    rms: bool = False
    weight: Optional[torch.dtype] = None  # None: no weight; else its dtype
    bias: bool = False  # in the weight's dtype (x's without a weight)
    residual: Optional[torch.dtype] = None
    residual_out: Optional[torch.dtype] = None  # stored z; required with a residual or dropout
    dropout_p: float = 0.0
    grad_residual: bool = False  # the backward gets a gradient of residual_out
    pad: int = 0  # elements between the rows of x, residual, grad_out, grad_residual and z (odd: unaligned)
    weight_misaligned: bool = False
    sms: int = H100_SMS
    smem_limit: int = H100_SMEM
    looped_backward: Optional[bool] = None  # the plan must (not) use the long-row kernels; None: not checked


CASES = [
    # Forward warp per row (1 chunk a lane), backward warp per row, with tiny and odd rows.
    Case("fp16-ln-n1", FP16, rows=5, n=1, weight=FP16, bias=True),
    Case("bf16-rms-n7-weight", BF16, rows=9, n=7, rms=True, weight=BF16),
    Case("fp32-ln-n100-no-affine", FP32, rows=11, n=100),
    Case("fp16-ln-n100-bias-only", FP16, rows=6, n=100, bias=True),
    # Backward warp-per-row blocks visiting several rows each (1 SM: 4 blocks of 8 row groups for 37 rows).
    Case("bf16-ln-n200-persistent-1-sm", BF16, rows=37, n=200, weight=BF16, bias=True, sms=1),
    # Forward warp with 2 and 4 chunks a lane; backward blocks of 64 and 128 threads, several rows a block.
    Case("fp16-ln-n300-fp32-affine", FP16, rows=10, n=300, weight=FP32, bias=True, sms=1),
    Case("bf16-rms-n500-residual", BF16, rows=7, n=500, rms=True, weight=BF16, residual=BF16, residual_out=BF16,
         grad_residual=True, sms=1),
    Case("fp16-ln-n1000-residual-fp32", FP16, rows=6, n=1000, weight=FP16, bias=True, residual=FP32,
         residual_out=FP32, grad_residual=True),
    Case("fp32-ln-n1000-residual", FP32, rows=5, n=1000, weight=FP32, bias=True, residual=FP32, residual_out=FP32),
    # Dropout (bit-exact masks checked), with and without a residual.
    Case("fp16-ln-n1000-dropout", FP16, rows=6, n=1000, weight=FP16, bias=True, dropout_p=0.3, residual_out=FP16),
    Case("bf16-rms-n4097-dropout-residual-fp32", BF16, rows=3, n=4097, rms=True, weight=FP32, residual=BF16,
         residual_out=FP32, dropout_p=0.2, grad_residual=True),
    Case("fp32-ln-n7-dropout", FP32, rows=13, n=7, dropout_p=0.5, residual_out=FP32, weight=FP32),
    # Strided rows: aligned (vector accesses) and unaligned (element accesses); a weight off 16-byte alignment.
    Case("fp16-ln-n1000-rows-unaligned", FP16, rows=5, n=1000, weight=FP16, bias=True, residual=FP16,
         residual_out=FP16, grad_residual=True, pad=3, weight_misaligned=True),
    Case("bf16-ln-n1500-rows-aligned", BF16, rows=4, n=1500, weight=BF16, bias=True, residual=FP32,
         residual_out=FP32, pad=8),
    Case("fp32-rms-n100-rows-unaligned", FP32, rows=7, n=100, rms=True, weight=FP32, residual=FP32,
         residual_out=FP32, pad=1, weight_misaligned=True, grad_residual=True),
    # Blocks of 256 .. 1024 threads a row; the backward's 1024-thread blocks persistent over several rows.
    Case("fp16-ln-n3000", FP16, rows=3, n=3000, weight=FP16, bias=True, sms=1),
    Case("fp16-ln-n4097", FP16, rows=5, n=4097, weight=FP16, bias=True, sms=2, looped_backward=False),
    Case("fp32-ln-n4097-residual", FP32, rows=3, n=4097, weight=FP32, bias=True, residual=FP32, residual_out=FP32,
         grad_residual=True, sms=2, looped_backward=False),
    Case("bf16-rms-n8000-unaligned", BF16, rows=3, n=8000, rms=True, weight=BF16, pad=5, looped_backward=False),
    # Backward rows kernel refused for lack of shared memory: the long-row kernels instead.
    Case("fp16-ln-n4097-small-smem", FP16, rows=5, n=4097, weight=FP16, bias=True, smem_limit=48 * 1024,
         looped_backward=True),
    # The forward's largest rows kernels (512 and 1024 threads), the backward's long-row kernels.
    Case("fp16-ln-n12345-residual", FP16, rows=3, n=12345, weight=FP16, bias=True, residual=FP16, residual_out=FP16,
         grad_residual=True, looped_backward=True),
    Case("bf16-ln-n12345-residual-fp32", BF16, rows=2, n=12345, weight=BF16, residual=FP32, residual_out=FP32,
         looped_backward=True),
    Case("fp32-rms-n16000", FP32, rows=2, n=16000, rms=True, weight=FP32, looped_backward=True),
    # Many partial rows of grad_weight and grad_bias for the affine kernel to add: 50 blocks, 20 slices.
    Case("fp32-ln-n300-200-rows", FP32, rows=200, n=300, weight=FP32, bias=True, looped_backward=False),
    Case("fp32-ln-n16400-20-rows", FP32, rows=20, n=16400, weight=FP32, bias=True, looped_backward=True),
    # The looped forward.
    Case("fp16-ln-n65537-dropout-residual", FP16, rows=2, n=65537, weight=FP16, bias=True, residual=FP16,
         residual_out=FP16, dropout_p=0.1, grad_residual=True, sms=4),
    Case("bf16-rms-n65537-unaligned", BF16, rows=2, n=65537, rms=True, weight=FP32, pad=3, sms=4),
    Case("fp32-ln-n65537", FP32, rows=3, n=65537, weight=FP32, bias=True, sms=4),
]  # fmt: skip


@dataclass
class Problem:
    x: torch.Tensor
    residual: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    keep: Optional[torch.Tensor]
    seed: int


def make_problem(case: Case) -> Problem:
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    shape = (case.rows, case.n)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(case.dtype)
    x = torch.where(x == 0, torch.ones_like(x), x)  # no zeros: a dropped element must read as exactly 0
    residual = None if case.residual is None else torch.randn(shape, generator=g).to(case.residual)
    affine = case.weight or case.dtype
    weight = None if case.weight is None else (torch.rand(case.n, generator=g) + 0.5).to(case.weight)
    bias = None if not case.bias else torch.randn(case.n, generator=g).to(affine)
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    keep = None
    if case.dropout_p > 0:
        keep = reference.elementwise_dropout_mask(seed, case.dropout_p, case.rows, case.n, torch.device("cpu"))
    return Problem(x, residual, weight, bias, keep, seed)


def double(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.double()


def forward_reference(case: Case, pr: Problem, upcast_from: str):
    """(out, z) of reference.norm: on float64 copies (the truth), or on the tensors themselves (float32 compute, the
    baseline). The baseline drops out as torch does, multiplying by 1 / (1 - p) rounded to float32 (the reference
    divides by 1 - p: the two round differently where x / (1 - p) + residual is a tie of z's dtype, which for
    p = 0.1 happens to about one element in 400 of float16 data)."""
    if upcast_from == "float64":
        return reference.norm(
            double(pr.x), double(pr.residual), double(pr.weight), double(pr.bias), EPS, case.rms, pr.keep,
            case.dropout_p, case.residual_out,
        )  # fmt: skip
    x = pr.x
    if pr.keep is not None:
        x = pr.x.float() * (pr.keep * torch.tensor(1.0 / (1.0 - case.dropout_p), dtype=FP32))
    out, z = reference.norm(x, pr.residual, pr.weight, pr.bias, EPS, case.rms, None, 0.0, case.residual_out)
    return out.to(case.dtype), z


def stats(z: torch.Tensor, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """mean (zeros for RMSNorm) and rstd of z's rows, in z's dtype."""
    mean = torch.zeros_like(z[:, 0]) if rms else z.mean(dim=-1)
    centred = z - mean[:, None]
    return mean, torch.rsqrt(centred.pow(2).mean(dim=-1) + EPS)


def run_forward(lib, case: Case, pr: Problem, schedule: int):
    x = row_strided(pr.x, case.pad)
    residual = None if pr.residual is None else row_strided(pr.residual, case.pad)
    place = misaligned if case.weight_misaligned else guarded
    weight = None if pr.weight is None else place(pr.weight)
    bias = None if pr.bias is None else place(pr.bias)
    out = output((case.rows, case.n), case.dtype)
    residual_out = None if case.residual_out is None else output((case.rows, case.n), case.residual_out)
    mean = None if case.rms else output((case.rows,), FP32)
    rstd = output((case.rows,), FP32)
    affine = case.weight or case.dtype
    codes = [CODES[case.dtype], CODES[case.residual or case.dtype], CODES[case.residual_out or case.dtype],
             CODES[affine]]  # fmt: skip
    args = ctypes.create_string_buffer(lib.emu_norm_forward_args_size())
    pointer = harness.pointer
    lib.emu_norm_forward_args(
        args, int64s([case.rows, case.n]), ints(codes), pointer(x), pointer(residual),
        int64s([x.stride(0), 0 if residual is None else residual.stride(0)]), pointer(weight), pointer(bias),
        pointer(out), pointer(residual_out), pointer(mean), pointer(rstd), EPS, int(case.rms), case.dropout_p, pr.seed,
    )  # fmt: skip
    code = call_in_child(lib.emu_norm_forward, args, case.sms, case.smem_limit, schedule)
    return code, out, residual_out, mean, rstd


@pytest.mark.parametrize("schedule", [0, 1], ids=["in-order", "reversed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward(lib, case, schedule):
    """out, residual_out, mean and rstd against reference.norm in float64, with the float32-compute reference in the
    case's dtypes as the baseline of the error-ratio rule; dropout's kept elements bit for bit."""
    pr = make_problem(case)
    code, out, residual_out, mean, rstd = run_forward(lib, case, pr, schedule)
    assert code == 0, f"norm_forward_cuda returned {CUDA_ERRORS.get(code, code)}"

    truth_out, truth_z = forward_reference(case, pr, "float64")
    base_out, base_z = forward_reference(case, pr, "native")
    assert_error_ratio(out, truth_out, base_out)
    if case.residual_out is not None:
        assert_error_ratio(residual_out, truth_z, base_z, name="residual_out")
    truth_mean, truth_rstd = stats(truth_z.double(), case.rms)
    base_mean, base_rstd = stats(base_z.float(), case.rms)
    if not case.rms:
        assert_error_ratio(mean, truth_mean, base_mean, name="mean")
    assert_error_ratio(rstd, truth_rstd, base_rstd, name="rstd")
    if pr.keep is not None and pr.residual is None:
        dropped = residual_out == 0
        assert torch.equal(dropped, ~pr.keep), (
            f"dropout mask: {int((dropped != ~pr.keep).sum())} of {pr.keep.numel()} elements differ from "
            "reference.elementwise_dropout_mask"
        )


def run_backward(lib, case: Case, pr: Problem, z: torch.Tensor, grad_out, grad_residual, mean, rstd, schedule):
    """(plan, code, grad_x, grad_residual_in, grad_weight, grad_bias) of the emulated backward."""
    go = row_strided(grad_out, case.pad)
    gr = None if grad_residual is None else row_strided(grad_residual, case.pad)
    zg = row_strided(z, case.pad)
    weight = None if pr.weight is None else (misaligned if case.weight_misaligned else guarded)(pr.weight)
    mean_g = None if mean is None else guarded(mean)
    rstd_g = guarded(rstd)
    affine = case.weight or case.dtype
    grad_x = output((case.rows, case.n), case.dtype)
    grad_residual_in = None if case.residual is None else output((case.rows, case.n), case.residual)
    grad_weight = None if pr.weight is None else output((case.n,), affine)
    grad_bias = None if pr.bias is None else output((case.n,), affine)
    codes = [CODES[case.dtype], CODES[z.dtype], CODES[case.residual or case.dtype], CODES[affine]]
    args = ctypes.create_string_buffer(lib.emu_norm_backward_args_size())
    pointer = harness.pointer
    lib.emu_norm_backward_args(
        args, int64s([case.rows, case.n]), ints(codes), pointer(go), pointer(gr), pointer(zg),
        int64s([go.stride(0), 0 if gr is None else gr.stride(0), zg.stride(0)]), pointer(weight), pointer(mean_g),
        pointer(rstd_g), pointer(grad_x), pointer(grad_residual_in), pointer(grad_weight), pointer(grad_bias),
        int(case.rms), case.dropout_p, pr.seed,
    )  # fmt: skip
    plan = guarded(torch.zeros(4, dtype=torch.int64))
    code = call_in_child(lib.emu_norm_backward_plan, args, plan.data_ptr(), case.sms, case.smem_limit)
    assert code == 0, f"norm_backward_plan returned {CUDA_ERRORS.get(code, code)}"
    plan = plan.tolist()
    workspace = output((plan[3] // 4,), FP32) if plan[3] else None
    code = call_in_child(
        lib.emu_norm_backward, args, int64s(plan), pointer(workspace), case.sms, case.smem_limit, schedule
    )
    return plan, code, grad_x, grad_residual_in, grad_weight, grad_bias


@pytest.mark.parametrize("schedule", [0, 1], ids=["in-order", "reversed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_backward(lib, case, schedule):
    """grad_x, grad_residual_in, grad_weight and grad_bias against reference.norm_backward in float64 (z, mean and
    rstd given as the forward would store them), with the float32-compute reference rounded to the output dtypes
    as the baseline; dropout's dropped gradients exactly zero."""
    pr = make_problem(case)
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + 1)
    truth_z = forward_reference(case, pr, "float64")[1]
    z = truth_z if case.residual_out is not None else pr.x  # residual_out as stored, else x
    grad_out = torch.randn(case.rows, case.n, generator=g).to(case.dtype)
    grad_residual = torch.randn(case.rows, case.n, generator=g).to(z.dtype) if case.grad_residual else None
    mean, rstd = stats(z.double(), case.rms)
    plan, code, grad_x, grad_residual_in, grad_weight, grad_bias = run_backward(
        lib, case, pr, z, grad_out, grad_residual, None if case.rms else mean.float(), rstd.float(), schedule
    )
    assert code == 0, f"norm_backward_cuda returned {CUDA_ERRORS.get(code, code)}"
    if case.looped_backward is not None:
        assert bool(plan[0]) == case.looped_backward, f"plan {plan}: expected looped={case.looped_backward}"

    args = (EPS, case.rms, pr.keep, case.dropout_p)
    truth = reference.norm_backward(double(grad_out), double(grad_residual), z.double(), double(pr.weight), *args)
    base = reference.norm_backward(grad_out, grad_residual, z, pr.weight, *args)
    affine = case.weight or case.dtype
    kw = dict(ratio=GRADIENT_RATIO)
    assert_error_ratio(grad_x, truth[0], base[0].to(case.dtype), name="grad_x", **kw)
    if case.residual is not None:
        assert_error_ratio(grad_residual_in, truth[1], base[1].to(case.residual), name="grad_residual_in", **kw)
    if pr.weight is not None:
        assert_error_ratio(grad_weight, truth[2], base[2].to(affine), name="grad_weight", **kw)
    if pr.bias is not None:
        assert_error_ratio(grad_bias, truth[3], base[3].to(affine), name="grad_bias", **kw)
    if pr.keep is not None:
        dropped = grad_x == 0
        assert torch.equal(dropped, ~pr.keep), (
            f"dropout mask: {int((dropped != ~pr.keep).sum())} of {pr.keep.numel()} gradients differ from "
            "reference.elementwise_dropout_mask"
        )


def test_launcher_refusals(lib):
    """A residual in a 16-bit dtype other than x's, or float64 x, is refused with cudaErrorInvalidValue before any
    launch, writing nothing."""
    case = Case("refused", FP16, rows=2, n=8, residual=BF16, residual_out=FP16)
    code, out, *_ = run_forward(lib, case, make_problem(case), 0)
    assert code == 1, f"bfloat16 residual with float16 x: {CUDA_ERRORS.get(code, code)}"
    assert out.isnan().all(), "a refused launch wrote its output"

    case = Case("refused-float64", FP64, rows=2, n=8)
    code, out, *_ = run_forward(lib, case, make_problem(case), 0)
    assert code == 1, f"float64 x: {CUDA_ERRORS.get(code, code)}"
    assert out.isnan().all(), "a refused launch wrote its output"
