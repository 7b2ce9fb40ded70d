"""``python -m fastattn.info``: versions, devices, and which backends can run here and why not."""

from __future__ import annotations

import platform

import torch

import fastattn
from fastattn import backends
from fastattn.ops import linear


def _triton_version() -> str:
    try:
        import triton  # noqa: PLC0415
    except ImportError:
        return "not installed"
    return triton.__version__


def devices() -> list[torch.device]:
    """CPU and CUDA, whether or not a GPU is visible (the report then says why the GPU backends cannot run)."""
    return [torch.device("cpu"), torch.device("cuda")]


def report() -> dict:
    """A dict describing this installation: versions, build, and per device each backend's status."""
    module, reason = backends.extension()
    return {
        "fastattn": fastattn.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton_interpreter": backends.triton_interpreting(),
        "forced": backends.forced(),
        "extension": module.build_info() if module is not None else {"error": reason},
        "backends": {
            str(device): {name: backends.unavailable_reason(name, device) for name in backends.PRIORITY[device.type]}
            for device in devices()
        },
    }


def main() -> None:
    info = report()
    print(f"fastattn {info['fastattn']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})"
          f"  triton {info['triton']}")
    print(f"GPU: {info['gpu'] or 'none visible'}    Triton interpreter: {'on' if info['triton_interpreter'] else 'off'}"
          f"    forced backend: {','.join(info['forced']) if info['forced'] else 'none'}")
    ext = info["extension"]
    if "error" in ext:
        print(f"fastattn._C: not loaded: {ext['error']}")
    else:
        cuda = f"CUDA kernels for {ext['cuda_archs']}" if ext["cuda"] else f"no CUDA kernels ({ext['cuda_status']})"
        print(f"fastattn._C: loaded, C++ CPU kernels, {cuda}")
        large = "" if ext["cpu_step_gemm_large"] else ", large ones on oneDNN (an Intel CPU; =1 keeps them here)"
        gemm = (f"the AVX-512 step GEMM{large} (FASTATTN_CPU_STEP_GEMM=0 turns it off)" if ext["cpu_step_gemm"]
                else "oneDNN / ATen's mm (not the AVX-512 step GEMM: no AVX-512F, or FASTATTN_CPU_STEP_GEMM=0)")
        print(f"CPU recurrent steps multiply on {gemm}")
        print("fastattn.linear: float32 CPU products of 512+ rows on " +
              ("the AVX-512 step GEMM" if linear.kernel_available()
               else "F.linear (the step GEMM does not take large products here)"))
    for device, statuses in info["backends"].items():
        print(f"\n{device} tensors, in priority order:")
        for name, why in statuses.items():
            print(f"  {name:<10} {'available' if why is None else 'not available: ' + why}")


if __name__ == "__main__":
    main()
