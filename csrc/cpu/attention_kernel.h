// CPU attention forward and backward kernels on raw pointers (arguments: csrc/attention.h; the kernels in
// attention_tiles.h, attention_forward_kernel.cpp, attention_backward_tiles.h). No torch headers:
// csrc/cpu/attention.cpp binds it to tensors and splits the tasks over threads.
#pragma once
#include <cstdint>

#include "../attention.h"

namespace fastattn {

// The forward is split into independent tasks, one per (batch, query head, block of queries); task t writes
// only its own rows of out and lse, so disjoint task ranges may run on different threads.
int64_t attention_forward_cpu_tasks(const AttentionForwardArgs& args);

// Tasks worth one thread at least: small problems stay on the calling thread instead of paying the thread
// pool's start-up.
int64_t attention_forward_cpu_grain(const AttentionForwardArgs& args);

// Runs tasks [task_begin, task_end).
void attention_forward_cpu(const AttentionForwardArgs& args, int64_t task_begin, int64_t task_end);

// The backward in two passes. Pass 1 (dK, dV): one task per (batch, kv head, block of keys), writing only its
// rows of dk and dv. Pass 2 (dQ): the forward's tasks (attention_forward_cpu_tasks / _grain on args.forward),
// writing only their rows of dq. Pass 2 does not read pass 1's outputs: the passes may run in either order.
int64_t attention_backward_cpu_kv_tasks(const AttentionBackwardArgs& args);
int64_t attention_backward_cpu_kv_grain(const AttentionBackwardArgs& args);
void attention_backward_cpu_kv(const AttentionBackwardArgs& args, int64_t task_begin, int64_t task_end);
void attention_backward_cpu_q(const AttentionBackwardArgs& args, int64_t task_begin, int64_t task_end);

// The fused backward: one task per (batch, kv head), writing only its rows of dk, dv and dq (those of the
// group's query heads), with 5 GEMMs per tile instead of the two passes' 7. Returns its task count, or 0
// when `threads` would be poorly balanced over so few tasks (or its dQ accumulator too large): then run the
// two passes.
int64_t attention_backward_cpu_fused_tasks(const AttentionBackwardArgs& args, int64_t threads);
void attention_backward_cpu_fused(const AttentionBackwardArgs& args, int64_t task_begin, int64_t task_end);

}  // namespace fastattn
