// CPU attention backward on raw pointers (arguments and semantics: csrc/attention.h): task counts, grains and the
// dispatch on dtype to the entry points that attention_backward_<dtype>.cpp instantiate (attention_backward_tiles.h).
#include "attention_backward_tiles.h"

namespace fastattn {

using attention_cpu::ceil_div;
using attention_cpu::kBlockK;
using attention_cpu::kLanes;

int64_t attention_backward_cpu_kv_tasks(const AttentionBackwardArgs& args) {
  return args.forward.batch * args.forward.heads_kv * ceil_div(args.forward.seq_k, kBlockK);
}

int64_t attention_backward_cpu_kv_grain(const AttentionBackwardArgs& args) {
  // Multiply-adds per task at most (four products over every query of the group); about 2^20 a thread at least.
  constexpr int64_t kMinWorkPerThread = int64_t(1) << 20;
  const AttentionForwardArgs& f = args.forward;
  const int64_t group = f.heads_kv > 0 ? f.heads_q / f.heads_kv : 1;
  const int64_t work = std::max<int64_t>(std::min(kBlockK, f.seq_k), 1) * std::max<int64_t>(f.seq_q * group, 1) *
                       std::max<int64_t>(2 * (f.head_dim + f.head_dim_v), 1);
  return std::max<int64_t>(1, kMinWorkPerThread / work);
}

void attention_backward_cpu_kv(const AttentionBackwardArgs& args, int64_t task_begin, int64_t task_end) {
  switch (args.forward.dtype) {
    case Dtype::kHalf: return attention_cpu::backward_kv_tasks_half(args, task_begin, task_end);
    case Dtype::kBFloat16: return attention_cpu::backward_kv_tasks_bfloat16(args, task_begin, task_end);
    case Dtype::kFloat: return attention_cpu::backward_kv_tasks_float(args, task_begin, task_end);
    case Dtype::kDouble: return attention_cpu::backward_kv_tasks_double(args, task_begin, task_end);
  }
}

int64_t attention_backward_cpu_fused_tasks(const AttentionBackwardArgs& args, int64_t threads) {
  // Fused tasks are (batch, kv head) with the same work each: fuse when every thread gets two at least (then
  // the last round leaves at most a third of the threads idle), and the dQ accumulator stays under 64 MiB.
  const AttentionForwardArgs& f = args.forward;
  const int64_t tasks = f.batch * f.heads_kv;
  const int64_t lanes = f.dtype == Dtype::kDouble ? kLanes<double> : kLanes<float>;
  const int64_t bytes = (f.heads_kv > 0 ? f.heads_q / f.heads_kv : 0) * f.seq_q * ceil_div(f.head_dim, lanes) *
                        lanes * (f.dtype == Dtype::kDouble ? 8 : 4);
  return tasks >= 2 * threads && bytes <= (int64_t(64) << 20) ? tasks : 0;
}

void attention_backward_cpu_fused(const AttentionBackwardArgs& args, int64_t task_begin, int64_t task_end) {
  switch (args.forward.dtype) {
    case Dtype::kHalf: return attention_cpu::backward_fused_tasks_half(args, task_begin, task_end);
    case Dtype::kBFloat16: return attention_cpu::backward_fused_tasks_bfloat16(args, task_begin, task_end);
    case Dtype::kFloat: return attention_cpu::backward_fused_tasks_float(args, task_begin, task_end);
    case Dtype::kDouble: return attention_cpu::backward_fused_tasks_double(args, task_begin, task_end);
  }
}

void attention_backward_cpu_q(const AttentionBackwardArgs& args, int64_t task_begin, int64_t task_end) {
  switch (args.forward.dtype) {
    case Dtype::kHalf: return attention_cpu::backward_q_tasks_half(args, task_begin, task_end);
    case Dtype::kBFloat16: return attention_cpu::backward_q_tasks_bfloat16(args, task_begin, task_end);
    case Dtype::kFloat: return attention_cpu::backward_q_tasks_float(args, task_begin, task_end);
    case Dtype::kDouble: return attention_cpu::backward_q_tasks_double(args, task_begin, task_end);
  }
}


}  // namespace fastattn
