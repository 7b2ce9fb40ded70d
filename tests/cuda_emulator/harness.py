"""What the emulated-kernel tests share (tests/test_cuda_emulated*.py):
building a kernel's emulator library, calling it in a forked child, and guarded copies of tensors.

The tests load this file by path, with their load_harness() (pytest runs with --import-mode=importlib, so
tests/ is not on sys.path).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import mmap
import os
import shutil
import signal
import subprocess
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EMULATOR = ROOT / "tests" / "cuda_emulator"
CSRC = ROOT / "csrc"
# On an idle 2-core machine -O1 compiles the attention kernels in 7 s and runs their tests in 10 s; -O0: 3 + 24 s,
# -O2: 9 + 9 s.
CXXFLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-fvisibility=hidden", "-w", "-fno-strict-aliasing"]
CALL_TIMEOUT_S = 300  # one emulated launcher call
H100_SMEM = 227 * 1024  # opt-in shared memory per block of the emulated GPU, unless a case says otherwise
H100_SMS = 132  # its multiprocessors
CUDA_ERRORS = {1: "cudaErrorInvalidValue", 9: "cudaErrorInvalidConfiguration", 801: "cudaErrorNotSupported"}
SKIP_REASON = "FASTATTN_SKIP_CUDA=1: the CUDA kernels are skipped on purpose"
SKIPPED = os.environ.get("FASTATTN_SKIP_CUDA") == "1"


def cuda_include() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    return None


def load_gen():
    """tests/cuda_emulator/gen.py as a module."""
    spec = importlib.util.spec_from_file_location("cuda_emulator_gen", EMULATOR / "gen.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def build(cache: Path, kernel: Path, shim: Path) -> Path:
    """The emulator library of ``kernel`` (a .cu that gen.py has a swap table for) with the C ABI of ``shim``,
    compiled unless ``cache`` holds one built from the same sources."""
    compiler, include = shutil.which("g++"), cuda_include()
    skip = "(FASTATTN_SKIP_CUDA=1 skips the CUDA kernels' tests on purpose)"
    if compiler is None:
        pytest.fail(f"g++ is not on PATH: the emulated CUDA kernels are compiled with it {skip}")
    if include is None:
        pytest.fail(f"no CUDA headers (cuda_fp16.h in $CUDA_HOME/include or /usr/local/cuda/include) {skip}")
    sources = [kernel, *EMULATOR.glob("*.h"), EMULATOR / "gen.py", shim]
    sources += [*CSRC.glob("*.h"), *(CSRC / "cuda").glob("*.h")]  # what the .cu may include
    digest = hashlib.sha256(" ".join([compiler, str(include), kernel.name, *CXXFLAGS]).encode())
    for path in sorted(sources):
        digest.update(path.read_bytes())
    out = cache / digest.hexdigest()[:20]
    stem = kernel.name.removesuffix(".cu")
    library = out / f"lib{stem}_emu.so"
    if library.exists():
        return library

    emulated = load_gen().generate(kernel.read_text(), str(kernel))  # a GenerationError says what to update
    out.mkdir(parents=True, exist_ok=True)
    source, partial = out / f"{stem}_emu.{os.getpid()}.cpp", out / f"lib{stem}_emu.{os.getpid()}.so"
    source.write_text(emulated)
    command = [
        compiler, *CXXFLAGS, f"-DEMULATED_KERNEL=\"{source}\"", f"-I{EMULATOR}", f"-I{CSRC / 'cuda'}", f"-I{CSRC}",
        f"-I{include}", str(shim), "-o", str(partial),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(
            "g++ could not compile the emulated CUDA kernels (does the .cu use a CUDA feature emu.h lacks?):\n"
            f"{' '.join(command)}\n{result.stderr[-8000:]}"
        )
    os.replace(source, out / f"{stem}_emu.cpp")  # what was compiled, for a look
    os.replace(partial, library)  # atomic: a concurrent run never loads a half-written library
    return library


def cache_directory(request) -> Path:
    """Where built libraries live: the pytest cache, or a temporary directory without one."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("cuda_emulator") if cache else Path(tempfile.gettempdir()) / "fastattn-cuda-emulator")


def call_in_child(function, *args) -> int:
    """function(*args), a ctypes call writing only to shared memory, run in a forked child: a crash, a deadlock
    the emulator reports or a hang fails the calling test, with the child's stderr, instead of killing pytest."""
    result_read, result_write = os.pipe()
    with tempfile.TemporaryFile() as stderr:
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(stderr.fileno(), 2)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(CALL_TIMEOUT_S)
                os.write(result_write, str(function(*args)).encode())
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        os.close(result_write)
        with os.fdopen(result_read) as pipe:
            result = pipe.read()
        _, status = os.waitpid(pid, 0)
        stderr.seek(0)
        report = stderr.read().decode(errors="replace")[-4000:]
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        why = f"took over {CALL_TIMEOUT_S} s" if sig == signal.SIGALRM else f"died of {sig.name}"
        pytest.fail(f"the emulated kernel {why}:\n{report}")
    if os.WEXITSTATUS(status) != 0 or not result:
        pytest.fail(f"calling the emulator failed:\n{report}")
    return int(result)


LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def guarded(t: torch.Tensor, fill: float | None = None, guard_below: bool = False) -> torch.Tensor:
    """A copy of ``t`` (same shape and strides) in memory that forked children share, ending right before an
    inaccessible page: a kernel that reads or writes past the tensor's last element crashes. Its first element
    is 16-byte aligned, as in torch's allocations. ``fill``: the value of the elements the strides skip (row
    padding), else zero. ``guard_below``: the inaccessible page lies right before the first element instead
    (page-aligned), so that an access before the tensor (a negative index) crashes."""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0  # elements
    if span == 0:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    nbytes = -(-span * t.element_size() // 16) * 16
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    memory = mmap.mmap(-1, size + mmap.PAGESIZE)  # shared with children
    guard = 0 if guard_below else size
    if LIBC.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(memory)) + guard, mmap.PAGESIZE, 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect(PROT_NONE) failed")
    start = mmap.PAGESIZE if guard_below else size - nbytes
    storage = torch.frombuffer(memory, dtype=t.dtype, count=span, offset=start)
    if fill is not None:
        storage.fill_(fill)
    copy = storage.as_strided(t.shape, t.stride())
    distinct = tuple(0 if stride == 0 else slice(None) for stride in t.stride())  # broadcast dims: write once
    copy[distinct].copy_(t[distinct])
    return copy


def output(shape, dtype) -> torch.Tensor:
    """A guarded output, NaN until the kernel writes it."""
    return guarded(torch.full(shape, float("nan"), dtype=dtype))


def int64s(values):
    return (ctypes.c_int64 * len(values))(*values)


def pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def strides(t: torch.Tensor | None, n: int) -> list[int]:
    """The first n strides of t, zeros for None."""
    return [0] * n if t is None else list(t.stride()[:n])
