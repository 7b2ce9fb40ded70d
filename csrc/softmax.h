// Softmax kernel arguments shared by the CPU and CUDA kernels. No torch headers: the kernel files that
// include this compile quickly; csrc/softmax_binding.h fills these from tensors.
#pragma once
#include <cstdint>

#include "types.h"

namespace fastattn {

struct SoftmaxForwardArgs {
  const void* x;             // (d0, d1, d2, n) with strides (x_stride[0..2], 1)
  const void* mask;          // (d0, d1, d2, n) with strides mask_stride[0..3]; null when kind is kNone
  void* out;                 // contiguous (d0, d1, d2, n), dtype of x
  int64_t d0, d1, d2, n;
  int64_t x_stride[3];
  int64_t mask_stride[4];
  Dtype dtype;
  MaskKind mask_kind;
  double scale;              // z = x * scale (+ mask); kernels use it in their compute type
  bool causal;               // column j of row i2 is masked when j > i2 + n - d2
  bool log;                  // log-softmax instead of softmax
  int64_t rows() const { return d0 * d1 * d2; }
};

struct SoftmaxBackwardArgs {
  const void* grad;          // (rows, n) with strides (grad_row_stride, 1)
  const void* out;           // contiguous (rows, n): the forward's output
  void* grad_x;              // contiguous (rows, n)
  int64_t rows, n;
  int64_t grad_row_stride;
  Dtype dtype;
  double scale;
  bool log;
};

}  // namespace fastattn
