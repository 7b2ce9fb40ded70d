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

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec_math.h"

namespace fastattn {
namespace {

using cpu::compute_t;
using cpu::convert_row;
using cpu::exp_of;

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

// Sum of f(0), ..., f(n - 1): lane_reduce over blocks of kSumBlock terms, the block sums added in double.
// A lane adds at most 8 terms before its partial sum is folded in, which keeps the rounding error of long
// mixed-sign sums (the log-softmax backward's sum of g) at or below torch's.
template <class C, class F>
FASTATTN_INLINE C lane_sum(int64_t n, F f) {
  constexpr int64_t kSumBlock = 8 * kLanes<C>;
  double total = 0;
  for (int64_t begin = 0; begin < n; begin += kSumBlock) {
    const int64_t count = std::min(kSumBlock, n - begin);
    total += lane_reduce(count, C(0), SumOp{}, [&](int64_t j) FASTATTN_INLINE_LAMBDA { return f(begin + j); });
  }
  return static_cast<C>(total);
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

// Forward of one row, in the compute type C.
//   x:     the row's n inputs
//   mask:  mask policy already moved to this row
//   valid: columns [valid, n) are causally masked (valid = n without a causal mask)
//   y:     the row's n outputs
// Pass 1 finds m = max z; pass 2 writes exp(z - m) (log-softmax: z - m) to y while summing s = sum exp(z - m);
// pass 3 scales y by 1 / s (log-softmax: subtracts log s). z is recomputed from x rather than stored: x is in
// L1 after pass 1, and pass 2's stores to y (cache misses when y is the output) then overlap the exp work.
template <class C, class Mask>
FASTATTN_INLINE void forward_row(const C* __restrict x, Mask mask, C scale, int64_t n, int64_t valid, bool log,
                                 C* __restrict y) {
  constexpr C kInf = std::numeric_limits<C>::infinity();
  const auto z = [&](int64_t j) FASTATTN_INLINE_LAMBDA { return mask.apply(x[j] * scale, j); };
  // The max skips NaN, but a NaN (or +inf, through inf - inf) z still makes s NaN below.
  const C m = lane_reduce(valid, -kInf, MaxOp{}, z);
  if (m == -kInf) {  // no finite z: every z is -inf (a fully masked row), or some are NaN
    bool has_nan = false;
    for (int64_t j = 0; j < valid; ++j) has_nan |= std::isnan(z(j));
    std::fill(y, y + n, has_nan ? std::numeric_limits<C>::quiet_NaN() : log ? -kInf : C(0));
    return;
  }
  const C s = lane_sum<C>(valid, [&](int64_t j) FASTATTN_INLINE_LAMBDA {
    const C shifted = z(j) - m;
    const C e = exp_of(shifted);
    y[j] = log ? shifted : e;
    return e;
  });
  if (log) {
    const C log_s = std::log(s);
    for (int64_t j = 0; j < valid; ++j) y[j] -= log_s;
  } else {
    const C inv_s = C(1) / s;
    for (int64_t j = 0; j < valid; ++j) y[j] *= inv_s;
  }
  std::fill(y + valid, y + n, log ? -kInf : C(0));
}

// Forward of rows [begin, end) with the given mask policy (not yet moved to a row).
template <class T, class Mask>
FASTATTN_INLINE void forward_rows_masked(const SoftmaxForwardArgs& a, Mask mask, int64_t begin, int64_t end) {
  using C = compute_t<T>;
  cpu::RowStage<T> stage(a.n);
  const C scale = static_cast<C>(a.scale);
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t i2 = r % a.d2, i1 = (r / a.d2) % a.d1, i0 = r / a.d2 / a.d1;
    const T* x_row = x + i0 * a.x_stride[0] + i1 * a.x_stride[1] + i2 * a.x_stride[2];
    const int64_t mask_offset = i0 * a.mask_stride[0] + i1 * a.mask_stride[1] + i2 * a.mask_stride[2];
    // Causal: column j of row i2 is kept when j <= i2 + n - d2.
    const int64_t valid = a.causal ? std::clamp<int64_t>(i2 + a.n - a.d2 + 1, 0, a.n) : a.n;
    T* out_row = out + r * a.n;
    forward_row(stage.load(x_row, 0), mask.at(mask_offset), scale, a.n, valid, a.log, stage.output(out_row));
    stage.store(out_row);
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

// Backward of one row, in the compute type C: g (the incoming gradient), y (the forward's output) and dx,
// each n values.
template <class C>
FASTATTN_INLINE void backward_row(const C* __restrict g, const C* __restrict y, C scale, int64_t n, bool log,
                                  C* __restrict dx) {
  if (log) {
    const C sum_g = lane_sum<C>(n, [&](int64_t j) FASTATTN_INLINE_LAMBDA { return g[j]; });
    for (int64_t j = 0; j < n; ++j) {
      const C dxj = scale * (g[j] - exp_of(y[j]) * sum_g);
      dx[j] = y[j] == -std::numeric_limits<C>::infinity() ? C(0) : dxj;  // masked: no gradient
    }
  } else {
    const C dot = lane_sum<C>(n, [&](int64_t j) FASTATTN_INLINE_LAMBDA { return g[j] * y[j]; });
    for (int64_t j = 0; j < n; ++j) dx[j] = scale * y[j] * (g[j] - dot);
  }
}

template <class T>
FASTATTN_INLINE void backward_rows(const SoftmaxBackwardArgs& a, int64_t begin, int64_t end) {
  using C = compute_t<T>;
  cpu::RowStage<T> stage(a.n);
  const C scale = static_cast<C>(a.scale);
  const T* grad = static_cast<const T*>(a.grad);
  const T* out = static_cast<const T*>(a.out);
  T* grad_x = static_cast<T*>(a.grad_x);
  for (int64_t r = begin; r < end; ++r) {
    T* dx_row = grad_x + r * a.n;
    backward_row(stage.load(grad + r * a.grad_row_stride, 0), stage.load(out + r * a.n, 1), scale, a.n, a.log,
                 stage.output(dx_row));
    stage.store(dx_row);
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
