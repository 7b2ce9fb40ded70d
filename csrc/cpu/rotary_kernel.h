// CPU rotary position embedding kernels on raw pointers. No torch headers: csrc/cpu/rotary.cpp binds them to
// tensors and splits the tasks over threads.
#pragma once
#include <cstdint>

#include "../rotary.h"

namespace fastattn {

// Tokens per task: a task computes the angles of this many consecutive positions of one batch once, then
// rotates those tokens' rows in every head of q and k.
constexpr int64_t kRotaryTokensPerTask = 16;

// The number of tasks of args: batch * ceil(seq / kRotaryTokensPerTask).
inline int64_t rotary_cpu_tasks(const RotaryArgs& args) {
  return args.batch * ((args.seq + kRotaryTokensPerTask - 1) / kRotaryTokensPerTask);
}

// Runs tasks [task_begin, task_end) of the problem in args (see csrc/rotary.h). Task t covers batch
// t / ceil(seq / kRotaryTokensPerTask) and its block of tokens; distinct tasks write distinct rows, so disjoint
// task ranges may run on different threads.
void rotary_cpu(const RotaryArgs& args, int64_t task_begin, int64_t task_end);

}  // namespace fastattn
