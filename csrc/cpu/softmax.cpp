// CPU implementation of the fastattn_C softmax ops (schemas in csrc/fastattn.cpp): checks and argument packing
// in csrc/softmax_binding.h, the kernels in csrc/cpu/softmax_kernel.cpp, rows split over at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "../softmax_binding.h"
#include "huge_pages.h"
#include "softmax_kernel.h"

namespace fastattn {
namespace {

// Rows per task: about this many elements at least, so that small inputs stay on the calling thread
// instead of paying the thread pool's start-up.
constexpr int64_t kMinElementsPerTask = 32768;

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(n, 1)); }

at::Tensor softmax_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale, bool causal,
                               bool log) {
  at::Tensor out;
  const SoftmaxForwardArgs args = softmax_forward_args(x, mask, scale, causal, log, out);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  at::parallel_for(0, args.rows(), row_grain(args.n),
                   [&](int64_t begin, int64_t end) { softmax_forward_cpu_rows(args, begin, end); });
  return out;
}

at::Tensor softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& out, double scale, bool log) {
  at::Tensor grad_x;
  const SoftmaxBackwardArgs args = softmax_backward_args(grad, out, scale, log, grad_x);
  advise_huge_pages(grad_x.data_ptr(), grad_x.nbytes());
  at::parallel_for(0, args.rows, row_grain(args.n),
                   [&](int64_t begin, int64_t end) { softmax_backward_cpu_rows(args, begin, end); });
  return grad_x;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("softmax_forward", &fastattn::softmax_forward_cpu);
  m.impl("softmax_backward", &fastattn::softmax_backward_cpu);
}
