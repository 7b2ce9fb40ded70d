// CUDA implementations of fastattn_C::conv_epilogue_forward / conv_epilogue_backward (schemas in csrc/fastattn.cpp).
// Compiled by the host compiler: checks and packs tensors (csrc/conv_epilogue_binding.h), plans the backward, takes
// its workspace (the blocks' float32 sums of grad_bias) from torch's caching allocator, then calls the launchers of
// csrc/cuda/conv_epilogue_kernel.cu on the current stream of the tensors' device.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <tuple>

#include "../conv_epilogue_binding.h"
#include "checks.h"
#include "conv_epilogue_kernel.h"

namespace fastattn {
namespace {

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

at::Tensor conv_epilogue_forward(const at::Tensor& y, const std::optional<at::Tensor>& bias,
                                 c10::string_view activation, bool pool) {
  constexpr const char* op = "fastattn_C::conv_epilogue_forward";
  check_cuda_input(y, op, "y");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out;
  const ConvEpilogueForwardArgs args = conv_epilogue_forward_args(y, bias, activation, pool, out);
  check_launch(conv_epilogue_forward_cuda(args, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> conv_epilogue_backward(const at::Tensor& grad, const at::Tensor& y,
                                                          const std::optional<at::Tensor>& bias,
                                                          c10::string_view activation, bool pool, bool bias_grad) {
  constexpr const char* op = "fastattn_C::conv_epilogue_backward";
  check_cuda_input(y, op, "y");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor grad_y;
  const ConvEpilogueBackwardArgs args = conv_epilogue_backward_args(grad, y, bias, activation, pool, grad_y);
  at::Tensor grad_bias = at::empty({bias_grad ? args.shape.c : 0}, y.options().dtype(at::kFloat));
  ConvEpilogueBackwardPlan plan{};
  check_launch(conv_epilogue_backward_plan(args, bias_grad, &plan), op);
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, y.options().dtype(at::kByte));
  }
  check_launch(conv_epilogue_backward_cuda(args, plan, bias_grad ? grad_bias.data_ptr<float>() : nullptr,
                                           workspace.defined() ? workspace.data_ptr() : nullptr,
                                           c10::cuda::getCurrentCUDAStream()),
               op);
  return {grad_y, grad_bias};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("conv_epilogue_forward", &fastattn::conv_epilogue_forward);
  m.impl("conv_epilogue_backward", &fastattn::conv_epilogue_backward);
}
