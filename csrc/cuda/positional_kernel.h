// Host launchers of the CUDA positional-encoding kernels (csrc/cuda/positional_kernel.cu). No torch headers: the
// kernels take raw pointers and a stream; csrc/cuda/positional.cpp fills the arguments from tensors and checks the
// result.
#pragma once
#include <cuda_runtime_api.h>

#include "../positional.h"

namespace fastattn {

// positional_add (see PositionalAddArgs). Launches on `stream`; returns the launch error (cudaSuccess when there is
// nothing to do), cudaErrorInvalidValue for float64. Positions outside a table give NaN rows (the Python
// layer checks them before the launch).
cudaError_t positional_add_cuda(const PositionalAddArgs& args, cudaStream_t stream);

// embedding_forward (see EmbeddingForwardArgs); a token or position out of range gives a NaN row. Same error
// convention as positional_add_cuda.
cudaError_t embedding_forward_cuda(const EmbeddingForwardArgs& args, cudaStream_t stream);

// embedding_scatter with atomics: adds scale * grad[n] to row index[n] of args.out, which must be a zero-filled
// contiguous (num_rows, dim) float32 buffer (whatever args.dtype, the dtype of grad). Entries with index skip_row
// or out of range add nothing. The order of the atomic adds, and so the last bits of a row that several entries
// share, varies from run to run.
cudaError_t embedding_scatter_cuda(const EmbeddingScatterArgs& args, cudaStream_t stream);

}  // namespace fastattn
