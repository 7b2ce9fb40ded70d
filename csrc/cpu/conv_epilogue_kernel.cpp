// CPU conv epilogue kernels on raw pointers (arguments and layouts: csrc/conv_epilogue.h).
//
// Forward, in the compute type C (float for half/bfloat16/float, double for double), per element or 2x2 window:
//   z = y + bias[c],  a = act(z),  out = a, or with the pool out = a of the window's first maximum (the last NaN)
// Backward, with g the incoming gradient:
//   grad_y = g * act'(z) at the element the forward's output came from, 0 elsewhere (the pool's other three
//   elements, and the last row / column a floor-sized pool leaves out)
// and, on request, the bias gradient: the sums of grad_y per channel, in float64 (csrc/cpu/conv_epilogue.cpp).
//
// Activations, with Phi the standard normal CDF and sigmoid(v) = 1 / (1 + e^-v):
//   relu: max(z, 0) (NaN stays NaN), derivative 0 for z <= 0 else 1 (also at NaN), as torch's
//   gelu: z Phi(z), derivative Phi(z) + z e^(-z^2/2) / sqrt(2 pi)
//   gelu_tanh: z sigmoid(2u) with u = sqrt(2/pi) (z + 0.044715 z^3) (= 0.5 z (1 + tanh u)), derivative
//              s + 2 z s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 z^2) with s = sigmoid(2u)
//   silu: z sigmoid(z), derivative s + z s (1 - s) with s = sigmoid(z)
// In float, Phi comes from a branch-free erf (normal_cdf below) and exp from vec_math.h's exp_of, so that the
// loops vectorise; double uses libm.
//
// Rows are processed in chunks of at most kChunk elements, staged through per-task float rows for half and
// bfloat16, by row kernels per compute type and activation; the float ones are compiled for AVX-512, AVX2 + FMA
// and baseline x86-64 (target_clones).
//
// Vectorisation: the loops must have no branches. The selects of this file are bit masks (select, keep_if), and
// exp_of's range checks (ternaries in vec_math.h) become vector blends only when floating-point operations may be
// assumed not to trap: hence no-trapping-math (the values are unchanged: this is not -ffast-math), set before the
// includes so that the inlined helpers compile alike.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "conv_epilogue_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace fastattn {
namespace {

using cpu::compute_t;
using cpu::convert_row;
using cpu::exp_of;
using cpu::lane_sum;
using cpu::sigmoid_of;
using cpu::SlotStage;

constexpr int64_t kChunk = 1024;  // elements of a row processed at once: the staged rows stay in L1

// ---------------------------------------------------------------------------------------------------------
// Selects without branches.
// ---------------------------------------------------------------------------------------------------------

// pick ? a : b and keep ? v : +0 as bit masks. Written as ternaries, the window functions' selects became branches
// (and masked stores) in the backward loops, which then did not vectorise.
template <class C> using Bits = std::conditional_t<sizeof(C) == 4, uint32_t, uint64_t>;
template <class C> FASTATTN_INLINE C select(bool pick, C a, C b) {
  const Bits<C> mask = Bits<C>(0) - Bits<C>(pick);
  return cpu::bit_cast<C>((cpu::bit_cast<Bits<C>>(a) & mask) | (cpu::bit_cast<Bits<C>>(b) & ~mask));
}
template <class C> FASTATTN_INLINE C keep_if(bool keep, C v) {
  return cpu::bit_cast<C>(cpu::bit_cast<Bits<C>>(v) & (Bits<C>(0) - Bits<C>(keep)));
}

// ---------------------------------------------------------------------------------------------------------
// Activations.
// ---------------------------------------------------------------------------------------------------------

// Phi(x) = 0.5 (1 + erf(v)) with v = x / sqrt 2, in float without branches. For |v| <= kErfSplit,
// erf(v) = v P(v^2); above, erfc(t) = exp(R(t - kErfSplit) - t^2) with t = |v| and R fitted to log erfc(t) + t^2 on
// [kErfSplit, 4] (weighted least squares refined toward minimax, in 40-digit arithmetic): Phi = 1 - erfc(t) / 2
// for v > 0, erfc(t) / 2 for v < 0, so the lower tail keeps its relative accuracy down to t = 4. Measured against
// 40-digit values on [-12, 12]: at most 8.8e-8 absolute error (1.5 float ulps of Phi). Past t = 4, R is taken at
// 4 (error below 1e-8 absolute, relative in the far tail where Phi < 1e-8); NaN stays NaN, Phi(+-inf) = 1, 0.
constexpr float kErfSplit = 0.875f;
constexpr float kErfP[] = {1.12837923f,    -0.376126349f,  0.11283733f,  -0.0268615838f,
                           0.00520674745f, -0.00082111021f, 8.67538329e-05f};
constexpr float kErfcR[] = {-0.767199397f,   -0.680220485f,  0.173467726f,     -0.0469404832f,  0.0114321215f,
                            -0.00230254396f, 0.00034950499f, -3.48052126e-05f, 1.71144404e-06f, -7.46337303e-09f};
constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluTanhCubic = 0.044715;

template <size_t N>
FASTATTN_INLINE float polynomial(const float (&c)[N], float x) {
  float r = c[N - 1];
  for (size_t k = N - 1; k-- > 0;) r = r * x + c[k];
  return r;
}

FASTATTN_INLINE float normal_cdf(float x) {
  const float v = x * static_cast<float>(kSqrtHalf);
  const float t = std::fabs(v);
  const float s = v * v;
  const float small = 0.5f + 0.5f * (v * polynomial(kErfP, s));
  const float half_erfc = 0.5f * exp_of(polynomial(kErfcR, std::min(t, 4.0f) - kErfSplit) - s);
  return select(t <= kErfSplit, small, select(v > 0.0f, 1.0f - half_erfc, half_erfc));
}

FASTATTN_INLINE double normal_cdf(double x) { return 0.5 * std::erfc(-x * kSqrtHalf); }


// s = sigmoid(v) and s (1 - s), the latter without the cancellation of 1 - s when s is near 1: with e = e^-v,
// 1 - s = e s for v >= 0 (e <= 1), and 1 - s is exact enough for v < 0 (s < 1/2; also when e overflows to inf).
template <class C> FASTATTN_INLINE C sigmoid_and_slope(C v, C& slope) {
  const C e = exp_of(-v);
  const C s = C(1) / (C(1) + e);
  slope = s * select(e > C(1), C(1) - s, e * s);
  return s;
}

// Act<A>::value(z) = act(z); Act<A>::backward(z, g) = g * act'(z).
template <Activation A> struct Act;

template <> struct Act<Activation::kNone> {
  template <class C> static FASTATTN_INLINE C value(C z) { return z; }
  template <class C> static FASTATTN_INLINE C backward(C, C g) { return g; }
};

template <> struct Act<Activation::kRelu> {
  template <class C> static FASTATTN_INLINE C value(C z) { return keep_if(!(z < C(0)), z); }
  template <class C> static FASTATTN_INLINE C backward(C z, C g) { return keep_if(!(z <= C(0)), g); }
};

template <> struct Act<Activation::kGelu> {
  template <class C> static FASTATTN_INLINE C value(C z) { return z * normal_cdf(z); }
  template <class C> static FASTATTN_INLINE C backward(C z, C g) {
    return g * (normal_cdf(z) + z * C(kInvSqrt2Pi) * exp_of(C(-0.5) * z * z));
  }
};

template <> struct Act<Activation::kGeluTanh> {
  template <class C> static FASTATTN_INLINE C gate(C z) {
    return sigmoid_of(C(2 * kSqrt2OverPi) * (z + C(kGeluTanhCubic) * z * z * z));
  }
  template <class C> static FASTATTN_INLINE C value(C z) { return z * gate(z); }
  template <class C> static FASTATTN_INLINE C backward(C z, C g) {
    C slope;
    const C s = sigmoid_and_slope(C(2 * kSqrt2OverPi) * (z + C(kGeluTanhCubic) * z * z * z), slope);
    const C du = C(kSqrt2OverPi) * (C(1) + C(3 * kGeluTanhCubic) * z * z);
    return g * (s + C(2) * z * slope * du);
  }
};

template <> struct Act<Activation::kSilu> {
  template <class C> static FASTATTN_INLINE C value(C z) { return z * sigmoid_of(z); }
  template <class C> static FASTATTN_INLINE C backward(C z, C g) {
    C slope;
    const C s = sigmoid_and_slope(z, slope);
    return g * (s + z * slope);
  }
};

// ---------------------------------------------------------------------------------------------------------
// One 2x2 window, its elements in torch's order (0,0), (0,1), (1,0), (1,1).
// ---------------------------------------------------------------------------------------------------------

// Whether v takes over as the window's maximum m: strictly larger (ties keep the first), or NaN (the last NaN wins).
template <class C> FASTATTN_INLINE bool replaces(C v, C m) { return (v > m) | (v != v); }

template <Activation A, class C>
FASTATTN_INLINE C window_forward(C z00, C z01, C z10, C z11) {
  using F = Act<A>;
  C m = F::value(z00);
  const C a01 = F::value(z01);
  m = select(replaces(a01, m), a01, m);
  const C a10 = F::value(z10);
  m = select(replaces(a10, m), a10, m);
  const C a11 = F::value(z11);
  return select(replaces(a11, m), a11, m);
}

// The gradient of a window's element At (0 to 3 in window order): g * act'(z) if the forward picked it, else 0.
// The four calls of a window compute the same values, which the compiler merges once they are inlined.
template <Activation A, int At, class C>
FASTATTN_INLINE C window_backward(C z00, C z01, C z10, C z11, C g) {
  using F = Act<A>;
  const C a00 = F::value(z00), a01 = F::value(z01), a10 = F::value(z10), a11 = F::value(z11);
  const bool s01 = replaces(a01, a00);
  const C m01 = select(s01, a01, a00);
  const bool s10 = replaces(a10, m01);
  const bool s11 = replaces(a11, select(s10, a10, m01));
  const C z = select(s11, z11, select(s10, z10, select(s01, z01, z00)));
  const C dz = F::backward(z, g);
  // Bitwise & and |: && and || would branch.
  if constexpr (At == 0) return keep_if(!(s01 | s10 | s11), dz);
  if constexpr (At == 1) return keep_if(s01 & !(s10 | s11), dz);
  if constexpr (At == 2) return keep_if(s10 & !s11, dz);
  return keep_if(s11, dz);
}

// ---------------------------------------------------------------------------------------------------------
// Row kernels: the arithmetic on compute-type rows, one set per compute type and activation (not per storage
// dtype: half, bfloat16 and float share the float set, which keeps the compile short).
// ---------------------------------------------------------------------------------------------------------

// o[j] = act(x[j] + bias[j]) for n values; the bias is tiled over the row.
template <Activation A, class C>
FASTATTN_INLINE void forward_row(const C* __restrict x, const C* __restrict bias, int64_t n, C* __restrict o) {
  for (int64_t j = 0; j < n; ++j) o[j] = Act<A>::value(x[j] + bias[j]);
}

// d[j] = g[j] * act'(x[j] + bias[j]).
template <Activation A, class C>
FASTATTN_INLINE void backward_row(const C* __restrict x, const C* __restrict bias, const C* __restrict g, int64_t n,
                                  C* __restrict d) {
  for (int64_t j = 0; j < n; ++j) d[j] = Act<A>::backward(x[j] + bias[j], g[j]);
}

// NCHW pool over rows x0, x1 of one plane (bias b): o[j] from the window x0[2j], x0[2j + 1], x1[2j], x1[2j + 1].
template <Activation A, class C>
FASTATTN_INLINE void pool_forward_row(const C* __restrict x0, const C* __restrict x1, C b, int64_t windows,
                                      C* __restrict o) {
  for (int64_t j = 0; j < windows; ++j) {
    o[j] = window_forward<A>(x0[2 * j] + b, x0[2 * j + 1] + b, x1[2 * j] + b, x1[2 * j + 1] + b);
  }
}

template <Activation A, class C>
FASTATTN_INLINE void pool_backward_row(const C* __restrict x0, const C* __restrict x1, const C* __restrict g, C b,
                                       int64_t windows, C* __restrict d0, C* __restrict d1) {
  for (int64_t j = 0; j < windows; ++j) {
    const C z00 = x0[2 * j] + b, z01 = x0[2 * j + 1] + b, z10 = x1[2 * j] + b, z11 = x1[2 * j + 1] + b;
    d0[2 * j] = window_backward<A, 0>(z00, z01, z10, z11, g[j]);
    d0[2 * j + 1] = window_backward<A, 1>(z00, z01, z10, z11, g[j]);
    d1[2 * j] = window_backward<A, 2>(z00, z01, z10, z11, g[j]);
    d1[2 * j + 1] = window_backward<A, 3>(z00, z01, z10, z11, g[j]);
  }
}

// NHWC pool over rows of pixels of c channels: o[j c + q] from x0[2j c + q], x0[(2j + 1) c + q], x1[...] + bias[q].
template <Activation A, class C>
FASTATTN_INLINE void pool_forward_pixels(const C* __restrict x0, const C* __restrict x1, const C* __restrict bias,
                                         int64_t windows, int64_t c, C* __restrict o) {
  for (int64_t j = 0; j < windows; ++j) {
    const C* a0 = x0 + 2 * j * c;
    const C* a1 = x1 + 2 * j * c;
    for (int64_t q = 0; q < c; ++q) {
      o[j * c + q] = window_forward<A>(a0[q] + bias[q], a0[c + q] + bias[q], a1[q] + bias[q], a1[c + q] + bias[q]);
    }
  }
}

// The backward of one NHWC window per channel: pixels x00, x01 (row 0), x10, x11 (row 1), c values each, into
// d00 ... d11. Separate restrict pointers: as offsets of one row the compiler could not tell them apart.
template <Activation A, class C>
FASTATTN_INLINE void window_backward_pixels(const C* __restrict x00, const C* __restrict x01, const C* __restrict x10,
                                            const C* __restrict x11, const C* __restrict bias, const C* __restrict g,
                                            int64_t c, C* __restrict d00, C* __restrict d01, C* __restrict d10,
                                            C* __restrict d11) {
  for (int64_t q = 0; q < c; ++q) {
    const C z00 = x00[q] + bias[q], z01 = x01[q] + bias[q], z10 = x10[q] + bias[q], z11 = x11[q] + bias[q];
    d00[q] = window_backward<A, 0>(z00, z01, z10, z11, g[q]);
    d01[q] = window_backward<A, 1>(z00, z01, z10, z11, g[q]);
    d10[q] = window_backward<A, 2>(z00, z01, z10, z11, g[q]);
    d11[q] = window_backward<A, 3>(z00, z01, z10, z11, g[q]);
  }
}

template <Activation A, class C>
FASTATTN_INLINE void pool_backward_pixels(const C* x0, const C* x1, const C* g, const C* bias, int64_t windows,
                                          int64_t c, C* d0, C* d1) {
  for (int64_t j = 0; j < windows; ++j) {
    const int64_t at = 2 * j * c;
    window_backward_pixels<A>(x0 + at, x0 + at + c, x1 + at, x1 + at + c, bias, g + j * c, c, d0 + at, d0 + at + c,
                              d1 + at, d1 + at + c);
  }
}

// The row kernels of one compute type and activation.
template <class C>
struct RowKernels {
  void (*forward)(const C* x, const C* bias, int64_t n, C* o);
  void (*backward)(const C* x, const C* bias, const C* g, int64_t n, C* d);
  void (*pool_forward)(const C* x0, const C* x1, C b, int64_t windows, C* o);
  void (*pool_backward)(const C* x0, const C* x1, const C* g, C b, int64_t windows, C* d0, C* d1);
  void (*pool_forward_pixels)(const C* x0, const C* x1, const C* bias, int64_t windows, int64_t c, C* o);
  void (*pool_backward_pixels)(const C* x0, const C* x1, const C* g, const C* bias, int64_t windows, int64_t c,
                               C* d0, C* d1);
};

// Plain functions (target_clones needs them) for each row kernel of (C, A), and kernels_<name>() gathering them.
// The float ones are compiled for AVX-512, AVX2 + FMA and baseline x86-64; the double ones once (libm bound).
#define FASTATTN_ROW_KERNELS(C, A, name, ATTRIBUTES)                                                              \
  ATTRIBUTES void forward_##name(const C* x, const C* bias, int64_t n, C* o) { forward_row<A>(x, bias, n, o); }  \
  ATTRIBUTES void backward_##name(const C* x, const C* bias, const C* g, int64_t n, C* d) {                       \
    backward_row<A>(x, bias, g, n, d);                                                                            \
  }                                                                                                               \
  ATTRIBUTES void pool_forward_##name(const C* x0, const C* x1, C b, int64_t windows, C* o) {                     \
    pool_forward_row<A>(x0, x1, b, windows, o);                                                                   \
  }                                                                                                               \
  ATTRIBUTES void pool_backward_##name(const C* x0, const C* x1, const C* g, C b, int64_t windows, C* d0,         \
                                       C* d1) {                                                                   \
    pool_backward_row<A>(x0, x1, g, b, windows, d0, d1);                                                          \
  }                                                                                                               \
  ATTRIBUTES void pool_forward_pixels_##name(const C* x0, const C* x1, const C* bias, int64_t windows, int64_t c, \
                                             C* o) {                                                              \
    pool_forward_pixels<A>(x0, x1, bias, windows, c, o);                                                          \
  }                                                                                                               \
  ATTRIBUTES void pool_backward_pixels_##name(const C* x0, const C* x1, const C* g, const C* bias,                \
                                              int64_t windows, int64_t c, C* d0, C* d1) {                         \
    pool_backward_pixels<A>(x0, x1, g, bias, windows, c, d0, d1);                                                 \
  }                                                                                                               \
  RowKernels<C> kernels_##name() {                                                                                \
    return {forward_##name,      backward_##name,            pool_forward_##name,                                \
            pool_backward_##name, pool_forward_pixels_##name, pool_backward_pixels_##name};                       \
  }

FASTATTN_ROW_KERNELS(float, Activation::kNone, none_float, FASTATTN_TARGET_CLONES)
FASTATTN_ROW_KERNELS(float, Activation::kRelu, relu_float, FASTATTN_TARGET_CLONES)
FASTATTN_ROW_KERNELS(float, Activation::kGelu, gelu_float, FASTATTN_TARGET_CLONES)
FASTATTN_ROW_KERNELS(float, Activation::kGeluTanh, gelu_tanh_float, FASTATTN_TARGET_CLONES)
FASTATTN_ROW_KERNELS(float, Activation::kSilu, silu_float, FASTATTN_TARGET_CLONES)
FASTATTN_ROW_KERNELS(double, Activation::kNone, none_double, )
FASTATTN_ROW_KERNELS(double, Activation::kRelu, relu_double, )
FASTATTN_ROW_KERNELS(double, Activation::kGelu, gelu_double, )
FASTATTN_ROW_KERNELS(double, Activation::kGeluTanh, gelu_tanh_double, )
FASTATTN_ROW_KERNELS(double, Activation::kSilu, silu_double, )
#undef FASTATTN_ROW_KERNELS

template <class C> RowKernels<C> row_kernels(Activation a);

template <> RowKernels<float> row_kernels<float>(Activation a) {
  switch (a) {
    case Activation::kNone: return kernels_none_float();
    case Activation::kRelu: return kernels_relu_float();
    case Activation::kGelu: return kernels_gelu_float();
    case Activation::kGeluTanh: return kernels_gelu_tanh_float();
    case Activation::kSilu: return kernels_silu_float();
  }
  return kernels_none_float();
}

template <> RowKernels<double> row_kernels<double>(Activation a) {
  switch (a) {
    case Activation::kNone: return kernels_none_double();
    case Activation::kRelu: return kernels_relu_double();
    case Activation::kGelu: return kernels_gelu_double();
    case Activation::kGeluTanh: return kernels_gelu_tanh_double();
    case Activation::kSilu: return kernels_silu_double();
  }
  return kernels_none_double();
}

// partial[q] += v[p * k + q] for the `pixels` pixels of k channels in v.
template <class C>
void add_per_channel(const C* v, int64_t pixels, int64_t k, double* partial) {
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t q = 0; q < k; ++q) partial[q] += static_cast<double>(v[p * k + q]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// NCHW: a unit is a plane (i0, ch); the bias is one scalar b, tiled into a row for the elementwise kernels.
// ---------------------------------------------------------------------------------------------------------

// A plane without the pool as segments of contiguous elements: one segment of h * w when rows are back to back,
// else the h rows.
struct Segments {
  int64_t count, length, stride;
};

Segments plane_segments(const ConvEpilogueShape& s, int64_t row_stride) {
  if (row_stride == s.w || s.h == 1) return {1, s.h * s.w, 0};
  return {s.h, s.w, row_stride};
}

template <class T>
void forward_nchw(const ConvEpilogueForwardArgs& a, int64_t begin, int64_t end) {
  using C = compute_t<T>;
  const RowKernels<C> k = row_kernels<C>(a.activation);
  const ConvEpilogueShape& s = a.shape;
  const int64_t oh = s.out_h(), ow = s.out_w();
  const T* y = static_cast<const T*>(a.y);
  T* out = static_cast<T*>(a.out);
  const C* bias = static_cast<const C*>(a.bias);
  SlotStage<T> stage(kChunk, 3);
  std::vector<C> bias_row(kChunk);
  for (int64_t p = begin; p < end; ++p) {
    const int64_t i0 = p / s.c, ch = p % s.c;
    const T* plane = y + i0 * a.y_stride[0] + ch * a.y_stride[1];
    T* out_plane = out + p * oh * ow;
    const C b = bias ? bias[ch] : C(0);
    if (!s.pool) {
      const Segments seg = plane_segments(s, a.y_stride[2]);
      std::fill(bias_row.begin(), bias_row.begin() + std::min(kChunk, seg.length), b);
      for (int64_t r = 0; r < seg.count; ++r) {
        for (int64_t j0 = 0; j0 < seg.length; j0 += kChunk) {
          const int64_t n = std::min(kChunk, seg.length - j0);
          T* dst = out_plane + r * seg.length + j0;
          k.forward(stage.load(plane + r * seg.stride + j0, 0, n), bias_row.data(), n, stage.output(dst, 2));
          stage.store(dst, 2, n);
        }
      }
      continue;
    }
    for (int64_t i = 0; i < oh; ++i) {
      const T* row0 = plane + 2 * i * a.y_stride[2];
      const T* row1 = row0 + a.y_stride[2];
      for (int64_t j0 = 0; j0 < ow; j0 += kChunk / 2) {
        const int64_t n = std::min(kChunk / 2, ow - j0);
        T* dst = out_plane + i * ow + j0;
        k.pool_forward(stage.load(row0 + 2 * j0, 0, 2 * n), stage.load(row1 + 2 * j0, 1, 2 * n), b, n,
                       stage.output(dst, 2));
        stage.store(dst, 2, n);
      }
    }
  }
}

template <class T>
void backward_nchw(const ConvEpilogueBackwardArgs& a, int64_t begin, int64_t end, double* plane_sums) {
  using C = compute_t<T>;
  const RowKernels<C> k = row_kernels<C>(a.activation);
  const ConvEpilogueShape& s = a.shape;
  const int64_t oh = s.out_h(), ow = s.out_w();
  const T* y = static_cast<const T*>(a.y);
  const T* grad = static_cast<const T*>(a.grad);
  T* grad_y = static_cast<T*>(a.grad_y);
  const C* bias = static_cast<const C*>(a.bias);
  SlotStage<T> stage(kChunk, 5);
  std::vector<C> bias_row(kChunk);
  for (int64_t p = begin; p < end; ++p) {
    const int64_t i0 = p / s.c, ch = p % s.c;
    const T* plane = y + i0 * a.y_stride[0] + ch * a.y_stride[1];
    const T* grad_plane = grad + i0 * a.grad_stride[0] + ch * a.grad_stride[1];
    T* dy_plane = grad_y + p * s.h * s.w;
    const C b = bias ? bias[ch] : C(0);
    double sum = 0;
    if (!s.pool) {
      const Segments seg = plane_segments(s, a.y_stride[2]);
      const Segments grad_seg = plane_segments(s, a.grad_stride[2]);
      const bool same = grad_seg.count == seg.count;  // else walk both row by row
      const int64_t count = same ? seg.count : s.h, length = same ? seg.length : s.w;
      std::fill(bias_row.begin(), bias_row.begin() + std::min(kChunk, length), b);
      for (int64_t r = 0; r < count; ++r) {
        const T* y_row = plane + r * (same ? seg.stride : a.y_stride[2]);
        const T* g_row = grad_plane + r * (same ? grad_seg.stride : a.grad_stride[2]);
        for (int64_t j0 = 0; j0 < length; j0 += kChunk) {
          const int64_t n = std::min(kChunk, length - j0);
          T* dst = dy_plane + r * length + j0;
          C* d = stage.output(dst, 3);
          k.backward(stage.load(y_row + j0, 0, n), bias_row.data(), stage.load(g_row + j0, 1, n), n, d);
          if (plane_sums) sum += lane_sum<double>(n, [&](int64_t j) { return static_cast<double>(d[j]); });
          stage.store(dst, 3, n);
        }
      }
    } else {
      for (int64_t i = 0; i < oh; ++i) {
        const T* row0 = plane + 2 * i * a.y_stride[2];
        const T* row1 = row0 + a.y_stride[2];
        const T* g_row = grad_plane + i * a.grad_stride[2];
        T* dst0 = dy_plane + 2 * i * s.w;
        T* dst1 = dst0 + s.w;
        for (int64_t j0 = 0; j0 < ow; j0 += kChunk / 2) {
          const int64_t n = std::min(kChunk / 2, ow - j0);
          C* d0 = stage.output(dst0 + 2 * j0, 3);
          C* d1 = stage.output(dst1 + 2 * j0, 4);
          k.pool_backward(stage.load(row0 + 2 * j0, 0, 2 * n), stage.load(row1 + 2 * j0, 1, 2 * n),
                          stage.load(g_row + j0, 2, n), b, n, d0, d1);
          if (plane_sums) sum += lane_sum<double>(2 * n, [&](int64_t j) { return double(d0[j]) + double(d1[j]); });
          stage.store(dst0 + 2 * j0, 3, 2 * n);
          stage.store(dst1 + 2 * j0, 4, 2 * n);
        }
        if (s.w % 2) dst0[s.w - 1] = dst1[s.w - 1] = T(0);  // the column the pool left out
      }
      if (s.h % 2) std::fill(dy_plane + (s.h - 1) * s.w, dy_plane + s.h * s.w, T(0));  // and the row
    }
    if (plane_sums) plane_sums[p] = sum;
  }
}

// ---------------------------------------------------------------------------------------------------------
// NHWC: a unit is an output row (i0, i); a row of pixels holds w * c values, channel fastest.
// ---------------------------------------------------------------------------------------------------------

// Pixels per chunk: rows are processed kChunk values at a time, or one pixel when a pixel holds more.
int64_t pixels_per_chunk(int64_t c, int64_t values_per_pixel) {
  return std::max<int64_t>(1, kChunk / (values_per_pixel * c));
}

// The bias tiled over `pixels` pixels (zeros without a bias), so that a chunk adds it element by element.
template <class C>
std::vector<C> tiled_bias(const C* bias, int64_t c, int64_t pixels) {
  std::vector<C> tiled(pixels * c, C(0));
  if (bias) {
    for (int64_t p = 0; p < pixels; ++p) std::copy(bias, bias + c, tiled.begin() + p * c);
  }
  return tiled;
}

template <class T>
void forward_nhwc(const ConvEpilogueForwardArgs& a, int64_t begin, int64_t end) {
  using C = compute_t<T>;
  const RowKernels<C> k = row_kernels<C>(a.activation);
  const ConvEpilogueShape& s = a.shape;
  const int64_t oh = s.out_h(), ow = s.out_w(), c = s.c;
  const T* y = static_cast<const T*>(a.y);
  T* out = static_cast<T*>(a.out);
  const int64_t ppc = pixels_per_chunk(c, s.pool ? 2 : 1);
  const std::vector<C> bias = tiled_bias(static_cast<const C*>(a.bias), c, s.pool ? 1 : ppc);
  SlotStage<T> stage(std::max(kChunk, 2 * c), 3);
  for (int64_t u = begin; u < end; ++u) {
    const int64_t i0 = u / oh, i = u % oh;
    T* out_row = out + u * ow * c;
    if (!s.pool) {
      const T* row = y + i0 * a.y_stride[0] + i * a.y_stride[2];
      for (int64_t p0 = 0; p0 < s.w; p0 += ppc) {
        const int64_t n = std::min(ppc, s.w - p0) * c;
        k.forward(stage.load(row + p0 * c, 0, n), bias.data(), n, stage.output(out_row + p0 * c, 2));
        stage.store(out_row + p0 * c, 2, n);
      }
      continue;
    }
    const T* row0 = y + i0 * a.y_stride[0] + 2 * i * a.y_stride[2];
    const T* row1 = row0 + a.y_stride[2];
    for (int64_t p0 = 0; p0 < ow; p0 += ppc) {
      const int64_t n = std::min(ppc, ow - p0);
      k.pool_forward_pixels(stage.load(row0 + 2 * p0 * c, 0, 2 * n * c), stage.load(row1 + 2 * p0 * c, 1, 2 * n * c),
                            bias.data(), n, c, stage.output(out_row + p0 * c, 2));
      stage.store(out_row + p0 * c, 2, n * c);
    }
  }
}

template <class T>
void backward_nhwc(const ConvEpilogueBackwardArgs& a, int64_t begin, int64_t end, double* channel_sums) {
  using C = compute_t<T>;
  const RowKernels<C> k = row_kernels<C>(a.activation);
  const ConvEpilogueShape& s = a.shape;
  const int64_t oh = s.out_h(), ow = s.out_w(), c = s.c;
  const T* y = static_cast<const T*>(a.y);
  const T* grad = static_cast<const T*>(a.grad);
  T* grad_y = static_cast<T*>(a.grad_y);
  const int64_t ppc = pixels_per_chunk(c, s.pool ? 2 : 1);
  const std::vector<C> bias = tiled_bias(static_cast<const C*>(a.bias), c, s.pool ? 1 : ppc);
  SlotStage<T> stage(std::max(kChunk, 2 * c), 5);
  const int64_t row_values = s.w * c;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t i0 = u / oh, i = u % oh;
    const T* g_row = grad + i0 * a.grad_stride[0] + i * a.grad_stride[2];
    if (!s.pool) {
      const T* row = y + i0 * a.y_stride[0] + i * a.y_stride[2];
      T* dst = grad_y + u * row_values;
      for (int64_t p0 = 0; p0 < s.w; p0 += ppc) {
        const int64_t pixels = std::min(ppc, s.w - p0), n = pixels * c;
        C* d = stage.output(dst + p0 * c, 3);
        k.backward(stage.load(row + p0 * c, 0, n), bias.data(), stage.load(g_row + p0 * c, 1, n), n, d);
        if (channel_sums) add_per_channel(d, pixels, c, channel_sums);
        stage.store(dst + p0 * c, 3, n);
      }
      continue;
    }
    const T* row0 = y + i0 * a.y_stride[0] + 2 * i * a.y_stride[2];
    const T* row1 = row0 + a.y_stride[2];
    T* dst0 = grad_y + (i0 * s.h + 2 * i) * row_values;
    T* dst1 = dst0 + row_values;
    for (int64_t p0 = 0; p0 < ow; p0 += ppc) {
      const int64_t n = std::min(ppc, ow - p0);
      C* d0 = stage.output(dst0 + 2 * p0 * c, 3);
      C* d1 = stage.output(dst1 + 2 * p0 * c, 4);
      k.pool_backward_pixels(stage.load(row0 + 2 * p0 * c, 0, 2 * n * c), stage.load(row1 + 2 * p0 * c, 1, 2 * n * c),
                             stage.load(g_row + p0 * c, 2, n * c), bias.data(), n, c, d0, d1);
      if (channel_sums) {
        add_per_channel(d0, 2 * n, c, channel_sums);
        add_per_channel(d1, 2 * n, c, channel_sums);
      }
      stage.store(dst0 + 2 * p0 * c, 3, 2 * n * c);
      stage.store(dst1 + 2 * p0 * c, 4, 2 * n * c);
    }
    if (s.w % 2) {  // the pixel column the pool left out
      std::fill(dst0 + (s.w - 1) * c, dst0 + row_values, T(0));
      std::fill(dst1 + (s.w - 1) * c, dst1 + row_values, T(0));
    }
    if (s.h % 2 && i == oh - 1) std::fill(dst1 + row_values, dst1 + 2 * row_values, T(0));  // and the row
  }
}

template <class T>
void forward_units(const ConvEpilogueForwardArgs& a, int64_t begin, int64_t end) {
  if (a.shape.channels_last) {
    forward_nhwc<T>(a, begin, end);
  } else {
    forward_nchw<T>(a, begin, end);
  }
}

template <class T>
void backward_units(const ConvEpilogueBackwardArgs& a, int64_t begin, int64_t end, double* sums) {
  if (a.shape.channels_last) {
    backward_nhwc<T>(a, begin, end, sums);
  } else {
    backward_nchw<T>(a, begin, end, sums);
  }
}

}  // namespace

int64_t conv_epilogue_units(const ConvEpilogueShape& s) { return s.channels_last ? s.n * s.out_h() : s.n * s.c; }

int64_t conv_epilogue_unit_elements(const ConvEpilogueShape& s) {
  return s.channels_last ? (s.pool ? 2 : 1) * s.w * s.c : s.h * s.w;
}

void conv_epilogue_forward_cpu_units(const ConvEpilogueForwardArgs& args, int64_t begin, int64_t end) {
  switch (args.dtype) {
    case Dtype::kHalf: return forward_units<c10::Half>(args, begin, end);
    case Dtype::kBFloat16: return forward_units<c10::BFloat16>(args, begin, end);
    case Dtype::kFloat: return forward_units<float>(args, begin, end);
    case Dtype::kDouble: return forward_units<double>(args, begin, end);
  }
}

void conv_epilogue_backward_cpu_units(const ConvEpilogueBackwardArgs& args, int64_t begin, int64_t end,
                                      double* bias_sums) {
  switch (args.dtype) {
    case Dtype::kHalf: return backward_units<c10::Half>(args, begin, end, bias_sums);
    case Dtype::kBFloat16: return backward_units<c10::BFloat16>(args, begin, end, bias_sums);
    case Dtype::kFloat: return backward_units<float>(args, begin, end, bias_sums);
    case Dtype::kDouble: return backward_units<double>(args, begin, end, bias_sums);
  }
}

}  // namespace fastattn
