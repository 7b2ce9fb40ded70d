// Tensor checks, output allocation and argument packing for the KV-cache op (csrc/cuda/kvcache.cpp).
// Device-neutral: nothing here runs a kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "binding.h"
#include "kvcache.h"

namespace fastattn {

// Validates the layout documented in csrc/fastattn.cpp (kvcache_forward) and packs the arguments; out and lse are
// left for kvcache_outputs. lengths must stay alive while the kernel runs (the caller keeps the tensor).
inline KvcacheArgs kvcache_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& lengths, const std::optional<at::Tensor>& alibi, double scale,
                                int64_t window_left, int64_t window_right, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, op,
              ": q, k_cache, v_cache must be 4-D (B, H, S, D), got ", q.sizes(), ", ", k_cache.sizes(), ", ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op,
              ": q, k_cache, v_cache must have one dtype, got ", q.scalar_type(), ", ", k_cache.scalar_type(), ", ",
              v_cache.scalar_type());
  TORCH_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device(), op,
              ": q, k_cache, v_cache must be on one device");
  const int64_t batch = q.size(0), heads_q = q.size(1), n = q.size(2), head_dim = q.size(3);
  const int64_t heads_kv = k_cache.size(1), seq_k = k_cache.size(2), head_dim_v = v_cache.size(3);
  TORCH_CHECK(k_cache.size(0) == batch && v_cache.size(0) == batch, op, ": q, k_cache, v_cache batch sizes differ");
  TORCH_CHECK(k_cache.size(3) == head_dim, op, ": k_cache's head dim ", k_cache.size(3), " differs from q's ",
              head_dim);
  TORCH_CHECK(v_cache.size(1) == heads_kv && v_cache.size(2) == seq_k, op,
              ": v_cache must be (B, Hkv, S, Dv) with k_cache's Hkv and S, got k_cache ", k_cache.sizes(),
              " and v_cache ", v_cache.sizes());
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, op, ": heads of q (", heads_q,
              ") must be a multiple of the heads of the caches (", heads_kv, ")");
  TORCH_CHECK(q.size(3) <= 1 || q.stride(3) == 1, op, ": q must have unit stride over the head dim");
  TORCH_CHECK(k_cache.size(3) <= 1 || k_cache.stride(3) == 1, op, ": k_cache must have unit stride over the head dim");
  TORCH_CHECK(v_cache.size(3) <= 1 || v_cache.stride(3) == 1, op, ": v_cache must have unit stride over the head dim");
  TORCH_CHECK(lengths.scalar_type() == at::kLong, op, ": lengths must be int64, got ", lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch, op, ": lengths must be (B,) = (", batch, "), got ",
              lengths.sizes());
  TORCH_CHECK(lengths.device() == q.device(), op, ": lengths must be on ", q.device());
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op, ": window bounds must be -1 (unbounded) or >= 0, got ",
              window_left, ", ", window_right);

  KvcacheArgs a{};
  a.dtype = dtype_of(q);
  a.q = q.data_ptr();
  a.k = k_cache.data_ptr();
  a.v = v_cache.data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k_cache.stride(i);
    a.v_stride[i] = v_cache.stride(i);
  }
  a.lengths = lengths.data_ptr<int64_t>();
  a.lengths_stride = lengths.stride(0);
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
  a.batch = batch;
  a.heads_q = heads_q;
  a.heads_kv = heads_kv;
  a.n_queries = n;
  a.seq_k = seq_k;
  a.head_dim = head_dim;
  a.head_dim_v = head_dim_v;
  a.scale = scale;
  a.window_left = window_left;
  a.window_right = window_right;
  a.split_size = 0;
  return a;
}

// Allocates out (B, Hq, n, Dv) in q's dtype and lse (B, Hq, n) float32, both contiguous, and points args at them.
inline void kvcache_outputs(const at::Tensor& q, const at::Tensor& v_cache, KvcacheArgs& args, at::Tensor& out,
                            at::Tensor& lse) {
  const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
  out = at::empty({q.size(0), q.size(1), q.size(2), v_cache.size(3)}, options);
  lse = at::empty({q.size(0), q.size(1), q.size(2)}, options.dtype(at::kFloat));
  args.out = out.data_ptr();
  args.lse = lse.data_ptr<float>();
}

}  // namespace fastattn
