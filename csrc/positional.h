// Positional-encoding kernel arguments and the sinusoid maths shared by the CPU and CUDA kernels. No torch
// headers: the kernel files that include this compile quickly; csrc/positional_binding.h fills these from tensors.
//
// positional_add, over x viewed as (batch, seq, dim) (the binding swaps the strides of a seq-first x):
//   out[b, s, c] = dropout(x[b, s, c] * scale + PE[pos(b, s), c])      pos(b, s) = offset + offsets[b] + s
// where PE is
//   kSinusoid: PE[p, 2i] = sin(p * base^(-2i/dim)), PE[p, 2i + 1] = cos(p * base^(-2i/dim)), computed in the kernel;
//   kTable:    PE[p, c] = table[p, c] (a learned position embedding, gathered);
//   kNone:     0 (out = dropout(x * scale): the backward of every kind, with the forward's scale and seed).
// Dropout is elementwise (csrc/philox.h) over the rows of the output in its own memory order: element (b, s, c)
// is row b * row_stride_b + s * row_stride_s, column c.
//
// embedding_forward:  out[b, s, :] = dropout(token_weight[tokens[b, s]] * token_scale + position_weight[pos(b, s)])
// with pos(b, s) = positions[b, s] when given, else offset + offsets[b] + s; dropout row b * seq + s.
// embedding_scatter (the backward of both gathers): out[v, :] = scale * sum over n with index[n] = v of grad[n, :],
// and out[skip_row, :] = 0 (nn.Embedding's padding_idx).
//
// Sinusoid in float (half, bfloat16 and float outputs), exact to about one float rounding at any position:
//   g_i = base^(-2i/dim) / (2 pi)              turns per position, in double
//   t4  = 4 * pos * g_i                        the angle in quarter turns, in double
//   q   = round(t4),  r = (t4 - q) * pi / 2    t4 - q is exact; |r| <= pi / 4, rounded to float
//   sin(angle) = sin(q pi/2 + r) = (sin r, cos r, -sin r, -cos r)[q mod 4]; cos(angle) uses q + 1
// with sin r and cos r from their Taylor series (truncation below 3e-9 relative for |r| <= pi / 4). The
// reduction in double keeps the angle exact where a float product pos * f would lose it (torch's fp32 table is
// off by 7e-3 at position 1e5). Float64 outputs take sin(pos * f_i) and cos(pos * f_i) in double.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "philox.h"
#include "types.h"

#if defined(__CUDACC__)
#define FASTATTN_PE_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FASTATTN_PE_INLINE inline __attribute__((always_inline))
#else
#define FASTATTN_PE_INLINE inline
#endif

namespace fastattn {

// What positional_add adds to x * scale.
enum class PeKind : int { kNone, kSinusoid, kTable };

struct PositionalAddArgs {
  const void* x;            // (batch, seq, dim) with strides (x_stride_b, x_stride_s, 1)
  void* out;                // (batch, seq, dim) with strides (out_stride_b, out_stride_s, 1), x's dtype
  const void* table;        // kTable: (table_rows, dim) with strides (table_stride, 1), x's dtype; else null
  const int64_t* offsets;   // (batch,) per-sequence position offsets, or null
  int64_t batch, seq, dim;
  int64_t x_stride_b, x_stride_s;
  int64_t out_stride_b, out_stride_s;
  int64_t row_stride_b, row_stride_s;  // the dropout row of (b, s)
  int64_t table_rows, table_stride;
  int64_t offset;           // added to every position
  Dtype dtype;
  PeKind pe;
  double scale;             // multiplies x
  double base;              // kSinusoid: the wavelength base (10000 in "Attention is all you need")
  Dropout dropout;
  FASTATTN_PE_INLINE int64_t rows() const { return batch * seq; }
};

struct EmbeddingForwardArgs {
  const int64_t* tokens;          // (batch, seq) contiguous, each in [0, vocab)
  const int64_t* positions;       // (batch, seq) contiguous, each in [0, max_positions), or null
  const int64_t* offsets;         // (batch,), or null; used when positions is null
  const void* token_weight;       // (vocab, dim) with strides (token_stride, 1)
  const void* position_weight;    // (max_positions, dim) with strides (position_stride, 1), token_weight's dtype
  void* out;                      // contiguous (batch, seq, dim)
  int64_t batch, seq, dim;
  int64_t vocab, max_positions;
  int64_t token_stride, position_stride;
  int64_t offset;
  Dtype dtype;
  double token_scale;
  Dropout dropout;
  FASTATTN_PE_INLINE int64_t rows() const { return batch * seq; }
};

struct EmbeddingScatterArgs {
  const void* grad;       // (n, dim) with strides (grad_stride, 1)
  const int64_t* index;   // (n,) contiguous, each in [0, num_rows)
  void* out;              // contiguous (num_rows, dim), grad's dtype
  int64_t n, dim, num_rows;
  int64_t grad_stride;
  int64_t skip_row;       // a row that gets no gradient (padding_idx), or -1
  Dtype dtype;
  double scale;
};

namespace pe {

constexpr double kInvTwoPi = 0.15915494309189533577;  // 1 / (2 pi)
constexpr double kHalfPi = 1.57079632679489661923;

// The frequency of column pair i: base^(-2i/dim) radians per position.
FASTATTN_PE_INLINE double frequency(int64_t i, int64_t dim, double base) {
  return pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
}

// sin r and cos r for |r| <= pi / 4 in float: Taylor series to r^9 and r^10, in Horner form.
FASTATTN_PE_INLINE float sin_small(float r) {
  const float r2 = r * r;
  return r + r * r2 * (-1.66666667e-1f + r2 * (8.33333333e-3f + r2 * (-1.98412698e-4f + r2 * 2.75573192e-6f)));
}
FASTATTN_PE_INLINE float cos_small(float r) {
  const float r2 = r * r;
  return 1.0f + r2 * (-0.5f + r2 * (4.16666667e-2f + r2 * (-1.38888889e-3f + r2 * (2.48015873e-5f +
                                                                                 r2 * -2.75573192e-7f))));
}

// The bits of a double.
FASTATTN_PE_INLINE uint64_t double_bits(double v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
#endif
}

// Reduces pos * turns (turns = frequency / (2 pi)) to the nearest quarter turn: returns r in [-pi/4, pi/4] and
// sets quadrant to that quarter turn mod 4, so that sin(angle) = sin(quadrant * pi / 2 + r). Rounding adds and
// subtracts 1.5 * 2^52, whose low mantissa bits then hold round(t4) (two's complement), so that q mod 4 is two
// bits; branch-free, so that the CPU loop vectorises. Exact while |t4| < 2^51 (positions below about 10^15).
FASTATTN_PE_INLINE float reduce_quarter_turns(double pos, double turns, int& quadrant) {
  constexpr double kRoundShift = 6755399441055744.0;  // 1.5 * 2^52
  const double t4 = 4.0 * (pos * turns);
  const double shifted = t4 + kRoundShift;
  const double q = shifted - kRoundShift;
  quadrant = static_cast<int>(double_bits(shifted) & 3u);
  return static_cast<float>((t4 - q) * kHalfPi);
}

// sin(quadrant * pi / 2 + r) from sin r and cos r; quadrant may be 0 .. 4.
FASTATTN_PE_INLINE float select_quadrant(float s, float c, int quadrant) {
  const float v = (quadrant & 1) ? c : s;
  return (quadrant & 2) ? -v : v;
}

}  // namespace pe
}  // namespace fastattn
