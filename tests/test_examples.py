"""The training examples run end to end: a few steps each as a subprocess, the exit code says whether the targets
were met (0) or missed (1), the lines examples/README.md describes are printed, and the same script runs under
``torchrun --nproc_per_node=2`` (gloo on CPU) with only rank 0 printing."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 240  # generous: the machine may be shared; a run of a few steps takes seconds


def _run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _example(name: str, *flags: str) -> subprocess.CompletedProcess:
    return _run(sys.executable, str(EXAMPLES / name), *flags)


def _explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


def test_sequence_example_meets_a_loose_target():
    result = _example("train_sequence.py", "--steps", "5", "--batch-size", "16", "--target-loss", "100")
    assert result.returncode == 0, _explain(result)
    assert "1 process(es)" in result.stdout
    assert "final loss: " in result.stdout and "(target < 100) PASSED" in result.stdout, _explain(result)
    assert "eval loss: " in result.stdout and "eval rank accuracy: " in result.stdout, _explain(result)
    assert "wall time: " in result.stdout


def test_sequence_example_exits_1_when_the_target_is_missed():
    result = _example("train_sequence.py", "--steps", "2", "--batch-size", "8", "--target-loss", "0")
    assert result.returncode == 1, _explain(result)
    assert "(target < 0) MISSED" in result.stdout, _explain(result)


def test_seq2seq_example_generates_and_checks_accuracy():
    """A missed accuracy target alone fails the run; generation with the KV cache equals generation without."""
    flags = ["--steps", "5", "--batch-size", "16", "--dtype", "float64", "--target-loss", "100"]
    result = _example("train_seq2seq.py", *flags, "--target-accuracy", "1.01")
    assert result.returncode == 1, _explain(result)
    assert "(target < 100) PASSED" in result.stdout, _explain(result)
    assert "exact-match accuracy (greedy, KV cache): " in result.stdout, _explain(result)
    assert "(target >= 1.01) MISSED" in result.stdout, _explain(result)
    assert result.stdout.count("  src '") == 4, _explain(result)  # the generated examples
    assert "KV-cached generation equals uncached generation on 32 sequences: True" in result.stdout, _explain(result)


def test_examples_reject_bad_flags():
    result = _example("train_seq2seq.py", "--steps", "0")
    assert result.returncode == 2, _explain(result)
    assert "--steps must be >= 1, got 0" in result.stderr, _explain(result)


def test_sequence_example_under_torchrun_two_processes():
    result = _run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  str(EXAMPLES / "train_sequence.py"), "--device", "cpu", "--steps", "5", "--batch-size", "8",
                  "--target-loss", "100")  # fmt: skip
    assert result.returncode == 0, _explain(result)
    assert "2 process(es) on cpu" in result.stdout, _explain(result)
    assert result.stdout.count("final loss: ") == 1, _explain(result)  # rank 0 alone prints


def test_digits_cnn_example_meets_loose_targets():
    flags = ["--steps", "5", "--batch-size", "16", "--target-loss", "100", "--target-accuracy", "0"]
    result = _example("train_digits_cnn.py", *flags)
    assert result.returncode == 0, _explain(result)
    assert "1347 training / 450 test digits at 28x28; MnistCNN" in result.stdout, _explain(result)
    assert "final loss: " in result.stdout and "(target < 100) PASSED" in result.stdout, _explain(result)
    assert "test loss: " in result.stdout, _explain(result)
    assert "test accuracy (450 digits): " in result.stdout and "(target >= 0) PASSED" in result.stdout, _explain(result)
    assert "wall time: " in result.stdout


def test_lstm_example_exits_1_when_only_the_accuracy_target_is_missed():
    flags = ["--steps", "3", "--batch-size", "8", "--hidden", "9", "--dtype", "float64", "--target-loss", "100"]
    result = _example("train_lstm.py", *flags, "--target-accuracy", "1.01")
    assert result.returncode == 1, _explain(result)
    assert "LSTMClassifier" in result.stdout and "(target < 100) PASSED" in result.stdout, _explain(result)
    assert "eval loss: " in result.stdout, _explain(result)
    assert "eval accuracy (2048 sequences): " in result.stdout, _explain(result)
    assert "(target >= 1.01) MISSED" in result.stdout, _explain(result)


def test_lstm_example_rejects_a_bad_hidden_size():
    result = _example("train_lstm.py", "--hidden", "0")
    assert result.returncode == 2, _explain(result)
    assert "--hidden must be >= 1, got 0" in result.stderr, _explain(result)
