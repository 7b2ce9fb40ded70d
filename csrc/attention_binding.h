// Tensor checks, output allocation and argument packing for the attention ops, shared by the CPU and CUDA
// bindings (csrc/cpu/attention.cpp, csrc/cuda/attention.cpp). Device-neutral: nothing here runs a kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>

#include "attention.h"
#include "binding.h"

namespace fastattn {

// Validates the layout documented in csrc/fastattn.cpp (attention_forward) and packs the arguments; out and lse
// are left for attention_forward_outputs.
inline AttentionForwardArgs attention_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& mask,
                                                   const std::optional<at::Tensor>& key_padding,
                                                   const std::optional<at::Tensor>& alibi, double scale,
                                                   int64_t diagonal, int64_t window_left, int64_t window_right,
                                                   double dropout_p, int64_t seed, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, H, S, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k, v must be on one device");
  const int64_t batch = q.size(0), heads_q = q.size(1), seq_q = q.size(2), head_dim = q.size(3);
  const int64_t heads_kv = k.size(1), seq_k = k.size(2), head_dim_v = v.size(3);
  TORCH_CHECK(k.size(0) == batch && v.size(0) == batch, op, ": q, k, v batch sizes differ");
  TORCH_CHECK(k.size(3) == head_dim, op, ": k's head dim ", k.size(3), " differs from q's ", head_dim);
  TORCH_CHECK(v.size(1) == heads_kv && v.size(2) == seq_k, op, ": v must be (B, Hkv, Sk, Dv) with k's Hkv and Sk, ",
              "got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(heads_kv > 0 ? heads_q % heads_kv == 0 : heads_q == 0, op, ": heads of q (", heads_q,
              ") must be a multiple of the heads of k and v (", heads_kv, ")");
  TORCH_CHECK(q.size(3) <= 1 || q.stride(3) == 1, op, ": q must have unit stride over the head dim");
  TORCH_CHECK(k.size(3) <= 1 || k.stride(3) == 1, op, ": k must have unit stride over the head dim");
  TORCH_CHECK(v.size(3) <= 1 || v.stride(3) == 1, op, ": v must have unit stride over the head dim");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op, ": window bounds must be -1 (unbounded) or >= 0, got ",
              window_left, ", ", window_right);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  // Philox counters are 32-bit words (csrc/philox.h).
  TORCH_CHECK(dropout_p == 0.0 || (seq_q <= UINT32_MAX && seq_k <= UINT32_MAX && batch * heads_q <= UINT32_MAX), op,
              ": dropout indexes (batch * heads, seq_q, seq_k) in 32 bits each, got ", batch * heads_q, ", ", seq_q,
              ", ", seq_k);

  AttentionForwardArgs a{};
  a.dtype = dtype_of(q);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k.stride(i);
    a.v_stride[i] = v.stride(i);
  }
  a.batch = batch;
  a.heads_q = heads_q;
  a.heads_kv = heads_kv;
  a.seq_q = seq_q;
  a.seq_k = seq_k;
  a.head_dim = head_dim;
  a.head_dim_v = head_dim_v;

  a.mask = nullptr;
  a.mask_kind = MaskKind::kNone;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == batch && m.size(1) == heads_q && m.size(2) == seq_q &&
                    m.size(3) == seq_k,
                op, ": mask must be (B, Hq, Sq, Sk) = (", batch, ", ", heads_q, ", ", seq_q, ", ", seq_k,
                ") (expand it to broadcast), got ", m.sizes());
    TORCH_CHECK(m.device() == q.device(), op, ": mask must be on ", q.device());
    a.mask_kind = mask_kind_of(m, q.scalar_type(), op);
    a.mask = m.data_ptr();
    for (int i = 0; i < 4; ++i) a.mask_stride[i] = m.stride(i);
  }
  a.key_padding = nullptr;
  if (key_padding.has_value()) {
    const at::Tensor& p = *key_padding;
    TORCH_CHECK(p.scalar_type() == at::kBool, op, ": key_padding must be bool, got ", p.scalar_type());
    TORCH_CHECK(p.dim() == 2 && p.size(0) == batch && p.size(1) == seq_k, op, ": key_padding must be (B, Sk) = (",
                batch, ", ", seq_k, "), got ", p.sizes());
    TORCH_CHECK(p.device() == q.device(), op, ": key_padding must be on ", q.device());
    a.key_padding = static_cast<const uint8_t*>(p.data_ptr());
    for (int i = 0; i < 2; ++i) a.key_padding_stride[i] = p.stride(i);
  }
  a.alibi = nullptr;
  if (alibi.has_value()) {
    const at::Tensor& s = *alibi;
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": alibi slopes must be float32, got ", s.scalar_type());
    TORCH_CHECK(s.dim() == 2 && s.size(0) == batch && s.size(1) == heads_q, op, ": alibi slopes must be (B, Hq) = (",
                batch, ", ", heads_q, ") (expand them to broadcast), got ", s.sizes());
    TORCH_CHECK(s.device() == q.device(), op, ": alibi slopes must be on ", q.device());
    a.alibi = s.data_ptr<float>();
    for (int i = 0; i < 2; ++i) a.alibi_stride[i] = s.stride(i);
  }
  a.scale = scale;
  a.diagonal = diagonal;
  a.window_left = window_left;
  a.window_right = window_right;
  a.dropout.on = dropout_p > 0.0;
  if (a.dropout.on) {
    a.dropout.threshold = static_cast<uint32_t>(std::ldexp(dropout_p, 32));  // exact, then floored
    a.dropout.scale = 1.0 / (1.0 - dropout_p);
    a.dropout.key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
    a.dropout.key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  }
  return a;
}

// Allocates the forward's outputs for q (B, Hq, Sq, D) and v (..., Dv): out (B, Hq, Sq, Dv) in q's dtype and lse
// (B, Hq, Sq) in float32 (float64 for float64 q), both contiguous, and points args at them.
inline void attention_forward_outputs(const at::Tensor& q, const at::Tensor& v, AttentionForwardArgs& args,
                                      at::Tensor& out, at::Tensor& lse) {
  const at::ScalarType lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
  out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, options);
  lse = at::empty({q.size(0), q.size(1), q.size(2)}, options.dtype(lse_type));
  args.out = out.data_ptr();
  args.lse = lse.data_ptr();
}

// Validates the arguments of attention_backward (csrc/fastattn.cpp), allocates dq, dk, dv contiguous in q's
// dtype and packs the arguments. lse and delta must be contiguous (the caller makes them so and keeps them).
inline AttentionBackwardArgs attention_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                                                     const at::Tensor& delta, const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& key_padding,
                                                     const std::optional<at::Tensor>& alibi, double scale,
                                                     int64_t diagonal, int64_t window_left, int64_t window_right,
                                                     double dropout_p, int64_t seed, at::Tensor& dq, at::Tensor& dk,
                                                     at::Tensor& dv) {
  constexpr const char* op = "attention_backward";
  AttentionBackwardArgs a{};
  a.forward = attention_forward_args(q, k, v, mask, key_padding, alibi, scale, diagonal, window_left, window_right,
                                     dropout_p, seed, op);
  const int64_t batch = q.size(0), heads_q = q.size(1), seq_q = q.size(2);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == batch && grad_out.size(1) == heads_q &&
                  grad_out.size(2) == seq_q && grad_out.size(3) == v.size(3),
              op, ": grad_out must be (B, Hq, Sq, Dv) = (", batch, ", ", heads_q, ", ", seq_q, ", ", v.size(3),
              "), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), op, ": grad_out must have q's dtype ", q.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == q.device(), op, ": grad_out must be on ", q.device());
  TORCH_CHECK(grad_out.size(3) <= 1 || grad_out.stride(3) == 1, op,
              ": grad_out must have unit stride over the head dim");
  const at::ScalarType stat_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&lse, &delta}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == heads_q && t->size(2) == seq_q, op,
                ": lse and delta must be (B, Hq, Sq) = (", batch, ", ", heads_q, ", ", seq_q, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == stat_type, op, ": lse and delta must be ", stat_type, ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": lse and delta must be on ", q.device());
    TORCH_CHECK(t->is_contiguous(), op, ": lse and delta must be contiguous");
  }
  const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
  dq = at::empty(q.sizes(), options);
  dk = at::empty(k.sizes(), options);
  dv = at::empty(v.sizes(), options);
  a.grad_out = grad_out.data_ptr();
  for (int i = 0; i < 3; ++i) a.grad_out_stride[i] = grad_out.stride(i);
  a.lse = lse.data_ptr();
  a.delta = delta.data_ptr();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  return a;
}

}  // namespace fastattn
