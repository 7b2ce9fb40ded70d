"""Tile configs of fastattn's Triton attention kernels, timed side by side on one GPU against torch SDPA.

    python -m bench.tune_attention [--out DIR] [--quick] [--deadline S] [--jobs N] [--no-prune] [--dry-run]

For each problem of PROBLEMS and each pass (``forward``: the forward kernel; ``backward``: delta and the two
backward kernels, as fastattn's op runs them) every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) of
GRIDS is installed by patching ``_config`` / ``_bwd_config`` of fastattn.triton_kernels.attention, checked once
against float32 SDPA on the same inputs (relative error ||x - ref|| / ||ref|| at most TOLERANCE; for the
backward the worst of dq, dk, dv) and timed with ``triton.testing.do_bench`` (bench.harness.GpuTimer), next to
bf16/fp16 SDPA and the module's own choice (the default, always a candidate). Candidates whose estimated shared
memory exceeds the device's budget are left out (``--no-prune`` keeps them); compile failures, wrong results
and candidates left past ``--deadline`` are rows too, with the reason.

Compiling takes about a second per candidate, so ``--jobs`` worker processes first compile every candidate
(running it once on zero inputs) into Triton's on-disk cache, for at most WARM_SHARE of the deadline; the
timing then loads them from there, one candidate at a time on an otherwise idle GPU. Candidates are ordered
defaults first, then shuffled (fixed seed) and interleaved over problems, so a run cut short still samples
every problem's whole grid.

Writes into ``--out`` (default ``bench/results/<device>-<date>-tune-attention/``): ``tune.csv`` (a row per
problem x pass x provider/config), ``tune.md`` (the printed tables: fastest first, with the default's rank)
and ``env.json``. ``--dry-run`` only lists the candidates per problem, and runs without a GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import itertools
import multiprocessing
import random
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from bench import environment, report
from bench.harness import _describe, timer_for
from fastattn.triton_kernels import attention as kernels

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = torch.device("cuda")
PASSES = ("forward", "backward")
BACKWARD_WORK = 2.5  # backward FLOPs / forward FLOPs (bench/attention.py)
TOLERANCE = 2e-2  # relative error allowed against float32 SDPA (bf16 SDPA itself: a few 1e-3)
ASSUMED_SMEM = 227 * 1024  # shared memory per block (opt-in) of an H100 / H200: the budget without a GPU
WARM_SHARE = 0.6  # of --deadline, at most, for compiling in the worker processes
STRAGGLERS_S = 30.0  # then at most this long for the compiles under way to end
GRIDS = {
    "forward": dict(block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4)),
    "backward": dict(block_m=(32, 64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3)),
}
COLUMNS = (
    "problem", "dtype", "batch", "heads", "seq", "head_dim", "causal", "mode", "provider", "config",
    "block_m", "block_n", "num_warps", "num_stages", "default", "status", "median_ms", "p20_ms", "p80_ms",
    "tflops", "speedup_vs_sdpa", "rel_err", "smem_estimate", "smem", "regs", "spills", "reason",
    "device", "torch", "triton", "date",
)  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """Self-attention on (batch, heads, seq, head_dim) q, k, v of ``dtype``, causal or not."""

    batch: int
    heads: int
    seq: int
    head_dim: int
    dtype: torch.dtype
    causal: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.heads, self.seq, self.head_dim

    @property
    def label(self) -> str:
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, str(self.dtype))
        causal = " causal" if self.causal else ""
        return f"B{self.batch} H{self.heads} S{self.seq} D{self.head_dim} {dtype}{causal}"

    @property
    def block_dims(self) -> tuple[int, int]:
        """(BLOCK_D, BLOCK_DV): the head dims padded as the launchers pad them."""
        block = max(16, triton.next_power_of_2(self.head_dim))
        return block, block

    def flops(self, mode: str) -> float:
        """4·B·H·S²·D for the forward, halved when causal; the backward 2.5x that."""
        forward = 4 * self.batch * self.heads * self.seq**2 * self.head_dim / (2 if self.causal else 1)
        return forward * (BACKWARD_WORK if mode == "backward" else 1.0)


PROBLEMS = (
    Problem(4, 16, 4096, 128, torch.bfloat16),
    Problem(4, 32, 4096, 64, torch.bfloat16),
    Problem(1, 16, 16384, 128, torch.bfloat16, causal=True),
    Problem(4, 16, 4096, 128, torch.float16),
    Problem(2, 16, 4096, 256, torch.bfloat16),
)
QUICK_PROBLEMS = PROBLEMS[:2]


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class Candidate:
    """One config of one problem and pass; ``smem``: its estimated shared memory in bytes."""

    problem: Problem
    mode: str
    config: Config
    smem: int
    default: bool


# ---------------------------------------------------------------------------------------------------------
# The candidates.
# ---------------------------------------------------------------------------------------------------------


def estimated_smem(problem: Problem, mode: str, config: Config) -> int:
    """Bytes of shared memory ``config`` needs, roughly. Forward: the module's own ``_shared_memory``.
    Backward (the module has no estimate): the larger of the two kernels, each holding its own block's rows
    (k, v for dK/dV; q, dO for dQ) and streaming the other's through ``num_stages`` buffers, plus one
    (BLOCK_M, BLOCK_N) tile for the probabilities' layout change and the module's SMEM_SLACK."""
    block_d, block_dv = problem.block_dims
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    block_m, block_n, _, stages = config
    if mode == "forward":
        return kernels._shared_memory(block_m, block_n, block_d, block_dv, stages, itemsize, 0)
    row = (block_d + block_dv) * itemsize
    tiles = max(block_n * row + stages * block_m * row, block_m * row + stages * block_n * row)
    return tiles + block_m * block_n * itemsize + kernels.SMEM_SLACK


def default_config(problem: Problem, mode: str, smem_budget: int) -> Config:
    """The config the module picks for ``problem`` (no mask) on a device with ``smem_budget`` bytes."""
    block_d, block_dv = problem.block_dims
    if mode == "forward":
        return Config(*kernels._config(problem.seq, block_d, block_dv, problem.dtype, 0, smem_budget))
    return Config(*kernels._bwd_config(problem.dtype, block_d, block_dv))


def candidates(problem: Problem, mode: str, smem_budget: int, prune: bool = True) -> list[Candidate]:
    """The default config, then GRIDS[mode]'s others whose estimated shared memory fits ``smem_budget`` (all
    of them when not ``prune``), shuffled with a fixed seed."""
    default = default_config(problem, mode, smem_budget)
    grid = [Config(*values) for values in itertools.product(*GRIDS[mode].values())]
    random.Random(0).shuffle(grid)
    fits = [c for c in grid if c != default and (not prune or estimated_smem(problem, mode, c) <= smem_budget)]
    return [Candidate(problem, mode, c, estimated_smem(problem, mode, c), c == default) for c in [default, *fits]]


def schedule(problems, smem_budget: int, prune: bool = True) -> list[Candidate]:
    """Every problem's candidates for both passes, interleaved: each problem and pass gets its share of a run
    cut short, defaults first."""
    lists = [candidates(problem, mode, smem_budget, prune) for problem in problems for mode in PASSES]
    return [c for group in itertools.zip_longest(*lists) for c in group if c is not None]


def listing(problems, smem_budget: int, prune: bool = True) -> str:
    """The dry run's text: per problem and pass, the candidates with their estimated shared memory."""
    lines = [f"shared memory budget: {smem_budget} bytes ({smem_budget / 1024:g} KiB)"]
    for problem in problems:
        for mode in PASSES:
            group = candidates(problem, mode, smem_budget, prune)
            grid_size = len(list(itertools.product(*GRIDS[mode].values())))
            lines.append(f"{problem.label} · {mode}: {len(group)} configs ({grid_size} in the grid)")
            lines += [
                f"  {c.config.label:<16} smem {c.smem / 1024:6.1f} KiB" + ("  (default)" if c.default else "")
                for c in group
            ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Running a candidate.
# ---------------------------------------------------------------------------------------------------------


def triton_forward(problem: Problem, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of the Triton forward kernel, as fastattn.attention calls it (no mask, Sq = Sk)."""
    window_right = 0 if problem.causal else -1
    return kernels.attention_forward(q, k, v, None, None, None, problem.head_dim**-0.5, 0, -1, window_right)


def triton_backward(problem: Problem, q, k, v, grad: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, ...]:
    """(dq, dk, dv): delta = rowsum(grad * out) in float32, then the two backward kernels, as fastattn's op."""
    delta = (grad.float() * out.float()).sum(-1)
    window_right = 0 if problem.causal else -1
    return kernels.attention_backward(
        grad, q, k, v, lse, delta, None, None, None, problem.head_dim**-0.5, 0, -1, window_right
    )


@contextlib.contextmanager
def installed(candidate: Candidate):
    """The module's ``_config`` (forward) or ``_bwd_config`` (backward) answers ``candidate.config``."""
    name = "_config" if candidate.mode == "forward" else "_bwd_config"
    with mock.patch.object(kernels, name, lambda *args, **kwargs: tuple(candidate.config)):
        yield


@contextlib.contextmanager
def launched_kernels():
    """A list collecting the compiled kernels the attention kernels launch while inside (``JITFunction.run``
    returns them: Triton internals, read for their statistics only)."""
    launched = []
    with contextlib.ExitStack() as stack:
        for name in ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"):
            jit = getattr(kernels, name)

            def run(*args, _run=jit.run, **kwargs):
                launched.append(_run(*args, **kwargs))
                return launched[-1]

            stack.enter_context(mock.patch.object(jit, "run", run))
        yield launched


def kernel_stats(launched) -> dict:
    """Shared memory (bytes) and registers per thread (the most over the kernels) and spilled bytes (summed)
    of compiled kernels; {} where this Triton's kernels lack them."""
    unique = list({id(kernel): kernel for kernel in launched}.values())
    try:
        return dict(
            smem=max(kernel.metadata.shared for kernel in unique),
            regs=max(kernel.n_regs for kernel in unique),
            spills=sum(kernel.n_spills for kernel in unique),
        )
    except (AttributeError, ValueError):
        return {}


def cuda_alive() -> bool:
    """False once an error (an illegal address, say) has broken this process's CUDA context."""
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


_WORKER_BROKEN = False  # in a worker process: an earlier candidate broke its CUDA context


def compile_candidate(candidate: Candidate) -> tuple[str, str | None]:
    """In a worker process: compile ``candidate`` by running it once on zero inputs of its problem's shapes
    (the kernels specialise on dtypes, alignment and sizes, not on values). Returns ("ok", None),
    ("failed", reason), or ("skipped", reason) from a worker whose CUDA context broke."""
    global _WORKER_BROKEN
    if _WORKER_BROKEN:
        return "skipped", "this worker's CUDA context broke earlier"
    problem = candidate.problem
    try:
        q, k, v, grad, out = (torch.zeros(problem.shape, dtype=problem.dtype, device=DEVICE) for _ in range(5))
        lse = torch.zeros(problem.shape[:3], device=DEVICE)
        with installed(candidate):
            if candidate.mode == "forward":
                triton_forward(problem, q, k, v)
            else:
                triton_backward(problem, q, k, v, grad, out, lse)
            torch.cuda.synchronize()
        return "ok", None
    except Exception as error:  # noqa: BLE001 - a candidate's failure is a result
        reason = _describe(error)
        if not cuda_alive():
            _WORKER_BROKEN = True
            reason += " (and broke the CUDA context)"
        return "failed", reason


def compile_all(plan: list[Candidate], jobs: int, seconds: float) -> dict[Candidate, str]:
    """Compile ``plan`` in ``jobs`` processes for at most ``seconds`` (those left compile later, in this
    process, when first run); returns the reasons of the candidates that failed."""
    failures = {}
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    futures = {pool.submit(compile_candidate, candidate): candidate for candidate in plan}
    done = concurrent.futures.as_completed(futures, timeout=max(seconds, 0.0))
    try:
        for future in progress(done, total=len(futures), desc=f"compiling ({jobs} processes)"):
            status, reason = future.result()
            if status == "failed":
                failures[futures[future]] = reason
    except (concurrent.futures.TimeoutError, BrokenProcessPool) as error:
        left = sum(not future.done() for future in futures)
        print(f"compiling stopped ({type(error).__name__}): {left} candidate(s) compile when timed", file=sys.stderr)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        give_up = time.perf_counter() + STRAGGLERS_S  # for the compiles under way, which run to their end
        while any(future.running() for future in futures) and time.perf_counter() < give_up:
            time.sleep(0.1)
    return failures


# ---------------------------------------------------------------------------------------------------------
# Measuring, on the GPU of this process.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """A problem's inputs, the default forward's (out, lse) for the backward, and the float32 SDPA truth per
    pass: [out] or [dq, dk, dv]."""

    q: Tensor
    k: Tensor
    v: Tensor
    grad: Tensor
    out: Tensor
    lse: Tensor
    truth: dict[str, list[Tensor]]


def prepare(problem: Problem) -> Inputs:
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(problem.shape, dtype=problem.dtype, device=DEVICE) for _ in range(4))
    exact = [t.float().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*exact, is_causal=problem.causal)
    truth = {
        "forward": [reference.detach()],
        "backward": list(torch.autograd.grad(reference, exact, grad.float())),
    }
    out, lse = triton_forward(problem, q, k, v)  # the default config's
    return Inputs(q, k, v, grad, out, lse, truth)


def sdpa_call(problem: Problem, mode: str, x: Inputs):
    """A call of torch SDPA in the problem's dtype: the forward, or the backward alone (through autograd, the
    graph kept)."""
    if mode == "forward":
        return lambda: [F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=problem.causal)]
    leaves = [t.detach().requires_grad_() for t in (x.q, x.k, x.v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=problem.causal)
    return lambda: torch.autograd.grad(out, leaves, x.grad, retain_graph=True)


def triton_call(candidate: Candidate, x: Inputs):
    problem = candidate.problem
    if candidate.mode == "forward":
        return lambda: triton_forward(problem, x.q, x.k, x.v)[:1]
    return lambda: triton_backward(problem, x.q, x.k, x.v, x.grad, x.out, x.lse)


def relative_error(values, truth: list[Tensor]) -> float:
    """max over the outputs of ||value - truth|| / ||truth|| (NaN if any value is NaN)."""
    return max(((value.float() - t).norm() / t.norm()).item() for value, t in zip(values, truth, strict=True))


class ContextBroken(Exception):
    """A candidate broke this process's CUDA context: nothing more can run."""


def measure(fn, truth: list[Tensor], timer) -> dict:
    """Check ``fn()`` once against ``truth``, then time it: the row's status, rel_err, times, kernel stats
    and reason. Raises ContextBroken when ``fn`` broke the CUDA context."""
    fields = {}
    try:
        with launched_kernels() as launched:
            fields["rel_err"] = relative_error(fn(), truth)
        fields.update(kernel_stats(launched))
        if not fields["rel_err"] <= TOLERANCE:
            return dict(fields, status="wrong", reason=f"relative error {fields['rel_err']:.2e} > {TOLERANCE:g}")
        timing = timer(fn)
    except Exception as error:  # noqa: BLE001 - a candidate's failure is a result
        if not cuda_alive():
            raise ContextBroken(_describe(error)) from error
        return dict(fields, status="failed", reason=_describe(error))
    return dict(fields, status="ok", median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)


def new_row(problem: Problem, mode: str, env: dict, candidate: Candidate | None = None, **fields) -> dict:
    """A row of tune.csv: SDPA's when ``candidate`` is None."""
    row = dict.fromkeys(COLUMNS)
    row.update(
        problem=problem.label, dtype=str(problem.dtype).removeprefix("torch."), batch=problem.batch,
        heads=problem.heads, seq=problem.seq, head_dim=problem.head_dim, causal=problem.causal, mode=mode,
        provider="sdpa" if candidate is None else "triton",
    )  # fmt: skip
    if candidate is not None:
        row.update(config=candidate.config.label, default=candidate.default, smem_estimate=candidate.smem)
        row.update(candidate.config._asdict())
    row.update({key: env[key] for key in ("device", "torch", "triton", "date")})
    row.update(fields)
    if row["median_ms"]:
        row["tflops"] = problem.flops(mode) / row["median_ms"] / 1e9
    return row


def run(plan: list[Candidate], failures: dict, problems, timer, env: dict, stop_at: float) -> list[dict]:
    """Rows for SDPA and every candidate of ``plan``; candidates not started by ``stop_at``
    (time.perf_counter) are rows with status not-run."""
    inputs, unprepared, sdpa_ms, rows = {}, {}, {}, []
    for problem in problems:
        try:
            inputs[problem] = prepare(problem)
        except Exception as error:  # noqa: BLE001 - reported in every row of the problem
            if not cuda_alive():
                raise
            unprepared[problem] = f"preparing the inputs and reference failed: {_describe(error)}"
        for mode in PASSES:
            if problem in unprepared:
                fields = dict(status="failed", reason=unprepared[problem])
            else:
                fields = measure(sdpa_call(problem, mode, inputs[problem]), inputs[problem].truth[mode], timer)
            rows.append(new_row(problem, mode, env, **fields))
            sdpa_ms[problem, mode] = fields.get("median_ms")
    broken = None
    bar = progress(plan, total=len(plan), desc="timing")
    for candidate in bar:
        problem, mode = candidate.problem, candidate.mode
        if broken or time.perf_counter() > stop_at:
            reason = f"not run: the CUDA context broke ({broken})" if broken else "not run: past --deadline"
            fields = dict(status="not-run", reason=reason)
        elif candidate in failures or problem in unprepared:
            fields = dict(status="failed", reason=failures.get(candidate) or unprepared[problem])
        else:
            if hasattr(bar, "set_description_str"):
                bar.set_description_str(f"{problem.label} {mode} {candidate.config.label}")
            try:
                with installed(candidate):
                    fields = measure(triton_call(candidate, inputs[problem]), inputs[problem].truth[mode], timer)
            except ContextBroken as error:
                broken = f"{problem.label} {mode} {candidate.config.label}: {error}"
                fields = dict(status="failed", reason=f"{error} (and broke the CUDA context)")
        row = new_row(problem, mode, env, candidate, **fields)
        if row["median_ms"] and sdpa_ms[problem, mode]:
            row["speedup_vs_sdpa"] = sdpa_ms[problem, mode] / row["median_ms"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------------------------------


def tables(rows: list[dict], top: int = 10) -> str:
    """Per problem, a section per pass (:func:`section`), then the forward + backward times of SDPA, the
    default configs and the best ones."""
    parts = []
    for problem in dict.fromkeys(row["problem"] for row in rows):
        totals = {}
        for mode in PASSES:
            text, totals[mode] = section([r for r in rows if r["problem"] == problem and r["mode"] == mode], top)
            parts.append(text)
        parts.append(f"**{problem} · forward + backward**: {total_line(totals)}")
    return "\n\n".join(parts)


def section(group: list[dict], top: int) -> tuple[str, tuple]:
    """One problem and pass: SDPA's time, the ``top`` fastest configs (and the default, wherever it ranks),
    the default's rank, then each config that failed or was wrong and a count of those not run. Also returns
    the (SDPA, default, best) times."""
    first = group[0]
    sdpa = next(row for row in group if row["provider"] == "sdpa")
    configs = [row for row in group if row["provider"] == "triton"]
    timed = sorted((row for row in configs if row["status"] == "ok"), key=lambda row: row["median_ms"])
    default = next((row for row in configs if row["default"]), None)
    head = ["rank", "config", "ms", "TFLOP/s", "vs SDPA", "rel err", "est. KiB", "KiB", "regs", "spills"]
    body = [
        [str(rank), r["config"] + (" (default)" if r["default"] else ""), report.format_ms(r["median_ms"]),
         report.format_rate(r["tflops"]), report.format_ratio(r["speedup_vs_sdpa"]), f"{r['rel_err']:.1e}",
         kib(r["smem_estimate"]), kib(r["smem"]), blank_if_none(r["regs"]), blank_if_none(r["spills"])]
        for rank, r in enumerate(timed, 1) if rank <= top or r["default"]
    ]  # fmt: skip
    lines = [
        f"### {first['problem']} · {first['mode']}",
        "",
        f"SDPA: {describe_time(sdpa)}",
        "",
        report.markdown_table(head, body, left_aligned=2) if body else "No config was timed.",
        "",
        default_line(default, timed),
    ]
    lines += [f"- {r['config']}: {r['status']}: {r['reason']}" for r in configs if r["status"] in ("failed", "wrong")]
    not_run = [row["reason"] for row in configs if row["status"] == "not-run"]
    lines += [f"- {not_run.count(reason)} config(s) {reason}" for reason in dict.fromkeys(not_run)]
    best = timed[0]["median_ms"] if timed else None
    return "\n".join(lines), (sdpa["median_ms"], default and default["median_ms"], best)


def header(env: dict) -> str:
    return (
        f"# Triton attention tile configs: {env['device']}\n\n"
        f"{env['date']} · torch {env['torch']} · triton {env['triton']} · fastattn {env['fastattn']} "
        f"(git {env['fastattn_git']}) · `{env['command']}` · {env['runtime_s']:.0f} s\n\n"
        f"Medians in ms (p20/p80 in tune.csv). Timer: {env['timer']}. `vs SDPA` = SDPA's time / the config's "
        f"(> 1: faster than SDPA). rel err = ||x - ref|| / ||ref|| against float32 SDPA (backward: worst of dq, dk, "
        f"dv), at most {env['tolerance']:g}. est. KiB: shared memory by the estimate used to prune (budget "
        f"{env['smem_budget'] / 1024:g} KiB); KiB, regs, spills: the compiled kernels' (backward: the larger "
        f"kernel's; spills summed)."
    )


def describe_time(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    return f"{report.format_ms(row['median_ms'])} ms, {report.format_rate(row['tflops'])} TFLOP/s"


def kib(value) -> str:
    return "" if value is None else f"{value / 1024:.0f}"


def blank_if_none(value) -> str:
    return "" if value is None else str(value)


def default_line(default: dict | None, timed: list[dict]) -> str:
    if default is None or default["status"] != "ok":
        return f"The default was not timed ({default and default['status']})."
    rank = timed.index(default) + 1
    if rank == 1:
        return f"The default {default['config']} is the fastest of {len(timed)}."
    gain = default["median_ms"] / timed[0]["median_ms"]
    return f"The default {default['config']} ranks {rank} of {len(timed)}; the best is {gain:.2f}x faster."


def total_line(totals: dict[str, tuple]) -> str:
    """SDPA, default and best forward + backward times, where both passes have them."""
    names = ("SDPA", "default", "best configs")
    sums = [None if None in pair else sum(pair) for pair in zip(*(totals[mode] for mode in PASSES), strict=True)]
    times = [f"{name} {report.format_ms(ms)} ms" for name, ms in zip(names, sums, strict=True) if ms is not None]
    return "; ".join(times) or "no times"


# ---------------------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------------------


def write_outputs(rows: list[dict], env: dict, out: Path) -> str:
    """tune.csv, env.json and tune.md into ``out``; returns tune.md's text."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "tune.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    report.write_json(env, out / "env.json")
    text = f"{header(env)}\n\n{tables(rows)}\n"
    (out / "tune.md").write_text(text)
    return text


def progress(items, total: int, desc: str):
    """tqdm over ``items`` when installed, else the items as they are."""
    try:
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tune_attention", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="output folder (default: bench/results/<device>-<date>-tune-attention/)"
    )
    parser.add_argument("--quick", action="store_true", help=f"the first {len(QUICK_PROBLEMS)} problems, short timings")
    parser.add_argument(
        "--deadline",
        type=float,
        default=240.0,
        metavar="SECONDS",
        help="start no config after this many seconds (default 240); the rest are not-run rows",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="processes compiling ahead of the timing (default: the cores less 2; 0: none)",
    )
    parser.add_argument("--no-prune", action="store_true", help="keep configs over the shared memory estimate")
    parser.add_argument(
        "--smem-budget",
        type=int,
        metavar="BYTES",
        help=f"shared memory per block (default: the GPU's; without one {ASSUMED_SMEM})",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the configs per problem and exit (no GPU needed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    problems = QUICK_PROBLEMS if args.quick else PROBLEMS
    gpu = torch.cuda.is_available()
    device_budget = torch.cuda.get_device_properties(0).shared_memory_per_block_optin if gpu else ASSUMED_SMEM
    budget = args.smem_budget or device_budget
    if args.dry_run:
        print(listing(problems, budget, prune=not args.no_prune))
        return
    if not gpu:
        raise SystemExit("bench.tune_attention needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "--dry-run lists the configs without one")  # fmt: skip
    if kernels._interpreting():
        raise SystemExit("bench.tune_attention: unset TRITON_INTERPRET (the interpreter ignores tile configs)")

    start = time.perf_counter()
    env = environment.describe(DEVICE, torch.get_num_threads(), argv)
    timer = timer_for(DEVICE, args.quick)
    jobs = max(environment.cpu_cores() - 2, 1) if args.jobs is None else args.jobs
    plan = schedule(problems, budget, prune=not args.no_prune)
    env.update(command=" ".join(["python -m bench.tune_attention", *argv]), timer=timer.description,
               smem_budget=budget, tolerance=TOLERANCE, jobs=jobs, deadline_s=args.deadline, candidates=len(plan),
               problems=[problem.label for problem in problems], grids=GRIDS)  # fmt: skip
    out = args.out or RESULTS / f"{env['device_slug']}-{env['date']}-tune-attention"

    failures = compile_all(plan, jobs, args.deadline * WARM_SHARE) if jobs > 0 else {}
    env["compile_s"] = time.perf_counter() - start
    rows = run(plan, failures, problems, timer, env, start + args.deadline)
    env["runtime_s"] = time.perf_counter() - start
    env["status_counts"] = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}

    print(write_outputs(rows, env, out))
    print(f"wrote {out}/ (tune.csv, tune.md, env.json) in {env['runtime_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
