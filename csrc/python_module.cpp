// The Python module fastattn._C: loading it registers the ops (torch.ops.fastattn_C) and tells how it was built.
#include <pybind11/pybind11.h>

#include "cpu/step_gemm.h"

#if __has_include("generated/build_info.h")
#include "generated/build_info.h"  // written by setup.py
#endif
#ifndef FASTATTN_CUDA_STATUS
#define FASTATTN_CUDA_STATUS "not compiled (built without setup.py)"
#endif
#ifndef FASTATTN_CUDA_ARCHS
#define FASTATTN_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, module) {
  module.doc() = "fastattn C++/CUDA kernels; the ops live in torch.ops.fastattn_C";
  module.def("build_info", [] {
    pybind11::dict info;
#ifdef FASTATTN_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_status"] = FASTATTN_CUDA_STATUS;
    info["cuda_archs"] = FASTATTN_CUDA_ARCHS;
    info["cpu_step_gemm"] = fastattn::cpu::step_gemm_available();  // the recurrent steps' AVX-512 GEMM
    info["cpu_step_gemm_large"] = fastattn::cpu::step_gemm_takes_large();  // ... for large products too
    return info;
  });
}
