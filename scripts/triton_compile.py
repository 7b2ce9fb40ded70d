"""Compile fastattn's Triton kernels ahead of time for real GPU targets, with no GPU and no driver.

The CPU test suite runs the Triton kernels through the interpreter, which never runs Triton's compiler, so a
kernel can pass every test here and still fail to compile on a GPU. This script runs the real compiler
(``triton.compile``: Triton IR -> TritonGPU IR -> LLVM -> PTX -> ptxas cubin) for each target.

The specialisations come from the launchers themselves: each case calls ``attention_forward``,
``attention_backward``, ``attention_kvcache``, ``softmax_*``, ``norm_*``, the positional, rotary and convolution
epilogue launchers or the recurrent time loops on meta tensors, with the kernels swapped for recorders and
``torch.cuda.get_device_properties`` answering for the target, so block sizes, warps and stages are what ``_config``
/ ``_bwd_config`` / ``_blocks`` pick there. Each recorded launch is typed the way Triton's launcher types it
(pointers 16-byte aligned, an int equal to 1 a constant, ints divisible by 16 marked so, arguments past int32 as
i64) and compiled once per target.

    python scripts/triton_compile.py [--arch 90 80] [--quick]

One line per compilation: seconds, registers and stack (spill) bytes per thread from cuobjdump,
shared memory from Triton's metadata. Exits 1 if any compilation fails, with each error at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable, NamedTuple
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are defined: the interpreter has no compiler
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kernels, installed or not

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastattn.triton_kernels import attention, conv_epilogue, kvcache, norm, positional, recurrent  # noqa: E402
from fastattn.triton_kernels import rotary, softmax  # noqa: E402

# What launchers read from torch.cuda.get_device_properties, per compute capability: H100, A100.
DEVICES = {
    90: types.SimpleNamespace(shared_memory_per_block_optin=227 * 1024, multi_processor_count=132),
    80: types.SimpleNamespace(shared_memory_per_block_optin=163 * 1024, multi_processor_count=108),
}
KERNELS = {
    attention: ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"),
    kvcache: ("_kvcache_split_kernel", "_kvcache_combine_kernel"),
    softmax: ("_softmax_fwd_kernel", "_softmax_bwd_kernel"),
    norm: ("_norm_fwd_kernel", "_norm_bwd_kernel"),
    positional: ("_positional_add_kernel", "_embedding_forward_kernel", "_embedding_scatter_kernel"),
    rotary: ("_rotary_kernel",),
    conv_epilogue: ("_conv_epilogue_fwd_kernel", "_conv_epilogue_bwd_kernel"),
    recurrent: ("_cell_forward", "_layernorm_lstm_forward", "_cell_backward", "_layernorm_lstm_backward",
                "_sequence_forward", "_sequence_backward"),
}
POINTER_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64",
}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
DIVISIBLE = [["tt.divisibility", 16]]


class Case(NamedTuple):
    label: str
    run: Callable[[], None]  # calls launchers on meta tensors
    quick: bool = False


class Launch(NamedTuple):
    label: str
    kernel: triton.JITFunction
    args: dict  # parameter name -> value
    options: dict  # num_warps, num_stages, ...


def meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


# ---------------------------------------------------------------------------------------------------------
# Cases: every feature in every dtype at least once, each block config _config / _bwd_config can pick.
# ---------------------------------------------------------------------------------------------------------

BATCH, HEADS, HEADS_KV, SEQ = 2, 8, 2, 1000  # GQA (4 q heads per kv head); lengths not multiples of 16


def attention_case(dtype, head_dim, mask=None, kpad=False, alibi=False, window=(-1, -1), dropout=(0.0, 0),
                   seq_q=SEQ, backward=True, quick=False) -> Case:
    """Forward (and backward) attention; ``mask`` None, "bool" or "float" (q's dtype)."""
    features = [f"{mask}-mask" if mask else "", "kpad" if kpad else "", "alibi" if alibi else "",
                f"window{window}" if window != (-1, -1) else "", f"dropout{dropout}" if dropout[0] else "",
                f"sq{seq_q}" if seq_q != SEQ else ""]
    label = " ".join([DTYPE_NAMES[dtype], f"d{head_dim}", *filter(None, features)])

    def run():
        q = meta(BATCH, HEADS, seq_q, head_dim, dtype=dtype)
        k = meta(BATCH, HEADS_KV, SEQ, head_dim, dtype=dtype)
        v = meta(BATCH, HEADS_KV, SEQ, head_dim, dtype=dtype)
        mask_t = None
        if mask:  # one (Sq, Sk) mask broadcast over batch and heads, as fastattn.ops passes it
            mask_t = meta(seq_q, SEQ, dtype=torch.bool if mask == "bool" else dtype).expand(BATCH, HEADS, seq_q, SEQ)
        pad = meta(BATCH, SEQ, dtype=torch.bool) if kpad else None
        slopes = meta(HEADS, dtype=torch.float32).expand(BATCH, HEADS) if alibi else None
        rest = (mask_t, pad, slopes, head_dim**-0.5, SEQ - seq_q, *window, *dropout)
        out, lse = attention.attention_forward(q, k, v, *rest)
        if backward:
            attention.attention_backward(out, q, k, v, lse, lse, *rest)

    return Case(label, run, quick)


def kvcache_case(dtype, head_dim, n_queries, group, alibi=False, window=(-1, -1), quick=False) -> Case:
    label = f"{DTYPE_NAMES[dtype]} d{head_dim} n{n_queries} group{group}" + " alibi" * alibi
    label += f" window{window}" if window != (-1, -1) else ""

    def run():
        cache = 4096
        q = meta(BATCH, HEADS_KV * group, n_queries, head_dim, dtype=dtype)
        k = meta(BATCH, HEADS_KV, cache, head_dim, dtype=dtype)
        slopes = meta(HEADS_KV * group, dtype=torch.float32).expand(BATCH, HEADS_KV * group) if alibi else None
        lengths = meta(BATCH, dtype=torch.int64)
        kvcache.attention_kvcache(q, k, k, lengths, slopes, head_dim**-0.5, *window)

    return Case(label, run, quick)


def softmax_case(dtype, n, mask=None, causal=False, log=False, quick=False) -> Case:
    label = f"{DTYPE_NAMES[dtype]} n{n}" + f" {mask}-mask" * bool(mask) + " causal" * causal + " log" * log

    def run():
        rows = 64
        x = meta(BATCH, HEADS, rows, n, dtype=dtype)
        mask_t = None if mask is None else meta(rows, n, dtype=torch.bool if mask == "bool" else dtype)
        out = softmax.softmax_forward(x, None if mask_t is None else mask_t.expand(x.shape), 1.0, causal, log)
        softmax.softmax_backward(out.view(-1, n), out.view(-1, n), 1.0, log)

    return Case(label, run, quick)


def norm_case(dtype, n, rms=False, residual=None, affine=True, dropout=(0.0, 0), z_dtype=None, quick=False) -> Case:
    """LayerNorm / RMSNorm forward and backward; ``residual`` None or its dtype, ``z_dtype`` the stored z's."""
    label = f"{DTYPE_NAMES[dtype]} n{n} {'rms' if rms else 'layer'}" + " affine" * affine
    label += f" residual-{DTYPE_NAMES[residual]}" if residual else ""
    label += f" dropout{dropout}" if dropout[0] else ""

    def run():
        rows = 4096
        x = meta(rows, n, dtype=dtype)
        res = None if residual is None else meta(rows, n, dtype=residual)
        weight = meta(n, dtype=dtype) if affine else None
        bias = meta(n, dtype=dtype) if affine and not rms else None
        store = z_dtype or (residual if (residual or dropout[0]) else None) or (dtype if dropout[0] else None)
        out, z, mean, rstd = norm.norm_forward(x, res, weight, bias, 1e-5, rms, *dropout, store)
        norm.norm_backward(out, z if store else None, z if store else x, weight, mean, rstd, rms, bias is not None,
                           *dropout, dtype, residual)

    return Case(label, run, quick)


def positional_case(dtype, quick=False) -> Case:
    """Sinusoidal (both layouts, offsets, dropout) and table positional adds, the fused embedding gather and its
    scatter-add backward."""

    def run():
        x = meta(4, 100, 1024, dtype=dtype)
        offsets = meta(4, dtype=torch.int64)
        table = meta(4096, 1024, dtype=dtype)
        tokens = meta(4, 100, dtype=torch.int64)
        positional.positional_add(x, None, offsets, 3, 0.5, 10000.0, True, True, 0.1, 2**40 + 5)
        positional.positional_add(x, None, None, 0, 1.0, 10000.0, True, False, 0.0, 0)
        positional.positional_add(x, table, offsets, 3, 0.5, 10000.0, False, True, 0.1, 7)
        positional.positional_add(meta(3, 7, 100, dtype=dtype), None, None, 0, 1.0, 10000.0, False, True, 0.1, 7)
        positional.embedding_forward(tokens, table, table, tokens, None, 0, 2.0, 0.1, 9)
        positional.embedding_forward(tokens, table, table, None, offsets, 0, 2.0, 0.0, 9)
        positional.embedding_scatter(meta(400, 1024, dtype=dtype), meta(400, dtype=torch.int64), 4096, 2.0, 3)

    return Case(f"{DTYPE_NAMES[dtype]} positional", run, quick)


def rotary_case(dtype, head_dim, rotary_dim, interleaved=False, positions=False, tables=False, quick=False) -> Case:
    """q (GQA) and k rotated in one launch, angles in the kernel or from tables, offsets or explicit positions."""
    label = f"{DTYPE_NAMES[dtype]} d{head_dim} r{rotary_dim}" + " interleaved" * interleaved
    label += " positions" * positions + " tables" * tables

    def run():
        seq, compute = 1000, torch.float64 if dtype == torch.float64 else torch.float32
        q, k = meta(BATCH, HEADS, seq, head_dim, dtype=dtype), meta(BATCH, HEADS_KV, seq, head_dim, dtype=dtype)
        q_out, k_out = meta(BATCH, HEADS, seq, head_dim, dtype=dtype), meta(BATCH, HEADS_KV, seq, head_dim, dtype=dtype)
        pos = meta(BATCH, seq, dtype=torch.int64) if positions else None
        offsets = None if positions else meta(BATCH, dtype=torch.int64)
        cos = meta(4096, rotary_dim // 2, dtype=compute) if tables else None
        rotary.rotary(q, k, q_out, k_out, pos, offsets, cos, cos, 3, rotary_dim, interleaved, 10000.0, False)

    return Case(label, run, quick)


def conv_epilogue_case(dtype, activation, pool, channels_last, quick=False) -> Case:
    """Bias + activation (+ 2x2 max pool) after a convolution, forward and backward with the bias gradient."""
    label = f"{DTYPE_NAMES[dtype]} {activation}" + " pool" * pool + " nhwc" * channels_last

    def run():
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        y = meta(8, 64, 31, 31, dtype=dtype).contiguous(memory_format=fmt)
        bias = meta(64, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        out = conv_epilogue.conv_epilogue_forward(y, bias, activation, pool, channels_last)
        conv_epilogue.conv_epilogue_backward(out, y, bias, activation, pool, True, channels_last)

    return Case(label, run, quick)


def recurrent_case(dtype, kind, hidden, projected=False, quick=False) -> Case:
    """Two steps of one recurrent layer (lengths, saved activations), forward and backward through time; kind as
    fastattn.triton_kernels.recurrent numbers it."""
    names = ("lstm", "gru", "rnn_tanh", "rnn_relu", "layernorm_lstm")
    label = f"{DTYPE_NAMES[dtype]} {names[kind]} h{hidden}" + " projected" * projected

    def run():
        seq, batch, width = 2, 64, recurrent.GATES[kind] * hidden
        proj = hidden // 2 if projected else hidden
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        cell = kind in (recurrent.LSTM, recurrent.LAYERNORM_LSTM)
        c0 = meta(batch, hidden, dtype=dtype) if cell else None
        w_hr = meta(proj, hidden, dtype=dtype) if projected else None
        norms = (meta(width, dtype=dtype), None, meta(hidden, dtype=dtype), meta(hidden, dtype=dtype))
        norms = norms if kind == recurrent.LAYERNORM_LSTM else (None,) * 4
        lengths = meta(batch, dtype=torch.int64)
        w_hh = meta(width, proj, dtype=dtype)
        _, hstate, cstate, saved = recurrent.recurrent_forward(
            kind, meta(seq, batch, width, dtype=dtype), meta(batch, proj, dtype=dtype), c0, w_hh,
            meta(width, dtype=dtype), w_hr, lengths, False, True, *norms, 1e-5,
        )  # fmt: skip
        recurrent.recurrent_backward(kind, meta(seq, batch, proj, dtype=dtype), None,
                                     meta(batch, hidden, dtype=compute) if cell else None, w_hh, w_hr, hstate,
                                     cstate, saved, lengths, True, norms[0], norms[1], norms[2], norms[3])  # fmt: skip

    return Case(label, run, quick)


def cases() -> list[Case]:
    f16, b16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    dropout = (0.1, 1234)
    found = []
    for dtype in (f16, b16, f32, f64):
        found += [
            attention_case(dtype, 128),
            attention_case(dtype, 128, mask="bool", kpad=True, window=(256, 0), quick=dtype == f64),
            attention_case(dtype, 128, mask="float", alibi=True, window=(-1, 0), dropout=dropout),
        ]
    for dtype, head_dim in ((b16, 64), (b16, 256), (b16, 72), (f32, 64), (f32, 256), (f64, 64)):
        found.append(attention_case(dtype, head_dim, mask="bool", window=(-1, 0), dropout=dropout))
    found += [
        # every feature at once, 16-bit 128x64 tiles: the riskiest compilation
        attention_case(b16, 128, mask="bool", kpad=True, alibi=True, window=(256, 0), dropout=dropout, quick=True),
        attention_case(b16, 128, dropout=(0.5, 2**64 - 1)),  # dropout words past int32: i64 arguments
        attention_case(b16, 128, seq_q=1, backward=False),  # decoding through the forward: BLOCK_M 16
        attention_case(f64, 128, mask="bool", dropout=dropout, backward=False, quick=True),
        kvcache_case(b16, 128, 1, 4, quick=True),
        kvcache_case(f16, 256, 4, 4, alibi=True, window=(128, 0)),
        kvcache_case(b16, 128, 16, 8, window=(-1, 0)),
        kvcache_case(f32, 64, 16, 1),
        kvcache_case(f64, 72, 1, 4, alibi=True),
        softmax_case(f16, 1000, mask="bool", causal=True, quick=True),
        softmax_case(b16, 32768, mask="float", log=True),
        softmax_case(f32, 64),
        softmax_case(f64, 20000, causal=True, log=True),
        norm_case(b16, 4096, residual=f32, dropout=dropout, z_dtype=f32, quick=True),
        norm_case(f16, 8192, rms=True, residual=f16),
        norm_case(b16, 65537, residual=b16, dropout=dropout, quick=True),
        norm_case(f32, 100, affine=False),
        norm_case(f32, 1000, rms=True, dropout=(0.5, 2**64 - 1)),
        norm_case(f64, 20000, residual=f64),
        *(positional_case(dtype, quick=dtype == b16) for dtype in (f16, b16, f32, f64)),
        rotary_case(b16, 128, 128, quick=True),
        rotary_case(f16, 128, 64, interleaved=True, positions=True),
        rotary_case(f32, 72, 72, tables=True),
        rotary_case(f64, 40, 24, interleaved=True, positions=True, tables=True),
        conv_epilogue_case(b16, "gelu", True, True, quick=True),
        conv_epilogue_case(f16, "silu", False, False),
        conv_epilogue_case(f32, "gelu_tanh", True, False),
        conv_epilogue_case(f64, "relu", False, True),
        recurrent_case(b16, recurrent.LSTM, 512, quick=True),
        recurrent_case(b16, recurrent.LSTM, 64, quick=True),  # persistent: every step in one launch
        recurrent_case(f16, recurrent.GRU, 33),
        recurrent_case(f32, recurrent.LSTM, 64),
        recurrent_case(f64, recurrent.LSTM, 64),
        recurrent_case(b16, recurrent.LAYERNORM_LSTM, 1000, quick=True),
        recurrent_case(f16, recurrent.GRU, 256),
        recurrent_case(f32, recurrent.LSTM, 200, projected=True),
        recurrent_case(f32, recurrent.RNN_TANH, 100),
        recurrent_case(f32, recurrent.RNN_RELU, 4096),
        recurrent_case(f64, recurrent.LAYERNORM_LSTM, 40),
        recurrent_case(f64, recurrent.GRU, 7),
    ]
    return found


# ---------------------------------------------------------------------------------------------------------
# Recording launches and compiling them.
# ---------------------------------------------------------------------------------------------------------


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` appends the launch to ``launches``."""

    def __init__(self, kernel: triton.JITFunction, label: str, launches: list):
        self.kernel, self.label, self.launches = kernel, label, launches

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **kwargs):
        names = self.kernel.arg_names
        params = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        options = {k: v for k, v in kwargs.items() if k not in names}
        self.launches.append(Launch(self.label, self.kernel, params, options))


def record(case: Case, arch: int) -> list[Launch]:
    """The kernel launches ``case`` makes on a GPU of compute capability ``arch``."""
    launches = []
    patches = [mock.patch("torch.cuda.get_device_properties", lambda device: DEVICES[arch])]
    for module, names in KERNELS.items():
        patches += [mock.patch.object(module, n, Recorder(getattr(module, n), case.label, launches)) for n in names]
    for patch in patches:
        patch.start()
    try:
        case.run()
    finally:
        for patch in reversed(patches):
            patch.stop()
    return launches


def arg_type(value, specialize: bool):
    """(Triton type, divisible by 16) of a kernel argument, as Triton's launcher specialises it."""
    if isinstance(value, torch.Tensor):
        return "*" + POINTER_TYPES[value.dtype], True  # torch allocations are 16-byte aligned
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        kind = "i32" if -(2**31) <= value < 2**31 else "u64" if value >= 2**63 else "i64"
        if not specialize:
            return kind, False
        return ("constexpr", False) if value == 1 else (kind, value % 16 == 0)
    if isinstance(value, float):
        return "fp32", False
    if value is None:
        return "constexpr", False
    raise TypeError(f"no Triton type for {type(value).__name__}")


def specialise(launch: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``triton.compiler.ASTSource`` for a launch."""
    kernel = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, name) in enumerate(zip(kernel.params, kernel.arg_names)):
        value = launch.args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name], divisible = arg_type(value, not param.do_not_specialize)
        if signature[name] == "constexpr":
            constexprs[name] = value
        elif divisible:
            attrs[(i,)] = DIVISIBLE
    return signature, constexprs, attrs


def compile_launch(launch: Launch, arch: int):
    signature, constexprs, attrs = specialise(launch)
    source = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch.options)


def resources(compiled) -> str:
    """Registers and stack bytes per thread from cuobjdump (stack holds register spills: ptxas -v counts them
    as spill stores), shared memory bytes per program from Triton's metadata."""
    usage = {}
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            command = [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name]
            text = subprocess.run(command, capture_output=True, text=True).stdout
        usage = dict(field.split(":", 1) for line in text.splitlines() if "REG:" in line for field in line.split())
    except Exception:  # no cuobjdump (or no triton.knobs to find it): shared memory only
        pass
    return f"regs {usage.get('REG', '?'):>3}  stack {usage.get('STACK', '?'):>4}  smem {compiled.metadata.shared:>6}"


def explain(error: BaseException) -> list[str]:
    """The messages of ``error`` and its causes, innermost (the compiler's own complaint) first."""
    messages = []
    while error is not None:
        messages.insert(0, f"{type(error).__name__}: {str(error).strip()}")
        error = error.__cause__
    return messages


def describe(launch: Launch) -> str:
    a, o = launch.args, launch.options
    rows = next((a[k] for k in ("BLOCK_M", "BLOCK_S", "BM") if k in a), 1)
    cols = next((a[k] for k in ("BLOCK_N", "BLOCK_DV", "BLOCK_D", "BLOCK_P", "BLOCK", "BH") if k in a), 1)
    tile = f"{rows}x{cols}"
    name = launch.kernel.__name__.removeprefix("_").removesuffix("_kernel")
    return f"{name:<22} {launch.label:<64} {tile:>8} w{o.get('num_warps', 4)} s{o.get('num_stages', 3)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(DEVICES))
    parser.add_argument("--quick", action="store_true", help="only the cases marked quick (the test's subset)")
    args = parser.parse_args()
    # A fresh cache: every compilation really runs (and is timed), none is answered from an earlier run.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastattn-triton-compile-")
    try:  # fail here, once, with the reason, rather than on every compilation
        ptxas = triton.knobs.nvidia.ptxas
    except Exception as error:
        print(f"cannot compile for CUDA: Triton's ptxas is missing ({type(error).__name__}: {error})")
        return 2
    print(f"triton {triton.__version__}, ptxas {ptxas.version} ({ptxas.path}), torch {torch.__version__}")

    failures, count, start = [], 0, time.perf_counter()
    for arch in args.arch:
        seen = set()
        for case in cases():
            if args.quick and not case.quick:
                continue
            for launch in record(case, arch):
                key = (launch.kernel.__name__, repr(specialise(launch)), repr(launch.options))
                if key in seen:
                    continue
                seen.add(key)
                count += 1
                t0 = time.perf_counter()
                try:
                    compiled = compile_launch(launch, arch)
                    seconds, status = time.perf_counter() - t0, "ok    " + resources(compiled)
                except Exception as error:
                    failures.append((arch, describe(launch), error))
                    seconds, status = time.perf_counter() - t0, "FAILED  " + explain(error)[0].splitlines()[-1][:160]
                print(f"sm_{arch}  {describe(launch)}  {seconds:6.1f} s  {status}", flush=True)

    print(f"{count - len(failures)}/{count} compiled in {time.perf_counter() - start:.0f} s")
    shown = set()
    for arch, what, error in failures:  # each distinct compiler complaint in full once
        messages = explain(error)
        repeat = messages[0] in shown
        shown.add(messages[0])
        print(f"\n===== sm_{arch} {what}\n" + (f"{messages[0]} (as above)" if repeat else "\n\n".join(messages)))
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
