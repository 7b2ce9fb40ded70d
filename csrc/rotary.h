// Rotary position embedding (RoPE) kernel arguments shared by the CPU and CUDA kernels. No torch headers:
// csrc/rotary_binding.h fills these from tensors.
//
// The problem: q (B, Hq, S, D) and k (B, Hk, S, D) (Hk = 0 when there is no k) are rotated in one call. Token
// (b, s) sits at position
//     pos = (positions ? positions[b, s] : s + (offsets ? offsets[b] : 0)) + offset
// and pair i < P = rotary_dim / 2 of each of its head rows, (x[i], x[i + P]) (half-split) or (x[2i], x[2i+1])
// (interleaved), turns by the angle theta = pos * inv_freq[i], inv_freq[i] = exp2(-(2i / rotary_dim) *
// log2(base)) (computed in double, rounded to the compute type; theta in the compute type), or takes
// cos(theta), sin(theta) from row pos of the tables:
//     x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin        (inverse: sin -> -sin, the transposed rotation)
// Features rotary_dim .. D - 1 pass through (copied when the output is not the input). A position outside
// the tables gives NaN rows (callers check positions before launching).
#pragma once
#include <cstdint>

#include "types.h"

namespace fastattn {

struct RotaryTensor {
  const void* in;          // (B, heads, S, D) with strides (in_stride[0..2], 1)
  void* out;               // (B, heads, S, D) with strides (out_stride[0..2], 1); may be `in` itself (in place)
  int64_t heads;           // 0: absent
  int64_t in_stride[3];    // over B, heads, S, in elements
  int64_t out_stride[3];
  bool copy_rest() const { return out != in; }  // out-of-place: features rotary_dim .. D - 1 are copied
};

struct RotaryArgs {
  RotaryTensor q, k;
  int64_t batch, seq, head_dim, rotary_dim;
  const int64_t* positions;  // (B, S) with strides positions_stride[0..1], or null
  int64_t positions_stride[2];
  const int64_t* offsets;    // (B,) contiguous, or null
  int64_t offset;
  const void* cos;           // (table_rows, rotary_dim / 2) in the compute type, row stride cos_stride, or null
  const void* sin;           //   (then inv_freq is not used); same shape, row stride sin_stride
  int64_t table_rows, cos_stride, sin_stride;
  double log2_base;          // log2(base) for the computed angles
  Dtype dtype;
  bool interleaved;          // pairs (2i, 2i+1) instead of (i, i + rotary_dim / 2)
  bool inverse;              // rotate by -theta (the backward)
  int64_t pairs() const { return rotary_dim / 2; }
  int64_t heads() const { return q.heads + k.heads; }
};

}  // namespace fastattn
