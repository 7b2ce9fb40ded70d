// CUDA positional-encoding kernels on raw pointers (the torch binding is csrc/cuda/positional.cpp; keeping torch
// headers out of this file keeps its compile short). Arguments and maths: csrc/positional.h.
//
// Layout, shared by the three kernels: a thread owns a group of 4 consecutive columns (columns 4g .. 4g + 3, the
// 4 columns of one Philox call of the elementwise dropout) and walks rows blockIdx.y, blockIdx.y + gridDim.y, ...;
// a block of 128 threads covers 512 columns. Per-column work that does not depend on the row (the sinusoid's
// frequencies, in double) is done once per thread. When every row start is aligned to 4 elements (dim % 4 == 0
// and aligned pointers and strides) the 4 columns move as one 8- or 16-byte vector; otherwise element by
// element. All arithmetic is in float32; the sinusoid reduces its angle in double (csrc/positional.h).
//
// embedding_scatter adds with float32 atomics into a zero-filled float32 buffer: rows that several entries share
// get their sums in a run-dependent order (not bitwise deterministic, unlike the CPU kernel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../positional.h"
#include "positional_kernel.h"

namespace fastattn {
namespace {

constexpr int kThreads = 128;      // threads per block, each owning 4 consecutive columns
constexpr int kBlocksPerSm = 16;   // blocks of the grid per multiprocessor (2048 threads)

// ---------------------------------------------------------------------------------------------------------
// Elements: float32 from and to float, half and bfloat16; 4 consecutive elements at once.
// ---------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The 16 bits of a half or bfloat16 element, and back.
__device__ __forceinline__ unsigned short to_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned short to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <class T>
__device__ __forceinline__ T from_bits(unsigned short b);
template <>
__device__ __forceinline__ __half from_bits<__half>(unsigned short b) { return __ushort_as_half(b); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(unsigned short b) { return __ushort_as_bfloat16(b); }

// v[0 .. 3] = p[0 .. 3] (read-only data): one vector load when kVec (p aligned to 4 elements), else `count` (1 .. 4)
// scalar loads and zeros.
template <class T, bool kVec>
__device__ __forceinline__ void load4(const T* p, int count, float (&v)[4]) {
  if constexpr (kVec && sizeof(T) == 4) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else if constexpr (kVec) {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
    v[0] = to_float(from_bits<T>(q.x & 0xFFFFu));
    v[1] = to_float(from_bits<T>(q.x >> 16));
    v[2] = to_float(from_bits<T>(q.y & 0xFFFFu));
    v[3] = to_float(from_bits<T>(q.y >> 16));
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = k < count ? to_float(__ldg(p + k)) : 0.0f;
  }
}

// p[0 .. count) = v, rounded to T: one vector store when kVec, else scalar stores.
template <class T, bool kVec>
__device__ __forceinline__ void store4(T* p, int count, const float (&v)[4]) {
  if constexpr (kVec && sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else if constexpr (kVec) {
    uint2 q;
    q.x = to_bits(from_float<T>(v[0])) | (static_cast<unsigned>(to_bits(from_float<T>(v[1]))) << 16);
    q.y = to_bits(from_float<T>(v[2])) | (static_cast<unsigned>(to_bits(from_float<T>(v[3]))) << 16);
    *reinterpret_cast<uint2*>(p) = q;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < count) p[k] = from_float<T>(v[k]);
    }
  }
}

// Elementwise dropout of the 4 columns of group `group` of dropout row `row`, in place.
__device__ __forceinline__ void apply_dropout(const Dropout& d, uint64_t row, int64_t group, float (&v)[4]) {
  const Philox4 w = elementwise_dropout_bits(d, row, static_cast<uint32_t>(group));
  const float keep = static_cast<float>(d.scale);
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = w.x[k] >= d.threshold ? v[k] * keep : 0.0f;
}

// ---------------------------------------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------------------------------------

template <class T, PeKind kPe, bool kDropout, bool kVec>
__global__ void __launch_bounds__(kThreads) positional_add_kernel(const PositionalAddArgs a) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t col = 4 * group;
  if (col >= a.dim) return;
  const int count = static_cast<int>(a.dim - col < 4 ? a.dim - col : 4);
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const T* table = static_cast<const T*>(a.table);
  const float scale = static_cast<float>(a.scale);
  // Columns 4g + 2p and 4g + 2p + 1 (p = 0, 1) are the sin and cos of column pair 2g + p.
  double turns[2] = {0.0, 0.0};
  if constexpr (kPe == PeKind::kSinusoid) {
#pragma unroll
    for (int p = 0; p < 2; ++p) turns[p] = pe::frequency(2 * group + p, a.dim, a.base) * pe::kInvTwoPi;
  }
  const int64_t rows = a.rows();
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t b = r / a.seq, s = r - b * a.seq;
    const int64_t pos = a.offset + (a.offsets ? a.offsets[b] : 0) + s;
    float v[4];
    load4<T, kVec>(x + b * a.x_stride_b + s * a.x_stride_s + col, count, v);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] *= scale;
    if constexpr (kPe == PeKind::kSinusoid) {
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        int quadrant;
        const float angle = pe::reduce_quarter_turns(static_cast<double>(pos), turns[p], quadrant);
        const float sin_r = pe::sin_small(angle), cos_r = pe::cos_small(angle);
        v[2 * p] += pe::select_quadrant(sin_r, cos_r, quadrant);
        v[2 * p + 1] += pe::select_quadrant(sin_r, cos_r, quadrant + 1);
      }
    }
    if constexpr (kPe == PeKind::kTable) {
      float t[4];
      if (pos >= 0 && pos < a.table_rows) {
        load4<T, kVec>(table + pos * a.table_stride + col, count, t);
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) t[k] = __int_as_float(0x7fc00000);  // NaN: a position outside the table
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] += t[k];
    }
    if constexpr (kDropout) apply_dropout(a.dropout, static_cast<uint64_t>(b * a.row_stride_b + s * a.row_stride_s), group, v);
    store4<T, kVec>(out + b * a.out_stride_b + s * a.out_stride_s + col, count, v);
  }
}

template <class T, bool kDropout, bool kVec>
__global__ void __launch_bounds__(kThreads) embedding_forward_kernel(const EmbeddingForwardArgs a) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t col = 4 * group;
  if (col >= a.dim) return;
  const int count = static_cast<int>(a.dim - col < 4 ? a.dim - col : 4);
  const T* token_weight = static_cast<const T*>(a.token_weight);
  const T* position_weight = static_cast<const T*>(a.position_weight);
  T* out = static_cast<T*>(a.out);
  const float token_scale = static_cast<float>(a.token_scale);
  const int64_t rows = a.rows();
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t b = r / a.seq, s = r - b * a.seq;
    const int64_t token = a.tokens[r];
    const int64_t pos = a.positions ? a.positions[r] : a.offset + (a.offsets ? a.offsets[b] : 0) + s;
    float v[4];
    if (token >= 0 && token < a.vocab && pos >= 0 && pos < a.max_positions) {
      float p[4];
      load4<T, kVec>(token_weight + token * a.token_stride + col, count, v);
      load4<T, kVec>(position_weight + pos * a.position_stride + col, count, p);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = v[k] * token_scale + p[k];
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = __int_as_float(0x7fc00000);  // NaN: an index out of range
    }
    if constexpr (kDropout) apply_dropout(a.dropout, static_cast<uint64_t>(r), group, v);
    store4<T, kVec>(out + r * a.dim + col, count, v);
  }
}

template <class T, bool kVec>
__global__ void __launch_bounds__(kThreads) embedding_scatter_kernel(const EmbeddingScatterArgs a) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t col = 4 * group;
  if (col >= a.dim) return;
  const int count = static_cast<int>(a.dim - col < 4 ? a.dim - col : 4);
  const T* grad = static_cast<const T*>(a.grad);
  float* acc = static_cast<float*>(a.out);
  const float scale = static_cast<float>(a.scale);
  for (int64_t n = blockIdx.y; n < a.n; n += gridDim.y) {
    const int64_t row = a.index[n];
    if (row == a.skip_row || row < 0 || row >= a.num_rows) continue;
    float g[4];
    load4<T, kVec>(grad + n * a.grad_stride + col, count, g);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < count) atomicAdd(acc + row * a.dim + col + k, g[k] * scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launch: grid, vector path, and the dispatch over dtype and features.
// ---------------------------------------------------------------------------------------------------------

template <class T>
bool aligned4(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

// A stride that keeps 4-element alignment across the rows of a dim of `size`.
inline bool stride4(int64_t stride, int64_t size) { return size <= 1 || stride % 4 == 0; }

// 4-column groups across blockIdx.x; rows across blockIdx.y, enough blocks to fill the device, each block walking
// several rows (which amortises the per-column setup).
inline cudaError_t grid_for(int64_t dim, int64_t rows, dim3& grid) {
  int device = 0, sms = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) return error;
  const int64_t groups = (dim + 3) / 4;
  const int64_t blocks_x = (groups + kThreads - 1) / kThreads;
  const int64_t target = static_cast<int64_t>(sms) * kBlocksPerSm;
  int64_t blocks_y = (target + blocks_x - 1) / blocks_x;
  blocks_y = blocks_y < rows ? blocks_y : rows;
  blocks_y = blocks_y < 65535 ? blocks_y : 65535;
  if (blocks_x > 2147483647) return cudaErrorInvalidValue;
  grid = dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y < 1 ? 1 : blocks_y));
  return cudaSuccess;
}

template <class T, PeKind kPe>
cudaError_t launch_add(const PositionalAddArgs& a, dim3 grid, bool vec, cudaStream_t stream) {
  if (a.dropout.on) {
    if (vec) {
      positional_add_kernel<T, kPe, true, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      positional_add_kernel<T, kPe, true, false><<<grid, kThreads, 0, stream>>>(a);
    }
  } else {
    if (vec) {
      positional_add_kernel<T, kPe, false, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      positional_add_kernel<T, kPe, false, false><<<grid, kThreads, 0, stream>>>(a);
    }
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t positional_add_typed(const PositionalAddArgs& a, cudaStream_t stream) {
  dim3 grid;
  const cudaError_t error = grid_for(a.dim, a.rows(), grid);
  if (error != cudaSuccess) return error;
  bool vec = a.dim % 4 == 0 && aligned4<T>(a.x) && aligned4<T>(a.out) && stride4(a.x_stride_b, a.batch) &&
             stride4(a.x_stride_s, a.seq) && stride4(a.out_stride_b, a.batch) && stride4(a.out_stride_s, a.seq);
  if (a.pe == PeKind::kTable) vec = vec && aligned4<T>(a.table) && stride4(a.table_stride, a.table_rows);
  switch (a.pe) {
    case PeKind::kNone: return launch_add<T, PeKind::kNone>(a, grid, vec, stream);
    case PeKind::kSinusoid: return launch_add<T, PeKind::kSinusoid>(a, grid, vec, stream);
    case PeKind::kTable: return launch_add<T, PeKind::kTable>(a, grid, vec, stream);
  }
  return cudaErrorInvalidValue;
}

template <class T>
cudaError_t embedding_forward_typed(const EmbeddingForwardArgs& a, cudaStream_t stream) {
  dim3 grid;
  const cudaError_t error = grid_for(a.dim, a.rows(), grid);
  if (error != cudaSuccess) return error;
  const bool vec = a.dim % 4 == 0 && aligned4<T>(a.out) && aligned4<T>(a.token_weight) &&
                   aligned4<T>(a.position_weight) && stride4(a.token_stride, a.vocab) &&
                   stride4(a.position_stride, a.max_positions);
  if (a.dropout.on) {
    if (vec) {
      embedding_forward_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      embedding_forward_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(a);
    }
  } else {
    if (vec) {
      embedding_forward_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      embedding_forward_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(a);
    }
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t embedding_scatter_typed(const EmbeddingScatterArgs& a, cudaStream_t stream) {
  dim3 grid;
  const cudaError_t error = grid_for(a.dim, a.n, grid);
  if (error != cudaSuccess) return error;
  const bool vec = a.dim % 4 == 0 && aligned4<T>(a.grad) && stride4(a.grad_stride, a.n);
  if (vec) {
    embedding_scatter_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    embedding_scatter_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// Calls fn.template operator()<T>() for the element type T of `dtype`; float64 is refused.
template <class F>
cudaError_t by_dtype(Dtype dtype, const F& fn) {
  switch (dtype) {
    case Dtype::kHalf: return fn(__half{});
    case Dtype::kBFloat16: return fn(__nv_bfloat16{});
    case Dtype::kFloat: return fn(float{});
    case Dtype::kDouble: return cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t positional_add_cuda(const PositionalAddArgs& args, cudaStream_t stream) {
  if (args.rows() == 0 || args.dim == 0) return args.dtype == Dtype::kDouble ? cudaErrorInvalidValue : cudaSuccess;
  return by_dtype(args.dtype, [&](auto tag) { return positional_add_typed<decltype(tag)>(args, stream); });
}

cudaError_t embedding_forward_cuda(const EmbeddingForwardArgs& args, cudaStream_t stream) {
  if (args.rows() == 0 || args.dim == 0) return args.dtype == Dtype::kDouble ? cudaErrorInvalidValue : cudaSuccess;
  return by_dtype(args.dtype, [&](auto tag) { return embedding_forward_typed<decltype(tag)>(args, stream); });
}

cudaError_t embedding_scatter_cuda(const EmbeddingScatterArgs& args, cudaStream_t stream) {
  if (args.n == 0 || args.dim == 0) return args.dtype == Dtype::kDouble ? cudaErrorInvalidValue : cudaSuccess;
  return by_dtype(args.dtype, [&](auto tag) { return embedding_scatter_typed<decltype(tag)>(args, stream); });
}

}  // namespace fastattn
