// csrc/cpu/decode_linear_kernel.h: tiles of a few rows of x by a few rows of W, eight outputs each, every output a
// sum of eight lanes kept in a register over all of K; the eight are then summed across lanes together.
#include "decode_linear_kernel.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vec_math.h"

namespace fastattn {
namespace cpu {
namespace {

typedef int32_t Lanes8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
constexpr int kSums = 8;  // outputs a tile accumulates: 8 registers, summed across lanes together
constexpr int kRowBlock = 4;  // rows of x a tile takes at most
constexpr int64_t kColumnChunk = 32;  // columns whose weight rows stay in cache while every row block reads them

// The first n < 8 floats at p, zeros after.
FASTATTN_INLINE Float8 load_first(const float* p, int64_t n) {
  Float8 v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

// Lane j of the result: the sum of v[j]'s lanes. Three rounds, each adding two shuffles of pairs of vectors, halve
// the lanes per sum (in-lane shuffles for the first two, one 128-bit swap for the last).
FASTATTN_INLINE Float8 lane_sums(const Float8 (&v)[kSums]) {
  const Lanes8 even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
  const Lanes8 low_pairs = {0, 1, 8, 9, 4, 5, 12, 13}, high_pairs = {2, 3, 10, 11, 6, 7, 14, 15};
  const Lanes8 low_half = {0, 1, 2, 3, 8, 9, 10, 11}, high_half = {4, 5, 6, 7, 12, 13, 14, 15};
  Float8 twos[4], fours[2];
  for (int p = 0; p < 4; ++p) {
    twos[p] = __builtin_shuffle(v[2 * p], v[2 * p + 1], even) + __builtin_shuffle(v[2 * p], v[2 * p + 1], odd);
  }
  for (int p = 0; p < 2; ++p) {
    fours[p] = __builtin_shuffle(twos[2 * p], twos[2 * p + 1], low_pairs) +
               __builtin_shuffle(twos[2 * p], twos[2 * p + 1], high_pairs);
  }
  return __builtin_shuffle(fours[0], fours[1], low_half) + __builtin_shuffle(fours[0], fours[1], high_half);
}

// y[i, j] for i < kRows, j < kCols (kRows * kCols <= kSums) from rows i of x and rows j of w: sum (i, j) gathers in
// register i * kCols + j over K (the last k % 8 terms in a zero-padded vector), then all are summed across lanes.
template <int kRows, int kCols>
FASTATTN_INLINE void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, const float* bias,
                          float* y, int64_t ldy) {
  static_assert(kRows * kCols <= kSums, "a tile has kSums accumulators");
  Float8 acc[kSums] = {};
  const auto add = [&](auto load_at) FASTATTN_INLINE_LAMBDA {
    Float8 xv[kRows];
    for (int i = 0; i < kRows; ++i) xv[i] = load_at(x + i * ldx);
    for (int j = 0; j < kCols; ++j) {
      const Float8 wv = load_at(w + j * ldw);
      for (int i = 0; i < kRows; ++i) acc[i * kCols + j] += xv[i] * wv;
    }
  };
  int64_t kk = 0;
  for (; kk + kLanes <= k; kk += kLanes) {
    add([kk](const float* p) FASTATTN_INLINE_LAMBDA { return load_float8(p + kk); });
  }
  if (kk < k) {
    const int64_t rest = k - kk;
    add([kk, rest](const float* p) FASTATTN_INLINE_LAMBDA { return load_first(p + kk, rest); });
  }
  const Float8 sums = lane_sums(acc);
  for (int i = 0; i < kRows; ++i) {
    for (int j = 0; j < kCols; ++j) {
      y[i * ldy + j] = bias == nullptr ? sums[i * kCols + j] : sums[i * kCols + j] + bias[j];
    }
  }
}

// Columns [c0, c1) of kRows rows: kSums / kRows columns a tile, then one at a time.
template <int kRows>
FASTATTN_INLINE void columns(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, const float* bias,
                             float* y, int64_t ldy, int64_t c0, int64_t c1) {
  constexpr int kCols = kSums / kRows;
  int64_t j = c0;
  for (; j + kCols <= c1; j += kCols) {
    tile<kRows, kCols>(x, ldx, w + j * ldw, ldw, k, bias == nullptr ? nullptr : bias + j, y + j, ldy);
  }
  for (; j < c1; ++j) tile<kRows, 1>(x, ldx, w + j * ldw, ldw, k, bias == nullptr ? nullptr : bias + j, y + j, ldy);
}

}  // namespace

FASTATTN_TARGET_CLONES void decode_linear(const float* x, int64_t ldx, int64_t m, const float* w, int64_t ldw,
                                          int64_t k, const float* bias, float* y, int64_t ldy, int64_t col_begin,
                                          int64_t col_end) {
  for (int64_t c0 = col_begin; c0 < col_end; c0 += kColumnChunk) {
    const int64_t c1 = std::min(col_end, c0 + kColumnChunk);
    for (int64_t row = 0; row < m; row += kRowBlock) {
      const float* xr = x + row * ldx;
      float* yr = y + row * ldy;
      switch (std::min<int64_t>(kRowBlock, m - row)) {
        case 1: columns<1>(xr, ldx, w, ldw, k, bias, yr, ldy, c0, c1); break;
        case 2: columns<2>(xr, ldx, w, ldw, k, bias, yr, ldy, c0, c1); break;
        case 3: columns<3>(xr, ldx, w, ldw, k, bias, yr, ldy, c0, c1); break;
        default: columns<4>(xr, ldx, w, ldw, k, bias, yr, ldy, c0, c1); break;
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastattn
