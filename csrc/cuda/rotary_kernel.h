// Host launcher of the CUDA rotary position embedding kernel (csrc/cuda/rotary_kernel.cu). No torch headers: the
// kernel takes raw pointers and a stream; csrc/cuda/rotary.cpp fills the arguments from tensors and checks the
// result.
#pragma once
#include <cuda_runtime_api.h>

#include "../rotary.h"

namespace fastattn {

// The largest rotary_dim the CUDA kernel takes: a block keeps one token's cos and sin (rotary_dim floats) in
// shared memory.
constexpr int64_t kRotaryCudaMaxDim = 8192;

// Rotates q and k as csrc/rotary.h describes, in one launch on `stream`. Returns the launch error (cudaSuccess
// when there is nothing to do), cudaErrorInvalidValue for a dtype the kernel does not take (float64) or a
// rotary_dim above kRotaryCudaMaxDim.
cudaError_t rotary_cuda(const RotaryArgs& args, cudaStream_t stream);

}  // namespace fastattn
