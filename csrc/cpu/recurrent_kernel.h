// CPU recurrent cell kernels on raw pointers (see csrc/recurrent.h). No torch headers: csrc/cpu/recurrent.cpp
// runs the time loop and splits each step's rows over threads.
#pragma once
#include <cstdint>

#include "../recurrent.h"

namespace fastattn {

// The pointwise part of one step for rows [row_begin, row_end): gates, cell and hidden update (and the saved
// values). Writes only those rows, so disjoint ranges may run on different threads.
void recurrent_step_forward_cpu_rows(const RecurrentStepForwardArgs& args, int64_t row_begin, int64_t row_end);

// The gradients of one step's pointwise part for rows [row_begin, row_end).
void recurrent_step_backward_cpu_rows(const RecurrentStepBackwardArgs& args, int64_t row_begin, int64_t row_end);

}  // namespace fastattn
