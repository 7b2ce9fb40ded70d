"""The CUDA positional-encoding kernels (csrc/cuda/positional_kernel.cu: positional_add, embedding_forward,
embedding_scatter) emulated on the CPU, against the float64 references of fastattn.reference (positional_add with
sinusoidal_table or a table's rows, embedding_with_positions, embedding_scatter) with the error-ratio rule, on a
machine without a GPU.

How: as tests/test_cuda_emulated.py (its docstring says what the emulator shows and what it does not): gen.py
rewrites the unmodified .cu (its swap table for positional_kernel.cu), g++ builds it with
tests/cuda_emulator/shim_positional.cpp (a C ABI over positional_add_cuda, embedding_forward_cuda and
embedding_scatter_cuda that fills their arguments as csrc/positional_binding.h does) into a library of its own, and
each launcher call runs in a forked child on guarded copies of the tensors. The emulated device's multiprocessor
count is set per case: one multiprocessor makes each block walk several rows (the grid has 16 blocks a
multiprocessor), an H100's 132 give each row a block of its own.

Poison: the row padding of strided inputs and the outputs start as NaN, and every input ends at an inaccessible
page (a table used for negative indices starts after one); a kernel that reads past a row or a tensor, or leaves an
output element unwritten, shows NaN or crashes. The shim also reports the kernels' __ldg loads by size, and the
emulator faults a misaligned one: each case asserts the vector path (one 8- or 16-byte load for 4 columns) or the
element path, as the launcher's alignment rule should pick.

What passing shows: the three kernels for float16, bfloat16 and float32 (float64 refused), every encoding kind
(sinusoid, table, none: the backward), batch-first and seq-first x, int and per-sequence offsets (negative ones and
positions near 10^6 included), dims 1, 7, 30, 100, 513 .. 520 (odd: the element path and a partial last group;
multiples of 4: the vector path; over 512: two column blocks), x with padded rows (aligned and not), transposed or
broadcast (stride 0) in memory, padded table rows, scale and base, dropout bit for bit against
reference.elementwise_dropout_mask in the output's memory order (rows b * seq + s, or s * batch + b seq-first),
repeated tokens and positions, the scatter's repeated indices, skipped (padding) row and untouched rows, and the
documented handling of indices out of range: NaN rows in the forward kernels, nothing added in the scatter.
The kernels have no barriers, shared memory or warp collectives, so the emulator's two schedules differ only in the
order threads start: every case runs in order, and test_schedules_agree checks that a few give the same bits in
reverse. FASTATTN_EMULATED_POSITIONAL_KERNEL=path/positional_kernel.cu tests another kernel source instead
(mutate.py).
"""

from __future__ import annotations

import ctypes
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from cuda_emulator import harness  # tests/cuda_emulator/harness.py (conftest.py puts tests/ on sys.path)
from fastattn import reference
from fastattn.testing import assert_error_ratio

H100_SMS, CUDA_ERRORS = harness.H100_SMS, harness.CUDA_ERRORS
call_in_child, guarded, output, int64s, pointer = (
    harness.call_in_child, harness.guarded, harness.output, harness.int64s, harness.pointer
)  # fmt: skip
KERNEL = Path(
    os.environ.get("FASTATTN_EMULATED_POSITIONAL_KERNEL") or harness.CSRC / "cuda" / "positional_kernel.cu"
).resolve()
NAN = float("nan")
FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
CODES = {FP16: 0, BF16: 1, FP32: 2, FP64: 3}  # fastattn::Dtype
PE_CODES = {"none": 0, "sinusoid": 1, "table": 2}  # fastattn::PeKind
I64 = torch.int64

if harness.SKIPPED:
    pytestmark = pytest.mark.skip(reason=harness.SKIP_REASON)


# ---------------------------------------------------------------------------------------------------------
# Building and calling the emulated kernels.
# ---------------------------------------------------------------------------------------------------------


def load(library: Path) -> ctypes.CDLL:
    """The library, with the argument types of tests/cuda_emulator/shim_positional.cpp's C ABI."""
    lib = ctypes.CDLL(str(library))
    p, i32, i64, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    lib.emu_positional_add.argtypes = [p, p, p, p, p, p, i64, i32, i32, f64, f64, f64, i64, i32, i32, p]
    lib.emu_embedding_forward.argtypes = [p, p, p, p, p, p, p, p, i64, i32, f64, f64, i64, i32, i32, p]
    lib.emu_embedding_scatter.argtypes = [p, p, p, p, i64, i64, i32, f64, i32, i32, p]
    return lib


@pytest.fixture(scope="session")
def lib(request) -> ctypes.CDLL:
    """The emulator library, built once per source hash in the pytest cache (or a temporary directory)."""
    shim = harness.EMULATOR / "shim_positional.cpp"
    return load(harness.build(harness.cache_directory(request), KERNEL, shim))


def generator(name: str, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) + salt)


def random_seed(g: torch.Generator) -> int:
    """A 64-bit Philox seed as the ops pass it (a signed int64: its high bit set half the time)."""
    return int(torch.randint(-(2**63), 2**63 - 1, (1,), generator=g, dtype=I64))


def place(t: torch.Tensor, layout: str = "contiguous", guard_below: bool = False) -> torch.Tensor:
    """A guarded copy of t (2-D or 3-D) in memory laid out as ``layout`` says: "contiguous"; "padN" (N NaN elements
    after each row of the last dim); "transposed" (dims 0 and 1 swapped in memory); "broadcast" (t[0] repeated
    along dim 0 with stride 0: the values change to it)."""
    if layout == "transposed":
        return guarded(t.transpose(0, 1).contiguous(), guard_below=guard_below).transpose(0, 1)
    if layout == "broadcast":
        return guarded(t[:1].expand(t.shape), guard_below=guard_below)
    pad = int(layout.removeprefix("pad")) if layout.startswith("pad") else 0
    if layout != "contiguous" and not (layout.startswith("pad") and pad >= 0):
        raise ValueError(f"unknown layout {layout!r}")
    if pad == 0:
        return guarded(t.contiguous(), guard_below=guard_below)
    wide = torch.full((*t.shape[:-1], t.shape[-1] + pad), NAN, dtype=t.dtype)
    wide[..., : t.shape[-1]] = t
    return guarded(wide, fill=NAN, guard_below=guard_below)[..., : t.shape[-1]]


def loads_buffer() -> torch.Tensor:
    """Where the shim reports the kernel's __ldg loads: entry k counts the loads of k bytes."""
    return guarded(torch.zeros(17, dtype=I64))


def check_path(loads: torch.Tensor, dtype: torch.dtype, vector: bool, what: str) -> None:
    """The kernel took the vector path (4 columns in one 8- or 16-byte __ldg) iff ``vector``."""
    size = torch.empty((), dtype=dtype).element_size()
    element, vec = int(loads[size]), int(loads[4 * size])
    got = f"got {element} element and {vec} vector loads"
    if vector:
        assert vec > 0 and element == 0, f"{what}: expected the vector path, {got}"
    else:
        assert vec == 0 and element > 0, f"{what}: expected the element path, {got}"


def check_dropout(out: torch.Tensor, keep: torch.Tensor, undropped: torch.Tensor) -> None:
    """Dropped elements exactly 0, and kept ones nonzero wherever the undropped value cannot round to 0: the mask is
    reference.elementwise_dropout_mask's, bit for bit."""
    dropped = out == 0
    assert not (dropped != ~keep)[~keep].any(), (
        f"dropout mask: {int((~dropped & ~keep).sum())} elements the mask drops are not 0"
    )
    visible = undropped.abs() > 1e-2
    differ = (dropped != ~keep) & visible
    assert not differ.any(), (
        f"dropout mask: {int(differ.sum())} of {keep.numel()} elements differ from reference.elementwise_dropout_mask"
    )


def mask(seed: int, p: float, shape) -> Optional[torch.Tensor]:
    """The kept elements (bool, ``shape``) of dropout over the rows of a tensor of that shape in memory order."""
    if p == 0.0:
        return None
    rows = math.prod(shape[:-1])
    return reference.elementwise_dropout_mask(seed, p, rows, shape[-1], torch.device("cpu")).view(shape)


# ---------------------------------------------------------------------------------------------------------
# positional_add.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddCase:
    name: str
    dtype: torch.dtype
    pe: str  # "sinusoid", "table" or "none" (the backward of every kind)
    batch: int
    seq: int
    dim: int
    batch_first: bool = True
    offset: int = 0
    offsets: Optional[tuple[int, ...]] = None  # per-sequence offsets (batch,)
    scale: float = 1.0
    base: float = 10000.0
    dropout_p: float = 0.0
    layout: str = "contiguous"  # of x in memory (place())
    table_pad: int = 0  # elements between the table's rows
    sms: int = H100_SMS

    @property
    def vector(self) -> bool:
        """The launcher's rule: dim a multiple of 4 and every row start of x, out and the table 4-element aligned."""
        pad = int(self.layout.removeprefix("pad")) if self.layout.startswith("pad") else 0
        return self.dim % 4 == 0 and pad % 4 == 0 and self.table_pad % 4 == 0


ADD_CASES = [
    # Sinusoid: the vector path (dim % 4 == 0, aligned rows) and the element path (odd dims or unaligned rows).
    AddCase("fp32-sin-d64", FP32, "sinusoid", 2, 9, 64),
    AddCase("fp16-sin-d7-seq-first-offsets", FP16, "sinusoid", 3, 5, 7, batch_first=False, offsets=(0, 4, 11)),
    AddCase("bf16-sin-d1-offset", BF16, "sinusoid", 2, 6, 1, offset=5),
    # Rows 103 elements apart where one stride alone is unaligned, which alone must send x to the element path:
    # here the batch stride (the seq stride, 4 sequences, is 412), in bf16-table-d100-pad3-... the seq stride.
    AddCase("fp32-sin-d100-pad3-seq-first-dropout", FP32, "sinusoid", 4, 7, 100, batch_first=False, layout="pad3",
            scale=0.7, dropout_p=0.3),
    AddCase("fp16-sin-d100-pad4-negative-offsets", FP16, "sinusoid", 3, 4, 100, layout="pad4", offset=-3,
            offsets=(0, -20, 7)),
    # Two column blocks; 21 rows over 8 row blocks (one multiprocessor), seq-first dropout rows s * batch + b.
    AddCase("bf16-sin-d516-seq-first-dropout-1-sm", BF16, "sinusoid", 3, 7, 516, batch_first=False, dropout_p=0.2,
            sms=1),
    # Positions near 10^6: the angle reduced in double (a float32 product pos * f is off by up to 0.05 there).
    AddCase("fp32-sin-d128-far-positions", FP32, "sinusoid", 2, 5, 128, offset=10**6, offsets=(0, 123457)),
    AddCase("fp16-sin-d30-base500-scale-broadcast", FP16, "sinusoid", 3, 4, 30, base=500.0, scale=30**0.5,
            layout="broadcast"),
    AddCase("bf16-sin-d64-transposed-dropout", BF16, "sinusoid", 4, 3, 64, layout="transposed", dropout_p=0.5),
    AddCase("fp32-sin-d7-seq-first-transposed", FP32, "sinusoid", 2, 9, 7, batch_first=False, layout="transposed",
            offset=2),
    # A learned table, as tight as the positions (its last row ends at the guard page).
    AddCase("fp32-table-d64-offsets", FP32, "table", 2, 6, 64, offsets=(3, 0)),
    AddCase("fp16-table-d7-seq-first-table-pad2", FP16, "table", 3, 5, 7, batch_first=False, table_pad=2, offset=1),
    AddCase("bf16-table-d100-pad3-table-pad4-dropout", BF16, "table", 2, 4, 100, layout="pad3", table_pad=4,
            dropout_p=0.5),
    AddCase("fp16-table-d100-table-pad3", FP16, "table", 2, 5, 100, table_pad=3),
    AddCase("fp32-table-d520-seq-first-transposed-dropout-1-sm", FP32, "table", 3, 7, 520, batch_first=False,
            layout="transposed", offsets=(2, 0, 5), dropout_p=0.1, sms=1),
    AddCase("bf16-table-d1-seq-first", BF16, "table", 2, 4, 1, batch_first=False, offset=3),
    AddCase("fp16-table-d64-pad4-scale-dropout", FP16, "table", 3, 4, 64, layout="pad4", table_pad=4, scale=8.0,
            dropout_p=0.25),
    # No encoding: the backward of every kind (x * scale, the forward's dropout mask).
    AddCase("fp16-none-d100-dropout", FP16, "none", 2, 5, 100, dropout_p=0.3),
    AddCase("bf16-none-d7-seq-first-scale-dropout", BF16, "none", 3, 4, 7, batch_first=False, scale=2.5,
            dropout_p=0.2),
    AddCase("fp32-none-d513-pad4-1-sm", FP32, "none", 2, 10, 513, layout="pad4", scale=0.5, sms=1),
    AddCase("fp32-none-d64-seq-first-transposed-dropout", FP32, "none", 2, 3, 64, batch_first=False,
            layout="transposed", dropout_p=0.4),
]  # fmt: skip


@dataclass
class AddProblem:
    x: torch.Tensor  # guarded, in the case's layout; (batch, seq, dim) or (seq, batch, dim)
    table: Optional[torch.Tensor]
    offsets: Optional[torch.Tensor]
    positions: torch.Tensor  # of x's leading shape
    seed: int
    keep: Optional[torch.Tensor]


def make_add_problem(case: AddCase, table_rows: Optional[int] = None, guard_below: bool = False) -> AddProblem:
    g = generator(case.name)
    shape = (case.batch, case.seq, case.dim) if case.batch_first else (case.seq, case.batch, case.dim)
    x = (torch.randn(shape, generator=g) * 2).to(case.dtype)
    x = place(torch.where(x == 0, torch.ones_like(x), x), case.layout)
    offsets = None if case.offsets is None else guarded(torch.tensor(case.offsets, dtype=I64))
    positions = reference.sequence_positions(case.batch, case.seq, case.offset, offsets, case.batch_first)
    table = None
    if case.pe == "table":
        rows = table_rows if table_rows is not None else int(positions.max()) + 1
        table = torch.randn(rows, case.dim, generator=g).to(case.dtype)
        table = place(table, f"pad{case.table_pad}", guard_below=guard_below)
    seed = random_seed(g)
    return AddProblem(x, table, offsets, positions, seed, mask(seed, case.dropout_p, shape))


def run_add(lib, case: AddCase, pr: AddProblem, schedule: int = 0, dtype: Optional[torch.dtype] = None):
    """(cudaError_t code, out, loads) of positional_add_cuda; out is contiguous in x's layout, as the binding
    allocates it, and NaN where the kernel does not write."""
    x = pr.x
    out = output(x.shape, x.dtype)
    b, s = (0, 1) if case.batch_first else (1, 0)
    table_rows, table_stride = (0, 0) if pr.table is None else (pr.table.shape[0], pr.table.stride(0))
    sizes = [x.shape[b], x.shape[s], x.shape[2], table_rows]
    strides = [x.stride(b), x.stride(s), out.stride(b), out.stride(s), table_stride]
    loads = loads_buffer()
    code = call_in_child(
        lib.emu_positional_add, pointer(x), pointer(out), pointer(pr.table), pointer(pr.offsets), int64s(sizes),
        int64s(strides), case.offset, CODES[dtype or x.dtype], PE_CODES[case.pe], case.scale, case.base,
        case.dropout_p, pr.seed, case.sms, schedule, pointer(loads),
    )  # fmt: skip
    return code, out, loads


def add_encoding(case: AddCase, pr: AddProblem, positions: torch.Tensor) -> Optional[torch.Tensor]:
    """PE at ``positions`` in float64: the sinusoid, the table's rows, or None."""
    if case.pe == "sinusoid":
        return reference.sinusoidal_table(positions, case.dim, case.base)
    if case.pe == "table":
        return pr.table.double()[positions]
    return None


def add_references(case: AddCase, pr: AddProblem, positions: Optional[torch.Tensor] = None):
    """(truth, baseline, undropped): reference.positional_add in float64, in x's dtype from PE rounded to it (the
    error-ratio baseline), and the float64 truth without dropout."""
    pe = add_encoding(case, pr, pr.positions if positions is None else positions)
    truth = reference.positional_add(pr.x.double(), pe, case.scale, pr.keep, case.dropout_p)
    low = None if pe is None else pe.to(case.dtype)
    baseline = reference.positional_add(pr.x, low, case.scale, pr.keep, case.dropout_p, upcast=False)
    undropped = reference.positional_add(pr.x.double(), pe, case.scale)
    return truth, baseline, undropped


@pytest.mark.parametrize("case", ADD_CASES, ids=lambda c: c.name)
def test_positional_add(lib, case):
    """out against reference.positional_add in float64 (PE: reference.sinusoidal_table or the table's rows at
    offset + offsets[b] + s) with the error-ratio rule; dropout bit for bit; the vector path iff the rows align."""
    pr = make_add_problem(case)
    code, out, loads = run_add(lib, case, pr)
    assert code == 0, f"positional_add_cuda returned {CUDA_ERRORS.get(code, code)}"
    truth, baseline, undropped = add_references(case, pr)
    assert_error_ratio(out, truth, baseline)
    if pr.keep is not None:
        check_dropout(out, pr.keep, undropped)
    check_path(loads, case.dtype, case.vector, "positional_add")


OUT_OF_TABLE = [
    AddCase("fp16-table-d7-out-of-table", FP16, "table", 3, 6, 7, offset=-2, offsets=(0, 3, 9)),
    AddCase("fp32-table-d64-seq-first-out-of-table-dropout", FP32, "table", 3, 5, 64, batch_first=False, offset=-1,
            offsets=(0, 2, 5), dropout_p=0.3),
]  # fmt: skip


@pytest.mark.parametrize("guard_below", [False, True], ids=["guard-after", "guard-before"])
@pytest.mark.parametrize("case", OUT_OF_TABLE, ids=lambda c: c.name)
def test_positional_add_out_of_table(lib, case, guard_below):
    """Positions before the table (negative) or past its 8 rows give NaN rows (their dropped elements 0), without
    reading outside the table (guarded before its first row, or after its last); the other rows are right."""
    table_rows = 8
    pr = make_add_problem(case, table_rows=table_rows, guard_below=guard_below)
    code, out, _ = run_add(lib, case, pr)
    assert code == 0, f"positional_add_cuda returned {CUDA_ERRORS.get(code, code)}"
    inside = (pr.positions >= 0) & (pr.positions < table_rows)
    assert not inside.all() and inside.any(), "the case must have positions inside and outside the table"
    truth, baseline, undropped = add_references(case, pr, pr.positions.clamp(0, table_rows - 1))
    expected_nan = ~inside[..., None].expand(out.shape)
    if pr.keep is not None:
        expected_nan = expected_nan & pr.keep
    truth = truth.masked_fill(expected_nan, NAN)
    baseline = baseline.masked_fill(~inside[..., None], 0.0)
    assert_error_ratio(out, truth, baseline)
    assert torch.equal(out.isnan(), expected_nan), "NaN exactly in the kept elements of the rows outside the table"


# ---------------------------------------------------------------------------------------------------------
# embedding_forward.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedCase:
    name: str
    dtype: torch.dtype
    batch: int
    seq: int
    dim: int
    vocab: int = 13  # tokens repeat: batch * seq > vocab
    positions: bool = False  # random positions (with repeats) in [0, max_positions); else offset + offsets[b] + s
    max_positions: int = 0  # 0: as many as the positions need
    offset: int = 0
    offsets: Optional[tuple[int, ...]] = None
    token_scale: float = 1.0
    dropout_p: float = 0.0
    token_pad: int = 0  # elements between the token table's rows
    position_pad: int = 0
    sms: int = H100_SMS

    @property
    def vector(self) -> bool:
        """The launcher's rule: dim a multiple of 4 and both tables' rows 4-element aligned."""
        return self.dim % 4 == 0 and self.token_pad % 4 == 0 and self.position_pad % 4 == 0


EMBED_CASES = [
    EmbedCase("fp32-d64-positions", FP32, 3, 6, 64, positions=True),
    EmbedCase("fp16-d7-offsets-token-pad3", FP16, 3, 5, 7, offset=1, offsets=(0, 5, 9), token_pad=3),
    EmbedCase("bf16-d100-pads4-scale-dropout", BF16, 2, 7, 100, offset=2, token_pad=4, position_pad=4,
              token_scale=10.0, dropout_p=0.25),
    EmbedCase("fp32-d1-positions-dropout", FP32, 2, 7, 1, positions=True, dropout_p=0.5),
    # Two column blocks; 24 rows over 8 row blocks.
    EmbedCase("fp16-d516-scale-dropout-1-sm", FP16, 3, 8, 516, offset=3, token_scale=516**0.5, dropout_p=0.1, sms=1),
    EmbedCase("bf16-d100-token-pad3-positions", BF16, 2, 7, 100, positions=True, token_pad=3),
    EmbedCase("fp32-d100-position-pad2-offsets", FP32, 2, 7, 100, offsets=(4, 0), position_pad=2),
    EmbedCase("fp16-d520-positions-vocab5", FP16, 2, 4, 520, vocab=5, positions=True),
]  # fmt: skip


@dataclass
class EmbedProblem:
    tokens: torch.Tensor  # guarded (batch, seq) int64
    positions: Optional[torch.Tensor]  # guarded (batch, seq) int64, or None
    offsets: Optional[torch.Tensor]
    token_weight: torch.Tensor
    position_weight: torch.Tensor
    pos: torch.Tensor  # the positions the kernel should use (batch, seq)
    seed: int
    keep: Optional[torch.Tensor]


def make_embed_problem(case: EmbedCase, guard_below: bool = False, bad: bool = False) -> EmbedProblem:
    """``bad``: some tokens and positions out of range (-1, vocab, max_positions); the positions (given or from the
    offsets) are then made for a table of case.max_positions rows."""
    g = generator(case.name)
    shape = (case.batch, case.seq)
    tokens = torch.randint(0, case.vocab, shape, generator=g)
    offsets = None if case.offsets is None else guarded(torch.tensor(case.offsets, dtype=I64))
    if case.positions:
        pos = torch.randint(0, case.max_positions or 40, shape, generator=g)
    else:
        pos = reference.sequence_positions(case.batch, case.seq, case.offset, offsets)
    rows = case.max_positions or int(pos.max()) + 1
    if bad:
        tokens[0, 1], tokens[-1, -1] = -1, case.vocab
        if case.positions:
            pos[0, 2], pos[-1, 0] = -1, rows
    token_weight = place(torch.randn(case.vocab, case.dim, generator=g).to(case.dtype), f"pad{case.token_pad}",
                         guard_below)  # fmt: skip
    position_weight = torch.randn(rows, case.dim, generator=g).to(case.dtype)
    position_weight = place(position_weight, f"pad{case.position_pad}", guard_below)
    seed = random_seed(g)
    positions = guarded(pos) if case.positions else None
    return EmbedProblem(guarded(tokens), positions, offsets, token_weight, position_weight, pos, seed,
                        mask(seed, case.dropout_p, (*shape, case.dim)))  # fmt: skip


def run_embed(lib, case: EmbedCase, pr: EmbedProblem, schedule: int = 0, dtype: Optional[torch.dtype] = None):
    """(cudaError_t code, out, loads) of embedding_forward_cuda; out contiguous (batch, seq, dim), NaN where the
    kernel does not write."""
    tw, pw = pr.token_weight, pr.position_weight
    out = output((case.batch, case.seq, case.dim), tw.dtype)
    sizes = [case.batch, case.seq, case.dim, tw.shape[0], pw.shape[0]]
    loads = loads_buffer()
    code = call_in_child(
        lib.emu_embedding_forward, pointer(pr.tokens), pointer(pr.positions), pointer(pr.offsets), pointer(tw),
        pointer(pw), pointer(out), int64s(sizes), int64s([tw.stride(0), pw.stride(0)]),
        0 if case.positions else case.offset, CODES[dtype or tw.dtype], case.token_scale, case.dropout_p, pr.seed,
        case.sms, schedule, pointer(loads),
    )  # fmt: skip
    return code, out, loads


def embed_references(case: EmbedCase, pr: EmbedProblem, tokens: torch.Tensor, pos: torch.Tensor):
    """(truth, baseline, undropped) of reference.embedding_with_positions: float64, the weights' dtype, and float64
    without dropout."""
    tw, pw = pr.token_weight, pr.position_weight
    args = (case.token_scale, pr.keep, case.dropout_p)
    truth = reference.embedding_with_positions(tokens, tw.double(), pw.double(), pos, *args)
    baseline = reference.embedding_with_positions(tokens, tw, pw, pos, *args, upcast=False)
    undropped = reference.embedding_with_positions(tokens, tw.double(), pw.double(), pos, case.token_scale)
    return truth, baseline, undropped


@pytest.mark.parametrize("case", EMBED_CASES, ids=lambda c: c.name)
def test_embedding_forward(lib, case):
    """out against reference.embedding_with_positions in float64 with the error-ratio rule (repeated tokens and
    positions); dropout bit for bit over rows b * seq + s; the vector path iff both tables' rows align."""
    pr = make_embed_problem(case)
    code, out, loads = run_embed(lib, case, pr)
    assert code == 0, f"embedding_forward_cuda returned {CUDA_ERRORS.get(code, code)}"
    truth, baseline, undropped = embed_references(case, pr, pr.tokens, pr.pos)
    assert_error_ratio(out, truth, baseline)
    if pr.keep is not None:
        check_dropout(out, pr.keep, undropped)
    check_path(loads, case.dtype, case.vector, "embedding_forward")


OUT_OF_RANGE_EMBED = [
    EmbedCase("fp16-d7-bad-tokens-positions", FP16, 2, 5, 7, vocab=6, positions=True, max_positions=9),
    # Offsets that run past the position table: the last rows of sequence 1.
    EmbedCase("bf16-d64-bad-tokens-offsets-dropout", BF16, 2, 5, 64, vocab=6, offsets=(0, 6), max_positions=9,
              dropout_p=0.3),
]  # fmt: skip


@pytest.mark.parametrize("guard_below", [False, True], ids=["guard-after", "guard-before"])
@pytest.mark.parametrize("case", OUT_OF_RANGE_EMBED, ids=lambda c: c.name)
def test_embedding_forward_out_of_range(lib, case, guard_below):
    """A token or position out of range (-1, vocab, max_positions) gives a NaN row (its dropped elements 0),
    without reading outside either table (guarded before the first row, or after the last); the other rows are
    right."""
    pr = make_embed_problem(case, guard_below=guard_below, bad=True)
    code, out, _ = run_embed(lib, case, pr)
    assert code == 0, f"embedding_forward_cuda returned {CUDA_ERRORS.get(code, code)}"
    rows = pr.position_weight.shape[0]
    valid = (pr.tokens >= 0) & (pr.tokens < case.vocab) & (pr.pos >= 0) & (pr.pos < rows)
    assert not valid.all() and valid.any(), "the case must have valid and invalid rows"
    truth, baseline, _ = embed_references(case, pr, pr.tokens.clamp(0, case.vocab - 1), pr.pos.clamp(0, rows - 1))
    expected_nan = ~valid[..., None].expand(out.shape)
    if pr.keep is not None:
        expected_nan = expected_nan & pr.keep
    truth = truth.masked_fill(expected_nan, NAN)
    baseline = baseline.masked_fill(~valid[..., None], 0.0)
    assert_error_ratio(out, truth, baseline)
    assert torch.equal(out.isnan(), expected_nan), "NaN exactly in the kept elements of the invalid rows"


# ---------------------------------------------------------------------------------------------------------
# embedding_scatter.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScatterCase:
    name: str
    dtype: torch.dtype
    n: int
    dim: int
    num_rows: int  # the indices cover rows 0 .. num_rows - 2: the last row gets no entry
    skip_row: int = -1
    scale: float = 1.0
    grad_pad: int = 0
    sms: int = H100_SMS

    @property
    def vector(self) -> bool:
        return self.dim % 4 == 0 and self.grad_pad % 4 == 0


SCATTER_CASES = [
    ScatterCase("fp32-d64-skip2-scale", FP32, 50, 64, 7, skip_row=2, scale=0.5),
    ScatterCase("fp16-d7-pad3", FP16, 40, 7, 5, grad_pad=3),
    ScatterCase("bf16-d100-pad4-skip0-scale", BF16, 60, 100, 9, skip_row=0, grad_pad=4, scale=3.0),
    ScatterCase("fp32-d1-skip3", FP32, 30, 1, 5, skip_row=3),
    # Two column blocks; 40 entries over 8 row blocks.
    ScatterCase("fp16-d516-1-sm", FP16, 40, 516, 6, scale=0.125, sms=1),
    ScatterCase("bf16-d520-one-entry", BF16, 1, 520, 3),
    ScatterCase("fp32-d100-pad2-200-into-3", FP32, 200, 100, 4, grad_pad=2, scale=0.7),
]  # fmt: skip


def make_scatter_problem(case: ScatterCase) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad (n, dim) guarded with the case's row padding, index (n,) int64 with repeats and the skip row)."""
    g = generator(case.name)
    grad = place(torch.randn(case.n, case.dim, generator=g).to(case.dtype), f"pad{case.grad_pad}")
    index = torch.randint(0, case.num_rows - 1, (case.n,), generator=g)
    if case.skip_row >= 0:
        index[0] = case.skip_row
    return grad, index


def run_scatter(lib, case: ScatterCase, grad, index, schedule=0, guard_below=False, dtype=None):
    """(cudaError_t code, acc, loads) of embedding_scatter_cuda: acc is the float32 (num_rows, dim) buffer, zero
    before the call, that the binding allocates (and rounds to grad's dtype)."""
    acc = guarded(torch.zeros(case.num_rows, case.dim), guard_below=guard_below)
    index = guarded(index)
    loads = loads_buffer()
    code = call_in_child(
        lib.emu_embedding_scatter, pointer(grad), pointer(index), pointer(acc),
        int64s([case.n, case.dim, case.num_rows]), grad.stride(0), case.skip_row, CODES[dtype or grad.dtype],
        case.scale, case.sms, schedule, pointer(loads),
    )  # fmt: skip
    return code, acc, loads


def check_scatter(case: ScatterCase, grad, index, acc) -> None:
    """acc rounded to grad's dtype (what the op returns) against reference.embedding_scatter in float64, with its
    float32-compute version as the baseline; the skip row and the rows without entries exactly 0."""
    truth = reference.embedding_scatter(grad.double(), index, case.num_rows, case.scale, case.skip_row)
    baseline = reference.embedding_scatter(grad, index, case.num_rows, case.scale, case.skip_row)
    assert_error_ratio(acc.to(case.dtype), truth, baseline)
    empty = torch.ones(case.num_rows, dtype=torch.bool)
    empty[index] = False
    if case.skip_row >= 0:
        empty[case.skip_row] = True
    assert (acc[empty] == 0).all(), f"rows {empty.nonzero().flatten().tolist()} must stay exactly 0"


@pytest.mark.parametrize("case", SCATTER_CASES, ids=lambda c: c.name)
def test_embedding_scatter(lib, case):
    """The rows scale * sum of grad's rows with that index (repeated indices, a skipped padding row, a row with no
    entry) against reference.embedding_scatter; the vector path iff grad's rows align."""
    grad, index = make_scatter_problem(case)
    code, acc, loads = run_scatter(lib, case, grad, index)
    assert code == 0, f"embedding_scatter_cuda returned {CUDA_ERRORS.get(code, code)}"
    check_scatter(case, grad, index, acc)
    check_path(loads, case.dtype, case.vector, "embedding_scatter")


@pytest.mark.parametrize("guard_below", [False, True], ids=["guard-after", "guard-before"])
def test_embedding_scatter_out_of_range(lib, guard_below):
    """Entries whose index is out of range (-1, -7, num_rows, num_rows + 3) add nothing anywhere: the buffer is
    guarded before its first row or after its last, and the other entries' sums are right."""
    case = ScatterCase("fp16-d12-out-of-range", FP16, 24, 12, 5, skip_row=1, scale=2.0)
    grad, index = make_scatter_problem(case)
    bad = torch.tensor([3, 8, 15, 23])
    index[bad] = torch.tensor([-1, -7, case.num_rows, case.num_rows + 3])
    code, acc, _ = run_scatter(lib, case, grad, index, guard_below=guard_below)
    assert code == 0, f"embedding_scatter_cuda returned {CUDA_ERRORS.get(code, code)}"
    valid = torch.ones(case.n, dtype=torch.bool)
    valid[bad] = False
    check_scatter(ScatterCase(case.name, FP16, int(valid.sum()), 12, 5, skip_row=1, scale=2.0), grad[valid],
                  index[valid], acc)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# All three: schedules and refusals.
# ---------------------------------------------------------------------------------------------------------


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_schedules_agree(lib):
    """Threads started in reverse order give the same bits: no thread reads or writes another's columns (for the
    scatter, each element's adds keep their order)."""
    for case in (ADD_CASES[5], ADD_CASES[14]):
        pr = make_add_problem(case)
        outs = [run_add(lib, case, pr, schedule)[1] for schedule in (0, 1)]
        assert same_bits(*outs), f"{case.name}: the reversed schedule changed positional_add's output"
    case = EMBED_CASES[4]
    pr = make_embed_problem(case)
    outs = [run_embed(lib, case, pr, schedule)[1] for schedule in (0, 1)]
    assert same_bits(*outs), f"{case.name}: the reversed schedule changed embedding_forward's output"
    case = SCATTER_CASES[4]
    grad, index = make_scatter_problem(case)
    outs = [run_scatter(lib, case, grad, index, schedule)[1] for schedule in (0, 1)]
    assert same_bits(*outs), f"{case.name}: the reversed schedule changed embedding_scatter's sums"


def test_launcher_refusals(lib):
    """float64 is refused with cudaErrorInvalidValue before any launch, writing nothing, also when there is nothing
    to do; empty problems return cudaSuccess and write nothing."""
    case = AddCase("fp32-sin-refused", FP32, "sinusoid", 2, 3, 8)
    pr = make_add_problem(case)
    code, out, _ = run_add(lib, case, pr, dtype=FP64)
    assert code == 1, f"positional_add_cuda with float64: {CUDA_ERRORS.get(code, code)}"
    assert out.isnan().all(), "a refused launch wrote its output"
    empty = AddCase("fp32-sin-empty", FP32, "sinusoid", 2, 0, 8)
    assert run_add(lib, empty, make_add_problem(empty), dtype=FP64)[0] == 1, "float64 with no rows is not refused"
    assert run_add(lib, empty, make_add_problem(empty))[0] == 0, "no rows: cudaSuccess"

    case = EmbedCase("fp32-embed-refused", FP32, 2, 3, 8, positions=True)
    pr = make_embed_problem(case)
    code, out, _ = run_embed(lib, case, pr, dtype=FP64)
    assert code == 1, f"embedding_forward_cuda with float64: {CUDA_ERRORS.get(code, code)}"
    assert out.isnan().all(), "a refused launch wrote its output"

    case = ScatterCase("fp32-scatter-refused", FP32, 6, 8, 3)
    grad, index = make_scatter_problem(case)
    code, acc, _ = run_scatter(lib, case, grad, index, dtype=FP64)
    assert code == 1, f"embedding_scatter_cuda with float64: {CUDA_ERRORS.get(code, code)}"
    assert (acc == 0).all(), "a refused launch wrote its output"
    empty = ScatterCase("fp32-scatter-empty", FP32, 0, 8, 3)
    grad, index = make_scatter_problem(empty)
    code, acc, _ = run_scatter(lib, empty, grad, index)
    assert code == 0 and (acc == 0).all(), f"no entries: {CUDA_ERRORS.get(code, code)}, or rows written"
