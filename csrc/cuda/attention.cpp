// CUDA implementations of fastattn_C::attention_forward / attention_backward (schemas in csrc/fastattn.cpp).
// Compiled by the host compiler: checks and packs tensors (csrc/attention_binding.h), then calls the kernel
// launchers of csrc/cuda/attention_kernel.cu on the current stream of the tensors' device.
#include <ATen/ops/empty.h>       // used by attention_binding.h
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <tuple>

#include "../attention_binding.h"
#include "checks.h"
#include "attention_kernel.h"

namespace fastattn {
namespace {

void check_head_dims(const AttentionForwardArgs& args, const char* op) {
  TORCH_CHECK(args.head_dim <= kAttentionCudaMaxHeadDim && args.head_dim_v <= kAttentionCudaMaxHeadDim, op,
              ": the CUDA kernels take head dims up to ", kAttentionCudaMaxHeadDim, ", got ", args.head_dim,
              " (q, k) and ", args.head_dim_v, " (v)");
}

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error != cudaErrorNotSupported, op,
              ": the CUDA kernel for this head dim needs more shared memory per block than this GPU has "
              "(head dims above 128 need about 100 KiB: an sm_80 or sm_90 class GPU)");
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& key_padding,
                                                     const std::optional<at::Tensor>& alibi, double scale,
                                                     int64_t diagonal, int64_t window_left, int64_t window_right,
                                                     double dropout_p, int64_t seed) {
  constexpr const char* op = "fastattn_C::attention_forward";
  check_cuda_input(q, op, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionForwardArgs args = attention_forward_args(q, k, v, mask, key_padding, alibi, scale, diagonal, window_left,
                                                     window_right, dropout_p, seed, "attention_forward");
  check_head_dims(args, op);
  at::Tensor out, lse;
  attention_forward_outputs(q, v, args, out, lse);
  check_launch(attention_forward_cuda(args, c10::cuda::getCurrentCUDAStream()), op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
    const at::Tensor& delta, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& key_padding,
    const std::optional<at::Tensor>& alibi, double scale, int64_t diagonal, int64_t window_left,
    int64_t window_right, double dropout_p, int64_t seed) {
  constexpr const char* op = "fastattn_C::attention_backward";
  check_cuda_input(q, op, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor grad_out_c =
      grad_out.dim() == 4 && grad_out.size(3) > 1 && grad_out.stride(3) != 1 ? grad_out.contiguous() : grad_out;
  const at::Tensor lse_c = lse.contiguous(), delta_c = delta.contiguous();
  at::Tensor dq, dk, dv;
  const AttentionBackwardArgs args =
      attention_backward_args(grad_out_c, q, k, v, lse_c, delta_c, mask, key_padding, alibi, scale, diagonal,
                              window_left, window_right, dropout_p, seed, dq, dk, dv);
  check_head_dims(args.forward, op);
  check_launch(attention_backward_cuda(args, c10::cuda::getCurrentCUDAStream()), op);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("attention_forward", &fastattn::attention_forward);
  m.impl("attention_backward", &fastattn::attention_backward);
}
