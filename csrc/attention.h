// Attention kernel arguments shared by the CPU and CUDA kernels. No torch headers: the kernel files that
// include this compile quickly; csrc/attention_binding.h fills these from tensors.
//
// For query i of head h (batch b), with kv head h / (heads_q / heads_kv) (GQA):
//   s_j = scale * q_i . k_j + mask[b, h, i, j] (float masks) + alibi, or -inf where a bool mask is 0, the key
//         is padding, or j lies outside the window [i + diagonal - window_left, i + diagonal + window_right]
//   alibi: -slope[b, h] * |j - i - diagonal|
//   out_i = sum_j softmax(s)_j z_ij v_j,   lse_i = log sum_j exp(s_j)   (a query that sees no key: out 0, lse -inf)
//   z_ij: 1 without dropout; with dropout p, 1 / (1 - p) where csrc/philox.h keeps element (b, h, i, j), else 0
// Reference: fastattn/reference.py attention().
#pragma once
#include <cstdint>

#include "philox.h"
#include "types.h"

namespace fastattn {

// Dropout of the attention probabilities (csrc/philox.h says which are kept).
struct AttentionDropout {
  bool on;             // p > 0
  uint32_t threshold;  // floor(p * 2^32): element dropped iff its Philox word is below it
  double scale;        // 1 / (1 - p)
  uint32_t key0, key1; // the seed's low and high 32 bits
};

struct AttentionForwardArgs {
  const void* q;              // (batch, heads_q, seq_q, head_dim), strides q_stride (unit over head_dim)
  const void* k;              // (batch, heads_kv, seq_k, head_dim), strides k_stride
  const void* v;              // (batch, heads_kv, seq_k, head_dim_v), strides v_stride
  int64_t q_stride[3], k_stride[3], v_stride[3];  // over (batch, head, seq)
  const void* mask;           // (batch, heads_q, seq_q, seq_k), strides mask_stride (0 where broadcast)
  int64_t mask_stride[4];
  MaskKind mask_kind;         // kBool: nonzero = attend; kSame / kFloat: added to the scores
  const uint8_t* key_padding; // (batch, seq_k), nonzero = padding (never attended); null for none
  int64_t key_padding_stride[2];
  const float* alibi;         // (batch, heads_q) slopes, strides alibi_stride (0 over batch); null for none
  int64_t alibi_stride[2];
  void* out;                  // contiguous (batch, heads_q, seq_q, head_dim_v), dtype of q
  void* lse;                  // contiguous (batch, heads_q, seq_q): float32 (float64 for a float64 q)
  int64_t batch, heads_q, heads_kv, seq_q, seq_k, head_dim, head_dim_v;
  Dtype dtype;
  double scale;
  int64_t diagonal;           // the key aligned with query i is i + diagonal (causal: seq_k - seq_q or 0)
  int64_t window_left;        // -1: unbounded
  int64_t window_right;       // -1: unbounded; 0 with causal masking
  AttentionDropout dropout;
};

// The gradients of the forward above (delta_i = rowsum(grad_out_i * out_i) - grad_lse_i):
//   P = exp(S - lse) (0 for a query with lse -inf), dV = (P * Z)^T dO, dP = (dO V^T) * Z, dS = P * (dP - delta),
//   dQ = scale dS K, dK = scale dS^T Q; dK and dV of a kv head sum over the query heads that share it.
struct AttentionBackwardArgs {
  AttentionForwardArgs forward;  // q, k, v, masks, sizes, scale and window; forward.out and forward.lse unused
  const void* grad_out;          // (batch, heads_q, seq_q, head_dim_v), strides grad_out_stride, unit over head_dim_v
  int64_t grad_out_stride[3];
  const void* lse;               // contiguous (batch, heads_q, seq_q), float32 (float64 for a float64 q)
  const void* delta;             // contiguous (batch, heads_q, seq_q), the same type
  void* dq;                      // contiguous (batch, heads_q, seq_q, head_dim), dtype of q
  void* dk;                      // contiguous (batch, heads_kv, seq_k, head_dim)
  void* dv;                      // contiguous (batch, heads_kv, seq_k, head_dim_v)
};

}  // namespace fastattn
