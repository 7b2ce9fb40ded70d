// CUDA rotary position embedding kernel on raw pointers (the problem and arguments: csrc/rotary.h; the torch
// binding is csrc/cuda/rotary.cpp, keeping torch headers out of this file).
//
// One launch rotates q and k. Block (x, y) takes token x = b * S + s and a group of heads y of the list
// "q's heads, then k's heads":
//   1. its threads compute the token's P = rotary_dim / 2 angles once (cos and sin, float32) into shared memory:
//      inv_freq = exp2(-(2i / rotary_dim) * log2(base)) in double rounded to float, theta = float(pos) * inv_freq,
//      sincosf (the accurate libm version: the build does not use --use_fast_math); or a row of the tables;
//   2. its threads sweep the group's head rows in units of V pairs: a unit is one 16-byte vector per half
//      (half-split: x[i0 .. i0 + V) and x[P + i0 .. P + i0 + V)) or one 16-byte vector of V adjacent pairs
//      (interleaved), rotated in float32 and stored in place of the input's layout in the output;
//   3. when the output is a fresh tensor, they copy the features rotary_dim .. D - 1 (16 bytes at a time where
//      aligned).
// Consecutive threads take consecutive units of a row, so a warp reads and writes whole 128-byte lines. Where a
// tensor's pointer, strides or P are not multiples of a vector, the kernel is instantiated with V = 1 and
// element accesses. A thread reads each element of its unit before writing it, and no other thread touches
// it, so the output may be the input itself (in place).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../rotary.h"
#include "rotary_kernel.h"

namespace fastattn {
namespace {

constexpr int kThreads = 128;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(float v) { return v; }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float(float v) { return v; }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

// N elements loaded or stored as one aligned vector.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Pairs per 16-byte vector: half-split reads V pairs as two vectors of V elements, interleaved as one of 2V.
template <typename T, bool kInterleaved>
constexpr int kVectorPairs = (kInterleaved ? 8 : 16) / int(sizeof(T));

// The head row of token (b, s) in head h of the list "q's heads, then k's heads": input and output pointers.
template <typename T>
struct Row {
  const T* in;
  T* out;
  bool copy_rest;
};

template <typename T>
__device__ __forceinline__ Row<T> row_of(const RotaryArgs& a, int64_t b, int64_t s, int64_t h) {
  // Field by field, so that no address of the kernel's parameters is taken (that would copy them to local memory).
  const bool is_q = h < a.q.heads;
  const int64_t head = is_q ? h : h - a.q.heads;
  const void* in = is_q ? a.q.in : a.k.in;
  void* out = is_q ? a.q.out : a.k.out;
  const int64_t in_offset = b * (is_q ? a.q.in_stride[0] : a.k.in_stride[0]) +
                            head * (is_q ? a.q.in_stride[1] : a.k.in_stride[1]) +
                            s * (is_q ? a.q.in_stride[2] : a.k.in_stride[2]);
  const int64_t out_offset = b * (is_q ? a.q.out_stride[0] : a.k.out_stride[0]) +
                             head * (is_q ? a.q.out_stride[1] : a.k.out_stride[1]) +
                             s * (is_q ? a.q.out_stride[2] : a.k.out_stride[2]);
  return {static_cast<const T*>(in) + in_offset, static_cast<T*>(out) + out_offset, out != in};
}

// Loads V pairs starting at pair i0 of a row as (x1[j], x2[j]).
template <typename T, int V, bool kInterleaved>
__device__ __forceinline__ void load_pairs(const T* row, int i0, int pairs, float (&x1)[V], float (&x2)[V]) {
  if constexpr (V == 1) {
    x1[0] = to_float(row[kInterleaved ? 2 * i0 : i0]);
    x2[0] = to_float(row[kInterleaved ? 2 * i0 + 1 : i0 + pairs]);
  } else if constexpr (kInterleaved) {
    const Pack<T, 2 * V> p = *reinterpret_cast<const Pack<T, 2 * V>*>(row + 2 * i0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      x1[j] = to_float(p.v[2 * j]);
      x2[j] = to_float(p.v[2 * j + 1]);
    }
  } else {
    const Pack<T, V> p1 = *reinterpret_cast<const Pack<T, V>*>(row + i0);
    const Pack<T, V> p2 = *reinterpret_cast<const Pack<T, V>*>(row + pairs + i0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      x1[j] = to_float(p1.v[j]);
      x2[j] = to_float(p2.v[j]);
    }
  }
}

template <typename T, int V, bool kInterleaved>
__device__ __forceinline__ void store_pairs(T* row, int i0, int pairs, const float (&y1)[V], const float (&y2)[V]) {
  if constexpr (V == 1) {
    row[kInterleaved ? 2 * i0 : i0] = from_float<T>(y1[0]);
    row[kInterleaved ? 2 * i0 + 1 : i0 + pairs] = from_float<T>(y2[0]);
  } else if constexpr (kInterleaved) {
    Pack<T, 2 * V> p;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      p.v[2 * j] = from_float<T>(y1[j]);
      p.v[2 * j + 1] = from_float<T>(y2[j]);
    }
    *reinterpret_cast<Pack<T, 2 * V>*>(row + 2 * i0) = p;
  } else {
    Pack<T, V> p1, p2;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      p1.v[j] = from_float<T>(y1[j]);
      p2.v[j] = from_float<T>(y2[j]);
    }
    *reinterpret_cast<Pack<T, V>*>(row + i0) = p1;
    *reinterpret_cast<Pack<T, V>*>(row + pairs + i0) = p2;
  }
}

// One block: token blockIdx.x, heads [blockIdx.y * heads_per_block, ...) of q's then k's. V: pairs per unit
// (1: element accesses); vector_copy: the pass-through features are copied 16 bytes at a time.
template <typename T, int V, bool kInterleaved>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const RotaryArgs a, int heads_per_block, bool vector_copy) {
  extern __shared__ float angles[];  // cos[P], then sin[P]
  const int pairs = static_cast<int>(a.rotary_dim / 2);
  float* cos_s = angles;
  float* sin_s = angles + pairs;
  const int64_t token = blockIdx.x;
  const int64_t b = token / a.seq, s = token % a.seq;

  // 1. The token's angles.
  const int64_t pos = (a.positions != nullptr ? a.positions[b * a.positions_stride[0] + s * a.positions_stride[1]]
                                              : s + (a.offsets != nullptr ? a.offsets[b] : 0)) +
                      a.offset;
  for (int i = threadIdx.x; i < pairs; i += kThreads) {
    float c, sn;
    if (a.cos != nullptr) {
      if (pos < 0 || pos >= a.table_rows) {  // callers check positions; never read outside the tables
        c = sn = std::numeric_limits<float>::quiet_NaN();
      } else {
        c = static_cast<const float*>(a.cos)[pos * a.cos_stride + i];
        sn = static_cast<const float*>(a.sin)[pos * a.sin_stride + i];
      }
    } else {
      const float inv_freq = static_cast<float>(exp2(-(static_cast<double>(2 * i) / a.rotary_dim) * a.log2_base));
      sincosf(static_cast<float>(pos) * inv_freq, &sn, &c);
    }
    cos_s[i] = c;
    sin_s[i] = a.inverse ? -sn : sn;
  }
  __syncthreads();

  // 2. Rotate the rotary part of each head row of the group.
  const int64_t h_begin = static_cast<int64_t>(blockIdx.y) * heads_per_block;
  const int heads = static_cast<int>(min(static_cast<int64_t>(heads_per_block), a.q.heads + a.k.heads - h_begin));
  const int units = pairs / V;
  for (int item = threadIdx.x; item < heads * units; item += kThreads) {
    const Row<T> row = row_of<T>(a, b, s, h_begin + item / units);
    const int i0 = item % units * V;
    float x1[V], x2[V], y1[V], y2[V];
    load_pairs<T, V, kInterleaved>(row.in, i0, pairs, x1, x2);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float c = cos_s[i0 + j], sn = sin_s[i0 + j];
      y1[j] = x1[j] * c - x2[j] * sn;
      y2[j] = x2[j] * c + x1[j] * sn;
    }
    store_pairs<T, V, kInterleaved>(row.out, i0, pairs, y1, y2);
  }

  // 3. Copy features rotary_dim .. D - 1 into a fresh output.
  const int rest = static_cast<int>(a.head_dim - a.rotary_dim);
  if (rest == 0) return;
  constexpr int kCopy = 16 / int(sizeof(T));
  const int chunk = vector_copy ? kCopy : 1;
  const int chunks = rest / chunk;
  for (int item = threadIdx.x; item < heads * chunks; item += kThreads) {
    const Row<T> row = row_of<T>(a, b, s, h_begin + item / chunks);
    if (!row.copy_rest) continue;
    const int64_t e = a.rotary_dim + static_cast<int64_t>(item % chunks) * chunk;
    if (vector_copy) {
      *reinterpret_cast<uint4*>(row.out + e) = *reinterpret_cast<const uint4*>(row.in + e);
    } else {
      row.out[e] = row.in[e];
    }
  }
}

// Whether a tensor's rows start on `bytes` boundaries: its pointers and strides are multiples of it.
bool aligned(const RotaryTensor& t, int64_t element_size, int64_t bytes) {
  if (t.heads == 0) return true;
  if (reinterpret_cast<uintptr_t>(t.in) % bytes != 0 || reinterpret_cast<uintptr_t>(t.out) % bytes != 0) return false;
  for (int i = 0; i < 3; ++i) {
    if ((t.in_stride[i] * element_size) % bytes != 0 || (t.out_stride[i] * element_size) % bytes != 0) return false;
  }
  return true;
}

template <typename T, bool kInterleaved>
cudaError_t launch(const RotaryArgs& a, cudaStream_t stream) {
  const int64_t tokens = a.batch * a.seq;
  const int64_t heads = a.heads();
  if (tokens == 0 || heads == 0) return cudaSuccess;
  if (tokens > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidConfiguration;
  int device = 0, sms = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) return error;
  // Split the heads over blocks only when there are too few tokens to fill the GPU (decoding): each group then
  // computes the token's angles again.
  const int64_t wanted_groups = (4 * static_cast<int64_t>(sms) + tokens - 1) / tokens;
  const int64_t groups = std::min<int64_t>(std::max<int64_t>(wanted_groups, 1), std::min<int64_t>(heads, 65535));
  const int64_t heads_per_block = (heads + groups - 1) / groups;
  const int64_t grid_y = (heads + heads_per_block - 1) / heads_per_block;
  if (heads_per_block * std::max(a.rotary_dim, a.head_dim) > std::numeric_limits<int32_t>::max()) {
    return cudaErrorInvalidConfiguration;
  }

  const int64_t size = sizeof(T);
  constexpr int kV = kVectorPairs<T, kInterleaved>;
  const bool rows_aligned = aligned(a.q, size, 16) && aligned(a.k, size, 16);
  const bool vector_pairs = rows_aligned && a.pairs() % kV == 0;
  const bool vector_copy = rows_aligned && (a.rotary_dim * size) % 16 == 0 && (a.head_dim * size) % 16 == 0;
  const size_t shared = 2 * a.pairs() * sizeof(float);
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(grid_y));
  if (vector_pairs) {
    rotary_kernel<T, kV, kInterleaved>
        <<<grid, kThreads, shared, stream>>>(a, static_cast<int>(heads_per_block), vector_copy);
  } else {
    rotary_kernel<T, 1, kInterleaved>
        <<<grid, kThreads, shared, stream>>>(a, static_cast<int>(heads_per_block), vector_copy);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_layout(const RotaryArgs& a, cudaStream_t stream) {
  return a.interleaved ? launch<T, true>(a, stream) : launch<T, false>(a, stream);
}

}  // namespace

cudaError_t rotary_cuda(const RotaryArgs& args, cudaStream_t stream) {
  if (args.rotary_dim > kRotaryCudaMaxDim) return cudaErrorInvalidValue;
  switch (args.dtype) {
    case Dtype::kHalf: return dispatch_layout<__half>(args, stream);
    case Dtype::kBFloat16: return dispatch_layout<__nv_bfloat16>(args, stream);
    case Dtype::kFloat: return dispatch_layout<float>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastattn
