// Tensor checks, output allocation and argument packing shared by csrc/cpu/norm.cpp and csrc/cuda/norm.cpp.
// The layouts are documented with the schemas in csrc/fastattn.cpp; the Python tier (fastattn/ops/norm.py)
// checks user input first, so these checks guard the canonical layout only.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include "binding.h"
#include "norm.h"

namespace fastattn {

inline at::ScalarType norm_stats_type(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

// A (rows, n) operand with unit stride over n; returns its row stride.
inline int64_t norm_row_stride(const at::Tensor& t, int64_t rows, int64_t n, const at::Device& device, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == n, what, " must be (", rows, ", ", n, "), got ",
              t.sizes());
  TORCH_CHECK(n <= 1 || t.stride(1) == 1, what, " must have unit stride over the normalised dim");
  TORCH_CHECK(t.device() == device, what, " must be on ", device, ", got ", t.device());
  return rows <= 1 ? n : t.stride(0);
}

// Weight or bias: contiguous (n,) in x's dtype or float32; null when absent.
inline const void* norm_affine(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t n, const char* what,
                               Dtype& dtype) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->is_contiguous(), what, " must be contiguous (", n, "), got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, what, " must be ",
              x.scalar_type(), " or float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), what, " must be on ", x.device());
  dtype = dtype_of(*t);
  return t->data_ptr();
}

inline void norm_check_dropout(double dropout_p, const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

struct NormForwardOutputs {
  at::Tensor out, residual_out, mean, rstd;
};

inline NormForwardArgs norm_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, double eps, bool rms,
                                         double dropout_p, int64_t seed,
                                         std::optional<at::ScalarType> residual_out_dtype, NormForwardOutputs& o) {
  TORCH_CHECK(x.dim() == 2, "norm_forward: x must be (R, N), got ", x.sizes());
  TORCH_CHECK(!(rms && bias.has_value()), "norm_forward: RMSNorm takes no bias");
  TORCH_CHECK(eps >= 0.0, "norm_forward: eps must be >= 0, got ", eps);
  norm_check_dropout(dropout_p, "norm_forward");
  NormForwardArgs a{};
  a.rows = x.size(0);
  a.n = x.size(1);
  a.dtype = dtype_of(x);
  a.x = x.data_ptr();
  a.x_row_stride = norm_row_stride(x, a.rows, a.n, x.device(), "norm_forward: x");
  if (residual.has_value()) {
    a.residual = residual->data_ptr();
    a.residual_row_stride = norm_row_stride(*residual, a.rows, a.n, x.device(), "norm_forward: residual");
    a.residual_dtype = dtype_of(*residual);
  }
  a.weight_dtype = a.dtype;
  a.weight = norm_affine(weight, x, a.n, "norm_forward: weight", a.weight_dtype);
  Dtype bias_dtype = a.weight_dtype;  // stays the weight's when there is no bias
  a.bias = norm_affine(bias, x, a.n, "norm_forward: bias", bias_dtype);
  TORCH_CHECK(!(weight.has_value() && bias.has_value()) || bias_dtype == a.weight_dtype,
              "norm_forward: weight and bias must have the same dtype");
  a.weight_dtype = bias_dtype;
  TORCH_CHECK(residual_out_dtype.has_value() || (!residual.has_value() && dropout_p == 0.0),
              "norm_forward: residual_out_dtype is required with a residual or dropout (z must be stored)");

  const auto contiguous = x.options().memory_format(at::MemoryFormat::Contiguous);
  const auto stats = x.options().dtype(norm_stats_type(x.scalar_type()));
  o.out = at::empty({a.rows, a.n}, contiguous);
  o.residual_out = residual_out_dtype.has_value() ? at::empty({a.rows, a.n}, contiguous.dtype(*residual_out_dtype))
                                                  : at::empty({0}, x.options());
  o.mean = at::empty({rms ? 0 : a.rows}, stats);
  o.rstd = at::empty({a.rows}, stats);
  a.out = o.out.data_ptr();
  if (residual_out_dtype.has_value()) {
    a.residual_out = o.residual_out.data_ptr();
    a.residual_out_dtype = dtype_of(o.residual_out);
  }
  a.mean = rms ? nullptr : o.mean.data_ptr();
  a.rstd = o.rstd.data_ptr();
  a.eps = eps;
  a.rms = rms;
  a.dropout = make_dropout(dropout_p, seed);
  return a;
}

struct NormBackwardOutputs {
  at::Tensor grad_x, grad_residual_in, grad_weight, grad_bias;
};

inline NormBackwardArgs norm_backward_args(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual,
                                           const at::Tensor& z, const std::optional<at::Tensor>& weight,
                                           const at::Tensor& mean, const at::Tensor& rstd, bool rms, bool has_bias,
                                           double dropout_p, int64_t seed, at::ScalarType x_dtype,
                                           std::optional<at::ScalarType> residual_dtype, NormBackwardOutputs& o) {
  TORCH_CHECK(z.dim() == 2, "norm_backward: z must be (R, N), got ", z.sizes());
  norm_check_dropout(dropout_p, "norm_backward");
  NormBackwardArgs a{};
  a.rows = z.size(0);
  a.n = z.size(1);
  a.z = z.data_ptr();
  a.z_dtype = dtype_of(z);
  a.z_row_stride = norm_row_stride(z, a.rows, a.n, z.device(), "norm_backward: z");
  TORCH_CHECK(grad_out.scalar_type() == x_dtype, "norm_backward: grad_out must be ", x_dtype);
  a.grad_out = grad_out.data_ptr();
  a.grad_out_row_stride = norm_row_stride(grad_out, a.rows, a.n, z.device(), "norm_backward: grad_out");
  if (grad_residual.has_value()) {
    TORCH_CHECK(grad_residual->scalar_type() == z.scalar_type(), "norm_backward: grad_residual must be ",
                z.scalar_type());
    a.grad_residual = grad_residual->data_ptr();
    a.grad_residual_row_stride =
        norm_row_stride(*grad_residual, a.rows, a.n, z.device(), "norm_backward: grad_residual");
  }
  const auto stats_type = norm_stats_type(x_dtype);
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == a.rows && rstd.is_contiguous() && rstd.scalar_type() == stats_type,
              "norm_backward: rstd must be contiguous (", a.rows, ") ", stats_type);
  TORCH_CHECK(rms || (mean.dim() == 1 && mean.size(0) == a.rows && mean.is_contiguous() &&
                      mean.scalar_type() == stats_type),
              "norm_backward: mean must be contiguous (", a.rows, ") ", stats_type);
  a.mean = rms ? nullptr : mean.data_ptr();
  a.rstd = rstd.data_ptr();
  a.weight_dtype = dtype_of(grad_out);  // grad_bias without a weight comes in x's dtype
  a.weight = norm_affine(weight, grad_out, a.n, "norm_backward: weight", a.weight_dtype);
  a.dtype = dtype_of(grad_out);

  const auto contiguous = z.options().memory_format(at::MemoryFormat::Contiguous);
  const auto affine = z.options().dtype(weight.has_value() ? weight->scalar_type() : x_dtype);
  o.grad_x = at::empty({a.rows, a.n}, contiguous.dtype(x_dtype));
  o.grad_residual_in = residual_dtype.has_value() ? at::empty({a.rows, a.n}, contiguous.dtype(*residual_dtype))
                                                  : at::empty({0}, contiguous.dtype(x_dtype));
  o.grad_weight = at::empty({weight.has_value() ? a.n : 0}, affine);
  o.grad_bias = at::empty({has_bias ? a.n : 0}, affine);
  a.grad_x = o.grad_x.data_ptr();
  if (residual_dtype.has_value()) {
    a.grad_residual_in = o.grad_residual_in.data_ptr();
    a.residual_dtype = dtype_of(o.grad_residual_in);
  }
  a.grad_weight = weight.has_value() ? o.grad_weight.data_ptr() : nullptr;
  a.grad_bias = has_bias ? o.grad_bias.data_ptr() : nullptr;
  a.rms = rms;
  a.dropout = make_dropout(dropout_p, seed);
  return a;
}

}  // namespace fastattn
