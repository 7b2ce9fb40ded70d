// CUDA implementations of fastattn_C::norm_forward / norm_backward (schemas in csrc/fastattn.cpp). Compiled by the host
// compiler: checks and packs tensors (csrc/norm_binding.h), plans the backward, takes its workspace (the float32
// partial sums of grad_weight and grad_bias) from torch's caching allocator, then calls the launchers of
// csrc/cuda/norm_kernel.cu on the current stream of the tensors' device.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <tuple>

#include "../norm_binding.h"
#include "checks.h"
#include "norm_kernel.h"

namespace fastattn {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A tensor the kernels take beside x: x's dtype or float32 (residual, residual_out, weight, bias, z, grads).
void check_side(at::ScalarType t, at::ScalarType x, const char* op, const char* name) {
  TORCH_CHECK(t == x || t == at::kFloat, op, ": the CUDA kernels take ", name, " in x's dtype (", x,
              ") or float32, got ", t);
}

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

Outputs norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                     bool rms, double dropout_p, int64_t seed, std::optional<at::ScalarType> residual_out_dtype) {
  constexpr const char* op = "fastattn_C::norm_forward";
  check_cuda_input(x, op, "x");
  if (residual.has_value()) {
    check_cuda_input(*residual, op, "residual");
    check_side(residual->scalar_type(), x.scalar_type(), op, "residual");
  }
  if (residual_out_dtype.has_value()) check_side(*residual_out_dtype, x.scalar_type(), op, "residual_out_dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  NormForwardOutputs o;
  const NormForwardArgs args =
      norm_forward_args(x, residual, weight, bias, eps, rms, dropout_p, seed, residual_out_dtype, o);
  check_launch(norm_forward_cuda(args, c10::cuda::getCurrentCUDAStream()), op);
  return {o.out, o.residual_out, o.mean, o.rstd};
}

Outputs norm_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual, const at::Tensor& z,
                      const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
                      bool rms, bool has_bias, double dropout_p, int64_t seed, at::ScalarType x_dtype,
                      std::optional<at::ScalarType> residual_dtype) {
  constexpr const char* op = "fastattn_C::norm_backward";
  check_cuda_input(grad_out, op, "grad_out");
  check_cuda_input(z, op, "z");
  check_side(z.scalar_type(), x_dtype, op, "z");
  if (residual_dtype.has_value()) check_side(*residual_dtype, x_dtype, op, "residual_dtype");
  const c10::cuda::CUDAGuard guard(z.device());
  NormBackwardOutputs o;
  const NormBackwardArgs args = norm_backward_args(grad_out, grad_residual, z, weight, mean, rstd, rms, has_bias,
                                                   dropout_p, seed, x_dtype, residual_dtype, o);
  NormBackwardPlan plan{};
  check_launch(norm_backward_plan(args, &plan), op);
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, z.options().dtype(at::kByte));
  }
  check_launch(norm_backward_cuda(args, plan, workspace.defined() ? workspace.data_ptr() : nullptr,
                                  c10::cuda::getCurrentCUDAStream()),
               op);
  return {o.grad_x, o.grad_residual_in, o.grad_weight, o.grad_bias};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("norm_forward", &fastattn::norm_forward);
  m.impl("norm_backward", &fastattn::norm_backward);
}
