"""``python -m bench.plot results.csv [--out DIR]``: one PNG per op and mode from the tidy rows.

Each figure has a column per dtype: time (ms) on top, throughput (GB/s, or TFLOP/s) below, against the
swept size, a line per provider; its title names the device, versions and date.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from bench.report import THROUGHPUTS, group


def read_rows(path: Path) -> list[dict]:
    """The rows of a results.csv that ran, with numbers as floats."""
    with path.open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["status"] == "ok"]
    for row in rows:
        for key in ("x_value", "median_ms", "gbps", "tflops"):
            row[key] = float(row[key]) if row[key] else None
    return rows


def throughput_of(rows: list[dict]) -> tuple[str, str] | None:
    """The throughput column these rows report, e.g. ('gbps', 'GB/s'), or None."""
    return next(((key, unit) for key, unit in THROUGHPUTS if any(row[key] for row in rows)), None)


def title(op: str, mode: str, row: dict) -> str:
    return (
        f"{op} {mode} on {row['device']} ({row['threads']} threads)\n"
        f"torch {row['torch']}, triton {row['triton'] or 'none'}, fastattn {row['fastattn']}, {row['date']}"
    )


def draw_lines(axes, rows: list[dict], key: str) -> None:
    """A line per provider of ``rows[key]`` against x, on log-log axes."""
    for provider, provider_rows in group(rows, ("provider",)).items():
        points = sorted((row["x_value"], row[key]) for row in provider_rows if row[key] is not None)
        if points:
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=provider[0])
    x_values = sorted({row["x_value"] for row in rows})
    axes.set_xscale("log", base=2)
    axes.set_xticks(x_values, [f"{x:g}" for x in x_values], minor=False)
    axes.minorticks_off()
    axes.grid(True, which="both", alpha=0.3)


def plot_op_mode(op: str, mode: str, rows: list[dict], out_dir: Path) -> Path:
    """One figure for one op and mode: a column per dtype, time above throughput."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    by_dtype = group(rows, ("dtype",))
    throughput = throughput_of(rows)
    n_rows = 2 if throughput else 1
    figure, axes = plt.subplots(n_rows, len(by_dtype), figsize=(5 * len(by_dtype), 3.6 * n_rows), squeeze=False)
    for column, ((dtype,), dtype_rows) in enumerate(by_dtype.items()):
        x_label = dtype_rows[0]["x_label"]
        draw_lines(axes[0][column], dtype_rows, "median_ms")
        axes[0][column].set(title=dtype, ylabel="median time (ms)", yscale="log", xlabel=x_label)
        if throughput:
            key, unit = throughput
            draw_lines(axes[1][column], dtype_rows, key)
            axes[1][column].set(ylabel=unit, xlabel=x_label)
    axes[0][0].legend(fontsize="small")
    figure.suptitle(title(op, mode, rows[0]), fontsize="medium")
    figure.tight_layout()
    path = out_dir / f"{op}-{mode.replace('+', '-')}.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_csv(csv_path: Path, out_dir: Path | None = None) -> list[Path]:
    """Draw every op and mode of ``csv_path`` into ``out_dir`` (default: beside the CSV); returns the PNGs."""
    out_dir = out_dir or csv_path.parent
    rows = read_rows(csv_path)
    return [plot_op_mode(op, mode, op_rows, out_dir) for (op, mode), op_rows in group(rows, ("op", "mode")).items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="a results.csv written by python -m bench")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: beside the CSV)")
    args = parser.parse_args(argv)
    for path in plot_csv(args.csv, args.out):
        print(path)


if __name__ == "__main__":
    main()
