"""The CUDA convolution epilogue kernels (csrc/cuda/conv_epilogue_kernel.cu) emulated on the CPU, against the float64
references (fastattn.reference.conv_epilogue and conv_epilogue_backward) with the error-ratio rule, on a machine
without a GPU.

How: as tests/test_cuda_emulated.py (its docstring says what the emulator shows and what it does not): gen.py rewrites
the unmodified .cu (its swap table for conv_epilogue_kernel.cu), g++ builds it with
tests/cuda_emulator/shim_conv_epilogue.cpp (a C ABI over conv_epilogue_forward_cuda, conv_epilogue_backward_plan and
conv_epilogue_backward_cuda that fills their arguments as csrc/conv_epilogue_binding.h does) into a library of its
own, and each launcher call runs in a forked child on guarded copies of the tensors. The bias reaches the kernels in
float32, as fastattn.ops.conv_epilogue passes it; the references take it in its own dtype (y's, or float32). The
emulated device's multiprocessor count is set per case: one multiprocessor makes each block walk many lines, 132 give
most lines a block of their own.

Poison: the outputs and the backward's workspace start as NaN, the elements a sliced input skips are NaN, and every
input ends at an inaccessible page; a kernel that reads outside its view, or leaves an output element or a block's
bias-gradient sum unwritten, shows NaN or crashes. The shim also reports the kernels' __ldg loads by size, and the
emulator faults a misaligned one: the cases built for it assert the vector path (16-byte loads only) or the element
path.

What passing shows: both kernels and the bias-gradient sum for float16, bfloat16 and float32 (float64 refused), every
activation with the pool on and off, NCHW and NHWC, odd H and W (the floor-sized pool's left-out row and column get
zero gradients), C = 1, 3, 33, a bias absent, in y's dtype or in float32; sliced inputs and gradients (rows not back
to back, unaligned starts: the element path), aligned ones (the vector path), lines longer than a block (two chunk
tiles: NCHW planes and rows, NHWC channels); NaN windows and ties, where out is NaN and the gradient lands exactly
where torch's max_pool2d sends it; the same bits under the emulator's reversed schedule (the bias-gradient reduction
has barriers); and empty problems (grad_bias zeros). Not shown: more than 65535 NCHW channels (the grid's channel
loop), races under real scheduling, speed.
FASTATTN_EMULATED_CONV_EPILOGUE_KERNEL=path/conv_epilogue_kernel.cu tests another kernel source instead.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from cuda_emulator import harness  # tests/cuda_emulator/harness.py (conftest.py puts tests/ on sys.path)
from fastattn import reference
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

CUDA_ERRORS = harness.CUDA_ERRORS
call_in_child, guarded, int64s = harness.call_in_child, harness.guarded, harness.int64s
KERNEL = Path(
    os.environ.get("FASTATTN_EMULATED_CONV_EPILOGUE_KERNEL") or harness.CSRC / "cuda" / "conv_epilogue_kernel.cu"
).resolve()
NAN = float("nan")
FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
CODES = {FP16: 0, BF16: 1, FP32: 2, FP64: 3}  # fastattn::Dtype
NAMES = {FP16: "fp16", BF16: "bf16", FP32: "fp32"}
ACTIVATIONS = reference.CONV_ACTIVATIONS  # their index is fastattn::Activation's code

if harness.SKIPPED:
    pytestmark = pytest.mark.skip(reason=harness.SKIP_REASON)


# ---------------------------------------------------------------------------------------------------------
# Building and calling the emulated kernels.
# ---------------------------------------------------------------------------------------------------------


def load(library: Path) -> ctypes.CDLL:
    """The library, with the argument types of tests/cuda_emulator/shim_conv_epilogue.cpp's C ABI."""
    lib = ctypes.CDLL(str(library))
    p, i32 = ctypes.c_void_p, ctypes.c_int
    lib.emu_conv_epilogue_forward.argtypes = [p, p, p, p, p, p, i32, i32, i32, i32, p]
    lib.emu_conv_epilogue_backward_plan.argtypes = [p, p, p, p, i32, i32, i32, p]
    lib.emu_conv_epilogue_backward.argtypes = [p, p, p, p, p, p, p, p, p, p, i32, i32, p, i32, i32, p]
    return lib


@pytest.fixture(scope="session")
def lib(request) -> ctypes.CDLL:
    """The emulator library, built once per source hash in the pytest cache (or a temporary directory)."""
    shim = harness.EMULATOR / "shim_conv_epilogue.cpp"
    return load(harness.build(harness.cache_directory(request), KERNEL, shim))


def ints(values) -> ctypes.Array:
    return (ctypes.c_int * len(values))(*values)


def loads_buffer() -> torch.Tensor:
    """Where the shim reports the kernels' __ldg loads: entry k counts the loads of k bytes."""
    return guarded(torch.zeros(17, dtype=torch.int64))


def check_path(loads: torch.Tensor, dtype: torch.dtype, vector: Optional[bool], what: str) -> None:
    """The kernel read y (and grad) with 16-byte vector loads only (vector), element loads only (not vector), or
    either (None)."""
    if vector is None:
        return
    element, vec = int(loads[torch.empty((), dtype=dtype).element_size()]), int(loads[16])
    got = f"got {element} element and {vec} vector loads"
    if vector:
        assert vec > 0 and element == 0, f"{what}: expected the vector path, {got}"
    else:
        assert vec == 0 and element > 0, f"{what}: expected the element path, {got}"


# ---------------------------------------------------------------------------------------------------------
# The cases.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    shape: tuple[int, int, int, int]  # (N, C, H, W)
    activation: str
    pool: bool
    nhwc: bool
    bias: Optional[torch.dtype] = None  # None: no bias; else its dtype (y's or float32)
    sliced: bool = False  # y and grad views into larger NaN-padded tensors (one more N, H and W in front)
    misaligned: bool = False  # y and grad start one element past a 16-byte boundary
    sms: int = 2
    vector: Optional[bool] = None  # the loads must all be vectors (True), all elements (False); None: unchecked

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        n, c, h, w = self.shape
        return (n, c, h // 2, w // 2) if self.pool else (n, c, h, w)


def _grid() -> list[Case]:
    """Every dtype x activation x pool x layout, with the odd shapes, the bias kinds and device sizes in turn."""
    shapes = {False: [(2, 3, 7, 9), (1, 33, 5, 7), (3, 1, 9, 5)], True: [(2, 3, 7, 9), (1, 33, 5, 7), (2, 33, 3, 5)]}
    cases = []
    for index, (dtype, activation, pool, nhwc) in enumerate(
        itertools.product((FP16, BF16, FP32), ACTIVATIONS, (False, True), (False, True))
    ):
        shape = shapes[nhwc][index % 3]
        bias = (None, dtype, FP32)[(index // 3) % 3]
        bias_name = "nobias" if bias is None else ("bias-fp32" if bias == FP32 else "bias-same")
        parts = [NAMES[dtype], activation, "pool" if pool else "nopool", "nhwc" if nhwc else "nchw"]
        name = "-".join(parts + ["x".join(map(str, shape)), bias_name])
        cases.append(Case(name, dtype, shape, activation, pool, nhwc, bias, sms=(1, 2, 132)[(index // 9) % 3]))
    return cases


CASES = _grid() + [
    # Strided views (rows not back to back, starts off alignment): the element path.
    Case("fp16-relu-pool-nchw-sliced", FP16, (2, 3, 7, 11), "relu", True, False, FP16, sliced=True, vector=False),
    Case("bf16-gelu-nopool-nchw-sliced", BF16, (2, 5, 6, 9), "gelu", False, False, FP32, sliced=True, vector=False),
    Case("fp32-silu-pool-nhwc-sliced", FP32, (2, 6, 5, 7), "silu", True, True, FP32, sliced=True),
    Case("fp16-none-nopool-nhwc-sliced", FP16, (2, 16, 3, 5), "none", False, True, FP16, sliced=True, vector=True),
    Case("fp16-gelu_tanh-pool-nhwc-misaligned", FP16, (1, 16, 5, 7), "gelu_tanh", True, True, FP16,
         misaligned=True, vector=False),
    Case("fp32-relu-nopool-nchw-misaligned", FP32, (2, 3, 4, 8), "relu", False, False, FP32, misaligned=True,
         vector=False),
    # Aligned: the vector path only (NHWC channels a multiple of 8 or 4; NCHW rows or planes of whole vectors).
    Case("fp16-silu-pool-nhwc-aligned", FP16, (2, 16, 5, 7), "silu", True, True, FP32, vector=True),
    Case("bf16-gelu-nopool-nhwc-aligned", BF16, (1, 24, 3, 3), "gelu", False, True, BF16, vector=True),
    Case("fp32-gelu_tanh-pool-nchw-aligned", FP32, (2, 3, 5, 16), "gelu_tanh", True, False, FP32, vector=True),
    Case("bf16-relu-nopool-nchw-planes-aligned", BF16, (2, 3, 5, 8), "relu", False, False, BF16, vector=True),
    # Lines longer than a block's 256 chunks: two chunk tiles.
    Case("fp32-relu-pool-nchw-long-rows", FP32, (1, 2, 3, 2051), "relu", True, False, FP32, sms=1),
    Case("fp16-silu-nopool-nchw-long-planes", FP16, (2, 2, 37, 61), "silu", False, False, FP16, sms=1),
    Case("fp32-gelu-pool-nhwc-long-pixels", FP32, (1, 1100, 3, 3), "gelu", True, True, FP32, sms=1),
    # Many lines per block (one multiprocessor), and many blocks.
    Case("bf16-silu-pool-nchw-many-lines", BF16, (4, 2, 31, 9), "silu", True, False, FP32, sms=1),
    Case("fp16-relu-pool-nhwc-many-lines", FP16, (3, 5, 17, 13), "relu", True, True, FP16, sms=1),
]  # fmt: skip


def strided_copy(t: torch.Tensor, case: Case) -> torch.Tensor:
    """A guarded copy of t (N, C, H, W) in the case's layout: dense, or (sliced) inside a NaN-padded tensor with
    one more N, H and W in front, or (misaligned) starting one element past its 16-byte aligned allocation."""
    layout = torch.channels_last if case.nhwc else torch.contiguous_format
    if case.sliced:
        n, c, h, w = t.shape
        wide = torch.full((n + 1, c, h + 1, w + 1), NAN, dtype=t.dtype).contiguous(memory_format=layout)
        wide[1:, :, 1:, 1:] = t
        return guarded(wide, fill=NAN)[1:, :, 1:, 1:]
    dense = t.contiguous(memory_format=layout)
    if not case.misaligned:
        return guarded(dense)
    flat = guarded(torch.cat([torch.full((1,), NAN, dtype=t.dtype), dense.permute(0, 2, 3, 1).flatten()
                              if case.nhwc else dense.flatten()]))  # fmt: skip
    return flat.as_strided(dense.shape, dense.stride(), 1)


def poisoned(shape, dtype: torch.dtype, nhwc: bool) -> torch.Tensor:
    """A guarded output, contiguous in the layout, NaN until the kernel writes it."""
    layout = torch.channels_last if nhwc else torch.contiguous_format
    return guarded(torch.full(shape, NAN, dtype=dtype).contiguous(memory_format=layout))


@dataclass
class Problem:
    y: torch.Tensor  # the values, dense NCHW
    bias: Optional[torch.Tensor]  # in the case's bias dtype
    grad: torch.Tensor


def make_problem(case: Case) -> Problem:
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    y = (torch.randn(case.shape, generator=g) * 2).to(case.dtype)
    bias = None if case.bias is None else torch.randn(case.shape[1], generator=g).to(case.bias)
    grad = torch.randn(case.out_shape, generator=g).to(case.dtype)
    return Problem(y, bias, grad)


def sizes_and_flags(case: Case, y: torch.Tensor):
    # The layout rule of csrc/conv_epilogue_binding.h: NHWC only when C > 1.
    nhwc = case.nhwc and y.shape[1] > 1
    return int64s(list(y.shape)), ints([int(case.pool), int(nhwc)]), nhwc


def kernel_bias(pr: Problem) -> Optional[torch.Tensor]:
    return None if pr.bias is None else guarded(pr.bias.float())


def run_forward(lib, case: Case, pr: Problem, schedule: int = 0, dtype: Optional[torch.dtype] = None):
    """(cudaError_t code, out, loads) of conv_epilogue_forward_cuda; dtype overrides the dtype code passed."""
    y = strided_copy(pr.y, case)
    bias = kernel_bias(pr)
    sizes, flags, nhwc = sizes_and_flags(case, y)
    out = poisoned(case.out_shape, case.dtype, nhwc)
    loads = loads_buffer()
    code = call_in_child(
        lib.emu_conv_epilogue_forward, y.data_ptr(), harness.pointer(bias), out.data_ptr(), sizes,
        int64s(list(y.stride())), flags, CODES[dtype or case.dtype], ACTIVATIONS.index(case.activation), case.sms,
        schedule, loads.data_ptr(),
    )  # fmt: skip
    return code, out, loads


def run_backward(lib, case: Case, pr: Problem, bias_grad: bool, schedule: int = 0):
    """(cudaError_t code, grad_y, grad_bias or None, loads) of conv_epilogue_backward_plan and _cuda."""
    y, grad = strided_copy(pr.y, case), strided_copy(pr.grad, case)
    bias = kernel_bias(pr)
    sizes, flags, nhwc = sizes_and_flags(case, y)
    y_strides, grad_strides = int64s(list(y.stride())), int64s(list(grad.stride()))
    plan = guarded(torch.zeros(3, dtype=torch.int64))
    code = call_in_child(lib.emu_conv_epilogue_backward_plan, sizes, y_strides, grad_strides, flags,
                         CODES[case.dtype], int(bias_grad), case.sms, plan.data_ptr())  # fmt: skip
    assert code == 0, f"conv_epilogue_backward_plan returned {CUDA_ERRORS.get(code, code)}"
    plan = plan.tolist()
    assert plan[2] == (4 * plan[1] * case.shape[1] if bias_grad else 0), f"plan {plan}: workspace size"
    workspace = harness.output((plan[2] // 4,), FP32) if plan[2] else None
    grad_y = poisoned(case.shape, case.dtype, nhwc)
    grad_bias = harness.output((case.shape[1],), FP32) if bias_grad else None
    loads = loads_buffer()
    code = call_in_child(
        lib.emu_conv_epilogue_backward, grad.data_ptr(), y.data_ptr(), harness.pointer(bias), grad_y.data_ptr(),
        harness.pointer(grad_bias), harness.pointer(workspace), sizes, y_strides, grad_strides, flags,
        CODES[case.dtype], ACTIVATIONS.index(case.activation), int64s(plan), case.sms, schedule, loads.data_ptr(),
    )  # fmt: skip
    return code, grad_y, grad_bias, loads


def double(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.double()


def baseline(case: Case, pr: Problem):
    """(out, grad_y, grad_bias) of plain PyTorch in y's dtype (reference.conv_epilogue without upcast, through
    autograd): the error the rule allows is a multiple of this one's."""
    y = pr.y.clone().requires_grad_()
    bias = None if pr.bias is None else pr.bias.clone().requires_grad_()
    out = reference.conv_epilogue(y, bias, case.activation, case.pool, upcast=False)
    grads = torch.autograd.grad(out, [y] + ([bias] if bias is not None else []), pr.grad)
    return out.detach(), grads[0], grads[1] if bias is not None else None


def truth(case: Case, pr: Problem):
    """(out, grad_y, grad_bias) in float64."""
    y64, bias64 = pr.y.double(), double(pr.bias)
    out = reference.conv_epilogue(y64, bias64, case.activation, case.pool)
    dz = reference.conv_epilogue_backward(pr.grad.double(), y64, bias64, case.activation, case.pool)
    return out, dz, dz.sum(dim=(0, 2, 3))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_backward(lib, case):
    """out, grad_y and grad_bias (when there is a bias) against float64, with plain PyTorch in y's dtype as the
    baseline of the error-ratio rule; the load path where the case says."""
    pr = make_problem(case)
    code, out, loads = run_forward(lib, case, pr)
    assert code == 0, f"conv_epilogue_forward_cuda returned {CUDA_ERRORS.get(code, code)}"
    check_path(loads, case.dtype, case.vector, "forward")
    bias_grad = pr.bias is not None
    code, grad_y, grad_bias, loads = run_backward(lib, case, pr, bias_grad)
    assert code == 0, f"conv_epilogue_backward_cuda returned {CUDA_ERRORS.get(code, code)}"
    check_path(loads, case.dtype, case.vector, "backward")

    true_out, true_grad_y, true_grad_bias = truth(case, pr)
    base_out, base_grad_y, base_grad_bias = baseline(case, pr)
    assert_error_ratio(out, true_out, base_out)
    assert_error_ratio(grad_y, true_grad_y, base_grad_y, ratio=GRADIENT_RATIO, name="grad_y")
    if bias_grad:
        assert_error_ratio(grad_bias, true_grad_bias, base_grad_bias.float(), ratio=GRADIENT_RATIO, name="grad_bias")


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=str)
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_nan_and_ties_go_where_torch_sends_them(lib, nhwc, dtype):
    """Windows of ties (the first element wins) and of NaNs (the last NaN wins): out NaN exactly where the float64
    reference (torch's max_pool2d) is, and each output's gradient on exactly the element of max_pool2d's index, NaN
    where act'(NaN) is; grad_bias NaN in the channel with the NaNs."""
    y = torch.ones(2, 3, 5, 7)
    y[0, 1, 2, 3] = y[0, 1, 3, 2] = NAN  # two NaNs in window (1, 1) of plane (0, 1)
    y[0, 2, 0, 0] = NAN  # a NaN first in its window
    y[1, 2, :2, :2] = 4.0  # a tie of larger values
    y[1, 0, 2:4, 4:6] = -3.0  # a tie below zero (relu: all four 0)
    g = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).reshape(2, 3, 2, 3) + 1
    for activation in ("relu", "none", "silu"):
        case = Case(f"nan-{activation}", dtype, (2, 3, 5, 7), activation, True, nhwc, FP32, sms=1)
        pr = Problem(y.to(dtype), torch.full((3,), 0.5), g.to(dtype))
        code, out, _ = run_forward(lib, case, pr)
        assert code == 0, f"conv_epilogue_forward_cuda returned {CUDA_ERRORS.get(code, code)}"
        code, grad_y, grad_bias, _ = run_backward(lib, case, pr, True)
        assert code == 0, f"conv_epilogue_backward_cuda returned {CUDA_ERRORS.get(code, code)}"
        true_out, true_grad_y, true_grad_bias = truth(case, pr)
        assert torch.equal(out.isnan(), true_out.isnan()), f"{activation}: NaN outputs differ"
        atol = 64 * torch.finfo(dtype).eps  # a few ulps of values up to 40
        assert_close(out, true_out, atol=atol, name=f"{activation} output")
        assert torch.equal(grad_y != 0, true_grad_y != 0), f"{activation}: gradients on other elements than torch's"
        assert_close(grad_y, true_grad_y, atol=atol, name=f"{activation} grad_y")
        assert_close(grad_bias, true_grad_bias, atol=1e-4, name=f"{activation} grad_bias")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


SCHEDULE_CASES = ["fp16-relu-pool-nhwc-1x33x5x7-bias-fp32", "bf16-gelu_tanh-pool-nchw-1x33x5x7-bias-fp32",
                  "fp32-gelu_tanh-nopool-nhwc-2x33x3x5-bias-fp32", "bf16-silu-pool-nchw-many-lines",
                  "fp16-relu-pool-nhwc-many-lines", "fp32-gelu-pool-nhwc-long-pixels"]


def test_schedules_agree(lib):
    """Threads started (and woken from barriers) in reverse order give the same bits: no thread touches another's
    elements, and the bias gradient adds in a fixed order."""
    by_name = {c.name: c for c in CASES}
    for name in SCHEDULE_CASES:
        case = by_name[name]
        pr = make_problem(case)
        runs = [run_forward(lib, case, pr, schedule)[1:2] + run_backward(lib, case, pr, True, schedule)[1:3]
                for schedule in (0, 1)]  # fmt: skip
        for what, a, b in zip(("out", "grad_y", "grad_bias"), *runs):
            assert same_bits(a, b), f"{name}: the reversed schedule changed {what}"


def test_launcher_refusals_and_empty(lib):
    """float64 is refused with cudaErrorInvalidValue before any launch, writing nothing; an empty batch returns
    cudaSuccess with grad_bias zeros."""
    case = Case("refused-float64", FP32, (1, 3, 4, 4), "relu", True, False)
    code, out, _ = run_forward(lib, case, make_problem(case), dtype=FP64)
    assert code == 1, f"float64: {CUDA_ERRORS.get(code, code)}"
    assert out.isnan().all(), "a refused launch wrote its output"

    for nhwc in (False, True):
        case = Case(f"empty-{nhwc}", FP16, (0, 3, 4, 5), "gelu", True, nhwc, FP16)
        pr = make_problem(case)
        assert run_forward(lib, case, pr)[0] == 0, "empty forward: not cudaSuccess"
        code, _, grad_bias, _ = run_backward(lib, case, pr, True)
        assert code == 0, f"empty backward: {CUDA_ERRORS.get(code, code)}"
        assert torch.equal(grad_bias, torch.zeros(3)), f"empty batch: grad_bias {grad_bias.tolist()}"
