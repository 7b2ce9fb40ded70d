// CPU softmax kernels on raw pointers. No torch headers: csrc/cpu/softmax.cpp binds them to tensors and
// splits the rows over threads.
#pragma once
#include <cstdint>

#include "../softmax.h"

namespace fastattn {

// Softmax (or log-softmax) forward of rows [row_begin, row_end) of the (d0 * d1 * d2, n) problem in args;
// row r is (i0, i1, i2) with r = (i0 * d1 + i1) * d2 + i2. Writes out[r * n + j] for those rows only, so
// disjoint row ranges may run on different threads.
void softmax_forward_cpu_rows(const SoftmaxForwardArgs& args, int64_t row_begin, int64_t row_end);

// Softmax (or log-softmax) backward of rows [row_begin, row_end): writes grad_x[r * n + j] for those rows.
void softmax_backward_cpu_rows(const SoftmaxBackwardArgs& args, int64_t row_begin, int64_t row_end);

}  // namespace fastattn
