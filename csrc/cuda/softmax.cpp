// CUDA implementations of fastattn_C::softmax_forward / softmax_backward (schemas in csrc/fastattn.cpp).
// Compiled by the host compiler: checks and packs tensors (csrc/softmax_binding.h), then calls the kernel
// launchers of csrc/cuda/softmax_kernel.cu on the current stream of the tensors' device.
#include <ATen/ops/empty.h>       // used by softmax_binding.h
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include "../softmax_binding.h"
#include "checks.h"
#include "softmax_kernel.h"

namespace fastattn {
namespace {

at::Tensor softmax_forward(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale, bool causal,
                           bool log) {
  check_cuda_input(x, "fastattn_C::softmax_forward", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out;
  const SoftmaxForwardArgs args = softmax_forward_args(x, mask, scale, causal, log, out);
  const cudaError_t error = softmax_forward_cuda(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "fastattn_C::softmax_forward: CUDA kernel launch failed: ",
              cudaGetErrorString(error));
  return out;
}

at::Tensor softmax_backward(const at::Tensor& grad, const at::Tensor& out, double scale, bool log) {
  check_cuda_input(out, "fastattn_C::softmax_backward", "out");
  check_cuda_input(grad, "fastattn_C::softmax_backward", "grad");
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor grad_x;
  const SoftmaxBackwardArgs args = softmax_backward_args(grad, out, scale, log, grad_x);
  const cudaError_t error = softmax_backward_cuda(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "fastattn_C::softmax_backward: CUDA kernel launch failed: ",
              cudaGetErrorString(error));
  return grad_x;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("softmax_forward", &fastattn::softmax_forward);
  m.impl("softmax_backward", &fastattn::softmax_backward);
}
