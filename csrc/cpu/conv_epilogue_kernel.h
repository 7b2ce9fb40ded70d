// CPU conv epilogue kernels on raw pointers (arguments: csrc/conv_epilogue.h). No torch headers:
// csrc/cpu/conv_epilogue.cpp binds them to tensors and splits the work units over threads.
//
// Work units: in NCHW a unit is a plane (i0, ch), index i0 * c + ch; in NHWC a unit is one output row of an image,
// index i0 * out_h + i (input rows 2i and 2i + 1 with the pool, row i without). Units write disjoint parts of
// the outputs, so disjoint unit ranges may run on different threads.
#pragma once
#include <cstdint>

#include "../conv_epilogue.h"

namespace fastattn {

// The number of work units of `shape`, and the input elements one unit reads (for the split over threads).
int64_t conv_epilogue_units(const ConvEpilogueShape& shape);
int64_t conv_epilogue_unit_elements(const ConvEpilogueShape& shape);

// Forward of units [begin, end): writes their part of out.
void conv_epilogue_forward_cpu_units(const ConvEpilogueForwardArgs& args, int64_t begin, int64_t end);

// Backward of units [begin, end): writes their part of grad_y (zeros where the pool left an element out) and,
// when bias_sums is not null, the sums of grad_y over each unit's elements per channel: in NCHW bias_sums is
// (n * c,) and unit p stores its plane's sum at bias_sums[p]; in NHWC bias_sums is (c,) and the units' sums are
// added to it.
void conv_epilogue_backward_cpu_units(const ConvEpilogueBackwardArgs& args, int64_t begin, int64_t end,
                                      double* bias_sums);

}  // namespace fastattn
