// Host launchers of the CUDA recurrent cell kernels (csrc/cuda/recurrent_kernel.cu). No torch headers: the kernels
// take raw pointers and a stream; csrc/cuda/recurrent.cpp runs the time loop (csrc/recurrent_driver.h) and calls
// these once per step.
#pragma once
#include <cuda_runtime_api.h>

#include "../recurrent.h"

namespace fastattn {

// The pointwise part of one step (csrc/recurrent.h: gates, cell and hidden update, saved values) for every row, on
// `stream`, for x in float16, bfloat16, float32 (computing in float32) or float64 (in float64). Returns the launch
// error: cudaSuccess when there is no element, cudaErrorInvalidValue for another dtype, an unknown kind, or a
// pointer the kind needs left null.
cudaError_t recurrent_step_forward_cuda(const RecurrentStepForwardArgs& args, cudaStream_t stream);

// The gradients of one step's pointwise part for every row (csrc/recurrent.h), on `stream`; dc_prev may be dc
// itself. Returns the launch error as recurrent_step_forward_cuda.
cudaError_t recurrent_step_backward_cuda(const RecurrentStepBackwardArgs& args, cudaStream_t stream);

}  // namespace fastattn
