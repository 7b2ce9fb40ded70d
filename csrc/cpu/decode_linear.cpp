// CPU implementation of fastattn_C::decode_linear (schema in csrc/fastattn.cpp): checks, then the columns of the
// kernel in csrc/cpu/decode_linear_kernel.cpp split over at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "decode_linear_kernel.h"

namespace fastattn {
namespace {

// Multiply-adds per task at least, so that small products stay on the calling thread instead of paying the thread
// pool's start-up.
constexpr int64_t kMinMacsPerTask = 1 << 17;

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "decode_linear: x (M, K) and weight (N, K) expected, got ", x.sizes(), " and ", weight.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  (!has_bias || bias->scalar_type() == at::kFloat),
              "decode_linear: x, weight and bias must be float32");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && (!has_bias || bias->device().is_cpu()),
              "decode_linear: CPU tensors expected");
  TORCH_CHECK(x.size(0) <= cpu::kDecodeLinearMaxRows, "decode_linear: x may have at most ",
              cpu::kDecodeLinearMaxRows, " rows, got ", x.size(0));
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "decode_linear: bias must be (N,) = (", weight.size(0), ",), got ", bias->sizes());
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor ws = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor bs = has_bias ? bias->contiguous() : at::Tensor();
  auto out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const float* b = has_bias ? bs.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerTask / std::max<int64_t>(m * k, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    cpu::decode_linear(xs.data_ptr<float>(), xs.stride(0), m, ws.data_ptr<float>(), ws.stride(0), k, b,
                       out.data_ptr<float>(), n, begin, end);
  });
  return out;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) { m.impl("decode_linear", &fastattn::decode_linear_cpu); }
