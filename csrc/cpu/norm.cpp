// CPU implementation of the fastattn_C norm ops (schemas in csrc/fastattn.cpp): checks and argument packing in
// csrc/norm_binding.h, the kernels in csrc/cpu/norm_kernel.cpp, rows split over at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../norm_binding.h"
#include "huge_pages.h"
#include "norm_kernel.h"

namespace fastattn {
namespace {

// Rows per task: about this many elements at least, so that small inputs stay on the calling thread
// instead of paying the thread pool's start-up.
constexpr int64_t kMinElementsPerTask = 32768;

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(n, 1)); }

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs norm_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                         bool rms, double dropout_p, int64_t seed, std::optional<at::ScalarType> residual_out_dtype) {
  NormForwardOutputs o;
  const NormForwardArgs args =
      norm_forward_args(x, residual, weight, bias, eps, rms, dropout_p, seed, residual_out_dtype, o);
  advise_huge_pages(o.out.data_ptr(), o.out.nbytes());
  if (args.residual_out) advise_huge_pages(o.residual_out.data_ptr(), o.residual_out.nbytes());
  at::parallel_for(0, args.rows, row_grain(args.n),
                   [&](int64_t begin, int64_t end) { norm_forward_cpu_rows(args, begin, end); });
  return {o.out, o.residual_out, o.mean, o.rstd};
}

Outputs norm_backward_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual,
                          const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                          const at::Tensor& rstd, bool rms, bool has_bias, double dropout_p, int64_t seed,
                          at::ScalarType x_dtype, std::optional<at::ScalarType> residual_dtype) {
  NormBackwardOutputs o;
  const NormBackwardArgs args = norm_backward_args(grad_out, grad_residual, z, weight, mean, rstd, rms, has_bias,
                                                   dropout_p, seed, x_dtype, residual_dtype, o);
  advise_huge_pages(o.grad_x.data_ptr(), o.grad_x.nbytes());
  if (args.grad_residual_in) advise_huge_pages(o.grad_residual_in.data_ptr(), o.grad_residual_in.nbytes());
  const int64_t rows = args.rows, n = args.n;
  if (!args.grad_weight && !args.grad_bias) {
    at::parallel_for(0, rows, row_grain(n),
                     [&](int64_t begin, int64_t end) { norm_backward_cpu_rows(args, begin, end, nullptr); });
    return {o.grad_x, o.grad_residual_in, o.grad_weight, o.grad_bias};
  }
  // grad_weight / grad_bias: one block of rows per thread, each summing into its own float64 partial
  // (2, n); then one pass adds the partials column by column.
  const int64_t tasks = (rows + row_grain(n) - 1) / row_grain(n);
  const int64_t blocks = std::min<int64_t>(tasks, std::max(1, at::get_num_threads()));
  const at::Tensor partials = at::empty({blocks, 2, n}, z.options().dtype(at::kDouble));
  double* const partial = partials.data_ptr<double>();
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      norm_backward_cpu_rows(args, rows * b / blocks, rows * (b + 1) / blocks, partial + b * 2 * n);
    }
  });
  at::parallel_for(0, n, std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(blocks, 1)),
                   [&](int64_t begin, int64_t end) { norm_backward_cpu_reduce(args, partial, blocks, begin, end); });
  return {o.grad_x, o.grad_residual_in, o.grad_weight, o.grad_bias};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("norm_forward", &fastattn::norm_forward_cpu);
  m.impl("norm_backward", &fastattn::norm_backward_cpu);
}
