"""``python -m bench [--ops softmax] [--quick] [--out DIR] [--device cpu|cuda] [--threads N] [--skip P] [--deadline S]``

Runs every registered op benchmark (or those named) on one device with a progress bar, then writes
``results.csv`` (tidy rows), ``results.md`` (tables, also printed), ``env.json`` and one PNG per op and mode
into ``--out`` (default ``bench/results/<device>-<date>/``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from bench import environment, harness, report

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[2])
    parser.add_argument("--ops", nargs="+", metavar="OP", help="op benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="few shapes, short timings: a smoke test for CI")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<device>-<date>/)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: the cores this process has)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PROVIDER",
                        help="providers not to time, e.g. torch.compile (reported as skipped, with this reason)")
    parser.add_argument("--deadline", type=float, metavar="SECONDS",
                        help="start no case after this many seconds; the cases left are listed in env.json")
    return parser.parse_args(argv)


def pick_ops(registry: dict[str, harness.OpBenchmark], names: list[str] | None) -> list[harness.OpBenchmark]:
    """The op benchmarks named (comma- or space-separated), or all of them."""
    if not names:
        return list(registry.values())
    wanted = [name for item in names for name in item.split(",") if name]
    unknown = [name for name in wanted if name not in registry]
    if unknown:
        raise SystemExit(f"unknown op benchmark(s) {unknown}; known: {sorted(registry)}")
    return [registry[name] for name in wanted]


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to torch")
    return torch.device(name)


def progress(cases: list[harness.Case]):
    """A tqdm progress bar over the cases, or plain lines on stderr when tqdm is not installed."""
    try:
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError:
        return PlainProgress(cases)
    return tqdm(cases, unit="case", dynamic_ncols=True)


class PlainProgress:
    """The part of tqdm's interface used here, printing a line per case."""

    def __init__(self, cases: list[harness.Case]):
        self.cases = cases

    def __iter__(self):
        for index, case in enumerate(self.cases, 1):
            print(f"[{index}/{len(self.cases)}] {describe(case)}", file=sys.stderr, flush=True)
            yield case

    def set_description_str(self, text: str) -> None:
        pass


def describe(case: harness.Case) -> str:
    return f"{case.op} {case.mode} {harness.dtype_label(case.dtype)} {harness.shape_label(case.shape)}"


def run(cases: list[harness.Case], timer, env: dict, skip: Iterable[str] = (), deadline: float | None = None):
    """Time every case, showing progress, until ``deadline`` seconds have passed; returns the tidy rows and
    the cases not run."""
    start = time.perf_counter()
    rows: list[dict] = []
    bar = progress(cases)
    for index, case in enumerate(bar):
        if deadline is not None and time.perf_counter() - start > deadline:
            return rows, cases[index:]
        show = functools.partial(show_provider, bar, describe(case))
        rows += harness.run_case(case, timer, env, show, skip=set(skip))
    return rows, []


def show_provider(bar, case_label: str, provider: str) -> None:
    bar.set_description_str(f"{case_label} {provider}")


def write_outputs(rows: list[dict], ops: Iterable[harness.OpBenchmark], env: dict, out: Path) -> str:
    """results.csv, env.json, results.md and the plots; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, out / "results.csv")
    report.write_json(env, out / "env.json")
    text = report.markdown(rows, ops, env)
    (out / "results.md").write_text(text)
    try:
        from bench import plot  # noqa: PLC0415

        plot.plot_csv(out / "results.csv")
    except ImportError as error:
        print(f"no plots: {error}", file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = pick_device(args.device)
    threads = args.threads or environment.cpu_cores()
    torch.set_num_threads(threads)
    ops = pick_ops(harness.discover(), args.ops)
    env = environment.describe(device, threads, argv)
    timer = harness.timer_for(device, args.quick)
    env.update(timer=timer.description, quick=args.quick, ops=[op.name for op in ops])
    out = args.out or RESULTS / f"{env['device_slug']}-{env['date']}"

    start = time.perf_counter()
    cases = [case for op in ops for case in op.cases(device, args.quick)]
    rows, not_run = run(cases, timer, env, args.skip, args.deadline)
    env.update(runtime_s=time.perf_counter() - start, load_average_at_end=environment.load_average())
    if not_run:
        env["not_run_past_deadline"] = [describe(case) for case in not_run]
        print(f"--deadline {args.deadline:g} s: {len(not_run)} case(s) not run (listed in env.json)", file=sys.stderr)
    text = write_outputs(rows, ops, env, out)
    print(text)
    print(f"wrote {out}/ (results.csv, results.md, env.json, plots) in {env['runtime_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
