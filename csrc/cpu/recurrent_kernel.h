// CPU recurrent cell kernels on raw pointers (see csrc/recurrent.h). No torch headers: csrc/cpu/recurrent.cpp
// runs the time loop and splits each step's rows over threads.
#pragma once
#include <cstdint>

#include "../recurrent.h"

namespace fastattn {

// The pointwise part of one step for rows [row_begin, row_end): gates, cell and hidden update (and the saved
// values). Writes only those rows, so disjoint ranges may run on different threads.
void recurrent_step_forward_cpu_rows(const RecurrentStepForwardArgs& args, int64_t row_begin, int64_t row_end);

// The same for hidden units [unit_begin, unit_end) of those rows (of every gate): writes only those units of h, c,
// out and saved, so disjoint unit ranges may run on different threads. All H units for the LayerNorm-LSTM, whose
// norms span the row.
void recurrent_step_forward_cpu_units(const RecurrentStepForwardArgs& args, int64_t row_begin, int64_t row_end,
                                      int64_t unit_begin, int64_t unit_end);

// The gradients of one step's pointwise part for rows [row_begin, row_end).
void recurrent_step_backward_cpu_rows(const RecurrentStepBackwardArgs& args, int64_t row_begin, int64_t row_end);

// The same for hidden units [unit_begin, unit_end) of those rows: writes only those units of dc, pass and (of each
// gate) d_hh and d_x, and in float32 / float64 also reads only those of dh (half and bfloat16 convert whole rows).
// All H units for the LayerNorm-LSTM.
void recurrent_step_backward_cpu_units(const RecurrentStepBackwardArgs& args, int64_t row_begin, int64_t row_end,
                                       int64_t unit_begin, int64_t unit_end);

}  // namespace fastattn
