"""Backend selection, forcing, recording, and what fastattn.info reports."""

import subprocess
import sys

import pytest
import torch

import fastattn
import fastattn.info as fastattn_info
from fastattn import backends
from fastattn.ops import softmax as softmax_op
from fastattn.ops.linear import kernel_available


def test_default_cpu_choice_is_the_cpp_kernel():
    with fastattn.record() as calls:
        fastattn.softmax(torch.randn(3, 4))
    assert [(c.op, c.backend) for c in calls] == [("softmax", "cpu")]


def test_fallback_records_why_backends_were_passed_over(monkeypatch):
    monkeypatch.setattr(backends, "PRIORITY", {"cpu": ("cuda", "reference")})
    with fastattn.record() as calls:
        fastattn.softmax(torch.randn(3, 4, dtype=torch.float64))
    assert calls[0].backend == "reference"
    assert "cuda" in calls[0].skipped


def test_context_manager_forces_and_nests():
    x = torch.randn(3, 4)
    with fastattn.record() as calls:
        with fastattn.backend("reference"):
            fastattn.softmax(x)
            with fastattn.backend("cpu"):
                fastattn.softmax(x)
            fastattn.softmax(x)
    assert [c.backend for c in calls] == ["reference", "cpu", "reference"]


def test_backward_follows_the_forced_backend():
    x = torch.randn(3, 4, requires_grad=True)
    with fastattn.record() as calls, fastattn.backend("reference"):
        fastattn.softmax(x).sum().backward()
    assert [(c.op, c.backend) for c in calls] == [("softmax", "reference"), ("softmax_backward", "reference")]


def test_environment_variable_forces(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    with fastattn.record() as calls:
        fastattn.softmax(torch.randn(3, 4))
    assert calls[0].backend == "reference"
    monkeypatch.setenv("FASTATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        fastattn.softmax(torch.randn(3, 4))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with fastattn.backend("tpu"):
            pass


def test_fallback_past_an_available_backend_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(backends, "PRIORITY", {"cpu": ("cpu", "reference")})
    monkeypatch.setitem(softmax_op.CHECKS, "cpu", lambda *a: "refused for the test")
    with caplog.at_level("INFO", logger="fastattn"):
        fastattn.softmax(torch.randn(3, 4))
    assert "ran on reference" in caplog.text and "refused for the test" in caplog.text


def test_info_tells_the_truth():
    report = fastattn_info.report()
    cpu = report["backends"]["cpu"]
    module, reason = backends.extension()
    assert (cpu["cpu"] is None) == (module is not None)
    assert cpu["reference"] is None
    if not torch.cuda.is_available():
        assert report["gpu"] is None
        gpu_backends = report["backends"]["cuda"]
        assert "no CUDA GPU" in gpu_backends["triton"]
        assert "no CUDA GPU" in gpu_backends["cuda"] or "built without CUDA" in gpu_backends["cuda"]
    output = subprocess.run([sys.executable, "-m", "fastattn.info"], capture_output=True, text=True, check=True).stdout
    assert f"torch {torch.__version__}" in output
    assert "reference  available" in output
    if module is not None:  # the line on fastattn.linear says what its calls do
        assert ("fastattn.linear: float32 CPU products of 512+ rows on the AVX-512" in output) == kernel_available()
