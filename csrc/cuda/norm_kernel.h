// Host launchers of the CUDA LayerNorm / RMSNorm kernels (csrc/cuda/norm_kernel.cu). No torch headers: the kernels
// take raw pointers and a stream; csrc/cuda/norm.cpp fills the arguments from tensors and allocates the workspace.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../norm.h"

namespace fastattn {

// out, residual_out, mean and rstd of csrc/norm.h for x in float16, bfloat16 or float32 (residual, residual_out,
// weight and bias each in x's dtype or float32), rows of any length, on `stream`. Returns the launch error: cudaSuccess
// when there is no row, cudaErrorInvalidValue for dtypes the kernels do not take (float64, a 16-bit tensor beside
// x of the other 16-bit dtype).
cudaError_t norm_forward_cuda(const NormForwardArgs& args, cudaStream_t stream);

// How the backward runs. Rows that fit in a block's registers (up to 8192 elements, when the device has the shared
// memory for the sums: 64 KiB for the longest rows): `blocks` persistent blocks, each over every blocks-th group
// of rows, each writing the float32 partial sums of grad_weight and grad_bias over its rows to a row of the
// workspace; longer rows (`looped`): a kernel for the two row sums of every row, then `blocks` slices of rows
// times column tiles, one partial row per slice. A last kernel sums the partials into grad_weight and grad_bias
// (no atomics: the result is deterministic).
struct NormBackwardPlan {
  bool looped;
  int64_t blocks;
  int64_t partials;        // partial rows of grad_weight (and of grad_bias): (2, partials, n) float32
  size_t workspace_bytes;  // the partials (when a weight or bias gradient is wanted) and, for long rows, the row
                           // sums (rows, 2) float32; 0 when neither is needed
};

// Plans args for the current device (its multiprocessor count and opt-in shared memory per block). Returns
// cudaErrorInvalidValue for a dtype the kernels do not take, or the error of the device query.
cudaError_t norm_backward_plan(const NormBackwardArgs& args, NormBackwardPlan* plan);

// grad_x, grad_residual_in, grad_weight and grad_bias of csrc/norm.h on `stream`; `workspace`: plan.workspace_bytes
// bytes of device memory, 16-byte aligned (null when 0). Returns the launch error (cudaSuccess when there is
// nothing to compute), cudaErrorInvalidValue for a dtype the kernels do not take.
cudaError_t norm_backward_cuda(const NormBackwardArgs& args, const NormBackwardPlan& plan, void* workspace,
                               cudaStream_t stream);

}  // namespace fastattn
