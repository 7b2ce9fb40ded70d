"""Test setup: run Triton kernels on CPU tensors through the Triton interpreter when no GPU is present.

TRITON_INTERPRET must be set before any module defining Triton kernels is imported, so it is set here,
before the tests import fastattn's kernels.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers importable as packages (tests/cuda_emulator)

HAS_GPU = torch.cuda.is_available()
os.environ.pop("FASTATTN_BACKEND", None)  # the tests choose backends themselves
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastattn import backends  # noqa: E402

# (backend, device) pairs every op is tested on.
BACKEND_DEVICES = [
    ("cpu", "cpu"),
    ("triton", "cpu"),
    ("reference", "cpu"),
    ("cuda", "cuda"),
    ("triton", "cuda"),
    ("reference", "cuda"),
]


def backend_device_params():
    return [pytest.param(pair, id=f"{pair[0]}-{pair[1]}") for pair in BACKEND_DEVICES]


@pytest.fixture(params=backend_device_params())
def backend_device(request):
    """(backend name, device); skipped with the reason when the device is absent, failing when a backend
    that should run here does not (a missing extension must not hide behind a skip)."""
    name, device = request.param
    if device == "cuda" and not HAS_GPU:
        pytest.skip("no CUDA GPU visible: GPU backends run on a GPU machine")
    if name == "triton" and device == "cpu" and HAS_GPU:
        pytest.skip("a GPU is present: Triton runs on it, not through the CPU interpreter")
    reason = backends.unavailable_reason(name, torch.device(device))
    if reason is not None:
        pytest.fail(f"backend {name} should run {device} tensors here but: {reason}")
    with backends.backend(name):
        yield name, torch.device(device)


@pytest.fixture
def set_threads():
    """torch.set_num_threads for one test; the thread count before it is restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
