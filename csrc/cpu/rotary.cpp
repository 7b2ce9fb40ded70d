// CPU implementation of fastattn_C::rotary (schema in csrc/fastattn.cpp): checks and argument packing in
// csrc/rotary_binding.h, the kernel in csrc/cpu/rotary_kernel.cpp, tasks split over at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../rotary_binding.h"
#include "huge_pages.h"
#include "rotary_kernel.h"

namespace fastattn {
namespace {

// Elements per task at least, so that small inputs stay on the calling thread instead of paying the thread
// pool's start-up.
constexpr int64_t kMinElementsPerTask = 32768;

void advise_output(const at::Tensor& in, const at::Tensor& out) {
  if (out.data_ptr() != in.data_ptr() && out.is_contiguous()) advise_huge_pages(out.data_ptr(), out.nbytes());
}

void rotary_cpu_op(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& q_out,
                   const std::optional<at::Tensor>& k_out, const std::optional<at::Tensor>& positions,
                   const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& cos,
                   const std::optional<at::Tensor>& sin, int64_t offset, int64_t rotary_dim, bool interleaved,
                   double base, bool inverse) {
  TORCH_CHECK(q.device().is_cpu(), "fastattn_C::rotary (CPU): q must be a CPU tensor");
  const RotaryArgs args =
      rotary_args(q, k, q_out, k_out, positions, offsets, cos, sin, offset, rotary_dim, interleaved, base, inverse);
  const int64_t tasks = rotary_cpu_tasks(args);
  if (tasks == 0 || args.heads() == 0) return;
  advise_output(q, q_out);
  if (k.has_value()) advise_output(*k, *k_out);
  const int64_t elements_per_task = kRotaryTokensPerTask * args.heads() * args.head_dim;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(elements_per_task, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { rotary_cpu(args, begin, end); });
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) { m.impl("rotary", &fastattn::rotary_cpu_op); }
