"""bench/tune_attention.py without a GPU: the dry-run listing of tile configs, their pruning to the shared
memory budget, the config patching, and the clear exit without CUDA. No kernel runs."""

import itertools
import re

import pytest
import torch

from bench import tune_attention as tune
from fastattn.triton_kernels import attention as kernels


def parse_listing(text: str) -> tuple[int, dict[str, list[str]]]:
    """(budget in bytes, {'<problem> · <mode>': [config lines]}) from the dry run's output."""
    lines = text.splitlines()
    budget = int(re.fullmatch(r"shared memory budget: (\d+) bytes .*", lines[0]).group(1))
    sections: dict[str, list[str]] = {}
    for line in lines[1:]:
        if line.startswith("  "):
            sections[list(sections)[-1]].append(line.strip())
        else:
            sections[line.split(":")[0]] = []
    return budget, sections


def test_dry_run_lists_every_default_within_the_budget(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the dry run needs no GPU
    tune.main(["--dry-run"])
    budget, sections = parse_listing(capsys.readouterr().out)

    assert budget == tune.ASSUMED_SMEM
    assert list(sections) == [f"{p.label} · {mode}" for p in tune.PROBLEMS for mode in tune.PASSES]
    for problem, mode in itertools.product(tune.PROBLEMS, tune.PASSES):
        lines = sections[f"{problem.label} · {mode}"]
        default = tune.default_config(problem, mode, budget)
        assert lines, f"{problem.label} {mode}: no configs listed"
        assert [line.split("  ")[0] for line in lines if line.endswith("(default)")] == [default.label]
        for line in lines:
            kib = float(re.search(r"smem +([\d.]+) KiB", line).group(1))
            assert kib * 1024 <= budget, f"{problem.label} {mode}: {line} is over {budget} bytes"


@pytest.mark.parametrize("budget", [tune.ASSUMED_SMEM, 99 * 1024])  # H100 / H200, sm_86 / sm_89
def test_candidates_fit_the_budget_and_come_from_the_grid(budget):
    for problem, mode in itertools.product(tune.PROBLEMS, tune.PASSES):
        found = tune.candidates(problem, mode, budget)
        default = tune.default_config(problem, mode, budget)
        grid = set(itertools.product(*tune.GRIDS[mode].values()))

        assert found[0].config == default and found[0].default and not any(c.default for c in found[1:])
        assert len({c.config for c in found}) == len(found)
        assert all(c.config in grid and c.smem <= budget for c in found[1:])
        assert all(c.smem == tune.estimated_smem(problem, mode, c.config) for c in found)
        if mode == "forward":  # the module's own rule shrinks its choice to fit
            assert found[0].smem <= budget


def test_pruning_drops_only_configs_over_the_budget():
    problem = tune.Problem(2, 16, 4096, 256, torch.bfloat16)
    everything = tune.candidates(problem, "backward", tune.ASSUMED_SMEM, prune=False)
    kept = tune.candidates(problem, "backward", tune.ASSUMED_SMEM)

    assert len(everything) == len(list(itertools.product(*tune.GRIDS["backward"].values())))
    dropped = {c.config for c in everything} - {c.config for c in kept}
    assert dropped, "head dim 256 should leave some backward configs over the budget"
    assert all(tune.estimated_smem(problem, "backward", config) > tune.ASSUMED_SMEM for config in dropped)


def test_schedule_puts_defaults_first_and_runs_each_candidate_once():
    plan = tune.schedule(tune.PROBLEMS, tune.ASSUMED_SMEM)
    pairs = len(tune.PROBLEMS) * len(tune.PASSES)

    assert all(c.default for c in plan[:pairs]) and not any(c.default for c in plan[pairs:])
    expected = sum(len(tune.candidates(p, m, tune.ASSUMED_SMEM)) for p in tune.PROBLEMS for m in tune.PASSES)
    assert len(set(plan)) == len(plan) == expected


def test_installed_config_is_answered_then_restored():
    problem = tune.PROBLEMS[0]
    forward, backward = (tune.candidates(problem, mode, tune.ASSUMED_SMEM)[-1] for mode in tune.PASSES)
    block_d, block_dv = problem.block_dims
    before = kernels._config(problem.seq, block_d, block_dv, problem.dtype, 0, tune.ASSUMED_SMEM)

    with tune.installed(forward):
        assert kernels._config(problem.seq, block_d, block_dv, problem.dtype, 0, tune.ASSUMED_SMEM) == forward.config
    with tune.installed(backward):
        assert kernels._bwd_config(problem.dtype, block_d, block_dv) == backward.config
    assert kernels._config(problem.seq, block_d, block_dv, problem.dtype, 0, tune.ASSUMED_SMEM) == before
    assert tune.Config(*kernels._bwd_config(problem.dtype, block_d, block_dv)) == tune.default_config(
        problem, "backward", tune.ASSUMED_SMEM
    )


def test_without_a_gpu_the_run_exits_naming_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        tune.main(["--quick"])
