// Host launchers of the CUDA convolution epilogue kernels (csrc/cuda/conv_epilogue_kernel.cu). No torch headers: the
// kernels take raw pointers and a stream; csrc/cuda/conv_epilogue.cpp fills the arguments from tensors
// (csrc/conv_epilogue_binding.h) and allocates the backward's workspace.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../conv_epilogue.h"

namespace fastattn {

// out of csrc/conv_epilogue.h for y in float16, bfloat16 or float32 (bias float32), either layout, on `stream`.
// Returns the launch error: cudaSuccess when there is nothing to compute, cudaErrorInvalidValue for float64 or a
// line too long for the grid (more than 65535 * 256 vectors in one image row of NHWC channels or NCHW columns).
cudaError_t conv_epilogue_forward_cuda(const ConvEpilogueForwardArgs& args, cudaStream_t stream);

// How the backward runs: `slices` blocks along the lines of the problem (see the .cu), each block writing its
// float32 sums of grad_bias to a row of (partials, c) in the workspace, which a last kernel adds up in a fixed
// order (no atomics: grad_bias is the same bits from run to run).
struct ConvEpilogueBackwardPlan {
  int64_t slices;
  int64_t partials;        // rows of the workspace's (partials, c) float32 sums
  size_t workspace_bytes;  // partials * c * 4 when the bias gradient is wanted, else 0
};

// Plans args for the current device (its multiprocessor count); bias_grad: whether grad_bias is wanted. Returns
// cudaErrorInvalidValue as conv_epilogue_forward_cuda does, or the error of the device query.
cudaError_t conv_epilogue_backward_plan(const ConvEpilogueBackwardArgs& args, bool bias_grad,
                                        ConvEpilogueBackwardPlan* plan);

// grad_y of csrc/conv_epilogue.h and, when grad_bias is not null, grad_bias (c,) float32: the sums of
// g * act'(z) over (n, h, w) before rounding to y's dtype. `workspace`: plan.workspace_bytes bytes of device memory,
// 4-byte aligned (null when 0). Returns the launch error (cudaSuccess when there is nothing to compute; grad_bias is
// then zeros), cudaErrorInvalidValue as conv_epilogue_forward_cuda does.
cudaError_t conv_epilogue_backward_cuda(const ConvEpilogueBackwardArgs& args, const ConvEpilogueBackwardPlan& plan,
                                        float* grad_bias, void* workspace, cudaStream_t stream);

}  // namespace fastattn
