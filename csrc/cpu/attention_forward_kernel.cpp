// CPU attention forward: entry points of the ForwardKernel in attention_tiles.h (which documents the kernel).
#include "attention_kernel.h"

#include "attention_tiles.h"

namespace fastattn {
namespace attention_cpu {
namespace {

// Non-template entry points, one per dtype: target_clones needs plain functions.
#define FASTATTN_DEFINE_ENTRY_POINT(T, name)                                                             \
  FASTATTN_TARGET_CLONES void forward_tasks_##name(const AttentionForwardArgs& a, int64_t begin, int64_t end) { \
    ForwardKernel<T> kernel(a);                                                                          \
    for (int64_t task = begin; task < end; ++task) kernel.run(task);                                     \
  }

FASTATTN_DEFINE_ENTRY_POINT(c10::Half, half)
FASTATTN_DEFINE_ENTRY_POINT(c10::BFloat16, bfloat16)
FASTATTN_DEFINE_ENTRY_POINT(float, float)
FASTATTN_DEFINE_ENTRY_POINT(double, double)
#undef FASTATTN_DEFINE_ENTRY_POINT

}  // namespace
}  // namespace attention_cpu

using attention_cpu::block_q;
using attention_cpu::ceil_div;

int64_t attention_forward_cpu_tasks(const AttentionForwardArgs& args) {
  return args.batch * args.heads_q * ceil_div(args.seq_q, block_q(args.dtype));
}

int64_t attention_forward_cpu_grain(const AttentionForwardArgs& args) {
  // Multiply-adds per task at most (both products over every key); a thread gets about 2^20 at least.
  constexpr int64_t kMinWorkPerThread = int64_t(1) << 20;
  const int64_t work = std::max<int64_t>(std::min(block_q(args.dtype), args.seq_q), 1) *
                       std::max<int64_t>(args.seq_k, 1) * std::max<int64_t>(args.head_dim + args.head_dim_v, 1);
  return std::max<int64_t>(1, kMinWorkPerThread / work);
}

void attention_forward_cpu(const AttentionForwardArgs& args, int64_t task_begin, int64_t task_end) {
  switch (args.dtype) {
    case Dtype::kHalf: return attention_cpu::forward_tasks_half(args, task_begin, task_end);
    case Dtype::kBFloat16: return attention_cpu::forward_tasks_bfloat16(args, task_begin, task_end);
    case Dtype::kFloat: return attention_cpu::forward_tasks_float(args, task_begin, task_end);
    case Dtype::kDouble: return attention_cpu::forward_tasks_double(args, task_begin, task_end);
  }
}


}  // namespace fastattn
