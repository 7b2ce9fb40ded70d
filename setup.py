"""Builds the extension fastattn._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a
CUDA build of torch are present (also on a machine with no GPU, where they compile but cannot run).

Environment switches:
    FASTATTN_SKIP_EXTENSION=1   install the Python package only (backends cpu and cuda report why)
    FASTATTN_SKIP_CUDA=1        build the CPU kernels only
    FASTATTN_REQUIRE_EXTENSION=1  fail the install when the extension does not build (CI sets it)
    CUDA_HOME                   the CUDA toolkit (else found beside nvcc, else /usr/local/cuda)
    TORCH_CUDA_ARCH_LIST        CUDA architectures (default: the visible GPU's, else 9.0)
    MAX_JOBS                    parallel compile jobs (default: from cores and free memory)

Metadata lives in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def say(message: str) -> None:
    print(f"fastattn setup: {message}", file=sys.stderr, flush=True)


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else the root beside a real nvcc, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)  # a wrapper script resolves to itself
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and (root / "lib64" / "libcudart.so").exists():
            return str(root)
    return None


def cuda_decision(torch) -> tuple[bool, str]:
    """(build CUDA?, a sentence saying why or why not)."""
    if flag("FASTATTN_SKIP_CUDA"):
        return False, "skipped: FASTATTN_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, f"skipped: torch {torch.__version__} is a CPU build (install a CUDA build of torch)"
    home = find_cuda_home()
    if home is None:
        return False, "skipped: no CUDA toolkit found (set CUDA_HOME)"
    os.environ["CUDA_HOME"] = home  # torch.utils.cpp_extension reads it at import
    return True, f"built with the toolkit in {home} for torch {torch.__version__}"


def default_arch_list(torch) -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


def default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gib = 8.0
    return str(max(1, min(cores, int(free_gib // 2))))  # about 2 GiB a compile job


def write_build_info(status: str, archs: str) -> None:
    generated = CSRC / "generated"
    generated.mkdir(exist_ok=True)
    quote = lambda text: text.replace("\\", "\\\\").replace('"', '\\"')  # noqa: E731
    (generated / "build_info.h").write_text(
        "// Written by setup.py.\n"
        f'#define FASTATTN_CUDA_STATUS "{quote(status)}"\n'
        f'#define FASTATTN_CUDA_ARCHS "{quote(archs)}"\n'
    )


def sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


def extensions():
    if flag("FASTATTN_SKIP_EXTENSION"):
        say("FASTATTN_SKIP_EXTENSION=1: installing without fastattn._C (backends cpu and cuda unavailable)")
        return [], {}
    import torch

    with_cuda, status = cuda_decision(torch)
    from torch.utils import cpp_extension  # after CUDA_HOME is settled

    os.environ.setdefault("MAX_JOBS", default_max_jobs())
    # torch picks the C++ standard its headers need. -fopenmp: ATen's at::parallel_for is an OpenMP pragma in
    # a header, so without it the CPU kernels would run on one thread (libgomp is the one torch loads).
    # -fno-trapping-math: no kernel reads floating-point exception flags, and without AVX-512's masked lanes g++
    # only turns branches that may trap (exp_of's range checks) into vector selects when told they cannot.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp", "-fno-trapping-math"]
    cpp = sources("*.cpp") + sources("cpu/*.cpp")
    kwargs = dict(include_dirs=[str(CSRC)], extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    archs = ""
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list(torch))
        kwargs["extra_compile_args"]["cxx"] = cxx + ["-DFASTATTN_WITH_CUDA"]
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = cpp_extension.CUDAExtension("fastattn._C", cpp + sources("cuda/*.cpp") + sources("cuda/*.cu"), **kwargs)
    else:
        ext = cpp_extension.CppExtension("fastattn._C", cpp, **kwargs)
    say(f"CUDA kernels: {status}" + (f" (archs {archs})" if archs else ""))
    say(f"compiling with MAX_JOBS={os.environ['MAX_JOBS']}")
    write_build_info(status, archs)
    return [ext], {"build_ext": optional_build_ext(cpp_extension.BuildExtension)}


def optional_build_ext(base):
    """build_ext that reports a failed extension build and installs the Python package anyway."""

    class BuildExt(base):
        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 (any compiler failure)
                if flag("FASTATTN_REQUIRE_EXTENSION"):
                    raise
                say("=" * 78)
                say(f"building fastattn._C FAILED: {error}")
                say("fastattn installs without it: the cpu and cuda backends will say they are unavailable.")
                say("Set FASTATTN_REQUIRE_EXTENSION=1 to make this failure stop the install.")
                say("=" * 78)

    return BuildExt.with_options(use_ninja=True)


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
