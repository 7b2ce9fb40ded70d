// CPU LayerNorm / RMSNorm kernels on raw pointers. No torch headers: csrc/cpu/norm.cpp binds them to tensors and
// splits the rows over threads.
#pragma once
#include <cstdint>

#include "../norm.h"

namespace fastattn {

// Forward of rows [row_begin, row_end) of args: writes out, residual_out (when stored), mean and rstd of those
// rows only, so disjoint row ranges may run on different threads.
void norm_forward_cpu_rows(const NormForwardArgs& args, int64_t row_begin, int64_t row_end);

// Backward of rows [row_begin, row_end): writes grad_x and grad_residual_in of those rows, and (when args has
// grad_weight / grad_bias) this range's sums over rows of grad_out * zhat and of grad_out into
// partial[0 .. n) and partial[n .. 2n) (float64, overwritten). Each range gets its own partial, so ranges run
// on different threads without contention; norm_backward_cpu_reduce adds the partials up.
void norm_backward_cpu_rows(const NormBackwardArgs& args, int64_t row_begin, int64_t row_end, double* partial);

// grad_weight[j] and grad_bias[j] for columns [col_begin, col_end): the sums over `blocks` partials laid out as
// partials[(b * 2 + k) * n + j] (k = 0: weight, 1: bias), rounded to weight_dtype.
void norm_backward_cpu_reduce(const NormBackwardArgs& args, const double* partials, int64_t blocks, int64_t col_begin,
                              int64_t col_end);

}  // namespace fastattn
