// Input checks shared by the CUDA bindings (csrc/cuda/<op>.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastattn {

// A CUDA tensor of a dtype the CUDA kernels take: float16, bfloat16 or float32.
inline void check_cuda_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat,
              op, ": the CUDA kernels take float16, bfloat16 or float32, got ", t.scalar_type(),
              " (float64 runs on the triton or reference backend)");
}

}  // namespace fastattn
