// LayerNorm / RMSNorm kernel arguments shared by the CPU and CUDA kernels. No torch headers: the kernel files
// that include this compile quickly; csrc/norm_binding.h fills these from tensors.
//
// Over each row r of n elements (all arithmetic in the compute type: float32, float64 for float64 inputs):
//   z     = dropout(x) + residual        (dropout and residual optional; csrc/philox.h elementwise dropout)
//   mean  = sum(z) / n                   (LayerNorm only; RMSNorm uses mean = 0)
//   rstd  = 1 / sqrt(sum((z - mean)^2) / n + eps)
//   out   = (z - mean) * rstd * weight + bias   (weight and bias optional; RMSNorm has no bias)
// Backward, with zhat = (z - mean) * rstd and g = grad_out * weight:
//   dz = rstd * (g - mean(g) - zhat * mean(g * zhat)) + grad_residual   (RMSNorm: no mean(g) term)
//   grad_x = dz * keep / (1 - p) (dz without dropout), grad_residual_in = dz,
//   grad_weight = sum over rows of grad_out * zhat, grad_bias = sum over rows of grad_out.
// Reference: fastattn/reference.py norm() and norm_backward().
#pragma once
#include <cstdint>

#include "philox.h"
#include "types.h"

namespace fastattn {

struct NormForwardArgs {
  const void* x;              // (rows, n), row stride x_row_stride, unit stride over n; dtype
  const void* residual;       // (rows, n), row stride residual_row_stride, residual_dtype; null for none
  const void* weight;         // (n,) contiguous, weight_dtype (dtype or float32); null for none
  const void* bias;           // (n,) contiguous, weight_dtype; null for none
  void* out;                  // contiguous (rows, n), dtype
  void* residual_out;         // contiguous (rows, n), residual_out_dtype: z; null when not stored
  void* mean;                 // (rows,) compute type; null for RMSNorm
  void* rstd;                 // (rows,) compute type
  int64_t rows, n;
  int64_t x_row_stride, residual_row_stride;
  Dtype dtype, residual_dtype, residual_out_dtype, weight_dtype;
  double eps;
  bool rms;
  Dropout dropout;            // of x, before the residual is added
};

struct NormBackwardArgs {
  const void* grad_out;       // (rows, n), row stride grad_out_row_stride, unit stride over n; dtype
  const void* grad_residual;  // (rows, n), row stride grad_residual_row_stride, z_dtype: the gradient of
                              // residual_out from its later uses; null for none
  const void* z;              // (rows, n), row stride z_row_stride, z_dtype: residual_out, or x when none stored
  const void* weight;         // (n,) contiguous, weight_dtype; null for none
  const void* mean;           // (rows,) compute type; null for RMSNorm
  const void* rstd;           // (rows,) compute type
  void* grad_x;               // contiguous (rows, n), dtype
  void* grad_residual_in;     // contiguous (rows, n), residual_dtype; null when there was no residual
  void* grad_weight;          // (n,), weight_dtype; null when there is no weight
  void* grad_bias;            // (n,), weight_dtype; null when there is no bias
  int64_t rows, n;
  int64_t grad_out_row_stride, grad_residual_row_stride, z_row_stride;
  Dtype dtype, z_dtype, residual_dtype, weight_dtype;
  bool rms;
  Dropout dropout;            // the forward's
};

}  // namespace fastattn
