// Host launchers of the CUDA attention kernels (csrc/cuda/attention_kernel.cu). No torch headers: the kernels
// take raw pointers and a stream; csrc/cuda/attention.cpp fills the arguments from tensors and checks the result.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../attention.h"

namespace fastattn {

// The largest head dim (of q and k, and of v) the CUDA kernels take; every size from 1 up to it works.
constexpr int64_t kAttentionCudaMaxHeadDim = 256;

// out and lse of attention (csrc/attention.h, AttentionForwardArgs) for float16, bfloat16 or float32, head dims
// up to kAttentionCudaMaxHeadDim. Launches on `stream` and returns the launch error: cudaSuccess when there is
// nothing to compute (no query; with no key, out is 0 and lse -inf), cudaErrorInvalidValue for a dtype or head
// dim the kernels do not take, cudaErrorNotSupported when the kernel's tiles need more shared memory per block
// than the current device has (head dims above 128 need about 100 KiB: sm_80 / sm_90 class GPUs).
cudaError_t attention_forward_cuda(const AttentionForwardArgs& args, cudaStream_t stream);

// dq, dk, dv of attention (AttentionBackwardArgs): a kernel per (batch, kv head, key block) for dk and dv, looping
// over the query heads of the group, then one per (batch, query head, query block) for dq. No atomics: results
// are deterministic. Same limits and error convention as attention_forward_cuda.
cudaError_t attention_backward_cuda(const AttentionBackwardArgs& args, cudaStream_t stream);

}  // namespace fastattn
