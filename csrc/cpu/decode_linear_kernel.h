// The few-row float32 linear of a decoding step, y (M, N) = x (M, K) W^T (+ bias) with W (N, K) read in place
// (unit stride over K), as dot products over K: each weight row is read once per call and nothing is packed, so
// a call costs about one pass over W at cache bandwidth (ATen's mm runs such products at a fraction of it). No
// torch headers: csrc/cpu/decode_linear.cpp binds it to tensors and splits the columns over threads.
#pragma once
#include <cstdint>

namespace fastattn {
namespace cpu {

constexpr int64_t kDecodeLinearMaxRows = 16;

// Columns [col_begin, col_end) of y = x W^T (+ bias). x: m <= kDecodeLinearMaxRows rows of k floats, row stride ldx;
// w: rows of k floats, row stride ldw; bias: null or one float per column; y: row stride ldy.
void decode_linear(const float* x, int64_t ldx, int64_t m, const float* w, int64_t ldw, int64_t k, const float* bias,
                   float* y, int64_t ldy, int64_t col_begin, int64_t col_end);

}  // namespace cpu
}  // namespace fastattn
