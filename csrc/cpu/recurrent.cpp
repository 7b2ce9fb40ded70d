// CPU implementation of the fastattn_C recurrent ops (schemas in csrc/fastattn.cpp): the time loop of
// csrc/recurrent_driver.h with the pointwise cells of csrc/cpu/recurrent_kernel.cpp, each step's rows split over
// at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../recurrent_driver.h"
#include "recurrent_kernel.h"

namespace fastattn {
namespace {

// Rows per task: about this many gate values at least, so that small steps stay on the calling thread.
constexpr int64_t kMinElementsPerTask = 16384;

struct CpuCells {
  static int64_t grain(int64_t kind_width) { return std::max<int64_t>(1, kMinElementsPerTask / kind_width); }
  void forward(const RecurrentStepForwardArgs& a) const {
    at::parallel_for(0, a.batch, grain(4 * a.hidden),
                     [&](int64_t begin, int64_t end) { recurrent_step_forward_cpu_rows(a, begin, end); });
  }
  void backward(const RecurrentStepBackwardArgs& a) const {
    at::parallel_for(0, a.batch, grain(4 * a.hidden),
                     [&](int64_t begin, int64_t end) { recurrent_step_backward_cpu_rows(a, begin, end); });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_forward_cpu(
    int64_t kind, const at::Tensor& x_proj, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse, bool save) {
  return recurrent_forward_loop(kind, x_proj, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save, CpuCells{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_backward_cpu(
    int64_t kind, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& hstate, const at::Tensor& cstate, const at::Tensor& saved,
    const std::optional<at::Tensor>& lengths, bool reverse) {
  return recurrent_backward_loop(kind, grad_out, grad_h_n, grad_c_n, w_hh, w_hr, hstate, cstate, saved, lengths,
                                 reverse, CpuCells{});
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("recurrent_forward", &fastattn::recurrent_forward_cpu);
  m.impl("recurrent_backward", &fastattn::recurrent_backward_cpu);
}
