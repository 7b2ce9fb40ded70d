// CUDA implementation of fastattn_C::rotary (schema in csrc/fastattn.cpp). Compiled by the host compiler: checks
// and packs tensors (csrc/rotary_binding.h), then calls the launcher of csrc/cuda/rotary_kernel.cu on the current
// stream of q's device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include "../rotary_binding.h"
#include "checks.h"
#include "rotary_kernel.h"

namespace fastattn {
namespace {

void rotary_cuda_op(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& q_out,
                    const std::optional<at::Tensor>& k_out, const std::optional<at::Tensor>& positions,
                    const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& cos,
                    const std::optional<at::Tensor>& sin, int64_t offset, int64_t rotary_dim, bool interleaved,
                    double base, bool inverse) {
  check_cuda_input(q, "fastattn_C::rotary", "q");
  TORCH_CHECK(rotary_dim <= kRotaryCudaMaxDim, "fastattn_C::rotary: the CUDA kernel takes rotary_dim up to ",
              kRotaryCudaMaxDim, ", got ", rotary_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  const RotaryArgs args =
      rotary_args(q, k, q_out, k_out, positions, offsets, cos, sin, offset, rotary_dim, interleaved, base, inverse);
  const cudaError_t error = rotary_cuda(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "fastattn_C::rotary: CUDA kernel launch failed: ", cudaGetErrorString(error));
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) { m.impl("rotary", &fastattn::rotary_cuda_op); }
