// CUDA convolution epilogue kernels, forward and backward, on raw pointers (the torch binding is
// csrc/cuda/conv_epilogue.cpp; keeping torch headers out of this file keeps its compile short). Arguments, layouts
// and the pool's rules: csrc/conv_epilogue.h.
//
// Forward, with z = y + bias[c] in float32:
//
//     out = act(z),  or with the pool the act(z) of each 2x2 window's first maximum in the order (0,0), (0,1),
//                    (1,0), (1,1) (a NaN replaces any maximum: the last NaN wins), as torch's max_pool2d
//
// Backward, with g the incoming gradient:
//
//     grad_y = g * act'(z) at the element each output came from, 0 at the window's other elements and at the last
//              row / column a floor-sized pool leaves out,
//     grad_bias[c] = sum over (n, h, w) of g * act'(z), in float32, before rounding to y's dtype.
//
// Activations (Phi the standard normal CDF, sigmoid(v) = 1 / (1 + e^-v)): relu max(z, 0) (NaN stays NaN; the
// derivative is 0 for z <= 0, else 1, also at NaN, as torch's); gelu z Phi(z) with Phi = erfc(-z / sqrt 2) / 2
// (accurate in the lower tail); gelu_tanh z sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3); silu z sigmoid(z).
//
// Work: lines of consecutive output elements.
//   NCHW  a line is an output row (n, c, i) of out_w elements; without the pool, and with the rows of y (and grad)
//         back to back, a whole plane of h * w elements. A block runs the lines of one channel (blockIdx.z).
//   NHWC  a line is an output pixel (n, i, j): its c channels.
// A line is cut into chunks of VEC = 16 / sizeof(T) elements (8 for 16-bit dtypes, 4 for float32). A block of
// kThreads threads holds cg threads along a line, one chunk each (chunk blockIdx.y * cg + lane: cg is the line's
// chunk count, at most kThreads), times pl = kThreads / cg lines at once, and walks the lines of its slice
// (blockIdx.x) pl at a time, so that short lines (NCHW rows of a few columns, NHWC pixels of a few channels) still
// keep the threads busy. A thread's chunk keeps its place in every line, so its elements' channels stay the same:
// an NHWC thread keeps its VEC bias values and bias-gradient sums in registers across lines (NCHW: one of each).
//
// Memory: with the pool a chunk reads VEC windows: in NCHW 2 VEC consecutive elements of each of the window's two
// rows (the windows' two columns interleaved), in NHWC VEC consecutive channels at each of the four pixels. An
// access of VEC (or 2 VEC) consecutive elements is one (or two) 16-byte vector access when it lies wholly in the
// line and starts 16-byte aligned, which each tensor's pointer decides on its own; else element by element. y and
// grad are read through the read-only path (__ldg).
//
// Bias gradient, without atomics: each block adds its threads' sums per channel (NCHW: a warp-shuffle tree, then
// the warps in order; NHWC: per column, the lines in order) into its row of a (partials, c) float32 workspace, and
// a last kernel adds the rows per channel in a fixed order: the same bits from run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../conv_epilogue.h"
#include "conv_epilogue_kernel.h"
#include "elements.h"

namespace fastattn {
namespace {

constexpr int kThreads = 256;        // threads per block
constexpr int kBlocksPerSm = 8;      // blocks of the grid per multiprocessor (2048 threads)
constexpr int64_t kMaxTiles = 65535;  // gridDim.y limit: chunk tiles of a line

struct Params {
  const void* y;      // (n, c, h, w) with strides ys: unit stride over w (NCHW), or over c with ys[3] == c (NHWC)
  const void* grad;   // backward: (n, c, oh, ow) with strides gs, the inner layout of y's
  const float* bias;  // (c,), or null
  void* out;          // forward: out (n, c, oh, ow); backward: grad_y (n, c, h, w); contiguous in y's layout
  float* partial;     // backward: (partials, c) bias-gradient sums of the blocks, or null when not wanted
  int64_t n, c, h, w, oh, ow;
  int64_t ys[4], gs[4];
  int64_t lines;            // NCHW: lines of one channel (n * inner); NHWC: n * oh * ow
  int64_t inner;            // NCHW: lines of a plane (oh, or 1 for whole planes); NHWC: ow
  int64_t length;           // elements of a line: NCHW ow (h * w for whole planes); NHWC c
  int64_t chunks;           // VEC-element chunks of a line
  int cg, pl;               // threads along a line, lines at once
  int64_t lines_per_slice;  // lines of a block's slice
};

// ---------------------------------------------------------------------------------------------------------
// Activations and the pool's windows, in float32.
// ---------------------------------------------------------------------------------------------------------

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCubic = 0.044715f;

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// s = sigmoid(v) and s (1 - s), the latter without the cancellation of 1 - s when s is near 1: with e = e^-v,
// 1 - s = e s for v >= 0 (e <= 1); 1 - s is exact enough for v < 0 (also when e overflows to inf).
__device__ __forceinline__ float sigmoid_and_slope(float v, float& slope) {
  const float e = expf(-v);
  const float s = 1.0f / (1.0f + e);
  slope = s * (e > 1.0f ? 1.0f - s : e * s);
  return s;
}

__device__ __forceinline__ float normal_cdf(float z) { return 0.5f * erfcf(-z * kSqrtHalf); }

// Act<A>::value(z) = act(z); Act<A>::backward(z, g) = g * act'(z).
template <Activation A>
struct Act;

template <>
struct Act<Activation::kNone> {
  __device__ __forceinline__ static float value(float z) { return z; }
  __device__ __forceinline__ static float backward(float, float g) { return g; }
};

template <>
struct Act<Activation::kRelu> {
  __device__ __forceinline__ static float value(float z) { return z < 0.0f ? 0.0f : z; }
  __device__ __forceinline__ static float backward(float z, float g) { return z <= 0.0f ? 0.0f : g; }
};

template <>
struct Act<Activation::kGelu> {
  __device__ __forceinline__ static float value(float z) { return z * normal_cdf(z); }
  __device__ __forceinline__ static float backward(float z, float g) {
    return g * (normal_cdf(z) + z * kInvSqrt2Pi * expf(-0.5f * z * z));
  }
};

template <>
struct Act<Activation::kGeluTanh> {
  __device__ __forceinline__ static float twice_u(float z) {
    return 2.0f * kSqrt2OverPi * (z + kGeluTanhCubic * z * z * z);
  }
  __device__ __forceinline__ static float value(float z) { return z * sigmoid(twice_u(z)); }
  __device__ __forceinline__ static float backward(float z, float g) {
    float slope;
    const float s = sigmoid_and_slope(twice_u(z), slope);
    return g * (s + 2.0f * z * slope * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * z * z));
  }
};

template <>
struct Act<Activation::kSilu> {
  __device__ __forceinline__ static float value(float z) { return z * sigmoid(z); }
  __device__ __forceinline__ static float backward(float z, float g) {
    float slope;
    const float s = sigmoid_and_slope(z, slope);
    return g * (s + z * slope);
  }
};

// Whether v takes over as a window's maximum m: strictly larger (ties keep the first), or NaN.
__device__ __forceinline__ bool replaces(float v, float m) { return v > m || v != v; }

template <Activation A>
__device__ __forceinline__ float window_forward(float z00, float z01, float z10, float z11) {
  float m = Act<A>::value(z00);
  const float a01 = Act<A>::value(z01);
  m = replaces(a01, m) ? a01 : m;
  const float a10 = Act<A>::value(z10);
  m = replaces(a10, m) ? a10 : m;
  const float a11 = Act<A>::value(z11);
  return replaces(a11, m) ? a11 : m;
}

// d[0 .. 3]: the gradients of a window's elements in window order (g * act'(z) at the one the forward picked, 0 at
// the others). Returns g * act'(z) of the picked one.
template <Activation A>
__device__ __forceinline__ float window_backward(float z00, float z01, float z10, float z11, float g, float (&d)[4]) {
  const float a00 = Act<A>::value(z00), a01 = Act<A>::value(z01);
  const float a10 = Act<A>::value(z10), a11 = Act<A>::value(z11);
  const bool s01 = replaces(a01, a00);
  const float m01 = s01 ? a01 : a00;
  const bool s10 = replaces(a10, m01);
  const bool s11 = replaces(a11, s10 ? a10 : m01);
  const float dz = Act<A>::backward(s11 ? z11 : s10 ? z10 : s01 ? z01 : z00, g);
  d[0] = s01 || s10 || s11 ? 0.0f : dz;
  d[1] = s01 && !(s10 || s11) ? dz : 0.0f;
  d[2] = s10 && !s11 ? dz : 0.0f;
  d[3] = s11 ? dz : 0.0f;
  return dz;
}

// ---------------------------------------------------------------------------------------------------------
// Chunks: N consecutive elements of T (N * sizeof(T) a multiple of 16 bytes) as float32.
// ---------------------------------------------------------------------------------------------------------

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Element k of the raw words of a chunk.
template <typename T, int W>
__device__ __forceinline__ float word_element(const uint32_t (&w)[W], int k) {
  if constexpr (sizeof(T) == 4) {
    return Elem<T>::to_float(w[k]);
  } else {
    return Elem<T>::to_float((w[k / 2] >> (16 * (k % 2))) & 0xffffu);
  }
}

// One element through the read-only path, as raw bits.
template <typename T>
__device__ __forceinline__ uint32_t load_bits(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(__ldg(reinterpret_cast<const float*>(p)));
  } else {
    return __ldg(reinterpret_cast<const unsigned short*>(p));
  }
}

// v[k] = p[k] for the first `valid` of N elements (the others 0): 16-byte vector loads when valid == N and p is
// 16-byte aligned, else element loads.
template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* p, int valid, float (&v)[N]) {
  constexpr int kWords = N * int(sizeof(T)) / 4;
  static_assert(kWords % 4 == 0, "a chunk is whole 16-byte vectors");
  if (valid == N && aligned16(p)) {
    uint32_t w[kWords];
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(p) + i);
      w[4 * i] = q.x;
      w[4 * i + 1] = q.y;
      w[4 * i + 2] = q.z;
      w[4 * i + 3] = q.w;
    }
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = word_element<T>(w, k);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = k < valid ? Elem<T>::to_float(load_bits(p + k)) : 0.0f;
  }
}

// p[k] = v[k] rounded to T for the first `valid` of N elements, as load_chunk's vectors or elements.
template <typename T, int N>
__device__ __forceinline__ void store_chunk(T* p, int valid, const float (&v)[N]) {
  constexpr int kSize = int(sizeof(T));
  constexpr int kWords = N * kSize / 4;
  if (valid == N && aligned16(p)) {
    uint32_t w[kWords];
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) w[k * kSize / 4] |= Elem<T>::to_bits(v[k]) << (8 * (k * kSize % 4));
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      reinterpret_cast<uint4*>(p)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < valid) Elem<T>::write(p + k, Elem<T>::to_bits(v[k]));
    }
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_zeros(T* p, int valid) {
  float z[N];
#pragma unroll
  for (int k = 0; k < N; ++k) z[k] = 0.0f;
  store_chunk<T, N>(p, valid, z);
}

// z = y + b of the `valid` windows k0 .. k0 + VEC - 1 of a line whose first window's (0, 0) element is at w0:
// z[0 .. 3][e], the elements (0,0), (0,1), (1,0), (1,1) of window k0 + e, plus b[e]. row: the stride between the
// window's rows; col (NHWC): between its pixels.
template <bool kNhwc, typename T, int VEC>
__device__ __forceinline__ void load_windows(const T* w0, int64_t k0, int valid, int64_t row, int64_t col,
                                             const float (&b)[VEC], float (&z)[4][VEC]) {
  if constexpr (kNhwc) {
    const T* p = w0 + k0;
    load_chunk(p, valid, z[0]);
    load_chunk(p + col, valid, z[1]);
    load_chunk(p + row, valid, z[2]);
    load_chunk(p + row + col, valid, z[3]);
  } else {
    float r0[2 * VEC], r1[2 * VEC];
    load_chunk(w0 + 2 * k0, 2 * valid, r0);
    load_chunk(w0 + 2 * k0 + row, 2 * valid, r1);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      z[0][e] = r0[2 * e];
      z[1][e] = r0[2 * e + 1];
      z[2][e] = r1[2 * e];
      z[3][e] = r1[2 * e + 1];
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) z[k][e] += b[e];
  }
}

// The inverse of load_windows: d[0 .. 3][e] to the elements of window k0 + e.
template <bool kNhwc, typename T, int VEC>
__device__ __forceinline__ void store_windows(T* w0, int64_t k0, int valid, int64_t row, int64_t col,
                                              const float (&d)[4][VEC]) {
  if constexpr (kNhwc) {
    T* p = w0 + k0;
    store_chunk(p, valid, d[0]);
    store_chunk(p + col, valid, d[1]);
    store_chunk(p + row, valid, d[2]);
    store_chunk(p + row + col, valid, d[3]);
  } else {
    float r0[2 * VEC], r1[2 * VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      r0[2 * e] = d[0][e];
      r0[2 * e + 1] = d[1][e];
      r1[2 * e] = d[2][e];
      r1[2 * e + 1] = d[3][e];
    }
    store_chunk(w0 + 2 * k0, 2 * valid, r0);
    store_chunk(w0 + 2 * k0 + row, 2 * valid, r1);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Lines.
// ---------------------------------------------------------------------------------------------------------

// Where line l (of channel ch in NCHW) starts in each tensor, in elements: with the pool, y and grad_y at the (0, 0)
// element of the line's first window. last_row: the line's windows sit above the row a floor-sized pool leaves out;
// last_col (NHWC): left of the column it leaves out (in NCHW only a line's last window is, see the backward).
struct Line {
  int64_t y, grad, out, grad_y;
  bool last_row, last_col;
};

template <bool kPool, bool kNhwc>
__device__ __forceinline__ Line line_at(const Params& p, int64_t ch, int64_t l) {
  constexpr int64_t kStep = kPool ? 2 : 1;  // input rows (and NHWC pixels) per output row (pixel)
  Line at;
  if constexpr (kNhwc) {
    const int64_t t = l / p.ow, j = l - t * p.ow, n = t / p.oh, i = t - n * p.oh;
    at.y = n * p.ys[0] + kStep * (i * p.ys[2] + j * p.ys[3]);
    at.grad = n * p.gs[0] + i * p.gs[2] + j * p.gs[3];
    at.out = l * p.c;
    at.grad_y = kPool ? ((n * p.h + 2 * i) * p.w + 2 * j) * p.c : at.out;
    at.last_row = kPool && (p.h % 2 == 1) && i == p.oh - 1;
    at.last_col = kPool && (p.w % 2 == 1) && j == p.ow - 1;
  } else {
    const int64_t n = l / p.inner, i = l - n * p.inner, plane = n * p.c + ch;
    at.y = n * p.ys[0] + ch * p.ys[1] + kStep * i * p.ys[2];
    at.grad = n * p.gs[0] + ch * p.gs[1] + i * p.gs[2];
    at.out = (plane * p.inner + i) * p.length;
    at.grad_y = kPool ? (plane * p.h + 2 * i) * p.w : at.out;
    at.last_row = kPool && (p.h % 2 == 1) && i == p.oh - 1;
    at.last_col = false;
  }
  return at;
}

// A thread's place: its chunk of every line (`valid` of its VEC elements lie in the line; 0 for an idle thread)
// and the first of the lines it takes in its block's slice.
struct Place {
  int64_t k0;
  int valid;
  int64_t first, end;  // lines first, first + pl, ... below end
};

__device__ __forceinline__ Place place_of(const Params& p, int vec) {
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % p.cg, row = t / p.cg;
  const int64_t chunk = static_cast<int64_t>(blockIdx.y) * p.cg + lane;
  Place at;
  at.k0 = chunk * vec;
  at.valid = row >= p.pl || chunk >= p.chunks ? 0 : (p.length - at.k0 < vec ? int(p.length - at.k0) : vec);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.lines_per_slice;
  at.first = begin + row;
  at.end = p.lines - begin < p.lines_per_slice ? p.lines : begin + p.lines_per_slice;
  return at;
}

// The bias of a thread's elements: channels k0 + e (NHWC) or ch (NCHW); 0 without a bias.
template <bool kNhwc, int VEC>
__device__ __forceinline__ void load_bias(const Params& p, int64_t ch, const Place& at, float (&b)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    b[e] = p.bias == nullptr || e >= at.valid ? 0.0f : p.bias[kNhwc ? at.k0 + e : ch];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernels. Grid: (slices of lines, chunk tiles of a line, NCHW channels); kThreads threads.
// ---------------------------------------------------------------------------------------------------------

template <typename T, Activation A, bool kPool, bool kNhwc>
__global__ void __launch_bounds__(kThreads) conv_epilogue_forward_kernel(const Params p) {
  constexpr int VEC = kVec<T>;
  const Place at = place_of(p, VEC);
  if (at.valid == 0) return;
  const T* y = static_cast<const T*>(p.y);
  T* out = static_cast<T*>(p.out);
  for (int64_t ch = blockIdx.z; ch < (kNhwc ? 1 : p.c); ch += gridDim.z) {
    float b[VEC];
    load_bias<kNhwc>(p, ch, at, b);
    for (int64_t l = at.first; l < at.end; l += p.pl) {
      const Line line = line_at<kPool, kNhwc>(p, ch, l);
      float o[VEC];
      if constexpr (kPool) {
        float z[4][VEC];
        load_windows<kNhwc>(y + line.y, at.k0, at.valid, p.ys[2], p.ys[3], b, z);
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[e] = window_forward<A>(z[0][e], z[1][e], z[2][e], z[3][e]);
      } else {
        float v[VEC];
        load_chunk(y + line.y + at.k0, at.valid, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[e] = Act<A>::value(v[e] + b[e]);
      }
      store_chunk(out + line.out + at.k0, at.valid, o);
    }
  }
}

// Dynamic shared memory: NHWC pl * cg * VEC floats, NCHW kThreads / 32 (for the bias gradient).
template <typename T, Activation A, bool kPool, bool kNhwc>
__global__ void __launch_bounds__(kThreads) conv_epilogue_backward_kernel(const Params p) {
  extern __shared__ float sums[];
  constexpr int VEC = kVec<T>;
  const Place at = place_of(p, VEC);  // idle threads (valid 0) still join the bias gradient's reduction
  const T* y = static_cast<const T*>(p.y);
  const T* grad = static_cast<const T*>(p.grad);
  T* grad_y = static_cast<T*>(p.out);
  const int64_t dy_row = kNhwc ? p.w * p.c : p.w;  // grad_y's stride between rows of the image
  const int64_t dy_col = kNhwc ? p.c : 1;          // and between its pixels
  for (int64_t ch = blockIdx.z; ch < (kNhwc ? 1 : p.c); ch += gridDim.z) {
    float b[VEC];
    load_bias<kNhwc>(p, ch, at, b);
    float acc[kNhwc ? VEC : 1] = {};  // the thread's sums of g * act'(z) per channel
    for (int64_t l = at.first; at.valid > 0 && l < at.end; l += p.pl) {
      const Line line = line_at<kPool, kNhwc>(p, ch, l);
      float g[VEC];
      load_chunk(grad + line.grad + at.k0, at.valid, g);
      if constexpr (kPool) {
        float z[4][VEC], d[4][VEC];
        load_windows<kNhwc>(y + line.y, at.k0, at.valid, p.ys[2], p.ys[3], b, z);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          float w[4];
          const float dz = window_backward<A>(z[0][e], z[1][e], z[2][e], z[3][e], g[e], w);
#pragma unroll
          for (int k = 0; k < 4; ++k) d[k][e] = w[k];
          acc[kNhwc ? e : 0] += e < at.valid ? dz : 0.0f;
        }
        T* w0 = grad_y + line.grad_y;
        store_windows<kNhwc>(w0, at.k0, at.valid, dy_row, dy_col, d);
        // Zeros where the floor-sized pool left y out: the row below the windows, the column right of them.
        if (line.last_row) {
          if constexpr (kNhwc) {
            store_zeros<T, VEC>(w0 + 2 * dy_row + at.k0, at.valid);
            store_zeros<T, VEC>(w0 + 2 * dy_row + dy_col + at.k0, at.valid);
          } else {
            store_zeros<T, 2 * VEC>(w0 + 2 * dy_row + 2 * at.k0, 2 * at.valid);
          }
        }
        if constexpr (kNhwc) {
          if (line.last_col) {
            for (int r = 0; r < (line.last_row ? 3 : 2); ++r) {
              store_zeros<T, VEC>(w0 + r * dy_row + 2 * dy_col + at.k0, at.valid);
            }
          }
        } else if (p.w % 2 == 1 && at.k0 + at.valid == p.ow) {  // the line's last window
          for (int r = 0; r < (line.last_row ? 3 : 2); ++r) Elem<T>::write(w0 + r * dy_row + 2 * p.ow, 0u);
        }
      } else {
        float v[VEC], d[VEC];
        load_chunk(y + line.y + at.k0, at.valid, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          d[e] = Act<A>::backward(v[e] + b[e], g[e]);
          acc[kNhwc ? e : 0] += e < at.valid ? d[e] : 0.0f;
        }
        store_chunk(grad_y + line.grad_y + at.k0, at.valid, d);
      }
    }
    if (p.partial == nullptr) continue;
    if constexpr (kNhwc) {
      // Column t of the block's chunks (channel blockIdx.y * cg * VEC + t): the sum of its lines in order.
      const int width = p.cg * VEC, t = static_cast<int>(threadIdx.x);
      if (t / p.cg < p.pl) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) sums[(t / p.cg) * width + (t % p.cg) * VEC + e] = acc[e];
      }
      __syncthreads();
      for (int col = t; col < width; col += kThreads) {
        const int64_t channel = static_cast<int64_t>(blockIdx.y) * width + col;
        if (channel >= p.c) break;
        float s = 0.0f;
        for (int r = 0; r < p.pl; ++r) s += sums[r * width + col];
        p.partial[static_cast<int64_t>(blockIdx.x) * p.c + channel] = s;
      }
    } else {
      const float s = group_reduce<32>(acc[0], SumOp());
      if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] = s;
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < kThreads / 32; ++w) total += sums[w];
        p.partial[(static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * p.c + ch] = total;
      }
      __syncthreads();  // sums is written again for the next channel
    }
  }
}

// grad_bias[col] = the sum over rows of partial (rows, c), in a fixed order: blocks of 32 columns, each thread of
// a column adding every (kThreads / 32)-th row, then the threads in order. Dynamic shared memory: kThreads floats.
__global__ void __launch_bounds__(kThreads) conv_epilogue_bias_grad_kernel(const float* partial, int64_t rows,
                                                                           int64_t c, float* grad_bias) {
  extern __shared__ float sums[];
  constexpr int kGroups = kThreads / 32;
  const int lane = static_cast<int>(threadIdx.x % 32), group = static_cast<int>(threadIdx.x / 32);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  float s = 0.0f;
  if (col < c) {
    for (int64_t r = group; r < rows; r += kGroups) s += partial[r * c + col];
  }
  sums[threadIdx.x] = s;
  __syncthreads();
  if (group == 0 && col < c) {
    float total = 0.0f;
    for (int k = 0; k < kGroups; ++k) total += sums[k * 32 + lane];
    grad_bias[col] = total;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------------------------

struct Launch {
  Params p;
  dim3 grid;
  int64_t partials;  // rows of the bias-gradient sums: one per block of a channel
};

bool is_empty(const ConvEpilogueShape& s) { return s.n == 0 || s.c == 0 || s.h == 0 || s.w == 0; }

// The lines, chunks and grid of a non-empty problem with vectors of `vec` elements; gs: grad's strides (null in the
// forward). slices: blocks along the lines, or 0 for enough blocks to fill `sms` multiprocessors.
cudaError_t plan_launch(const ConvEpilogueShape& s, const int64_t* ys, const int64_t* gs, int vec, int64_t slices,
                        int sms, Launch& launch) {
  Params& p = launch.p;
  p = Params{};
  p.n = s.n, p.c = s.c, p.h = s.h, p.w = s.w, p.oh = s.out_h(), p.ow = s.out_w();
  for (int i = 0; i < 4; ++i) {
    p.ys[i] = ys[i];
    p.gs[i] = gs != nullptr ? gs[i] : 0;
  }
  const int64_t max_chunks = kMaxTiles * kThreads;
  if (s.channels_last) {
    p.inner = p.ow;
    p.length = s.c;
    p.lines = s.n * p.oh * p.ow;
  } else {
    // Whole planes when the rows lie back to back in y (and grad) and the plane's chunks fit the grid.
    const bool dense = s.h == 1 || (ys[2] == s.w && (gs == nullptr || gs[2] == s.w));
    const bool planes = !s.pool && dense && (s.h * s.w + vec - 1) / vec <= max_chunks;
    p.inner = planes ? 1 : p.oh;
    p.length = planes ? s.h * s.w : p.ow;
    p.lines = s.n * p.inner;
  }
  p.chunks = (p.length + vec - 1) / vec;
  if (p.chunks > max_chunks) return cudaErrorInvalidValue;
  p.cg = static_cast<int>(p.chunks < kThreads ? p.chunks : kThreads);
  p.pl = kThreads / p.cg;
  const int64_t tiles = (p.chunks + p.cg - 1) / p.cg;
  const int64_t channels = s.channels_last ? 1 : (s.c < 65535 ? s.c : 65535);  // gridDim.z limit
  if (slices == 0) {  // else the plan's count, kept as it is (a slice past the lines adds zeros)
    const int64_t target = static_cast<int64_t>(sms) * kBlocksPerSm, others = tiles * channels;
    const int64_t most = (p.lines + p.pl - 1) / p.pl;  // a slice of pl lines or more
    slices = (target + others - 1) / others;
    slices = slices < most ? slices : most;
    slices = slices < 0x7fffffff ? slices : 0x7fffffff;  // gridDim.x limit
    slices = slices > 1 ? slices : 1;
    const int64_t per_slice = (p.lines + slices - 1) / slices;
    slices = (p.lines + per_slice - 1) / per_slice;  // none empty
  }
  p.lines_per_slice = (p.lines + slices - 1) / slices;
  launch.grid = dim3(static_cast<unsigned>(slices), static_cast<unsigned>(tiles), static_cast<unsigned>(channels));
  launch.partials = s.channels_last ? slices : slices * tiles;
  return cudaSuccess;
}

cudaError_t multiprocessors(int* sms) {
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (error == cudaSuccess && *sms < 1) *sms = 1;
  return error;
}

// dispatch's visitors: launch the kernels of element type T, activation Act::value, pool and layout.
struct ForwardLauncher {
  const Launch& l;
  cudaStream_t stream;
  template <typename T, class Act, class Pool, class Nhwc>
  cudaError_t operator()(T, Act, Pool, Nhwc) const {
    conv_epilogue_forward_kernel<T, Act::value, Pool::value, Nhwc::value><<<l.grid, kThreads, 0, stream>>>(l.p);
    return cudaGetLastError();
  }
};

struct BackwardLauncher {
  const Launch& l;
  cudaStream_t stream;
  template <typename T, class Act, class Pool, class Nhwc>
  cudaError_t operator()(T, Act, Pool, Nhwc) const {
    const size_t smem = sizeof(float) * (Nhwc::value ? size_t(l.p.pl) * l.p.cg * kVec<T> : kThreads / 32);
    conv_epilogue_backward_kernel<T, Act::value, Pool::value, Nhwc::value><<<l.grid, kThreads, smem, stream>>>(l.p);
    return cudaGetLastError();
  }
};

// Calls f(T{}) for the element type T of `dtype`; float64 is refused.
template <class F>
cudaError_t by_dtype(Dtype dtype, const F& f) {
  switch (dtype) {
    case Dtype::kHalf: return f(__half{});
    case Dtype::kBFloat16: return f(__nv_bfloat16{});
    case Dtype::kFloat: return f(float{});
    default: return cudaErrorInvalidValue;
  }
}

// Calls f(T{}, activation, pool, channels_last) with the last three as std::integral_constant.
template <class F>
cudaError_t dispatch(Dtype dtype, Activation activation, const ConvEpilogueShape& s, const F& f) {
  const bool pool = s.pool, nhwc = s.channels_last;
  return by_dtype(dtype, [&](auto t) {
    const auto with_layout = [&](auto act) {
      using std::false_type, std::true_type;
      if (pool) return nhwc ? f(t, act, true_type{}, true_type{}) : f(t, act, true_type{}, false_type{});
      return nhwc ? f(t, act, false_type{}, true_type{}) : f(t, act, false_type{}, false_type{});
    };
    switch (activation) {
      case Activation::kNone: return with_layout(std::integral_constant<Activation, Activation::kNone>{});
      case Activation::kRelu: return with_layout(std::integral_constant<Activation, Activation::kRelu>{});
      case Activation::kGelu: return with_layout(std::integral_constant<Activation, Activation::kGelu>{});
      case Activation::kGeluTanh: return with_layout(std::integral_constant<Activation, Activation::kGeluTanh>{});
      case Activation::kSilu: return with_layout(std::integral_constant<Activation, Activation::kSilu>{});
    }
    return cudaErrorInvalidValue;
  });
}

int vector_of(Dtype dtype) { return dtype == Dtype::kFloat ? kVec<float> : kVec<__half>; }

bool supported(Dtype dtype) { return dtype == Dtype::kHalf || dtype == Dtype::kBFloat16 || dtype == Dtype::kFloat; }

}  // namespace

cudaError_t conv_epilogue_forward_cuda(const ConvEpilogueForwardArgs& a, cudaStream_t stream) {
  if (!supported(a.dtype)) return cudaErrorInvalidValue;
  if (is_empty(a.shape)) return cudaSuccess;
  int sms = 0;
  cudaError_t error = multiprocessors(&sms);
  Launch l;
  if (error == cudaSuccess) error = plan_launch(a.shape, a.y_stride, nullptr, vector_of(a.dtype), 0, sms, l);
  if (error != cudaSuccess) return error;
  l.p.y = a.y;
  l.p.bias = static_cast<const float*>(a.bias);
  l.p.out = a.out;
  return dispatch(a.dtype, a.activation, a.shape, ForwardLauncher{l, stream});
}

cudaError_t conv_epilogue_backward_plan(const ConvEpilogueBackwardArgs& a, bool bias_grad,
                                        ConvEpilogueBackwardPlan* plan) {
  if (!supported(a.dtype)) return cudaErrorInvalidValue;
  *plan = ConvEpilogueBackwardPlan{};
  if (is_empty(a.shape)) return cudaSuccess;
  int sms = 0;
  cudaError_t error = multiprocessors(&sms);
  Launch l;
  if (error == cudaSuccess) error = plan_launch(a.shape, a.y_stride, a.grad_stride, vector_of(a.dtype), 0, sms, l);
  if (error != cudaSuccess) return error;
  plan->slices = l.grid.x;
  plan->partials = l.partials;
  plan->workspace_bytes = bias_grad ? sizeof(float) * static_cast<size_t>(l.partials * a.shape.c) : 0;
  return cudaSuccess;
}

cudaError_t conv_epilogue_backward_cuda(const ConvEpilogueBackwardArgs& a, const ConvEpilogueBackwardPlan& plan,
                                        float* grad_bias, void* workspace, cudaStream_t stream) {
  if (!supported(a.dtype)) return cudaErrorInvalidValue;
  int64_t partials = 0;
  if (!is_empty(a.shape)) {
    Launch l;
    const cudaError_t error =
        plan_launch(a.shape, a.y_stride, a.grad_stride, vector_of(a.dtype), plan.slices, 1, l);
    if (error != cudaSuccess) return error;
    if (l.partials != plan.partials) return cudaErrorInvalidValue;  // not this problem's plan
    l.p.y = a.y;
    l.p.grad = a.grad;
    l.p.bias = static_cast<const float*>(a.bias);
    l.p.out = a.grad_y;
    l.p.partial = grad_bias != nullptr ? static_cast<float*>(workspace) : nullptr;
    partials = l.partials;
    const cudaError_t launched = dispatch(a.dtype, a.activation, a.shape, BackwardLauncher{l, stream});
    if (launched != cudaSuccess) return launched;
  }
  if (grad_bias == nullptr || a.shape.c == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((a.shape.c + 31) / 32);
  conv_epilogue_bias_grad_kernel<<<blocks, kThreads, kThreads * sizeof(float), stream>>>(
      static_cast<const float*>(workspace), partials, a.shape.c, grad_bias);
  return cudaGetLastError();
}

}  // namespace fastattn
