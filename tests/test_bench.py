"""The bench harness end to end on a tiny made-up op: rows, skipped providers, Markdown, targets, files."""

import csv
import json

import pytest
import torch

from bench import __main__ as bench_main
from bench import harness, report


def _providers(n: int):
    x = torch.randn(4, n)
    yield harness.Provider("torch", lambda: torch.exp(x))
    yield harness.Provider("fastattn-cpu", lambda: x.exp_())
    yield harness.Provider("broken", lambda: torch.ops.aten.this_op_does_not_exist(x))
    yield harness.skip("absent", "not installed here")


def _cases(device, quick):
    for n in (8, 16):
        yield harness.Case(
            op="toy", mode="forward", shape=(4, n), dtype=torch.float32, x_label="N", x_value=n,
            providers=lambda n=n: _providers(n), bytes=2 * 4 * n * 4,
        )  # fmt: skip


TARGET = harness.Target(
    device_type="cpu", modes=("forward",), providers=("fastattn-cpu",), scope="all", covers=lambda row: True,
    min_speedup={"torch": 1e-9},
)  # fmt: skip


@pytest.fixture
def toy_op(monkeypatch):
    monkeypatch.setitem(harness.REGISTRY, "toy", harness.OpBenchmark("toy", _cases, (TARGET,), "toy notes"))
    monkeypatch.setattr(harness, "discover", lambda: harness.REGISTRY)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # bench's main sets it


def test_bench_run_writes_rows_tables_and_plots(toy_op, tmp_path):
    bench_main.main(["--ops", "toy", "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])

    with (tmp_path / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["provider"] for row in rows] == ["torch", "fastattn-cpu", "broken", "absent"] * 2
    by_provider = {row["provider"]: row for row in rows if row["x_value"] == "16"}
    assert by_provider["torch"]["status"] == "ok" and float(by_provider["torch"]["median_ms"]) > 0
    assert float(by_provider["torch"]["gbps"]) == pytest.approx(2 * 4 * 16 * 4 / float(by_provider["torch"]["median_ms"]) / 1e6)
    assert by_provider["broken"]["status"] == "skipped" and "failed: AttributeError" in by_provider["broken"]["reason"]
    assert by_provider["absent"]["reason"] == "not installed here"

    text = (tmp_path / "results.md").read_text()
    assert "### toy · forward · float32" in text and "toy notes" in text
    assert "fastattn-cpu speedup" in text
    assert "- skipped `absent`: not installed here" in text
    assert "**Target** (all): `fastattn-cpu`" in text and ": met)" in text
    assert (tmp_path / "env.json").exists()
    assert (tmp_path / "toy-forward.png").stat().st_size > 0


def test_skip_leaves_a_provider_untimed(toy_op, tmp_path):
    bench_main.main(["--ops", "toy", "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path),
                     "--skip", "torch"])  # fmt: skip

    with (tmp_path / "results.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row["provider"] in ("torch", "fastattn-cpu")]
    assert [(row["provider"], row["status"]) for row in rows] == [("torch", "skipped"), ("fastattn-cpu", "ok")] * 2
    assert "--skip" in rows[0]["reason"]


def test_deadline_lists_the_cases_not_run(toy_op, tmp_path):
    bench_main.main(["--ops", "toy", "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path),
                     "--deadline", "-1"])  # fmt: skip

    env = json.loads((tmp_path / "env.json").read_text())
    assert env["not_run_past_deadline"] == ["toy forward float32 4x8", "toy forward float32 4x16"]


def test_unknown_op_is_refused():
    with pytest.raises(SystemExit, match="unknown op benchmark"):
        bench_main.pick_ops({"softmax": None}, ["sofmax"])


def test_target_verdict_reports_a_miss():
    rows = [
        {"provider": "torch", "shape": "1x1", "status": "ok", "median_ms": 1.0, "mode": "forward"},
        {"provider": "fastattn-cpu", "shape": "1x1", "status": "ok", "median_ms": 2.0, "mode": "forward"},
    ]
    target = harness.Target("cpu", ("forward",), ("fastattn-cpu",), "all", lambda row: True, {"torch": 1.0})
    (line,) = report.target_lines(rows, [target], {"device_type": "cpu", "device": "cpu"})
    assert "0.50x torch (>= 1.00x: missed)" in line


def test_cpu_timer_interleaves_the_providers_of_a_case():
    calls = []
    providers = lambda: (harness.Provider(name, lambda name=name: calls.append(name)) for name in "ab")  # noqa: E731
    case = harness.Case(op="toy", mode="forward", shape=(1,), dtype=torch.float32, x_label="N", x_value=1,
                        providers=providers)  # fmt: skip
    environment = dict.fromkeys(harness.COLUMNS, "")
    rows = harness.run_case(case, harness.CpuTimer(budget_s=0.001, min_reps=4), environment)
    assert [row["status"] for row in rows] == ["ok", "ok"] and all(row["reps"] >= 4 for row in rows)
    assert len(calls) >= 2 * (2 + 4) and calls == ["a", "b"] * (len(calls) // 2)  # first, warm-up, rounds
