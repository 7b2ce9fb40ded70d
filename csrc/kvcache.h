// KV-cache decoding attention arguments (the CUDA split-KV kernel, csrc/cuda/kvcache_kernel.cu). No torch headers:
// csrc/kvcache_binding.h fills these from tensors.
//
// A few new queries per sequence against a cache that holds lengths[b] valid keys. For query i (of n) of query
// head h, batch b, with kv head h / (heads_q / heads_kv) (GQA):
//   pos  = lengths[b] - n + i                        (the query's position in its sequence)
//   key j is seen iff j < lengths[b] (and j < seq_k), and (window_left < 0 or j - pos >= -window_left)
//                     and (window_right < 0 or j - pos <= window_right)      (causal: window_right = 0)
//   s_j  = scale * q_i . k_j  - slope[b, h] * |j - pos|   (the ALiBi term only with slopes)
//   out_i = sum_j softmax(s)_j v_j,   lse_i = log sum_j exp(s_j)   (natural log)
// A query that sees no key gets out 0 and lse -inf, never NaN. Reference: fastattn/reference.py
// attention_kvcache() / kvcache_scores_bias(); the Triton twin: fastattn/triton_kernels/kvcache.py.
#pragma once
#include <cstdint>

#include "types.h"

namespace fastattn {

struct KvcacheArgs {
  const void* q;            // (batch, heads_q, n_queries, head_dim), strides q_stride, unit over head_dim
  const void* k;            // (batch, heads_kv, seq_k, head_dim), strides k_stride, unit over head_dim
  const void* v;            // (batch, heads_kv, seq_k, head_dim_v), strides v_stride, unit over head_dim_v
  int64_t q_stride[3], k_stride[3], v_stride[3];  // over (batch, head, seq), in elements
  const int64_t* lengths;   // (batch,) valid keys per sequence, on the kernel's device; stride lengths_stride
  int64_t lengths_stride;
  const float* alibi;       // (batch, heads_q) slopes, strides alibi_stride (0 where broadcast); null for none
  int64_t alibi_stride[2];
  void* out;                // contiguous (batch, heads_q, n_queries, head_dim_v), dtype of q
  float* lse;               // contiguous (batch, heads_q, n_queries), float32
  int64_t batch, heads_q, heads_kv, n_queries, seq_k, head_dim, head_dim_v;  // seq_k: the caches' capacity S
  Dtype dtype;              // kHalf, kBFloat16 or kFloat (q, k and v share it)
  double scale;
  int64_t window_left;      // -1: unbounded
  int64_t window_right;     // -1: unbounded; 0: causal
  int64_t split_size;       // keys per split; 0: the launcher plans it (about two blocks per multiprocessor)
};

}  // namespace fastattn
