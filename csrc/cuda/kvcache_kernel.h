// Host launchers of the CUDA split-KV decoding kernel (csrc/cuda/kvcache_kernel.cu). No torch headers: the kernels
// take raw pointers and a stream; csrc/cuda/kvcache.cpp fills the arguments from tensors and allocates the scratch.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../kvcache.h"

namespace fastattn {

// The largest head dim (of q and k, and of v) the kernel takes; every size from 1 up to it works.
constexpr int64_t kKvcacheCudaMaxHeadDim = 256;

// How the keys are cut: `splits` thread blocks per (batch, kv head, block of rows), each over `split_size` keys
// of the capacity seq_k (lengths live on the device, so the plan cannot look at them: a split past a sequence's
// length writes an empty partial at once). With one split the kernel writes out and lse itself; with more it
// writes partials to a float32 scratch of `scratch_bytes` bytes and a second kernel merges them.
struct KvcachePlan {
  int64_t splits;
  int64_t split_size;
  size_t scratch_bytes;  // 0 when splits == 1
};

// Plans args (args.split_size > 0 forces the keys per split; 0 asks for about two blocks per multiprocessor of
// the current device). Returns cudaErrorInvalidValue for a dtype or head dim the kernel does not take, or the
// error of the device query.
cudaError_t kvcache_plan(const KvcacheArgs& args, KvcachePlan* plan);

// out and lse of KV-cache attention (csrc/kvcache.h) for float16, bfloat16 or float32, head dims up to
// kKvcacheCudaMaxHeadDim, on `stream`. `scratch`: plan.scratch_bytes bytes of device memory, 16-byte aligned
// (unused with one split). Returns the launch error: cudaSuccess when there is no query, cudaErrorInvalidValue
// for arguments the kernel does not take, cudaErrorNotSupported when the kernel needs more shared memory per
// block than the device has (with one stage, head dims above 128 need 76 KiB (16 rows per block) to 133 KiB
// (float32, 64 rows): sm_80 / sm_90 take every case; sm_86 / sm_89 (99 KiB) refuse head dims above 128 with more
// than 32 rows per block (16-bit) or more than 16 (float32)).
cudaError_t kvcache_forward_cuda(const KvcacheArgs& args, const KvcachePlan& plan, void* scratch,
                                 cudaStream_t stream);

}  // namespace fastattn
