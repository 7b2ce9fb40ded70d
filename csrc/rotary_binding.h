// Tensor checks and argument packing shared by csrc/cpu/rotary.cpp and csrc/cuda/rotary.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cmath>

#include "binding.h"
#include "rotary.h"

namespace fastattn {

namespace rotary_detail {

inline RotaryTensor pack(const at::Tensor& in, const at::Tensor& out, const at::Tensor& q, const char* name) {
  TORCH_CHECK(in.dim() == 4, "rotary: ", name, " must be (B, H, S, D), got ", in.sizes());
  TORCH_CHECK(in.size(0) == q.size(0) && in.size(2) == q.size(2) && in.size(3) == q.size(3), "rotary: ", name,
              " must match q in batch, seq and head_dim: ", in.sizes(), " vs q ", q.sizes());
  TORCH_CHECK(in.scalar_type() == q.scalar_type() && in.device() == q.device(), "rotary: ", name,
              " must have q's dtype and device");
  TORCH_CHECK(in.size(3) <= 1 || in.stride(3) == 1, "rotary: ", name, " must have unit stride over head_dim");
  TORCH_CHECK(out.sizes() == in.sizes() && out.scalar_type() == in.scalar_type() && out.device() == in.device(),
              "rotary: the output of ", name, " must have its shape, dtype and device");
  TORCH_CHECK(out.size(3) <= 1 || out.stride(3) == 1, "rotary: the output of ", name,
              " must have unit stride over head_dim");
  const bool same = out.data_ptr() == in.data_ptr();
  TORCH_CHECK(!same || out.strides() == in.strides(), "rotary: an in-place output of ", name,
              " must be the input itself");
  RotaryTensor t{};
  t.in = in.data_ptr();
  t.out = out.data_ptr();
  t.heads = in.size(1);
  for (int i = 0; i < 3; ++i) {
    t.in_stride[i] = in.stride(i);
    t.out_stride[i] = out.stride(i);
  }
  return t;
}

inline at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace rotary_detail

// Validates the layout documented in csrc/fastattn.cpp (rotary) and packs it; q_out / k_out are written by the
// kernel (either fresh tensors or q / k themselves for in place).
inline RotaryArgs rotary_args(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& q_out,
                              const std::optional<at::Tensor>& k_out, const std::optional<at::Tensor>& positions,
                              const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& cos,
                              const std::optional<at::Tensor>& sin, int64_t offset, int64_t rotary_dim,
                              bool interleaved, double base, bool inverse) {
  using rotary_detail::pack;
  RotaryArgs a{};
  a.dtype = dtype_of(q);
  a.q = pack(q, q_out, q, "q");
  TORCH_CHECK(k.has_value() == k_out.has_value(), "rotary: pass k and k_out together");
  if (k.has_value()) a.k = pack(*k, *k_out, q, "k");
  a.batch = q.size(0);
  a.seq = q.size(2);
  a.head_dim = q.size(3);
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= a.head_dim,
              "rotary: rotary_dim must be even and in [2, head_dim = ", a.head_dim, "], got ", rotary_dim);
  a.rotary_dim = rotary_dim;
  if (positions.has_value()) {
    const at::Tensor& p = *positions;
    TORCH_CHECK(p.scalar_type() == at::kLong && p.device() == q.device(), "rotary: positions must be int64 on ",
                q.device());
    TORCH_CHECK(p.dim() == 2 && p.size(0) == a.batch && p.size(1) == a.seq, "rotary: positions must be (B, S) = (",
                a.batch, ", ", a.seq, "), got ", p.sizes());
    a.positions = p.data_ptr<int64_t>();
    a.positions_stride[0] = p.stride(0);
    a.positions_stride[1] = p.stride(1);
  }
  if (offsets.has_value()) {
    const at::Tensor& o = *offsets;
    TORCH_CHECK(o.scalar_type() == at::kLong && o.device() == q.device() && o.dim() == 1 && o.size(0) == a.batch &&
                    (a.batch <= 1 || o.stride(0) == 1),
                "rotary: offsets must be a contiguous (B,) int64 tensor on ", q.device());
    a.offsets = o.data_ptr<int64_t>();
  }
  a.offset = offset;
  TORCH_CHECK(cos.has_value() == sin.has_value(), "rotary: pass cos and sin together");
  if (cos.has_value()) {
    const at::ScalarType ct = rotary_detail::compute_type(q.scalar_type());
    for (const at::Tensor* t : {&*cos, &*sin}) {
      TORCH_CHECK(t->dim() == 2 && t->size(1) == rotary_dim / 2, "rotary: cos and sin must be (positions, ",
                  rotary_dim / 2, "), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == ct && t->device() == q.device(), "rotary: cos and sin must be ", ct, " on ",
                  q.device());
      TORCH_CHECK(t->size(1) <= 1 || t->stride(1) == 1, "rotary: cos and sin must have unit stride over pairs");
    }
    TORCH_CHECK(cos->size(0) == sin->size(0), "rotary: cos and sin must have the same number of positions");
    a.cos = cos->data_ptr();
    a.sin = sin->data_ptr();
    a.table_rows = cos->size(0);
    a.cos_stride = cos->stride(0);
    a.sin_stride = sin->stride(0);
  }
  TORCH_CHECK(base > 0, "rotary: base must be positive, got ", base);
  a.log2_base = std::log2(base);
  a.interleaved = interleaved;
  a.inverse = inverse;
  return a;
}

}  // namespace fastattn
