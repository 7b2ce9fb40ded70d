// CUDA implementation of fastattn_C::kvcache_forward (schema in csrc/fastattn.cpp). Compiled by the host compiler:
// checks and packs tensors (csrc/kvcache_binding.h), plans the splits, takes the scratch for the splits' partial
// results from torch's caching allocator, then calls the launcher of csrc/cuda/kvcache_kernel.cu on the current
// stream of the tensors' device.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <tuple>

#include "../kvcache_binding.h"
#include "checks.h"
#include "kvcache_kernel.h"

namespace fastattn {
namespace {

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error != cudaErrorNotSupported, op,
              ": the CUDA kernel for this head dim and group size needs more shared memory per block than this "
              "GPU has (head dims above 128 need 76 to 133 KiB: an sm_80 or sm_90 class GPU)");
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

std::tuple<at::Tensor, at::Tensor> kvcache_forward(const at::Tensor& q, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache, const at::Tensor& lengths,
                                                   const std::optional<at::Tensor>& alibi, double scale,
                                                   int64_t window_left, int64_t window_right) {
  constexpr const char* op = "fastattn_C::kvcache_forward";
  check_cuda_input(q, op, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  KvcacheArgs args =
      kvcache_args(q, k_cache, v_cache, lengths, alibi, scale, window_left, window_right, "kvcache_forward");
  TORCH_CHECK(args.head_dim <= kKvcacheCudaMaxHeadDim && args.head_dim_v <= kKvcacheCudaMaxHeadDim, op,
              ": the CUDA kernel takes head dims up to ", kKvcacheCudaMaxHeadDim, ", got ", args.head_dim,
              " (q, k) and ", args.head_dim_v, " (v)");
  at::Tensor out, lse;
  kvcache_outputs(q, v_cache, args, out, lse);
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  KvcachePlan plan{};
  check_launch(kvcache_plan(args, &plan), op);
  at::Tensor scratch;
  if (plan.scratch_bytes > 0) {
    scratch = at::empty({static_cast<int64_t>(plan.scratch_bytes)}, q.options().dtype(at::kByte));
  }
  check_launch(kvcache_forward_cuda(args, plan, scratch.defined() ? scratch.data_ptr() : nullptr,
                                    c10::cuda::getCurrentCUDAStream()),
               op);
  return {out, lse};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) { m.impl("kvcache_forward", &fastattn::kvcache_forward); }
