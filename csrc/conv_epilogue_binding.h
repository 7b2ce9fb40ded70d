// Tensor checks and argument packing for the conv epilogue ops (csrc/cpu/conv_epilogue.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <string_view>
#include <vector>

#include "binding.h"
#include "conv_epilogue.h"

namespace fastattn {

inline Activation activation_of(std::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, "conv_epilogue: activation must be one of none, relu, gelu, gelu_tanh, silu, got '", name, "'");
}

// NHWC when channels are the unit-stride dim (and not merely because every other dim has size 1 or w's stride
// is 1 too); the rule fastattn/ops/conv_epilogue.py's channels_last() states.
inline bool is_channels_last(const at::Tensor& y) {
  return y.size(1) > 1 && y.stride(1) == 1 && (y.size(3) == 1 || y.stride(3) != 1);
}

inline at::MemoryFormat memory_format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Checks that t (n, c, rows, cols) has the inner layout the kernels read: unit stride over cols (NCHW), or over c
// with cols' stride c (NHWC).
inline void check_inner_layout(const at::Tensor& t, bool channels_last, const char* what) {
  if (channels_last) {
    TORCH_CHECK(t.stride(1) == 1 && (t.size(3) <= 1 || t.stride(3) == t.size(1)), "conv_epilogue: ", what,
                " must be NHWC with dense rows of pixels, got strides ", t.strides());
  } else {
    TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "conv_epilogue: ", what, " must have unit stride over W, got ",
                t.strides());
  }
}

inline ConvEpilogueShape conv_epilogue_shape(const at::Tensor& y, const std::optional<at::Tensor>& bias, bool pool,
                                             const char* op) {
  TORCH_CHECK(y.dim() == 4, op, ": y must be (N, C, H, W), got ", y.sizes());
  ConvEpilogueShape s{y.size(0), y.size(1), y.size(2), y.size(3), pool, is_channels_last(y)};
  TORCH_CHECK(!pool || (s.h >= 2 && s.w >= 2), op, ": pool needs H and W >= 2, got ", y.sizes());
  check_inner_layout(y, s.channels_last, "y");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    const at::ScalarType compute = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == s.c && b.is_contiguous(), op, ": bias must be contiguous (C,) = (",
                s.c, ",), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == compute, op, ": bias must be ", compute, " for ", y.scalar_type(), " y, got ",
                b.scalar_type());
    TORCH_CHECK(b.device() == y.device(), op, ": bias must be on ", y.device());
  }
  return s;
}

inline ConvEpilogueForwardArgs conv_epilogue_forward_args(const at::Tensor& y, const std::optional<at::Tensor>& bias,
                                                          std::string_view activation, bool pool, at::Tensor& out) {
  ConvEpilogueForwardArgs a{};
  a.shape = conv_epilogue_shape(y, bias, pool, "conv_epilogue_forward");
  a.activation = activation_of(activation);
  a.dtype = dtype_of(y);
  out = at::empty({a.shape.n, a.shape.c, a.shape.out_h(), a.shape.out_w()},
                  y.options().memory_format(memory_format_of(a.shape.channels_last)));
  a.y = y.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.out = out.data_ptr();
  for (int i = 0; i < 4; ++i) a.y_stride[i] = y.stride(i);
  return a;
}

inline ConvEpilogueBackwardArgs conv_epilogue_backward_args(const at::Tensor& grad, const at::Tensor& y,
                                                            const std::optional<at::Tensor>& bias,
                                                            std::string_view activation, bool pool,
                                                            at::Tensor& grad_y) {
  ConvEpilogueBackwardArgs a{};
  a.shape = conv_epilogue_shape(y, bias, pool, "conv_epilogue_backward");
  a.activation = activation_of(activation);
  a.dtype = dtype_of(y);
  const std::vector<int64_t> out_sizes{a.shape.n, a.shape.c, a.shape.out_h(), a.shape.out_w()};
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(out_sizes), "conv_epilogue_backward: grad must be ", out_sizes,
              ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == y.scalar_type(), "conv_epilogue_backward: grad and y dtypes differ");
  TORCH_CHECK(grad.device() == y.device(), "conv_epilogue_backward: grad and y devices differ");
  check_inner_layout(grad, a.shape.channels_last, "grad");
  grad_y = at::empty(y.sizes(), y.options().memory_format(memory_format_of(a.shape.channels_last)));
  a.grad = grad.data_ptr();
  a.y = y.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.grad_y = grad_y.data_ptr();
  for (int i = 0; i < 4; ++i) {
    a.y_stride[i] = y.stride(i);
    a.grad_stride[i] = grad.stride(i);
  }
  return a;
}

}  // namespace fastattn
