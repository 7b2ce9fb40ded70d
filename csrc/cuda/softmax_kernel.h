// Host launchers of the CUDA softmax kernels (csrc/cuda/softmax_kernel.cu). No torch headers: the kernels take raw
// pointers and a stream; csrc/cuda/softmax.cpp fills the arguments from tensors and checks the result.
#pragma once
#include <cuda_runtime_api.h>

#include "../softmax.h"

namespace fastattn {

// Softmax or log-softmax of z = x * scale (+ mask) over the last dim; see SoftmaxForwardArgs.
// Launches on `stream`; returns the launch error (cudaSuccess when rows() or n is 0: nothing is launched),
// cudaErrorInvalidValue for a dtype the kernels do not support (float64).
cudaError_t softmax_forward_cuda(const SoftmaxForwardArgs& args, cudaStream_t stream);

// Gradient with respect to z (times scale) from the forward output and the incoming gradient; see
// SoftmaxBackwardArgs. Same error convention as softmax_forward_cuda.
cudaError_t softmax_backward_cuda(const SoftmaxBackwardArgs& args, cudaStream_t stream);

}  // namespace fastattn
