"""The CUDA recurrent cell kernels (csrc/cuda/recurrent_kernel.cu: one step of the LSTM, GRU, tanh / ReLU RNN and
LayerNorm-LSTM, forward and backward) emulated on the CPU, against float64 references built from fastattn.reference's
cell functions with the error-ratio rule, on a machine without a GPU.

How: as tests/test_cuda_emulated.py (its docstring says what the emulator shows and what it does not): gen.py rewrites
the unmodified .cu (its swap table for recurrent_kernel.cu), g++ builds it with tests/cuda_emulator/shim_recurrent.cpp
(a C ABI over recurrent_step_forward_cuda and recurrent_step_backward_cuda that fills their arguments as
csrc/recurrent_driver.h does) into a library of its own, and each launcher call runs in a forked child on guarded
copies of the tensors.

The references. The driver gives a step's kernel hh = h_prev W_hh^T; these tests give it hh directly and let the
reference cells see the same values. LSTM, GRU and RNN: W_hh = 0 and a per-row bias (B, G*H) = hh + b_hh, which the
cells broadcast, so their hh + b_hh is the kernel's; the LayerNorm-LSTM: h = hh and W_hh = I (LN_hh reads hh; its b
joins after the norms) and a per-row LN_c bias. Autograd through these in float64 gives every gradient the kernel
writes: d_hh is the per-row bias's gradient (the LayerNorm-LSTM's: hh's), d_x is x_proj's, dh_pass h_prev's (with
W_hh = 0 only the GRU's z h path reaches it), dc_prev c's and d_cn the per-row LN_c bias's. The saved activations are
computed by their definition in csrc/recurrent.h. The baseline of the error-ratio rule is the same computation in the
case's dtype for the outputs in that dtype (h', out, d_hh, d_x, dh_pass) and in float32, the kernels' compute type, for
those in it (c', saved, dc_prev, d_cn); in float64 it is the truth, and only the floor (64 ulps) allows for rounding.
Rows not live at the step (lengths) must keep their state (h_prev, c_prev), output 0, save zeros and pass dh and dc
through with zero gate gradients.

Poison: every output starts as NaN and ends at an inaccessible page; x, out, grad_out and d_x have NaN padding past
each row, which must stay unwritten (and, read, would turn a result NaN). A kernel that leaves an element unwritten,
or reads or writes past a row or a tensor, fails or crashes.

What passing shows: every kind in float16, bfloat16, float32 and float64 at hidden sizes 1, 7, 40 and 129 (the element
kernels: one or several blocks, a partial last one; the LayerNorm-LSTM's row kernel with 32 and 128 threads, looping
over rows wider than its block) and 600 (512 threads), with and without lengths, with and without b_hh and the norms'
affine tensors (null: weight 1, bias 0), both LSTMs with a projection (no out, no dh_pass), dc_prev aliasing dc (as the
driver passes it) and not, under both emulator schedules for the cases with barriers and a few others; and the
launchers' refusals (unknown dtype or kind, a missing pointer) and an empty batch.
FASTATTN_EMULATED_RECURRENT_KERNEL=path/recurrent_kernel.cu tests another kernel source instead.
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
from fastattn.testing import GRADIENT_RATIO, OUTPUT_RATIO, assert_error_ratio

CUDA_ERRORS = harness.CUDA_ERRORS
call_in_child, guarded, output, int64s, pointer = (
    harness.call_in_child, harness.guarded, harness.output, harness.int64s, harness.pointer
)  # fmt: skip
KERNEL = Path(
    os.environ.get("FASTATTN_EMULATED_RECURRENT_KERNEL") or harness.CSRC / "cuda" / "recurrent_kernel.cu"
).resolve()
NAN = float("nan")
EPS = 1e-5
FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (FP16, BF16, FP32, FP64)
CODES = {FP16: 0, BF16: 1, FP32: 2, FP64: 3}  # fastattn::Dtype
KIND_CODES = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3, "layernorm_lstm": 4}  # fastattn::RecurrentKind
GATES = reference.RECURRENT_GATES
STEP = 2
LENGTHS = (3, 2, 5, 0, 7)  # at STEP: rows 0, 2, 4 live, rows 1 and 3 not
SCHEDULES = {0: "in-order", 1: "reversed"}

if harness.SKIPPED:
    pytestmark = pytest.mark.skip(reason=harness.SKIP_REASON)


def load(library: Path) -> ctypes.CDLL:
    """The library, with the argument types of tests/cuda_emulator/shim_recurrent.cpp's C ABI."""
    lib = ctypes.CDLL(str(library))
    p, i32, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    lib.emu_recurrent_forward.argtypes = [p] * 13 + [f64, i32]
    lib.emu_recurrent_backward.argtypes = [p] * 17 + [i32]
    return lib


@pytest.fixture(scope="session")
def lib(request) -> ctypes.CDLL:
    """The emulator library, built once per source hash in the pytest cache (or a temporary directory)."""
    shim = harness.EMULATOR / "shim_recurrent.cpp"
    return load(harness.build(harness.cache_directory(request), KERNEL, shim))


# ---------------------------------------------------------------------------------------------------------
# The cases.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    kind: str
    dtype: torch.dtype
    hidden: int
    lengths: bool  # some rows not live at the step
    affine: bool  # b_hh and (LayerNorm-LSTM) the norms' weights and biases given; else null
    batch: int = 5
    project: bool = False  # the LSTMs with a projection: no out, h_new of live rows only, no grad_out, no dh_pass
    alias: bool = True  # dc_prev is dc, as the driver passes it
    reversed_too: bool = False  # also under the reversed schedule

    @property
    def name(self) -> str:
        flags = ["lengths" if self.lengths else "", "affine" if self.affine else "", "project" if self.project else "",
                 "" if self.alias else "dc-apart"]  # fmt: skip
        return "-".join([self.kind, str(self.dtype).removeprefix("torch."), f"h{self.hidden}", *filter(None, flags)])

    @property
    def compute(self) -> torch.dtype:
        return reference.compute_dtype(self.dtype)

    @property
    def cell(self) -> bool:  # has c
        return GATES[self.kind] == 4


# Each (kind, dtype) at every hidden size, the four (lengths, affine) pairs spread over the sizes.
PAIRS = [(True, True), (False, False), (True, False), (False, True)]
CASES = [
    Case(kind, dtype, hidden, *PAIRS[i], reversed_too=kind == "layernorm_lstm" and hidden in (7, 129))
    for kind in KIND_CODES for dtype in DTYPES for i, hidden in enumerate((1, 7, 40, 129))
]  # fmt: skip
CASES += [
    # The LayerNorm-LSTM's row kernel at 512 threads, rows wider than the block.
    *(Case("layernorm_lstm", dtype, 600, lengths=True, affine=True, batch=3, reversed_too=dtype == FP32)
      for dtype in DTYPES),
    Case("lstm", FP16, 40, lengths=True, affine=True, project=True),
    Case("lstm", FP64, 7, lengths=False, affine=False, project=True),
    Case("layernorm_lstm", BF16, 129, lengths=True, affine=True, project=True),
    Case("layernorm_lstm", FP64, 40, lengths=True, affine=False, project=True),
    Case("lstm", BF16, 129, lengths=True, affine=True, alias=False, reversed_too=True),
    Case("layernorm_lstm", FP32, 40, lengths=True, affine=True, alias=False),
    Case("layernorm_lstm", FP64, 129, lengths=True, affine=False, alias=False),
    Case("gru", FP32, 129, lengths=True, affine=True, batch=9, reversed_too=True),
]  # fmt: skip
PARAMS = [
    pytest.param(case, schedule, id=f"{case.name}-{SCHEDULES[schedule]}")
    for case in CASES for schedule in ((0, 1) if case.reversed_too else (0,))
]  # fmt: skip


@dataclass
class Problem:
    x: torch.Tensor  # (B, G*H), the case's dtype
    hh: torch.Tensor  # (B, G*H)
    b_hh: Optional[torch.Tensor]  # (G*H,)
    h_prev: torch.Tensor  # (B, H)
    c_prev: Optional[torch.Tensor]  # (B, H), compute type
    norms: tuple  # hh weight, hh bias (4H,), c weight, c bias (H,), or None each
    live: torch.Tensor  # (B,) bool
    lengths: Optional[torch.Tensor]  # (B,) int64
    dh: torch.Tensor  # (B, H): the backward's inputs
    grad_out: Optional[torch.Tensor]  # (B, H)
    dc: Optional[torch.Tensor]  # (B, H), compute type


def make_problem(case: Case) -> Problem:
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    B, H, GH = case.batch, case.hidden, GATES[case.kind] * case.hidden

    def randn(*shape, scale=1.0, shift=0.0, dtype=case.dtype):
        return (torch.randn(*shape, generator=g, dtype=FP64) * scale + shift).to(dtype)

    layernorm = case.kind == "layernorm_lstm"
    norms = (None,) * 4
    if layernorm and case.affine:
        norms = (randn(GH, scale=0.3, shift=1.0), randn(GH, scale=0.3), randn(H, scale=0.3, shift=1.0),
                 randn(H, scale=0.3))  # fmt: skip
    lengths = torch.tensor([LENGTHS[b % len(LENGTHS)] for b in range(B)]) if case.lengths else None
    live = torch.ones(B, dtype=torch.bool) if lengths is None else lengths > STEP
    return Problem(
        x=randn(B, GH), hh=randn(B, GH), b_hh=randn(GH, scale=0.5) if case.affine else None, h_prev=randn(B, H),
        c_prev=randn(B, H, dtype=case.compute) if case.cell else None, norms=norms, live=live, lengths=lengths,
        dh=randn(B, H), grad_out=None if case.project else randn(B, H),
        dc=randn(B, H, dtype=case.compute) if case.cell else None,
    )  # fmt: skip


def normalised(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v - mean) * rstd over the last dim, and rstd (B, 1), as LN computes them."""
    centred = v - v.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + EPS)
    return centred * rstd, rstd


def reference_step(case: Case, pr: Problem, dtype: torch.dtype) -> dict:
    """The step by fastattn.reference's cells on pr's inputs converted to `dtype` (float64: the truth), every row as
    if live: h_new, c_new, saved (csrc/recurrent.h's layout) and the gradients d_hh, d_x, dh_pass, dc_prev, d_cn
    from dh (+ grad_out) reaching h' and dc reaching c' (None where the kind has none)."""
    B, H, GH = case.batch, case.hidden, GATES[case.kind] * case.hidden

    def cast(t):
        return None if t is None else t.to(dtype)

    def leaf(t):
        return None if t is None else t.to(dtype).detach().requires_grad_()

    x, h, c, b = leaf(pr.x), leaf(pr.h_prev), leaf(pr.c_prev), cast(pr.b_hh)
    c_new = None
    with torch.enable_grad():
        if case.kind == "layernorm_lstm":
            hh = leaf(pr.hh)
            bias = leaf(torch.zeros(B, GH, dtype=dtype) if b is None else b.expand(B, GH))  # gradient: d_x's
            hh_w, hh_b, c_w, c_b = (cast(t) for t in pr.norms)
            c_bias = leaf(torch.zeros(B, H, dtype=dtype) if c_b is None else c_b.expand(B, H))  # gradient: d_cn
            h_new, c_new = reference.layer_norm_lstm_cell(
                x, hh, c, torch.eye(GH, dtype=dtype), bias, None, (hh_w, hh_b), (c_w, c_bias), eps=EPS
            )
            wrt = {"d_hh": hh, "d_x": x, "dc_prev": c, "d_cn": c_bias}
        else:
            hh_plus_b = leaf(cast(pr.hh) if b is None else cast(pr.hh) + b)  # the cells' h W_hh^T + b_hh, W_hh = 0
            w_hh = torch.zeros(GH, H, dtype=dtype)
            if case.kind == "lstm":
                h_new, c_new = reference.lstm_cell(x, h, c, w_hh, hh_plus_b)
            elif case.kind == "gru":
                h_new = reference.gru_cell(x, h, w_hh, hh_plus_b)
            else:
                h_new = reference.rnn_cell(x, h, w_hh, hh_plus_b, case.kind.removeprefix("rnn_"))
            wrt = {"d_hh": hh_plus_b, "d_x": x, "dh_pass": h, "dc_prev": c}
        up = cast(pr.dh) if pr.grad_out is None else cast(pr.dh) + cast(pr.grad_out)
        loss = (h_new * up).sum() + (0 if c_new is None else (c_new * cast(pr.dc)).sum())
        names = [name for name, t in wrt.items() if t is not None]
        result = dict(zip(names, torch.autograd.grad(loss, [wrt[name] for name in names])))
    result["h_new"], result["c_new"] = h_new.detach(), None if c_new is None else c_new.detach()
    if case.kind == "layernorm_lstm":
        result["dh_pass"] = torch.zeros(B, H, dtype=dtype)
    with torch.no_grad():
        if case.kind == "lstm":
            i, f, g, o = (x + hh_plus_b).chunk(4, dim=-1)
            result["saved"] = torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], dim=-1)
        elif case.kind == "gru":
            (x_r, x_z, x_n), (h_r, h_z, h_n) = x.chunk(3, dim=-1), hh_plus_b.chunk(3, dim=-1)
            r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
            result["saved"] = torch.cat([r, z, (x_n + r * h_n).tanh(), h_n], dim=-1)
        elif case.kind == "layernorm_lstm":
            hh_hat, rstd_hh = normalised(hh)
            pre = x + hh_hat * (1 if hh_w is None else hh_w) + (0 if hh_b is None else hh_b) + bias
            i, f, g, o = pre.chunk(4, dim=-1)
            c_hat, rstd_c = normalised(c_new)
            gates = [i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()]
            result["saved"] = torch.cat([*gates, hh_hat, c_hat, rstd_hh, rstd_c], dim=-1)
    return result


def not_live(values: dict, case: Case, pr: Problem) -> dict:
    """values with the rows not live at the step replaced by what the kernels must write there."""
    B, GH = case.batch, GATES[case.kind] * case.hidden
    dtype = values["h_new"].dtype
    dead = {
        "h_new": pr.h_prev, "out": torch.zeros(B, case.hidden), "c_new": pr.c_prev, "saved": torch.zeros(B, 1),
        "d_hh": torch.zeros(B, GH), "d_x": torch.zeros(B, GH), "dh_pass": pr.dh, "dc_prev": pr.dc,
        "d_cn": torch.zeros(B, case.hidden),
    }  # fmt: skip
    values = dict(values, out=values["h_new"])
    live = pr.live[:, None]
    return {k: None if v is None else torch.where(live, v, dead[k].to(dtype)) for k, v in values.items()}


def expected(case: Case, pr: Problem) -> tuple[dict, dict]:
    """(truth, baseline) per output name, rows not live included."""
    truth = not_live(reference_step(case, pr, FP64), case, pr)
    in_dtype = not_live(reference_step(case, pr, case.dtype), case, pr)
    in_compute = in_dtype if case.compute == case.dtype else not_live(reference_step(case, pr, case.compute), case, pr)
    baseline = {k: (in_compute if k in ("c_new", "saved", "dc_prev", "d_cn") else in_dtype)[k] for k in truth}
    return truth, baseline


# ---------------------------------------------------------------------------------------------------------
# Calling the emulated kernels.
# ---------------------------------------------------------------------------------------------------------


def guard(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else guarded(t)


def padded(t: torch.Tensor, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A guarded copy of the 2-D t whose rows are `pad` NaN elements apart, and the whole buffer (rows + padding)."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), NAN, dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    wide = guarded(wide)
    return wide[:, : t.shape[1]], wide


def assert_padding_untouched(wide: Optional[torch.Tensor], n: int, name: str) -> None:
    if wide is not None:
        assert wide[:, n:].isnan().all(), f"{name}: the kernel wrote past the end of a row"


def norm_pointers(pr: Problem):
    """The norms as guarded copies (kept alive by the caller) and the shim's array of their pointers."""
    copies = [guard(t) for t in pr.norms]
    return copies, (ctypes.c_void_p * 4)(*[pointer(t) for t in copies])


def run_forward(lib, case: Case, pr: Problem, schedule: int, sizes=None) -> tuple[int, dict, dict]:
    """(code, outputs, padded buffers) of one emulated forward step."""
    B, H = case.batch, case.hidden
    x, _ = padded(pr.x)
    out, out_wide = (None, None) if case.project else padded(torch.full((B, H), NAN, dtype=case.dtype))
    c_new = output((B, H), case.compute) if case.cell else None
    width = {"lstm": 4 * H, "gru": 4 * H, "layernorm_lstm": 9 * H + 2}.get(case.kind)
    o = {"h_new": output((B, H), case.dtype), "out": out, "c_new": c_new,
         "saved": None if width is None else output((B, width), case.compute)}  # fmt: skip
    hh, b_hh, h_prev, c_prev, lengths = map(guard, (pr.hh, pr.b_hh, pr.h_prev, pr.c_prev, pr.lengths))
    norms, norm_array = norm_pointers(pr)
    sizes = sizes or [KIND_CODES[case.kind], CODES[case.dtype], B, H, STEP, int(case.project)]
    code = call_in_child(
        lib.emu_recurrent_forward, int64s(sizes), pointer(x), pointer(hh), pointer(b_hh), pointer(h_prev),
        pointer(c_prev), pointer(c_new), pointer(o["h_new"]), pointer(out), pointer(o["saved"]),
        int64s([x.stride(0), 0 if out is None else out.stride(0)]), pointer(lengths), norm_array, EPS, schedule,
    )  # fmt: skip
    return code, o, {"out": out_wide}


def run_backward(lib, case: Case, pr: Problem, truth: dict, schedule: int) -> tuple[int, dict, dict]:
    """(code, outputs, padded buffers) of one emulated backward step, its saved values, c' and h' the forward's
    (rounded to their dtypes)."""
    B, H, GH = case.batch, case.hidden, GATES[case.kind] * case.hidden
    grad_out = None if pr.grad_out is None else padded(pr.grad_out)[0]
    own_d_x = case.kind in ("gru", "layernorm_lstm")
    d_x, d_x_wide = padded(torch.full((B, GH), NAN, dtype=case.dtype)) if own_d_x else (None, None)
    dc = guard(pr.dc)
    dc_prev = dc if case.alias or dc is None else output((B, H), case.compute)
    dh_pass = None if case.project else output((B, H), case.dtype)
    d_cn = output((B, H), case.compute) if case.kind == "layernorm_lstm" else None
    o = {"d_hh": output((B, GH), case.dtype), "d_x": d_x, "dh_pass": dh_pass, "dc_prev": dc_prev, "d_cn": d_cn}
    saved, c_new = (guard(None if t is None else t.to(case.compute)) for t in (truth.get("saved"), truth["c_new"]))
    h_new = guarded(truth["h_new"].to(case.dtype))
    dh, h_prev, c_prev, lengths = map(guard, (pr.dh, pr.h_prev, pr.c_prev, pr.lengths))
    norms, norm_array = norm_pointers(pr)
    sizes = [KIND_CODES[case.kind], CODES[case.dtype], B, H, STEP]
    code = call_in_child(
        lib.emu_recurrent_backward, int64s(sizes), pointer(grad_out), pointer(dh), pointer(dc), pointer(dc_prev),
        pointer(saved), pointer(c_prev), pointer(c_new), pointer(h_prev), pointer(h_new), pointer(o["d_hh"]),
        pointer(d_x), pointer(o["d_cn"]), pointer(o["dh_pass"]),
        int64s([0 if grad_out is None else grad_out.stride(0), 0 if d_x is None else d_x.stride(0)]), pointer(lengths),
        norm_array, schedule,
    )  # fmt: skip
    return code, dict(o, dc=dc), {"d_x": d_x_wide}


@pytest.mark.parametrize("case, schedule", PARAMS)
def test_forward(lib, case, schedule):
    """h_new, out, c_new and the saved values against the float64 reference cells (rows not live: the state kept, 0
    out, zeros saved), the error-ratio rule against the same in the case's dtype (float32 for the compute-type
    outputs)."""
    pr = make_problem(case)
    code, got, wide = run_forward(lib, case, pr, schedule)
    assert code == 0, f"recurrent_step_forward_cuda returned {CUDA_ERRORS.get(code, code)}"
    truth, base = expected(case, pr)
    if case.project:  # h_new of the live rows only (the driver keeps the others' state itself)
        got["h_new"], truth["h_new"], base["h_new"] = (d["h_new"][pr.live] for d in (got, truth, base))
    for name in ("h_new", "out", "c_new", "saved"):
        if got[name] is not None:
            assert_error_ratio(got[name], truth[name], base[name], name=name, ratio=OUTPUT_RATIO)
    assert_padding_untouched(wide["out"], case.hidden, "out")


@pytest.mark.parametrize("case, schedule", PARAMS)
def test_backward(lib, case, schedule):
    """d_hh, d_x, dh_pass, dc_prev and d_cn against autograd through the float64 reference cells (rows not live: zero
    gate gradients, dh and dc passed through), the error-ratio rule as the forward's; dc itself unchanged unless
    dc_prev is dc."""
    pr = make_problem(case)
    truth, base = expected(case, pr)
    code, got, wide = run_backward(lib, case, pr, truth, schedule)
    assert code == 0, f"recurrent_step_backward_cuda returned {CUDA_ERRORS.get(code, code)}"
    for name in ("d_hh", "d_x", "dh_pass", "dc_prev", "d_cn"):
        if got[name] is not None:
            assert_error_ratio(got[name], truth[name], base[name], name=name, ratio=GRADIENT_RATIO)
    assert_padding_untouched(wide["d_x"], GATES[case.kind] * case.hidden, "d_x")
    if got["dc"] is not None and not case.alias:
        assert torch.equal(got["dc"], pr.dc), "dc changed though dc_prev is a tensor of its own"


def test_refusals_and_empty_batch(lib):
    """An unknown dtype or kind, or a pointer the kind needs left null, gives cudaErrorInvalidValue and writes nothing;
    an empty batch gives cudaSuccess."""
    case = Case("lstm", FP32, 7, lengths=False, affine=False)
    pr = make_problem(case)
    base = [KIND_CODES["lstm"], CODES[FP32], case.batch, case.hidden, STEP, 0]
    for why, sizes in [("dtype code 4", [0, 4, *base[2:]]), ("kind code 5", [5, *base[1:]]),
                       ("negative batch", [*base[:2], -1, *base[3:]])]:  # fmt: skip
        code, got, _ = run_forward(lib, case, pr, 0, sizes)
        assert code == 1, f"{why}: {CUDA_ERRORS.get(code, code)}"
        assert got["h_new"].isnan().all(), f"{why}: a refused launch wrote its output"
    code, *_ = run_forward(lib, case, pr, 0, [*base[:2], 0, *base[3:]])
    assert code == 0, f"empty batch: {CUDA_ERRORS.get(code, code)}"

    # The LSTM without c_prev, the LayerNorm-LSTM backward without d_cn.
    no_cell = Problem(**dict(pr.__dict__, c_prev=None))
    code, got, _ = run_forward(lib, case, no_cell, 0)
    assert code == 1 and got["h_new"].isnan().all(), f"LSTM without c_prev: {CUDA_ERRORS.get(code, code)}"
    sizes = [KIND_CODES["layernorm_lstm"], CODES[FP32], 2, 3, STEP]
    nothing = [None] * 9  # grad_out .. h_new
    d_hh = output((2, 12), FP32)
    code = call_in_child(lib.emu_recurrent_backward, int64s(sizes), *nothing, pointer(d_hh), None, None, None,
                         int64s([0, 0]), None, (ctypes.c_void_p * 4)(), 0)  # fmt: skip
    assert code == 1 and d_hh.isnan().all(), f"backward with null inputs: {CUDA_ERRORS.get(code, code)}"
