"""Writing the results: the tidy rows as CSV, the environment as JSON, and the Markdown tables."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

from bench.harness import COLUMNS, OpBenchmark, Target

# Device-to-device copy bandwidth (read + write counted), the ceiling memory-bound kernels are held to.
COPY_BANDWIDTH = {"H100 80GB HBM3": 3.0e12, "H200": 4.3e12}
COPY_BANDWIDTH_SOURCE = (
    "device-to-device copy measured on the project's H100 (3.0 TB/s) and H200 (4.3 TB/s) machines, "
    "read + write counted (shared/ENVIRONMENT.md)"
)

THROUGHPUTS = (("gbps", "GB/s"), ("tflops", "TFLOP/s"))
# Per-provider column groups of a table after the times and speedups (each shown when any row has it).
MEASURES = (*THROUGHPUTS, ("peak_mib", "peak MiB"))


def copy_bandwidth(device: str) -> float | None:
    """The copy-bandwidth ceiling in bytes/s for a known GPU, else None."""
    return next((rate for name, rate in COPY_BANDWIDTH.items() if name in device), None)


# ---------------------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------------------


def write_csv(rows: Iterable[dict], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: "" if row[key] is None else row[key] for key in COLUMNS} for row in rows)


def write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------------------------------------


def markdown(rows: list[dict], ops: Iterable[OpBenchmark], environment: dict) -> str:
    """results.md: a header naming device, versions and method, then per op a table per mode and dtype."""
    parts = [header(environment)]
    for op in ops:
        op_rows = [row for row in rows if row["op"] == op.name]
        if not op_rows:
            continue
        parts.append(f"## {op.name}\n\n{op.notes}".rstrip())
        for (mode, dtype), table_rows in group(op_rows, ("mode", "dtype")).items():
            parts.append(f"### {op.name} · {mode} · {dtype}")
            parts.append(table(table_rows))
            parts.extend(skipped_lines(table_rows) + target_lines(table_rows, op.targets, environment))
    return "\n\n".join(parts) + "\n"


def header(environment: dict) -> str:
    env = environment
    ceiling = copy_bandwidth(env["device"]) if env["device_type"] == "cuda" else None
    lines = [
        f"# fastattn benchmarks: {env['device']}",
        "",
        f"{env['date']} · torch {env['torch']} · triton {env['triton']} · fastattn {env['fastattn']} "
        f"(git {env['fastattn_git']}) · {env['threads']} threads · `{env['command']}` · {env['runtime_s']:.0f} s",
        "",
        f"Times are medians in ms (p20/p80 in results.csv). Timer: {env['timer']}. `P speedup` = torch eager "
        "time / P's time (> 1: P is faster than torch eager). GB/s = bytes moved per call / median time. A `—` is "
        "a provider that did not run at that shape; the list under each table says why.",
    ]
    if env["device_type"] == "cpu":
        lines += [
            "",
            f"1-minute load average: {env['load_average_at_start']} at the start, "
            f"{env['load_average_at_end']} at the end (above the thread count, other work skewed the times).",
        ]
    if ceiling:
        lines += ["", f"Copy-bandwidth ceiling here: {ceiling / 1e12:.1f} TB/s ({COPY_BANDWIDTH_SOURCE})."]
    return "\n".join(lines)


def group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """Rows grouped by the values of ``keys``, groups in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    return groups


def providers_in(rows: list[dict], status: str | None = None) -> list[str]:
    """Provider names in order of first appearance (only those with a row of ``status``, if given)."""
    return list(dict.fromkeys(row["provider"] for row in rows if status in (None, row["status"])))


def timed(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """The rows that ran, by (provider, shape)."""
    return {(row["provider"], row["shape"]): row for row in rows if row["status"] == "ok"}


def table(rows: list[dict]) -> str:
    """One Markdown table: a line per shape; times, ratios to torch eager, and throughput per provider."""
    providers = providers_in(rows, "ok")
    compared = [name for name in providers if name != "torch"]
    throughputs = [(key, unit) for key, unit in MEASURES if any(row[key] for row in rows)]
    by_key = timed(rows)
    shapes = sorted({(row["x_value"], row["shape"]) for row in rows}, key=lambda pair: (pair[0], pair[1]))
    x_label = rows[0]["x_label"]

    head = [x_label, "shape"] + [f"{name} ms" for name in providers]
    head += [f"{name} speedup" for name in compared]
    head += [f"{name} {unit}" for key, unit in throughputs for name in providers]
    body = []
    for x_value, shape in shapes:
        row_of = {name: by_key.get((name, shape)) for name in providers}
        cells = [str(x_value), shape] + [cell(row_of[name], "median_ms", format_ms) for name in providers]
        cells += [format_ratio(speedup(row_of.get("torch"), row_of[name])) for name in compared]
        cells += [cell(row_of[name], key, format_rate) for key, _ in throughputs for name in providers]
        body.append(cells)
    return markdown_table(head, body, left_aligned=2)


def speedup(baseline: dict | None, row: dict | None) -> float | None:
    """baseline time / row time (> 1: row is faster), or None when either did not run."""
    if baseline is None or row is None:
        return None
    return baseline["median_ms"] / row["median_ms"]


def cell(row: dict | None, key: str, formatter) -> str:
    return formatter(row[key]) if row is not None and row[key] is not None else "—"


def format_ms(value: float) -> str:
    return f"{value:.0f}" if value >= 1000 else f"{value:.3g}"


def format_rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def format_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def markdown_table(head: list[str], body: list[list[str]], left_aligned: int) -> str:
    """A Markdown table padded to line up in a terminal; columns after ``left_aligned`` align right."""
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def pad(index: int, text: str) -> str:
        return text.ljust(widths[index]) if index < left_aligned else text.rjust(widths[index])

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(pad(index, text) for index, text in enumerate(cells)) + " |"

    rule = "|" + "|".join(("-" * (w + 2)) if i < left_aligned else ("-" * (w + 1) + ":") for i, w in enumerate(widths))
    return "\n".join([line(head), rule + "|", *(line(cells) for cells in body)])


def skipped_lines(rows: list[dict]) -> list[str]:
    """'Skipped: provider: why' for each provider that did not run at some shape of the table."""
    all_shapes = {row["shape"] for row in rows}
    reasons: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        if row["status"] != "ok":
            reasons.setdefault((row["provider"], row["reason"]), []).append(row["shape"])
    lines = []
    for (provider, reason), shapes in reasons.items():
        where = "" if set(shapes) == all_shapes else f" (at {', '.join(shapes)})"
        lines.append(f"- skipped `{provider}`{where}: {reason}")
    return ["\n".join(lines)] if lines else []


# ---------------------------------------------------------------------------------------------------------
# Targets.
# ---------------------------------------------------------------------------------------------------------


def target_lines(rows: list[dict], targets: Iterable[Target], environment: dict) -> list[str]:
    """One line per target that covers this table's device and mode: how the providers fare against it."""
    lines = []
    for target in targets:
        if target.device_type != environment["device_type"] or rows[0]["mode"] not in target.modes:
            continue
        covered = [row for row in rows if target.covers(row)]
        if not covered:
            lines.append(f"**Target** ({target.scope}): not measured in this run.")
            continue
        verdicts = [provider_verdict(name, covered, target, environment["device"]) for name in target.providers]
        lines.append(f"**Target** ({target.scope}): " + "; ".join(verdicts) + ".")
    return lines


def provider_verdict(provider: str, rows: list[dict], target: Target, device: str) -> str:
    """E.g. 'fastattn-cpu 1.12x torch (>= 1.0x: met)', over the shapes of ``rows`` that it ran."""
    by_key = timed(rows)
    mine = [row for row in rows if row["provider"] == provider and row["status"] == "ok"]
    if not mine:
        return f"`{provider}` not measured (skipped)"
    parts = []
    for baseline, least in target.min_speedup.items():
        ratios = [speedup(by_key.get((baseline, row["shape"])), row) for row in mine]
        parts.append(judge([r for r in ratios if r is not None], least, baseline, lambda v: f"{v:.2f}x"))
    if target.min_copy_fraction is not None:
        parts.append(copy_verdict(mine, target.min_copy_fraction, device))
    return f"`{provider}` " + ", ".join(parts)


def copy_verdict(rows: list[dict], least: float, device: str) -> str:
    ceiling = copy_bandwidth(device)
    if ceiling is None:
        return f"no copy-bandwidth figure for {device}"
    fractions = [row["gbps"] * 1e9 / ceiling for row in rows]
    return judge(fractions, least, f"of {ceiling / 1e12:.1f} TB/s copy", lambda v: f"{v:.0%}")


def judge(values: list[float], least: float, what: str, formatter) -> str:
    """'0.97–1.12x torch (>= 1.0x: missed)': the range over shapes and whether its low end meets ``least``."""
    if not values:
        return f"no {what} to compare with"
    low, high = min(values), max(values)
    shown = formatter(low) if formatter(low) == formatter(high) else f"{formatter(low)}–{formatter(high)}"
    verdict = "met" if low >= least else "missed"
    return f"{shown} {what} (>= {formatter(least)}: {verdict})"
