// CPU rotary position embedding kernels on raw pointers (the problem and arguments: csrc/rotary.h).
//
// A task takes kRotaryTokensPerTask consecutive tokens of one batch: it computes their angles' cos and sin once
// (rows of P = rotary_dim / 2 values in the compute type: float, or double for double), then rotates those
// tokens' rows in every head of q and then of k, so the trigonometry is shared by all heads. A row's rotary part
// is staged through an L1-resident scratch row when its dtype is not the compute type (and when rotating in
// place, so that the rotation reads a copy it never writes), then rotated pair by pair; the rest of the row is
// copied when the output is a fresh tensor.
//
// Float angles use a branch-free sin/cos (sincos_of) so that the loop over a token's pairs vectorises;
// double angles use libm. The per-dtype entry points are compiled for AVX-512, AVX2 + FMA and baseline x86-64
// (target_clones).
#include "rotary_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace fastattn {
namespace {

using cpu::compute_t;
using cpu::convert_row;

// sin and cos of a float angle x, without branches so that loops over angles vectorise. x is reduced to
// r = x - k pi/2 with k = round(x 2/pi) in double (so |r| <= pi/4 up to rounding, with an absolute error far below
// a float ulp of r for |x| < 2^24); k is rounded by adding and subtracting 1.5 * 2^52 rather than by std::floor,
// which g++ does not vectorise without -fno-trapping-math. sin r and cos r come from minimax polynomials on
// [-pi/4, pi/4] (the classic Cephes sinf/cosf coefficients, about 1 ulp), and the quadrant k mod 4 swaps and
// signs them:
//     k mod 4:   0        1        2        3
//     sin x:     sin r    cos r   -sin r   -cos r
//     cos x:     cos r   -sin r   -cos r    sin r
FASTATTN_INLINE void sincos_of(float x, float& sin_x, float& cos_x) {
  constexpr double kTwoOverPi = 0.636619772367581343075535053490057448;
  constexpr double kPiOverTwo = 1.57079632679489661923132169163975144;
  constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: v + kRound - kRound rounds v to an integer
  const double k = (static_cast<double>(x) * kTwoOverPi + kRound) - kRound;
  const float r = static_cast<float>(static_cast<double>(x) - k * kPiOverTwo);
  const int32_t quadrant = static_cast<int32_t>(k) & 3;
  const float r2 = r * r;
  const float sin_r = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const float cos_r =
      1.0f - 0.5f * r2 + r2 * r2 * (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f + r2 * 2.443315711809948e-5f));
  const float s = (quadrant & 1) ? cos_r : sin_r;
  const float c = (quadrant & 1) ? sin_r : cos_r;
  sin_x = (quadrant & 2) ? -s : s;               // negative in quadrants 2 and 3
  cos_x = ((quadrant + 1) & 2) ? -c : c;         // negative in quadrants 1 and 2
}

FASTATTN_INLINE void sincos_of(double x, double& sin_x, double& cos_x) {
  sin_x = std::sin(x);
  cos_x = std::cos(x);
}

FASTATTN_INLINE int64_t position_of(const RotaryArgs& a, int64_t b, int64_t s) {
  const int64_t base = a.positions != nullptr
                           ? a.positions[b * a.positions_stride[0] + s * a.positions_stride[1]]
                           : s + (a.offsets != nullptr ? a.offsets[b] : 0);
  return base + a.offset;
}

// cos and sin rows (P values each) of the angles of token (b, s), sin negated for the inverse rotation.
template <class C>
FASTATTN_INLINE void token_angles(const RotaryArgs& a, const C* __restrict inv_freq, int64_t b, int64_t s,
                                  C* __restrict cos_row, C* __restrict sin_row) {
  const int64_t pairs = a.pairs();
  const int64_t pos = position_of(a, b, s);
  const C sign = a.inverse ? C(-1) : C(1);
  if (a.cos != nullptr) {
    if (pos < 0 || pos >= a.table_rows) {  // callers check positions; never read outside the tables
      std::fill(cos_row, cos_row + pairs, std::numeric_limits<C>::quiet_NaN());
      std::fill(sin_row, sin_row + pairs, std::numeric_limits<C>::quiet_NaN());
      return;
    }
    const C* table_cos = static_cast<const C*>(a.cos) + pos * a.cos_stride;
    const C* table_sin = static_cast<const C*>(a.sin) + pos * a.sin_stride;
    for (int64_t i = 0; i < pairs; ++i) {
      cos_row[i] = table_cos[i];
      sin_row[i] = sign * table_sin[i];
    }
    return;
  }
  const C p = static_cast<C>(pos);
  for (int64_t i = 0; i < pairs; ++i) {
    C sin_i, cos_i;
    sincos_of(p * inv_freq[i], sin_i, cos_i);
    cos_row[i] = cos_i;
    sin_row[i] = sign * sin_i;
  }
}

// y = the rotation of the rotary part x (rotary_dim = 2 * pairs values) by angles with cos c and sin s.
template <class C, bool kInterleaved>
FASTATTN_INLINE void rotate(const C* __restrict x, const C* __restrict c, const C* __restrict s, int64_t pairs,
                            C* __restrict y) {
  if constexpr (kInterleaved) {
    for (int64_t i = 0; i < pairs; ++i) {
      const C x1 = x[2 * i], x2 = x[2 * i + 1];
      y[2 * i] = x1 * c[i] - x2 * s[i];
      y[2 * i + 1] = x2 * c[i] + x1 * s[i];
    }
  } else {
    for (int64_t i = 0; i < pairs; ++i) {
      const C x1 = x[i], x2 = x[i + pairs];
      y[i] = x1 * c[i] - x2 * s[i];
      y[i + pairs] = x2 * c[i] + x1 * s[i];
    }
  }
}

// Per-thread scratch: the angles of one task's tokens and two staging rows.
template <class C>
struct Scratch {
  std::vector<C> inv_freq, cos, sin, x, y;
  explicit Scratch(const RotaryArgs& a)
      : inv_freq(a.pairs()),
        cos(kRotaryTokensPerTask * a.pairs()),
        sin(kRotaryTokensPerTask * a.pairs()),
        x(a.rotary_dim),
        y(a.rotary_dim) {
    // inv_freq[i] = exp2(-(2i / rotary_dim) * log2(base)) in double, rounded once (fastattn.reference's formula).
    for (int64_t i = 0; i < a.pairs(); ++i) {
      inv_freq[i] = static_cast<C>(std::exp2(-(static_cast<double>(2 * i) / a.rotary_dim) * a.log2_base));
    }
  }
};

// Rotates one head row of one token: in -> out (out may be in).
template <class T, bool kInterleaved>
FASTATTN_INLINE void rotate_row(const T* in, T* out, bool copy_rest, const compute_t<T>* c, const compute_t<T>* s,
                                const RotaryArgs& a, Scratch<compute_t<T>>& scratch) {
  using C = compute_t<T>;
  const int64_t rotary = a.rotary_dim;
  const C* x;
  if constexpr (std::is_same_v<T, C>) {
    if (copy_rest) {
      x = in;
    } else {  // in place: rotate a copy
      std::memcpy(scratch.x.data(), in, rotary * sizeof(C));
      x = scratch.x.data();
    }
    rotate<C, kInterleaved>(x, c, s, a.pairs(), out);
  } else {
    convert_row(in, scratch.x.data(), rotary);
    rotate<C, kInterleaved>(scratch.x.data(), c, s, a.pairs(), scratch.y.data());
    convert_row(scratch.y.data(), out, rotary);
  }
  if (copy_rest && a.head_dim > rotary) std::memcpy(out + rotary, in + rotary, (a.head_dim - rotary) * sizeof(T));
}

template <class T, bool kInterleaved>
FASTATTN_INLINE void run_tasks(const RotaryArgs& a, int64_t begin, int64_t end) {
  using C = compute_t<T>;
  Scratch<C> scratch(a);
  const int64_t pairs = a.pairs();
  const int64_t blocks_per_batch = (a.seq + kRotaryTokensPerTask - 1) / kRotaryTokensPerTask;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / blocks_per_batch;
    const int64_t s0 = task % blocks_per_batch * kRotaryTokensPerTask;
    const int64_t tokens = std::min(kRotaryTokensPerTask, a.seq - s0);
    for (int64_t j = 0; j < tokens; ++j) {
      token_angles<C>(a, scratch.inv_freq.data(), b, s0 + j, scratch.cos.data() + j * pairs,
                      scratch.sin.data() + j * pairs);
    }
    for (const RotaryTensor* t : {&a.q, &a.k}) {
      const bool copy_rest = t->copy_rest();
      for (int64_t h = 0; h < t->heads; ++h) {
        const T* in = static_cast<const T*>(t->in) + b * t->in_stride[0] + h * t->in_stride[1];
        T* out = static_cast<T*>(t->out) + b * t->out_stride[0] + h * t->out_stride[1];
        for (int64_t j = 0; j < tokens; ++j) {
          const int64_t s = s0 + j;
          rotate_row<T, kInterleaved>(in + s * t->in_stride[2], out + s * t->out_stride[2], copy_rest,
                                      scratch.cos.data() + j * pairs, scratch.sin.data() + j * pairs, a, scratch);
        }
      }
    }
  }
}

// Non-template entry points, one per dtype and layout: target_clones needs plain functions.
#define FASTATTN_DEFINE_ENTRY_POINTS(T, name)                                                            \
  FASTATTN_TARGET_CLONES void half_split_##name(const RotaryArgs& a, int64_t begin, int64_t end) {        \
    run_tasks<T, false>(a, begin, end);                                                                  \
  }                                                                                                      \
  FASTATTN_TARGET_CLONES void interleaved_##name(const RotaryArgs& a, int64_t begin, int64_t end) {       \
    run_tasks<T, true>(a, begin, end);                                                                   \
  }

FASTATTN_DEFINE_ENTRY_POINTS(c10::Half, half)
FASTATTN_DEFINE_ENTRY_POINTS(c10::BFloat16, bfloat16)
FASTATTN_DEFINE_ENTRY_POINTS(float, float)
FASTATTN_DEFINE_ENTRY_POINTS(double, double)
#undef FASTATTN_DEFINE_ENTRY_POINTS

}  // namespace

void rotary_cpu(const RotaryArgs& a, int64_t task_begin, int64_t task_end) {
  const bool il = a.interleaved;
  switch (a.dtype) {
    case Dtype::kHalf: return il ? interleaved_half(a, task_begin, task_end) : half_split_half(a, task_begin, task_end);
    case Dtype::kBFloat16:
      return il ? interleaved_bfloat16(a, task_begin, task_end) : half_split_bfloat16(a, task_begin, task_end);
    case Dtype::kFloat:
      return il ? interleaved_float(a, task_begin, task_end) : half_split_float(a, task_begin, task_end);
    case Dtype::kDouble:
      return il ? interleaved_double(a, task_begin, task_end) : half_split_double(a, task_begin, task_end);
  }
}

}  // namespace fastattn
