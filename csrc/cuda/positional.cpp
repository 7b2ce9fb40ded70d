// CUDA implementations of the fastattn_C positional-encoding ops (schemas in csrc/fastattn.cpp). Compiled by the
// host compiler: checks and packs tensors (csrc/positional_binding.h), then calls the kernel launchers of
// csrc/cuda/positional_kernel.cu on the current stream of the tensors' device. Indices are not range-checked here
// (that would need a device synchronisation): the Python layer checks them, and the kernels write NaN rows for
// any that are out of range instead of reading outside a table.
#include <ATen/ops/empty.h>  // used by positional_binding.h
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include "../positional_binding.h"
#include "checks.h"
#include "positional_kernel.h"

namespace fastattn {
namespace {

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, "fastattn_C::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

at::Tensor positional_add(const at::Tensor& x, const std::optional<at::Tensor>& table,
                          const std::optional<at::Tensor>& offsets, int64_t offset, double scale, double base,
                          bool sinusoid, bool batch_first, double dropout_p, int64_t seed) {
  check_cuda_input(x, "fastattn_C::positional_add", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out;
  const PositionalAddArgs args =
      positional_add_args(x, table, offsets, offset, scale, base, sinusoid, batch_first, dropout_p, seed, out);
  check_launch(positional_add_cuda(args, c10::cuda::getCurrentCUDAStream()), "positional_add");
  return out;
}

at::Tensor embedding_forward(const at::Tensor& tokens, const at::Tensor& token_weight,
                             const at::Tensor& position_weight, const std::optional<at::Tensor>& positions,
                             const std::optional<at::Tensor>& offsets, int64_t offset, double token_scale,
                             double dropout_p, int64_t seed) {
  check_cuda_input(token_weight, "fastattn_C::embedding_forward", "token_weight");
  const c10::cuda::CUDAGuard guard(token_weight.device());
  at::Tensor out;
  const EmbeddingForwardArgs args = embedding_forward_args(tokens, token_weight, position_weight, positions, offsets,
                                                           offset, token_scale, dropout_p, seed, out);
  check_launch(embedding_forward_cuda(args, c10::cuda::getCurrentCUDAStream()), "embedding_forward");
  return out;
}

at::Tensor embedding_scatter(const at::Tensor& grad, const at::Tensor& index, int64_t num_rows, double scale,
                             int64_t skip_row) {
  check_cuda_input(grad, "fastattn_C::embedding_scatter", "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  EmbeddingScatterArgs args = embedding_scatter_args(grad, index, num_rows, scale, skip_row);
  // float32 atomics accumulate into a zero-filled float32 buffer, rounded to grad's dtype at the end.
  at::Tensor acc = at::zeros({num_rows, args.dim}, grad.options().dtype(at::kFloat));
  args.out = acc.data_ptr();
  check_launch(embedding_scatter_cuda(args, c10::cuda::getCurrentCUDAStream()), "embedding_scatter");
  return grad.scalar_type() == at::kFloat ? acc : acc.to(grad.scalar_type());
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("positional_add", &fastattn::positional_add);
  m.impl("embedding_forward", &fastattn::embedding_forward);
  m.impl("embedding_scatter", &fastattn::embedding_scatter);
}
