// Tensor-to-argument helpers shared by the <op>_binding.h headers.
#pragma once
#include <ATen/core/Tensor.h>

#include "types.h"

namespace fastattn {

inline Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kFloat: return Dtype::kFloat;
    case at::kDouble: return Dtype::kDouble;
    default: TORCH_CHECK(false, "fastattn: unsupported dtype ", t.scalar_type());
  }
}

// How `mask` is stored relative to the input of dtype `input`: bool, the input's dtype, or float32.
inline MaskKind mask_kind_of(const at::Tensor& mask, at::ScalarType input, const char* op) {
  if (mask.scalar_type() == at::kBool) return MaskKind::kBool;
  if (mask.scalar_type() == input) return MaskKind::kSame;
  if (mask.scalar_type() == at::kFloat) return MaskKind::kFloat;
  TORCH_CHECK(false, op, ": mask must be bool, ", input, " or float32, got ", mask.scalar_type());
}

}  // namespace fastattn
