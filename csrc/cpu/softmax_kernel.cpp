// CPU softmax kernels on raw pointers (arguments: csrc/softmax.h).
//
// Forward, per row of n values, in the compute type C (float for half/bfloat16/float, double for double):
//   z_j = x_j * scale, then + mask_j (float masks) or -inf where a bool mask is 0 or causal masks column j
//   m = max_j z_j,  s = sum_j exp(z_j - m)
//   softmax: y_j = exp(z_j - m) / s            log-softmax: y_j = (z_j - m) - log(s)
// in three passes over a per-thread scratch row of z that stays in L1 (1: z and m; 2: exp and s; 3: y).
// A row whose z are all -inf gives y = 0 (log-softmax: -inf); a NaN or +inf z makes the whole row NaN, as
// in torch.softmax.
//
// Backward, per row, with g the incoming gradient and y the forward's output:
//   softmax:     dx_j = scale * y_j * (g_j - sum_k g_k y_k)
//   log-softmax: dx_j = scale * (g_j - exp(y_j) * sum_k g_k), and dx_j = 0 where y_j = -inf.
//
// Speed comes from loops that g++ -O3 vectorises without -ffast-math: reductions keep kLanes independent
// partial results (no reassociation needed), exp is a branch-free polynomial (exp_of), and the half/bfloat16
// conversions are c10's branch-free bit manipulations. The per-dtype entry points are compiled for AVX-512,
// AVX2 + FMA and baseline x86-64 (target_clones); the loader picks the best one this CPU supports.
#include "softmax_kernel.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__)
// Helpers are forced inline so that each target clone of an entry point compiles its own copy of them.
#define FASTATTN_INLINE inline __attribute__((always_inline))
#define FASTATTN_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FASTATTN_INLINE inline
#define FASTATTN_INLINE_LAMBDA
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTATTN_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTATTN_TARGET_CLONES
#endif

namespace fastattn {
namespace {

template <class T> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };
template <class T> using compute_t = typename ComputeType<T>::type;

template <class To, class From>
FASTATTN_INLINE To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// e^x in float without branches, so that loops calling it vectorise. Write x = k ln2 + r with k an integer and
// |r| <= ln2 / 2; then e^x = 2^k e^r, with e^r = 1 + r + r^2 q(r) and q a degree-4 polynomial fitted for
// minimax relative error (3.8e-9 with float coefficients, so about 1 ulp after rounding). e^-inf is exactly 0,
// NaN stays NaN, results below FLT_MIN flush to 0 and x above 88.37 gives +inf (the kernels only pass x <= 0).
FASTATTN_INLINE float exp_of(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;      // ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 9 bits, so k * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kShift = 12582912.0f;       // 1.5 * 2^23: v + kShift rounds v to an integer in the low bits
  constexpr float kMinArg = -87.33654475f;    // ln(FLT_MIN)
  constexpr float kMaxArg = 88.37f;           // just under 127.5 ln 2, so that 2^k below is finite
  constexpr float kC2 = 0.49999994f, kC3 = 0.16666521f, kC4 = 0.04166839f, kC5 = 0.00836871f,
                  kC6 = 0.0013814613f;
  const float t = x * kLog2e + kShift;        // low mantissa bits of t hold k = round(x / ln2)
  const float k = t - kShift;
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  const float q = kC2 + r * (kC3 + r * (kC4 + r * (kC5 + r * kC6)));
  const float er = 1.0f + (r + r * r * q);
  // 2^k: bits(t) = bits(kShift) + k, and bits(kShift) << 23 vanishes, so (bits(t) + 127) << 23 = bits(2^k).
  const float two_k = bit_cast<float>((bit_cast<uint32_t>(t) + 127u) << 23);
  const float e = er * two_k;
  return x < kMinArg ? 0.0f : (x > kMaxArg ? std::numeric_limits<float>::infinity() : e);
}

// Double precision keeps libm's exp (the kernels' speed targets are float, half and bfloat16).
FASTATTN_INLINE double exp_of(double x) { return std::exp(x); }

// Partial results kept apart in reductions: two 512-bit registers of float (or double) per accumulator array.
template <class C> constexpr int64_t kLanes = 128 / sizeof(C);

struct SumOp {
  template <class C> FASTATTN_INLINE C operator()(C a, C b) const { return a + b; }
};
// Ignores a NaN in b (x86 max semantics); callers make NaN rows NaN through the sum instead.
struct MaxOp {
  template <class C> FASTATTN_INLINE C operator()(C a, C b) const { return b > a ? b : a; }
};

// op-reduction of f(0), ..., f(n - 1) starting from init. Lane l accumulates f(j) for j = l mod kLanes, so the
// compiler can vectorise across lanes without reordering any floating-point operation within a lane.
template <class C, class Op, class F>
FASTATTN_INLINE C lane_reduce(int64_t n, C init, Op op, F f) {
  constexpr int64_t kL = kLanes<C>;
  C acc[kL];
  for (int64_t l = 0; l < kL; ++l) acc[l] = init;
  int64_t j = 0;
  for (; j + kL <= n; j += kL) {
    for (int64_t l = 0; l < kL; ++l) acc[l] = op(acc[l], f(j + l));
  }
  for (int64_t l = 0; j + l < n; ++l) acc[l] = op(acc[l], f(j + l));
  for (int64_t width = kL / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) acc[l] = op(acc[l], acc[l + width]);
  }
  return acc[0];
}

// Mask policies: at(offset) moves to a row's mask, apply(z, j) masks column j of that row. kUnit: the mask is
// contiguous over columns (the common case, which vectorises best).
struct NoMask {
  FASTATTN_INLINE NoMask at(int64_t) const { return *this; }
  template <class C> FASTATTN_INLINE C apply(C z, int64_t) const { return z; }
};

template <class M, bool kUnit>
struct AddMask {  // z + mask, mask stored as M (x's dtype or float32)
  const M* p;
  int64_t stride;  // column stride, used when !kUnit
  FASTATTN_INLINE AddMask at(int64_t offset) const { return {p + offset, stride}; }
  template <class C> FASTATTN_INLINE C apply(C z, int64_t j) const {
    return z + static_cast<C>(p[kUnit ? j : j * stride]);
  }
};

template <class M, bool kUnit>
struct KeepMask {  // -inf where the one-byte bool mask is 0
  const M* p;
  int64_t stride;
  FASTATTN_INLINE KeepMask at(int64_t offset) const { return {p + offset, stride}; }
  template <class C> FASTATTN_INLINE C apply(C z, int64_t j) const {
    return p[kUnit ? j : j * stride] ? z : -std::numeric_limits<C>::infinity();
  }
};

// A row with no finite z (every z is -inf or NaN): 0 (log-softmax: -inf), or NaN if some z is NaN.
// Rare, so not inlined into the vectorised entry points.
template <class T, class C>
void store_masked_row(const C* z, int64_t valid, int64_t n, bool log, T* y) {
  bool has_nan = false;
  for (int64_t j = 0; j < valid; ++j) has_nan |= std::isnan(z[j]);
  const C fill = has_nan ? std::numeric_limits<C>::quiet_NaN() : log ? -std::numeric_limits<C>::infinity() : C(0);
  std::fill(y, y + n, static_cast<T>(fill));
}

// Forward of one row.
//   x:     the row's n inputs (unit stride)
//   mask:  mask policy already moved to this row
//   valid: columns [valid, n) are causally masked (valid = n without a causal mask)
//   z:     scratch for n compute-type values
//   y:     the row's n outputs
template <class T, class Mask>
FASTATTN_INLINE void forward_row(const T* __restrict x, Mask mask, compute_t<T> scale, int64_t n, int64_t valid,
                                 bool log, compute_t<T>* __restrict z, T* __restrict y) {
  using C = compute_t<T>;
  constexpr C kInf = std::numeric_limits<C>::infinity();
  // Pass 1: z and its max. The max skips NaN, but a NaN z still poisons s below.
  const C m = lane_reduce(valid, -kInf, MaxOp{}, [&](int64_t j) FASTATTN_INLINE_LAMBDA {
    const C v = mask.apply(static_cast<C>(x[j]) * scale, j);
    z[j] = v;
    return v;
  });
  if (m == -kInf) return store_masked_row(z, valid, n, log, y);
  // Pass 2: s = sum exp(z - m), which is NaN if any z is NaN or +inf (then m = +inf and inf - inf = NaN).
  // Pass 3: the outputs, and the causally masked tail.
  if (log) {
    const C s = lane_reduce(valid, C(0), SumOp{}, [&](int64_t j) FASTATTN_INLINE_LAMBDA { return exp_of(z[j] - m); });
    const C log_s = std::log(s);
    for (int64_t j = 0; j < valid; ++j) y[j] = static_cast<T>((z[j] - m) - log_s);
    std::fill(y + valid, y + n, static_cast<T>(-kInf));
  } else {
    const C s = lane_reduce(valid, C(0), SumOp{}, [&](int64_t j) FASTATTN_INLINE_LAMBDA {
      const C e = exp_of(z[j] - m);
      z[j] = e;
      return e;
    });
    const C inv_s = C(1) / s;
    for (int64_t j = 0; j < valid; ++j) y[j] = static_cast<T>(z[j] * inv_s);
    std::fill(y + valid, y + n, static_cast<T>(C(0)));
  }
}

// Forward of rows [begin, end) with the given mask policy (not yet moved to a row).
template <class T, class Mask>
FASTATTN_INLINE void forward_rows_masked(const SoftmaxForwardArgs& a, Mask mask, int64_t begin, int64_t end) {
  using C = compute_t<T>;
  std::vector<C> z(a.n);
  const C scale = static_cast<C>(a.scale);
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t i2 = r % a.d2, i1 = (r / a.d2) % a.d1, i0 = r / a.d2 / a.d1;
    const T* x_row = x + i0 * a.x_stride[0] + i1 * a.x_stride[1] + i2 * a.x_stride[2];
    const int64_t mask_offset = i0 * a.mask_stride[0] + i1 * a.mask_stride[1] + i2 * a.mask_stride[2];
    // Causal: column j of row i2 is kept when j <= i2 + n - d2.
    const int64_t valid = a.causal ? std::clamp<int64_t>(i2 + a.n - a.d2 + 1, 0, a.n) : a.n;
    forward_row(x_row, mask.at(mask_offset), scale, a.n, valid, a.log, z.data(), out + r * a.n);
  }
}

// Dispatches on the mask's column stride: unit stride gets the contiguous (fast) policy.
template <class T, template <class, bool> class Policy, class M>
FASTATTN_INLINE void forward_rows_strided_mask(const SoftmaxForwardArgs& a, int64_t begin, int64_t end) {
  const M* p = static_cast<const M*>(a.mask);
  const int64_t stride = a.mask_stride[3];
  if (stride == 1) {
    forward_rows_masked<T>(a, Policy<M, true>{p, 1}, begin, end);
  } else {
    forward_rows_masked<T>(a, Policy<M, false>{p, stride}, begin, end);
  }
}

template <class T>
FASTATTN_INLINE void forward_rows(const SoftmaxForwardArgs& a, int64_t begin, int64_t end) {
  switch (a.mask_kind) {
    case MaskKind::kNone: return forward_rows_masked<T>(a, NoMask{}, begin, end);
    case MaskKind::kBool: return forward_rows_strided_mask<T, KeepMask, uint8_t>(a, begin, end);
    case MaskKind::kSame: return forward_rows_strided_mask<T, AddMask, T>(a, begin, end);
    case MaskKind::kFloat: return forward_rows_strided_mask<T, AddMask, float>(a, begin, end);
  }
}

// Backward of one row: g (the incoming gradient), y (the forward's output) and dx, each n values.
template <class T>
FASTATTN_INLINE void softmax_backward_row(const T* __restrict g, const T* __restrict y, compute_t<T> scale,
                                          int64_t n, T* __restrict dx) {
  using C = compute_t<T>;
  const C dot = lane_reduce(n, C(0), SumOp{}, [&](int64_t j) FASTATTN_INLINE_LAMBDA {
    return static_cast<C>(g[j]) * static_cast<C>(y[j]);
  });
  for (int64_t j = 0; j < n; ++j) {
    dx[j] = static_cast<T>(scale * static_cast<C>(y[j]) * (static_cast<C>(g[j]) - dot));
  }
}

template <class T>
FASTATTN_INLINE void log_softmax_backward_row(const T* __restrict g, const T* __restrict y, compute_t<T> scale,
                                              int64_t n, T* __restrict dx) {
  using C = compute_t<T>;
  const C sum_g = lane_reduce(n, C(0), SumOp{}, [&](int64_t j) FASTATTN_INLINE_LAMBDA { return static_cast<C>(g[j]); });
  for (int64_t j = 0; j < n; ++j) {
    const C yj = static_cast<C>(y[j]);
    const C dxj = scale * (static_cast<C>(g[j]) - exp_of(yj) * sum_g);
    dx[j] = static_cast<T>(yj == -std::numeric_limits<C>::infinity() ? C(0) : dxj);  // masked: no gradient
  }
}

template <class T>
FASTATTN_INLINE void backward_rows(const SoftmaxBackwardArgs& a, int64_t begin, int64_t end) {
  using C = compute_t<T>;
  const C scale = static_cast<C>(a.scale);
  const T* grad = static_cast<const T*>(a.grad);
  const T* out = static_cast<const T*>(a.out);
  T* grad_x = static_cast<T*>(a.grad_x);
  for (int64_t r = begin; r < end; ++r) {
    const T* g = grad + r * a.grad_row_stride;
    if (a.log) {
      log_softmax_backward_row(g, out + r * a.n, scale, a.n, grad_x + r * a.n);
    } else {
      softmax_backward_row(g, out + r * a.n, scale, a.n, grad_x + r * a.n);
    }
  }
}

// Non-template entry points, one pair per dtype: target_clones needs plain functions.
#define FASTATTN_DEFINE_ENTRY_POINTS(T, name)                                                               \
  FASTATTN_TARGET_CLONES void forward_rows_##name(const SoftmaxForwardArgs& a, int64_t begin, int64_t end) {  \
    forward_rows<T>(a, begin, end);                                                                         \
  }                                                                                                         \
  FASTATTN_TARGET_CLONES void backward_rows_##name(const SoftmaxBackwardArgs& a, int64_t begin, int64_t end) { \
    backward_rows<T>(a, begin, end);                                                                        \
  }

FASTATTN_DEFINE_ENTRY_POINTS(c10::Half, half)
FASTATTN_DEFINE_ENTRY_POINTS(c10::BFloat16, bfloat16)
FASTATTN_DEFINE_ENTRY_POINTS(float, float)
FASTATTN_DEFINE_ENTRY_POINTS(double, double)
#undef FASTATTN_DEFINE_ENTRY_POINTS

}  // namespace

void softmax_forward_cpu_rows(const SoftmaxForwardArgs& args, int64_t row_begin, int64_t row_end) {
  switch (args.dtype) {
    case Dtype::kHalf: return forward_rows_half(args, row_begin, row_end);
    case Dtype::kBFloat16: return forward_rows_bfloat16(args, row_begin, row_end);
    case Dtype::kFloat: return forward_rows_float(args, row_begin, row_end);
    case Dtype::kDouble: return forward_rows_double(args, row_begin, row_end);
  }
}

void softmax_backward_cpu_rows(const SoftmaxBackwardArgs& args, int64_t row_begin, int64_t row_end) {
  switch (args.dtype) {
    case Dtype::kHalf: return backward_rows_half(args, row_begin, row_end);
    case Dtype::kBFloat16: return backward_rows_bfloat16(args, row_begin, row_end);
    case Dtype::kFloat: return backward_rows_float(args, row_begin, row_end);
    case Dtype::kDouble: return backward_rows_double(args, row_begin, row_end);
  }
}

}  // namespace fastattn
