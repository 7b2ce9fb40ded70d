"""What every op benchmark shares: cases and providers, the op registry, timers, and the tidy rows.

An op benchmark is one file ``bench/<op>.py`` whose function, decorated with :func:`register`, yields
:class:`Case` objects. A case is one measured point (op, mode, shape, dtype); its ``providers()`` allocates
the inputs and yields :class:`Provider` objects: a name and a zero-argument callable, or the reason it
cannot run. :func:`run_case` times each provider and returns one tidy row per provider, skipped ones
included, so that a report can say why a provider is missing instead of silently dropping it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import pkgutil
import time
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

MODES = ("forward", "backward", "forward+backward")

# The columns of results.csv, in order.
COLUMNS = (
    "op", "mode", "provider", "status", "dtype", "shape", "x_label", "x_value",
    "median_ms", "p20_ms", "p80_ms", "gbps", "tflops", "bytes", "flops", "reps", "first_call_ms", "peak_mib",
    "reason",
    "device", "device_type", "threads", "torch", "triton", "fastattn", "date",
)  # fmt: skip

# Modules of this package that hold no op benchmark.
INFRASTRUCTURE = {"harness", "environment", "report", "plot", "tune_attention"}


# ---------------------------------------------------------------------------------------------------------
# Cases and providers.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Provider:
    """One implementation of a case: ``fn()`` runs it once; ``skipped`` says why it cannot run instead.

    ``context()`` is entered around all of the provider's calls (e.g. forcing a fastattn backend), so its
    cost stays out of the timings.
    """

    name: str
    fn: Callable[[], object] | None = None
    skipped: str | None = None
    context: Callable[[], AbstractContextManager] = contextlib.nullcontext


def skip(name: str, reason: str) -> Provider:
    """A provider that cannot run here, and why."""
    return Provider(name, skipped=reason)


@dataclass
class Case:
    """One measured point: ``op`` in one ``mode`` on inputs of one ``shape`` and ``dtype``.

    ``providers()`` allocates the inputs and yields the providers; it runs only when the case is timed.
    ``x_label``/``x_value`` name the swept quantity (e.g. ``N``, 1024) for tables and plots.
    ``bytes``/``flops``: memory traffic / floating-point work of one call, for GB/s / TFLOP/s (0: none).
    """

    op: str
    mode: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    x_label: str
    x_value: int
    providers: Callable[[], Iterator[Provider]]
    bytes: int = 0
    flops: int = 0


def shape_label(shape: Iterable[int]) -> str:
    """(8192, 1024) -> '8192x1024'."""
    return "x".join(str(size) for size in shape)


def dtype_label(dtype: torch.dtype) -> str:
    """torch.float32 -> 'float32'."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------
# Providers most op benchmarks need.
# ---------------------------------------------------------------------------------------------------------


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` for one shape; it compiles on its first call (outside the timed region).

    The compile caches are reset first: with ``dynamic=False`` every shape is a recompile, and past
    Dynamo's recompile limit a function would silently run eagerly. ``fullgraph=True`` turns a graph
    break into an error (reported as a skipped provider) instead of a silently slower graph.
    """
    torch.compiler.reset()
    return torch.compile(fn, dynamic=False, fullgraph=True)


def fastattn_providers(device: torch.device, fn: Callable[[], object]) -> Iterator[Provider]:
    """``fastattn-<backend>`` for each backend of ``device``'s priority list, each running ``fn()``.

    Each provider runs with its backend forced, so a backend that refuses the inputs fails (and is listed
    as skipped with the reason) instead of quietly falling back to another one.
    """
    from fastattn import backends  # noqa: PLC0415

    for backend in backends.PRIORITY.get(device.type, ("reference",)):
        name = f"fastattn-{backend}"
        reason = _why_not_timed(backend, device)
        if reason is None:
            yield Provider(name, fn, context=functools.partial(backends.backend, backend))
        else:
            yield skip(name, reason)


def _why_not_timed(backend: str, device: torch.device) -> str | None:
    from fastattn import backends  # noqa: PLC0415

    if backend == "triton" and device.type == "cpu":
        return "never timed on CPU: Triton runs CPU tensors only through its (about 10^4x slower) interpreter"
    return backends.unavailable_reason(backend, device)


# ---------------------------------------------------------------------------------------------------------
# The registry of op benchmarks.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A performance goal from an issue, reported (never asserted) under the tables it covers.

    ``covers(row)`` picks the shapes and dtypes the goal is about; ``min_speedup`` maps a baseline provider
    to the least acceptable ratio (baseline time / provider time); ``min_copy_fraction`` is the least
    acceptable fraction of the device's copy bandwidth (GPU devices with a known figure only).
    """

    device_type: str
    modes: tuple[str, ...]
    providers: tuple[str, ...]
    scope: str
    covers: Callable[[dict], bool]
    min_speedup: dict[str, float]
    min_copy_fraction: float | None = None


@dataclass(frozen=True)
class OpBenchmark:
    """A registered op benchmark: ``cases(device, quick)`` yields its cases; ``notes`` go into results.md."""

    name: str
    cases: Callable[[torch.device, bool], Iterable[Case]]
    targets: tuple[Target, ...] = ()
    notes: str = ""


REGISTRY: dict[str, OpBenchmark] = {}


def register(name: str, *, targets: Iterable[Target] = (), notes: str = ""):
    """Decorator for ``cases(device, quick) -> Iterable[Case]``: adds the op benchmark ``name``."""

    def decorator(cases: Callable[[torch.device, bool], Iterable[Case]]):
        REGISTRY[name] = OpBenchmark(name, cases, tuple(targets), notes)
        return cases

    return decorator


def discover() -> dict[str, OpBenchmark]:
    """Import every op benchmark module of this package (each registers itself); return the registry."""
    package = importlib.import_module("bench")
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name not in INFRASTRUCTURE:
            importlib.import_module(f"bench.{module.name}")
    return REGISTRY


# ---------------------------------------------------------------------------------------------------------
# Timers.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Quantiles of one provider's call times in milliseconds; ``reps`` is None when the timer chose it."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int | None


def _quantiles(times_ms: list[float]) -> Timing:
    median, p20, p80 = (
        torch.tensor(times_ms, dtype=torch.float64)
        .quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
        .tolist()
    )
    return Timing(median, p20, p80, len(times_ms))


class CpuTimer:
    """``time.perf_counter`` around each call: one warm-up call, then calls until ``budget_s`` has passed
    and at least ``min_reps`` ran (at most ``max_reps``). Caches are not flushed: keep inputs larger than
    the last-level cache when that matters. :func:`run_case` interleaves a case's providers through
    :meth:`rounds`, so that a slow drift of the machine falls on all of them alike."""

    interleaves = True

    def __init__(self, budget_s: float, min_reps: int, max_reps: int = 500):
        self.budget_s, self.min_reps, self.max_reps = budget_s, min_reps, max_reps
        self.description = (
            f"time.perf_counter, a first call and a warm-up call, then the providers of a case in turn, one call "
            f"each, for {budget_s:g} s per provider ({min_reps} to {max_reps} calls each); caches not flushed"
        )

    def once_ms(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def peak_mib(self, fn: Callable[[], object]) -> float | None:
        """None: torch's CPU allocator keeps no peak statistics."""
        return None

    def __call__(self, fn: Callable[[], object]) -> Timing:
        return self.rounds({"": (fn, contextlib.nullcontext)})[""]

    def rounds(self, calls: dict[str, tuple[Callable[[], object], Callable]]) -> dict[str, Timing | Exception]:
        """Times ``fn()`` (inside ``context()``) of every ``name: (fn, context)`` in turn, round after round,
        after one warm-up call each; a call that raises drops its provider (its value is the exception)."""
        results: dict[str, Timing | Exception] = {}
        times: dict[str, list[float]] = {}
        for name, (fn, context) in calls.items():
            try:
                with context():
                    fn()
                times[name] = []
            except Exception as error:  # noqa: BLE001 - reported by the caller
                results[name] = error
        deadline = time.perf_counter() + self.budget_s * max(len(times), 1)
        reps = 0
        while times and (reps < self.min_reps or (time.perf_counter() < deadline and reps < self.max_reps)):
            for name in list(times):
                fn, context = calls[name]
                try:
                    with context():
                        times[name].append(self.once_ms(fn))
                except Exception as error:  # noqa: BLE001
                    results[name] = error
                    del times[name]
            reps += 1
        results.update((name, _quantiles(ms)) for name, ms in times.items())
        return results


class GpuTimer:
    """``triton.testing.do_bench``: CUDA events, the L2 cache flushed before every call, ``warmup_ms`` of
    warm-up and about ``rep_ms`` of timed calls. Triton is imported only here, on a machine with a GPU."""

    def __init__(self, warmup_ms: int, rep_ms: int):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.description = (
            f"triton.testing.do_bench (CUDA events, L2 flushed before each call, {warmup_ms} ms warm-up, "
            f"{rep_ms} ms of calls)"
        )

    def once_ms(self, fn: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    def peak_mib(self, fn: Callable[[], object]) -> float:
        """Memory one call allocates at its peak, beyond what was allocated before it, in MiB."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    def __call__(self, fn: Callable[[], object]) -> Timing:
        from triton.testing import do_bench  # noqa: PLC0415

        median, p20, p80 = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80, None)


def timer_for(device: torch.device, quick: bool):
    """The timer for ``device``; ``quick`` trades precision for time (CI smoke runs)."""
    if device.type == "cuda":
        return GpuTimer(warmup_ms=5, rep_ms=20) if quick else GpuTimer(warmup_ms=25, rep_ms=100)
    return CpuTimer(budget_s=0.05, min_reps=3) if quick else CpuTimer(budget_s=0.5, min_reps=5)


# ---------------------------------------------------------------------------------------------------------
# Running a case.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What happened to one provider of a case: a timing, or the reason there is none."""

    provider: str
    timing: Timing | None = None
    first_call_ms: float | None = None
    peak_mib: float | None = None
    reason: str | None = None


def measure(provider: Provider, timer) -> Outcome:
    """Time one provider. Its first call (where torch.compile compiles) is timed apart from the rest; a
    provider that raises is reported as skipped with the error, and the run goes on."""
    if provider.skipped is not None:
        return Outcome(provider.name, reason=provider.skipped)
    try:
        with provider.context():
            first_call_ms = timer.once_ms(provider.fn)
            return Outcome(provider.name, timer(provider.fn), first_call_ms, timer.peak_mib(provider.fn))
    except Exception as error:  # noqa: BLE001 - any failure of a provider is reported, not fatal
        return Outcome(provider.name, reason=f"failed: {_describe(error)}")


def _describe(error: Exception, limit: int = 200) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_case(
    case: Case,
    timer,
    environment: dict,
    on_provider: Callable[[str], None] = lambda name: None,
    skip: Container[str] = (),
):
    """Time every provider of ``case`` but those named in ``skip``; returns one row (a dict with
    :data:`COLUMNS`) per provider."""
    torch.manual_seed(0)
    interleave = getattr(timer, "interleaves", False)
    providers, outcomes = [], []
    for provider in case.providers():
        if provider.name in skip:
            provider = Provider(provider.name, skipped="not timed in this run (--skip)")
        if interleave:
            providers.append(provider)  # timed together below
        else:
            on_provider(provider.name)
            outcomes.append(measure(provider, timer))
    if interleave:
        on_provider(", ".join(p.name for p in providers))
        outcomes = measure_interleaved(providers, timer)
    return [to_row(case, outcome, environment) for outcome in outcomes]


def measure_interleaved(providers: list[Provider], timer) -> list[Outcome]:
    """Each provider's first call timed apart (where torch.compile compiles), then all of them timed in turn
    by ``timer.rounds``; a provider that raises is reported as skipped with the error."""
    first_ms: dict[str, float] = {}
    failed: dict[str, Exception] = {}
    for provider in providers:
        if provider.skipped is None:
            try:
                with provider.context():
                    first_ms[provider.name] = timer.once_ms(provider.fn)
            except Exception as error:  # noqa: BLE001 - any failure of a provider is reported, not fatal
                failed[provider.name] = error
    timings = timer.rounds({p.name: (p.fn, p.context) for p in providers if p.name in first_ms})
    outcomes = []
    for provider in providers:
        result = failed.get(provider.name, timings.get(provider.name))
        if provider.skipped is not None:
            outcomes.append(Outcome(provider.name, reason=provider.skipped))
        elif isinstance(result, Exception):
            outcomes.append(Outcome(provider.name, reason=f"failed: {_describe(result)}"))
        else:
            outcomes.append(Outcome(provider.name, result, first_ms[provider.name]))
    return outcomes


def to_row(case: Case, outcome: Outcome, environment: dict) -> dict:
    """The tidy row of one provider of one case."""
    timing = outcome.timing
    seconds = timing.median_ms * 1e-3 if timing else None
    row = {
        "op": case.op,
        "mode": case.mode,
        "provider": outcome.provider,
        "status": "ok" if timing else "skipped",
        "dtype": dtype_label(case.dtype),
        "shape": shape_label(case.shape),
        "x_label": case.x_label,
        "x_value": case.x_value,
        "median_ms": timing.median_ms if timing else None,
        "p20_ms": timing.p20_ms if timing else None,
        "p80_ms": timing.p80_ms if timing else None,
        "gbps": case.bytes / seconds / 1e9 if seconds and case.bytes else None,
        "tflops": case.flops / seconds / 1e12 if seconds and case.flops else None,
        "bytes": case.bytes or None,
        "flops": case.flops or None,
        "reps": timing.reps if timing else None,
        "first_call_ms": outcome.first_call_ms,
        "peak_mib": outcome.peak_mib,
        "reason": outcome.reason,
    }
    row.update({key: environment[key] for key in COLUMNS if key not in row})
    return row
