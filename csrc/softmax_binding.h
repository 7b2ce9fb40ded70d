// Tensor checks and argument packing shared by csrc/cpu/softmax.cpp and csrc/cuda/softmax.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "binding.h"
#include "softmax.h"

namespace fastattn {

// Validates the canonical layout documented in csrc/fastattn.cpp and allocates the output.
inline SoftmaxForwardArgs softmax_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                               double scale, bool causal, bool log, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 4, "softmax_forward: x must be (D0, D1, D2, N), got ", x.sizes());
  TORCH_CHECK(x.size(3) <= 1 || x.stride(3) == 1, "softmax_forward: x must have unit stride over N");
  SoftmaxForwardArgs a{};
  a.dtype = dtype_of(x);
  out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  a.x = x.data_ptr();
  a.out = out.data_ptr();
  a.d0 = x.size(0); a.d1 = x.size(1); a.d2 = x.size(2); a.n = x.size(3);
  for (int i = 0; i < 3; ++i) a.x_stride[i] = x.stride(i);
  a.mask = nullptr;
  a.mask_kind = MaskKind::kNone;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.sizes() == x.sizes(), "softmax_forward: mask must have the shape of x, got ", m.sizes());
    TORCH_CHECK(m.device() == x.device(), "softmax_forward: mask must be on ", x.device());
    a.mask_kind = mask_kind_of(m, x.scalar_type(), "softmax_forward");
    a.mask = m.data_ptr();
    for (int i = 0; i < 4; ++i) a.mask_stride[i] = m.stride(i);
  }
  a.scale = scale;
  a.causal = causal;
  a.log = log;
  return a;
}

inline SoftmaxBackwardArgs softmax_backward_args(const at::Tensor& grad, const at::Tensor& out, double scale,
                                                 bool log, at::Tensor& grad_x) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "softmax_backward: out must be contiguous (R, N)");
  TORCH_CHECK(grad.sizes() == out.sizes(), "softmax_backward: grad must have the shape of out");
  TORCH_CHECK(grad.scalar_type() == out.scalar_type(), "softmax_backward: grad and out dtypes differ");
  TORCH_CHECK(grad.device() == out.device(), "softmax_backward: grad and out devices differ");
  TORCH_CHECK(grad.size(1) <= 1 || grad.stride(1) == 1, "softmax_backward: grad must have unit stride over N");
  SoftmaxBackwardArgs a{};
  grad_x = at::empty_like(out);
  a.grad = grad.data_ptr();
  a.out = out.data_ptr();
  a.grad_x = grad_x.data_ptr();
  a.rows = out.size(0);
  a.n = out.size(1);
  a.grad_row_stride = grad.stride(0);
  a.dtype = dtype_of(out);
  a.scale = scale;
  a.log = log;
  return a;
}

}  // namespace fastattn
