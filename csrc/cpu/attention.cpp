// CPU implementation of the fastattn_C attention op (schema in csrc/fastattn.cpp): checks and argument packing
// in csrc/attention_binding.h, the kernels declared in csrc/cpu/attention_kernel.h, tasks
// split over at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../attention_binding.h"
#include "attention_kernel.h"
#include "huge_pages.h"

namespace fastattn {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu_op(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                            const std::optional<at::Tensor>& key_padding,
                                                            const std::optional<at::Tensor>& alibi, double scale,
                                                            int64_t diagonal, int64_t window_left,
                                                            int64_t window_right, double dropout_p,
                                                            int64_t seed) {
  AttentionForwardArgs args = attention_forward_args(q, k, v, mask, key_padding, alibi, scale, diagonal, window_left,
                                                     window_right, dropout_p, seed, "attention_forward");
  at::Tensor out, lse;
  attention_forward_outputs(q, v, args, out, lse);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  at::parallel_for(0, attention_forward_cpu_tasks(args), attention_forward_cpu_grain(args),
                   [&](int64_t begin, int64_t end) { attention_forward_cpu(args, begin, end); });
  return {out, lse};
}

// Fused (one task per (batch, kv head)) when there are enough of them for the threads, else two passes: dK and dV
// by (batch, kv head, key block) tasks, then dQ by (batch, query head, query block) tasks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
    const at::Tensor& delta, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& key_padding,
    const std::optional<at::Tensor>& alibi, double scale, int64_t diagonal, int64_t window_left,
    int64_t window_right, double dropout_p, int64_t seed) {
  const at::Tensor grad_out_c =
      grad_out.dim() == 4 && grad_out.size(3) > 1 && grad_out.stride(3) != 1 ? grad_out.contiguous() : grad_out;
  const at::Tensor lse_c = lse.contiguous(), delta_c = delta.contiguous();
  at::Tensor dq, dk, dv;
  const AttentionBackwardArgs args = attention_backward_args(grad_out_c, q, k, v, lse_c, delta_c, mask, key_padding,
                                                             alibi, scale, diagonal, window_left, window_right,
                                                             dropout_p, seed, dq, dk, dv);
  const int64_t fused_tasks = attention_backward_cpu_fused_tasks(args, at::get_num_threads());
  if (fused_tasks > 0) {
    at::parallel_for(0, fused_tasks, 1,
                     [&](int64_t begin, int64_t end) { attention_backward_cpu_fused(args, begin, end); });
    return {dq, dk, dv};
  }
  at::parallel_for(0, attention_backward_cpu_kv_tasks(args), attention_backward_cpu_kv_grain(args),
                   [&](int64_t begin, int64_t end) { attention_backward_cpu_kv(args, begin, end); });
  at::parallel_for(0, attention_forward_cpu_tasks(args.forward), attention_forward_cpu_grain(args.forward),
                   [&](int64_t begin, int64_t end) { attention_backward_cpu_q(args, begin, end); });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("attention_forward", &fastattn::attention_forward_cpu_op);
  m.impl("attention_backward", &fastattn::attention_backward_cpu_op);
}
