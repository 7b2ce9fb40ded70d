// CPU implementation of the fastattn_C conv epilogue ops (schemas in csrc/fastattn.cpp): checks and argument packing
// in csrc/conv_epilogue_binding.h, the kernels in csrc/cpu/conv_epilogue_kernel.cpp, work units (NCHW planes, NHWC
// output rows) split over at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../conv_epilogue_binding.h"
#include "conv_epilogue_kernel.h"
#include "huge_pages.h"

namespace fastattn {
namespace {

// Units per task: about this many input elements at least, so that small inputs stay on the calling thread
// instead of paying the thread pool's start-up.
constexpr int64_t kMinElementsPerTask = 32768;

int64_t unit_grain(const ConvEpilogueShape& s) {
  return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(conv_epilogue_unit_elements(s), 1));
}

at::Tensor conv_epilogue_forward_cpu(const at::Tensor& y, const std::optional<at::Tensor>& bias,
                                     c10::string_view activation, bool pool) {
  at::Tensor out;
  const ConvEpilogueForwardArgs args = conv_epilogue_forward_args(y, bias, activation, pool, out);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  at::parallel_for(0, conv_epilogue_units(args.shape), unit_grain(args.shape),
                   [&](int64_t begin, int64_t end) { conv_epilogue_forward_cpu_units(args, begin, end); });
  return out;
}

// grad_bias[ch] = sum over rows r of sums[r * c + ch], in grad_bias's dtype (float or double).
template <class C>
void reduce_rows(const double* sums, int64_t rows, int64_t c, at::Tensor& grad_bias) {
  C* out = grad_bias.data_ptr<C>();
  for (int64_t ch = 0; ch < c; ++ch) {
    double total = 0;
    for (int64_t r = 0; r < rows; ++r) total += sums[r * c + ch];
    out[ch] = static_cast<C>(total);
  }
}

std::tuple<at::Tensor, at::Tensor> conv_epilogue_backward_cpu(const at::Tensor& grad, const at::Tensor& y,
                                                              const std::optional<at::Tensor>& bias,
                                                              c10::string_view activation, bool pool,
                                                              bool bias_grad) {
  at::Tensor grad_y;
  const ConvEpilogueBackwardArgs args = conv_epilogue_backward_args(grad, y, bias, activation, pool, grad_y);
  advise_huge_pages(grad_y.data_ptr(), grad_y.nbytes());
  const ConvEpilogueShape& s = args.shape;
  const int64_t units = conv_epilogue_units(s), grain = unit_grain(s);
  const at::ScalarType compute = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_bias = at::empty({bias_grad ? s.c : 0}, y.options().dtype(compute));
  if (!bias_grad) {
    at::parallel_for(0, units, grain,
                     [&](int64_t begin, int64_t end) { conv_epilogue_backward_cpu_units(args, begin, end, nullptr); });
    return {grad_y, grad_bias};
  }
  // The bias gradient sums grad_y per channel in float64: NCHW planes store one sum each, reduced over the batch
  // below; NHWC takes one block of units per thread, each adding into its own (c,) partial.
  at::Tensor sums;
  int64_t rows;
  if (!s.channels_last) {
    rows = s.n;
    sums = at::empty({s.n * s.c}, y.options().dtype(at::kDouble));
    double* const plane_sums = sums.data_ptr<double>();
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      conv_epilogue_backward_cpu_units(args, begin, end, plane_sums);
    });
  } else {
    const int64_t tasks = (units + grain - 1) / grain;
    rows = std::min<int64_t>(tasks, std::max(1, at::get_num_threads()));
    sums = at::zeros({rows, s.c}, y.options().dtype(at::kDouble));
    double* const partial = sums.data_ptr<double>();
    at::parallel_for(0, rows, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t b = block_begin; b < block_end; ++b) {
        conv_epilogue_backward_cpu_units(args, units * b / rows, units * (b + 1) / rows, partial + b * s.c);
      }
    });
  }
  if (compute == at::kDouble) {
    reduce_rows<double>(sums.data_ptr<double>(), rows, s.c, grad_bias);
  } else {
    reduce_rows<float>(sums.data_ptr<double>(), rows, s.c, grad_bias);
  }
  return {grad_y, grad_bias};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("conv_epilogue_forward", &fastattn::conv_epilogue_forward_cpu);
  m.impl("conv_epilogue_backward", &fastattn::conv_epilogue_backward_cpu);
}
