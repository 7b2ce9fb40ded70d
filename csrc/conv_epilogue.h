// Convolution epilogue kernel arguments: out = maxpool2x2(act(y + bias[c])), the pool optional. No torch headers:
// the kernel files that include this compile quickly; csrc/conv_epilogue_binding.h fills these from tensors.
//
// Layouts. y is (n, c, h, w) in one of two layouts, and every output is contiguous in y's layout:
//   NCHW (channels_last = false): unit stride over w; a plane (n, c) is rows h with stride y_stride[2].
//   NHWC (channels_last = true):  unit stride over c and y_stride[3] == c (a row of pixels is w * c values).
// The pool takes the 2x2 windows at (2i, 2j), floor-sized (out_h = h / 2, out_w = w / 2, a last odd row or
// column is left out), and picks the first maximum in window order (0,0), (0,1), (1,0), (1,1), or the last NaN,
// as torch's max_pool2d does; the backward sends each output's gradient to that element alone.
#pragma once
#include <cstdint>

#include "types.h"

namespace fastattn {

// act(z): none, relu, GELU (exact, 0.5 z (1 + erf(z / sqrt 2))), GELU with the tanh approximation, SiLU.
enum class Activation : int { kNone, kRelu, kGelu, kGeluTanh, kSilu };

struct ConvEpilogueShape {
  int64_t n, c, h, w;
  bool pool;           // 2x2 stride-2 max pool after the activation
  bool channels_last;  // NHWC (see above), else NCHW
  int64_t out_h() const { return pool ? h / 2 : h; }
  int64_t out_w() const { return pool ? w / 2 : w; }
};

struct ConvEpilogueForwardArgs {
  const void* y;        // (n, c, h, w) with strides y_stride, in the layout of `shape`
  const void* bias;     // contiguous (c,) in the compute type (float; double for double y), or null
  void* out;            // (n, c, out_h, out_w), dtype of y, contiguous in y's layout
  ConvEpilogueShape shape;
  int64_t y_stride[4];
  Dtype dtype;
  Activation activation;
};

struct ConvEpilogueBackwardArgs {
  const void* grad;     // (n, c, out_h, out_w) with strides grad_stride: unit stride over w (NCHW) or over c with
                        // grad_stride[3] == c (NHWC)
  const void* y;        // as in the forward
  const void* bias;     // as in the forward
  void* grad_y;         // (n, c, h, w), dtype of y, contiguous in y's layout
  ConvEpilogueShape shape;
  int64_t y_stride[4];
  int64_t grad_stride[4];
  Dtype dtype;
  Activation activation;
};

}  // namespace fastattn
