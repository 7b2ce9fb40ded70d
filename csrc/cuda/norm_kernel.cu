// CUDA LayerNorm / RMSNorm kernels, forward and backward, on raw pointers (the torch binding is csrc/cuda/norm.cpp;
// keeping torch headers out of this file keeps its compile short).
//
// Forward, per row of z = dropout(x) + residual (csrc/norm.h), z rounded to residual_out's dtype when it is stored:
//
//     mean = sum(z) / n  (0 for RMSNorm),   rstd = 1 / sqrt(sum((z - mean)^2) / n + eps),
//     out  = (z - mean) * rstd * weight + bias
//
// Backward, with zhat = (z - mean) * rstd, g = grad_out * weight, a = sum(g) / n, b = sum(g * zhat) / n:
//
//     dz = rstd * (g - a - zhat * b) + grad_residual  (RMSNorm: no a),   grad_x = dz * keep / (1 - p),
//     grad_weight = sum over rows of grad_out * zhat,  grad_bias = sum over rows of grad_out.
//
// All arithmetic is in float32. Kernel shapes, chosen by row length (forward_dispatch, backward_select):
//
//   rows kernels     G threads per row (G = 32: a warp, several rows per block; G = 64 .. 1024: a block), each
//                    thread holding CH chunks of the row in registers; reductions are warp shuffles, then shared
//                    memory across the warps of a row. Forward: z stays in registers between the statistics and
//                    the output, so x and the residual are read once and the mean and variance are two exact
//                    passes over registers. Backward: persistent blocks, each row group visiting every
//                    (blocks * rows per block)-th row; the row's raw bits stay in registers from the row sums to
//                    dz (g and zhat are recomputed from them), and each thread adds grad_out * zhat and grad_out
//                    of its own columns into its own shared-memory slots (registers cannot hold those sums too).
//   looped kernels   rows longer than the rows kernels take. Forward: a block per row; a first pass writes
//                    residual_out and merges per-chunk means and squared deviations (Chan, Golub and LeVeque's
//                    pairwise update), a second re-reads z and writes out. Backward: a kernel for the two row sums
//                    of every row, then blocks over (column tile, slice of rows) for dz.
//   affine kernel    sums the backward's per-block float32 partials of grad_weight and grad_bias (no atomics).
//
// Memory layout. A row is cut into chunks of VEC = 16 / sizeof(x) elements that start at multiples of VEC, so a
// chunk of x is one 16-byte load when the row starts 16-byte aligned. Chunks of the other tensors hold VEC
// elements too: 8, 16 or 32 bytes, as their dtypes may differ from x's (a float32 residual, residual_out or
// weight with 16-bit x). Each tensor's row start is checked on its own: a chunk that lies wholly in the row of a
// tensor whose row starts 16-byte aligned moves as vectors, everything else element by element. Thread t of a
// row's G threads owns chunks t, t + G, t + 2G, ..., so a warp's load instruction reads consecutive pieces.
// Dropout draws one Philox4x32-10 per 4 columns (csrc/philox.h; chunks start at multiples of 4).
//
// Every load of a row is issued before the first use of its data (the raw bits wait in registers), so each
// thread keeps its whole share of the row in flight at once.
#include <cstdint>
#include <type_traits>

#include "../norm.h"
#include "../philox.h"
#include "elements.h"
#include "norm_kernel.h"

namespace fastattn {
namespace {

// Blocks per SM asked of ptxas (__launch_bounds__): 1024 threads an SM, at most 64 registers a thread.
constexpr int min_blocks(int threads) { return threads >= 1024 ? 1 : 1024 / threads; }

// Vector loads and stores. kStream marks the last use of the data (evict-first); otherwise the default caching,
// which keeps data a later pass re-reads in L1 / L2. Never the read-only path: the looped forward re-reads
// residual_out, which it wrote itself.
template <bool kStream, typename V>
__device__ __forceinline__ V load_vector(const V* p) {
  if constexpr (kStream) {
    return __ldcs(p);
  } else {
    return *p;
  }
}

template <typename V>
__device__ __forceinline__ void store_vector(V* p, const V& v) {
  __stcs(p, v);  // outputs are not read again by these kernels (the looped forward's own re-read aside)
}

// ---------------------------------------------------------------------------------------------------------
// Chunks: N consecutive elements (N = VEC of x) of a tensor of dtype S as raw bits, element k in bytes
// [k * sizeof(S), (k + 1) * sizeof(S)) of the words: 8, 16 or 32 bytes.
// ---------------------------------------------------------------------------------------------------------

template <typename S, int N>
struct Chunk {
  static constexpr int kSize = int(sizeof(S));
  static constexpr int kBytes = N * kSize;
  static_assert(kBytes == 8 || kBytes == 16 || kBytes == 32, "Chunk: unexpected size");
  uint32_t w[kBytes / 4];

  // The chunk at p (its first element): `valid` of its N elements lie in the row (the others read as zero bits);
  // vec: p is aligned for vector loads and valid == N.
  template <bool kStream>
  __device__ __forceinline__ void load(const S* p, int valid, bool vec) {
    if (vec) {
      if constexpr (kBytes == 8) {
        const uint2 v = load_vector<kStream>(reinterpret_cast<const uint2*>(p));
        w[0] = v.x;
        w[1] = v.y;
      } else {
#pragma unroll
        for (int i = 0; i < kBytes / 16; ++i) {
          const uint4 v = load_vector<kStream>(reinterpret_cast<const uint4*>(p) + i);
          w[4 * i] = v.x;
          w[4 * i + 1] = v.y;
          w[4 * i + 2] = v.z;
          w[4 * i + 3] = v.w;
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kBytes / 4; ++i) w[i] = 0;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (k < valid) w[k * kSize / 4] |= Elem<S>::read(p + k) << (8 * (k * kSize % 4));
      }
    }
  }

  __device__ __forceinline__ float get(int k) const {
    if constexpr (kSize == 4) {
      return Elem<S>::to_float(w[k]);
    } else {
      return Elem<S>::to_float((w[k / 2] >> (16 * (k % 2))) & 0xffffu);
    }
  }
};

// Stores v[0 .. valid) to p (dtype S), as vectors when vec (p aligned, valid == N).
template <typename S, int N>
__device__ __forceinline__ void store_chunk(S* p, const float (&v)[N], int valid, bool vec) {
  constexpr int kSize = int(sizeof(S));
  constexpr int kBytes = N * kSize;
  if (vec) {
    uint32_t w[kBytes / 4];
#pragma unroll
    for (int i = 0; i < kBytes / 4; ++i) w[i] = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) w[k * kSize / 4] |= Elem<S>::to_bits(v[k]) << (8 * (k * kSize % 4));
    if constexpr (kBytes == 8) {
      store_vector(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
    } else {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) {
        store_vector(reinterpret_cast<uint4*>(p) + i, make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]));
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < valid) Elem<S>::write(p + k, Elem<S>::to_bits(v[k]));
    }
  }
}

// The tensors not held across a pass (weight, bias, residual_out, grad_residual_in) are float32 or x's dtype T,
// known at run time (`fp32`); `row` is column 0 of the tensor's row.
template <typename T, int N>
__device__ __forceinline__ void load_side(const void* row, bool fp32, int64_t col0, int valid, bool vec,
                                          float (&v)[N]) {
  if (fp32) {
    Chunk<float, N> c;
    c.template load<false>(static_cast<const float*>(row) + col0, valid, vec);
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = c.get(k);
  } else {
    Chunk<T, N> c;
    c.template load<false>(static_cast<const T*>(row) + col0, valid, vec);
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = c.get(k);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_side(void* row, bool fp32, int64_t col0, const float (&v)[N], int valid,
                                           bool vec) {
  if (fp32) {
    store_chunk(static_cast<float*>(row) + col0, v, valid, vec);
  } else {
    store_chunk(static_cast<T*>(row) + col0, v, valid, vec);
  }
}

// f rounded to T unless fp32.
template <typename T>
__device__ __forceinline__ float round_side(bool fp32, float f) {
  return fp32 ? f : Elem<T>::to_float(Elem<T>::to_bits(f));
}

// How many of the N columns from col0 lie in a row of n (0 when none).
template <int N, typename I>
__device__ __forceinline__ int chunk_valid(I col0, I n) {
  return col0 >= n ? 0 : (n - col0 >= N ? N : static_cast<int>(n - col0));
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename S>
__device__ __forceinline__ const S* row_of(const void* base, int64_t row, int64_t stride) {
  return static_cast<const S*>(base) + row * stride;
}

// Column 0 of row `row` of a contiguous (rows, n) tensor that is float32 or T.
template <typename T>
__device__ __forceinline__ void* side_row(void* base, bool fp32, int64_t row, int64_t n) {
  return static_cast<char*>(base) + row * n * (fp32 ? 4 : int64_t(sizeof(T)));
}

// The dropout factors of columns col0 .. col0 + N - 1 of `row` (col0 a multiple of 4): 1 / (1 - p) where kept,
// 0 where dropped, one Philox call per 4 columns that reach into the row, one call at a time (interleaving them
// only costs registers). A factor, not a select, so that a dropped NaN or infinity stays NaN, as in torch.
template <int N>
__device__ __forceinline__ void dropout_factors(const Dropout& d, float scale, int64_t row, int64_t col0, int valid,
                                                float (&f)[N]) {
  uint32_t keep = 0;
#pragma unroll 1
  for (int q = 0; q < N; q += 4) {
    if (q < valid) {
      const Philox4 bits =
          elementwise_dropout_bits(d, static_cast<uint64_t>(row), static_cast<uint32_t>((col0 + q) / 4));
#pragma unroll
      for (int k = 0; k < 4; ++k) keep |= uint32_t(bits.x[k] >= d.threshold) << (q + k);
    }
  }
#pragma unroll
  for (int k = 0; k < N; ++k) f[k] = (keep >> k & 1u) != 0 ? scale : 0.0f;
}

// ---------------------------------------------------------------------------------------------------------
// Reductions over the G threads of a row (G a multiple of 32; G > 32: ROWS row groups of G threads share the
// block, each with its own `buf`).
// ---------------------------------------------------------------------------------------------------------

// Every thread of the row gets the sum of v over the row. buf: G / 32 floats of shared memory for this call only
// (so no barrier is needed after it); G > 32 needs every thread of the block here (a __syncthreads).
template <int G>
__device__ __forceinline__ float row_sum(float v, float* buf) {
  v = group_reduce<32>(v, SumOp());
  if constexpr (G > 32) {
    constexpr int kWarps = G / 32;
    const int lane = threadIdx.x % 32;
    if (lane == 0) buf[threadIdx.x % G / 32] = v;
    __syncthreads();
    // Every group of kWarps lanes reads all the partial sums, so every lane ends with the total.
    v = group_reduce<kWarps>(buf[lane % kWarps], SumOp());
  }
  return v;
}

// Two sums at once, with one barrier. buf: 2 * G / 32 floats.
template <int G>
__device__ __forceinline__ void row_sum2(float& a, float& b, float* buf) {
  a = group_reduce<32>(a, SumOp());
  b = group_reduce<32>(b, SumOp());
  if constexpr (G > 32) {
    constexpr int kWarps = G / 32;
    const int lane = threadIdx.x % 32, warp = threadIdx.x % G / 32;
    if (lane == 0) {
      buf[warp] = a;
      buf[kWarps + warp] = b;
    }
    __syncthreads();
    a = group_reduce<kWarps>(buf[lane % kWarps], SumOp());
    b = group_reduce<kWarps>(buf[kWarps + lane % kWarps], SumOp());
  }
}

// Count, sum and sum of squared deviations from their mean of a set of values, merged pairwise (Chan, Golub and
// LeVeque 1979). The sum, not the mean, is carried: the mean is then as exact as a plain sum (a running mean
// updated at every merge drifts by an ulp a merge).
struct Moments {
  float count, sum, m2;
};

__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  if (a.count == 0.0f) return b;
  if (b.count == 0.0f) return a;
  const float count = a.count + b.count;
  const float delta = b.sum / b.count - a.sum / a.count;
  return {count, a.sum + b.sum, a.m2 + b.m2 + delta * delta * (a.count * b.count / count)};
}

__device__ __forceinline__ Moments shfl_xor(const Moments& m, int offset) {
  return {__shfl_xor_sync(0xffffffffu, m.count, offset), __shfl_xor_sync(0xffffffffu, m.sum, offset),
          __shfl_xor_sync(0xffffffffu, m.m2, offset)};
}

// The moments of the whole block (BLOCK threads, one row); buf: 3 * BLOCK / 32 floats.
template <int BLOCK>
__device__ __forceinline__ Moments block_moments(Moments m, float* buf) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) m = merge(m, shfl_xor(m, offset));
  if constexpr (BLOCK > 32) {
    constexpr int kWarps = BLOCK / 32;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
      buf[warp] = m.count;
      buf[kWarps + warp] = m.sum;
      buf[2 * kWarps + warp] = m.m2;
    }
    __syncthreads();
    const int w = lane % kWarps;
    m = {buf[w], buf[kWarps + w], buf[2 * kWarps + w]};
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset /= 2) m = merge(m, shfl_xor(m, offset));
  }
  return m;
}

// ---------------------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------------------

struct ForwardParams {
  const void* x;         // (rows, n), row stride xs, unit column stride; x's dtype T
  const void* residual;  // (rows, n), row stride rs, the kernel's R (T or float32); null: none
  const void* weight;    // (n,), float32 when weight_fp32, else T; null: none
  const void* bias;      // (n,), as weight; null: none
  void* out;             // contiguous (rows, n), T
  void* residual_out;    // contiguous (rows, n), float32 when residual_out_fp32, else T: z; null: not stored
  float* mean;           // (rows,); null for RMSNorm
  float* rstd;           // (rows,)
  int64_t rows;
  int64_t row_begin;     // the first row of this launch (launches split only past the grid limit)
  int64_t n, xs, rs;
  bool weight_fp32, residual_out_fp32;
  bool weight_vec, bias_vec;  // weight / bias start 16-byte aligned
  bool rms;
  float eps;
  float keep_scale;      // 1 / (1 - p)
  Dropout dropout;
};

// One row of the forward problem: its pointers and which of them allow vector accesses.
template <typename T, typename R>
struct ForwardRow {
  const T* x;
  const R* residual;
  T* out;
  void* residual_out;
  bool x_vec, residual_vec, out_vec, residual_out_vec;

  __device__ __forceinline__ ForwardRow(const ForwardParams& p, int64_t row) {
    x = row_of<T>(p.x, row, p.xs);
    residual = p.residual != nullptr ? row_of<R>(p.residual, row, p.rs) : nullptr;
    out = static_cast<T*>(p.out) + row * p.n;
    residual_out = p.residual_out != nullptr ? side_row<T>(p.residual_out, p.residual_out_fp32, row, p.n) : nullptr;
    x_vec = aligned16(x);
    residual_vec = aligned16(residual);
    out_vec = aligned16(out);
    residual_out_vec = aligned16(residual_out);
  }

  // Issues the loads of the chunk of x and of the residual at col0.
  template <bool kStream, int N>
  __device__ __forceinline__ void load(int64_t col0, int valid, Chunk<T, N>& xc, Chunk<R, N>& rc) const {
    xc.template load<kStream>(x + col0, valid, x_vec && valid == N);
    if (residual != nullptr) rc.template load<true>(residual + col0, valid, residual_vec && valid == N);
  }

  // z of the chunk at col0 from its loaded x and residual: dropout, the residual, and the rounding to
  // residual_out's dtype with the store of residual_out. Zero past the row's end.
  template <int N>
  __device__ __forceinline__ void z(const ForwardParams& p, int64_t row, int64_t col0, int valid,
                                    const Chunk<T, N>& xc, const Chunk<R, N>& rc, float (&v)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = xc.get(k);
    if (p.dropout.on) {
      float f[N];
      dropout_factors(p.dropout, p.keep_scale, row, col0, valid, f);
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] *= f[k];
    }
    if (residual != nullptr) {
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] += rc.get(k);
    }
    if (residual_out != nullptr) {
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] = round_side<T>(p.residual_out_fp32, v[k]);
      if (valid > 0) store_side<T>(residual_out, p.residual_out_fp32, col0, v, valid, residual_out_vec && valid == N);
    }
  }

  // Stores out of the chunk at col0 from z and the row's statistics.
  template <int N>
  __device__ __forceinline__ void store_out(const ForwardParams& p, int64_t col0, int valid, const float (&v)[N],
                                            float mean, float rstd) const {
    float y[N];
#pragma unroll
    for (int k = 0; k < N; ++k) y[k] = (v[k] - mean) * rstd;
    if (p.weight != nullptr) {
      float w[N];
      load_side<T>(p.weight, p.weight_fp32, col0, valid, p.weight_vec && valid == N, w);
#pragma unroll
      for (int k = 0; k < N; ++k) y[k] *= w[k];
    }
    if (p.bias != nullptr) {
      float b[N];
      load_side<T>(p.bias, p.weight_fp32, col0, valid, p.bias_vec && valid == N, b);
#pragma unroll
      for (int k = 0; k < N; ++k) y[k] += b[k];
    }
    store_chunk(out + col0, y, valid, out_vec && valid == N);
  }
};

// Rows held in registers: G threads per row (ROWS rows per block when G == 32, else one), CH chunks a thread;
// the launcher guarantees n <= G * CH * VEC.
template <typename T, typename R, int G, int ROWS, int CH>
__global__ void __launch_bounds__(G * ROWS, min_blocks(G * ROWS)) norm_forward_rows_kernel(const ForwardParams p) {
  constexpr int VEC = kVec<T>;
  static_assert(G % 32 == 0 && (G == 32 || ROWS == 1), "a row is a warp or a block");
  extern __shared__ float smem[];  // G > 32: two reductions of G / 32 floats
  const int t = threadIdx.x % G;
  const int64_t row = p.row_begin + static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / G;
  if (row >= p.rows) return;  // a whole warp (G == 32); blocks of G > 32 always have a row
  const ForwardRow<T, R> r(p, row);
  const int n = static_cast<int>(p.n);

  Chunk<T, VEC> xc[CH];
  Chunk<R, VEC> rc[CH];
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int col0 = (t + c * G) * VEC;
    r.template load<true>(col0, chunk_valid<VEC>(col0, n), xc[c], rc[c]);
  }
  float z[CH][VEC];
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int col0 = (t + c * G) * VEC;
    r.z(p, row, col0, chunk_valid<VEC>(col0, n), xc[c], rc[c], z[c]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += z[c][k];
  }
  float mean = 0.0f;
  if (!p.rms) mean = row_sum<G>(sum, smem) / static_cast<float>(n);
  float squares = 0.0f;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int valid = chunk_valid<VEC>((t + c * G) * VEC, n);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = z[c][k] - mean;
      if (k < valid) squares += d * d;
    }
  }
  const float rstd = 1.0f / sqrtf(row_sum<G>(squares, smem + G / 32) / static_cast<float>(n) + p.eps);
  if (t == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int col0 = (t + c * G) * VEC, valid = chunk_valid<VEC>(col0, n);
    if (valid > 0) r.store_out(p, col0, valid, z[c], mean, rstd);
  }
}

// Rows of any length: one block per row, U chunks a thread per step. Pass 1 computes z (storing residual_out) and
// its moments, pass 2 re-reads z (residual_out, or x when z is x) and writes out.
template <typename T, typename R, int BLOCK, int U>
__global__ void __launch_bounds__(BLOCK, min_blocks(BLOCK)) norm_forward_looped_kernel(const ForwardParams p) {
  constexpr int VEC = kVec<T>;
  extern __shared__ float smem[];  // 3 * BLOCK / 32 floats
  const int64_t row = p.row_begin + blockIdx.x;
  const ForwardRow<T, R> r(p, row);
  const int64_t n = p.n, chunks = (n + VEC - 1) / VEC;

  Moments m{0.0f, 0.0f, 0.0f};
  for (int64_t base = 0; base < chunks; base += BLOCK * U) {
    Chunk<T, VEC> xc[U];
    Chunk<R, VEC> rc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t col0 = (base + u * BLOCK + threadIdx.x) * VEC;
      r.template load<false>(col0, chunk_valid<VEC>(col0, n), xc[u], rc[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t col0 = (base + u * BLOCK + threadIdx.x) * VEC;
      const int valid = chunk_valid<VEC>(col0, n);
      if (valid == 0) continue;
      float z[VEC];
      r.z(p, row, col0, valid, xc[u], rc[u], z);
      // The chunk's own moments (sum 0 for RMSNorm: m2 is then the sum of squares), merged into the thread's.
      Moments c{static_cast<float>(valid), 0.0f, 0.0f};
      if (!p.rms) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) c.sum += z[k];  // zero past the row
      }
      const float chunk_mean = c.sum / c.count;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = z[k] - chunk_mean;
        if (k < valid) c.m2 += d * d;
      }
      m = merge(m, c);
    }
  }
  m = block_moments<BLOCK>(m, smem);
  const float mean = m.sum / static_cast<float>(n);
  const float rstd = 1.0f / sqrtf(m.m2 / static_cast<float>(n) + p.eps);
  if (threadIdx.x == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

  for (int64_t base = 0; base < chunks; base += BLOCK * U) {
    float z[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t col0 = (base + u * BLOCK + threadIdx.x) * VEC;
      const int valid = chunk_valid<VEC>(col0, n);
      if (r.residual_out != nullptr) {
        // This thread wrote these elements in pass 1.
        if (p.residual_out_fp32) {
          Chunk<float, VEC> c;
          c.template load<true>(static_cast<const float*>(r.residual_out) + col0, valid,
                                r.residual_out_vec && valid == VEC);
#pragma unroll
          for (int k = 0; k < VEC; ++k) z[u][k] = c.get(k);
        } else {
          Chunk<T, VEC> c;
          c.template load<true>(static_cast<const T*>(r.residual_out) + col0, valid,
                                r.residual_out_vec && valid == VEC);
#pragma unroll
          for (int k = 0; k < VEC; ++k) z[u][k] = c.get(k);
        }
      } else {
        Chunk<T, VEC> c;
        c.template load<true>(r.x + col0, valid, r.x_vec && valid == VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) z[u][k] = c.get(k);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t col0 = (base + u * BLOCK + threadIdx.x) * VEC;
      const int valid = chunk_valid<VEC>(col0, n);
      if (valid > 0) r.store_out(p, col0, valid, z[u], mean, rstd);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------------------

struct BackwardParams {
  const void* grad_out;       // (rows, n), row stride gs, unit column stride; x's dtype T
  const void* grad_residual;  // (rows, n), row stride grs, the kernel's Z (z's dtype: T or float32); null: none
  const void* z;              // (rows, n), row stride zs, Z
  const void* weight;         // (n,), float32 when weight_fp32, else T; null: none
  const float* mean;          // (rows,); null for RMSNorm
  const float* rstd;          // (rows,)
  void* grad_x;               // contiguous (rows, n), T
  void* grad_residual_in;     // contiguous (rows, n), float32 when residual_fp32, else T; null: none
  float* partial;             // (2, partials, n): partial sums of grad_weight, then of grad_bias; null: neither
  float* row_sums;            // (rows, 2): sum(g) and sum(g * zhat) of each row (long rows' kernels)
  int64_t rows;
  int64_t row_begin;          // the first row of this launch (row sums kernel, split past the grid limit)
  int64_t n, gs, grs, zs;
  int64_t partials;
  int64_t rows_per_slice;     // tiles kernel: rows per blockIdx.y
  bool weight_fp32, residual_fp32;
  bool weight_vec;            // weight starts 16-byte aligned
  bool rms;
  float keep_scale;           // 1 / (1 - p)
  Dropout dropout;
};

// One row of the backward problem: its pointers, which allow vector accesses, and its statistics.
template <typename T, typename Z>
struct BackwardRow {
  const T* grad_out;
  const Z* grad_residual;
  const Z* z;
  T* grad_x;
  void* grad_residual_in;
  float mean, rstd;
  bool go_vec, gr_vec, z_vec, gx_vec, gri_vec;

  __device__ __forceinline__ BackwardRow(const BackwardParams& p, int64_t row) {
    grad_out = row_of<T>(p.grad_out, row, p.gs);
    grad_residual = p.grad_residual != nullptr ? row_of<Z>(p.grad_residual, row, p.grs) : nullptr;
    z = row_of<Z>(p.z, row, p.zs);
    grad_x = static_cast<T*>(p.grad_x) + row * p.n;
    grad_residual_in =
        p.grad_residual_in != nullptr ? side_row<T>(p.grad_residual_in, p.residual_fp32, row, p.n) : nullptr;
    go_vec = aligned16(grad_out);
    gr_vec = aligned16(grad_residual);
    z_vec = aligned16(z);
    gx_vec = aligned16(grad_x);
    gri_vec = aligned16(grad_residual_in);
    mean = p.mean != nullptr ? p.mean[row] : 0.0f;
    rstd = p.rstd[row];
  }

  template <bool kStream, int N>
  __device__ __forceinline__ void load(int64_t col0, int valid, Chunk<T, N>& goc, Chunk<Z, N>& zc) const {
    goc.template load<kStream>(grad_out + col0, valid, go_vec && valid == N);
    zc.template load<kStream>(z + col0, valid, z_vec && valid == N);
  }

  // grad_out, g = grad_out * weight and zhat of the chunk at col0 from its loaded grad_out and z.
  template <int N>
  __device__ __forceinline__ void g_zhat(const BackwardParams& p, int64_t col0, int valid, const Chunk<T, N>& goc,
                                         const Chunk<Z, N>& zc, float (&go)[N], float (&g)[N],
                                         float (&zhat)[N]) const {
    float w[N];
    if (p.weight != nullptr) load_side<T>(p.weight, p.weight_fp32, col0, valid, p.weight_vec && valid == N, w);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      go[k] = goc.get(k);
      zhat[k] = (zc.get(k) - mean) * rstd;
      g[k] = p.weight != nullptr ? go[k] * w[k] : go[k];
    }
  }

  // dz of the chunk at col0 from g, zhat and the row's a = mean(g) (0 for RMSNorm) and b = mean(g * zhat); stores
  // grad_residual_in and grad_x.
  template <int N>
  __device__ __forceinline__ void store_dz(const BackwardParams& p, int64_t row, int64_t col0, int valid,
                                           const float (&g)[N], const float (&zhat)[N], float a, float b) const {
    float dz[N];
    Chunk<Z, N> grc;
    if (grad_residual != nullptr) grc.template load<true>(grad_residual + col0, valid, gr_vec && valid == N);
#pragma unroll
    for (int k = 0; k < N; ++k) dz[k] = rstd * (g[k] - a - zhat[k] * b);
    if (grad_residual != nullptr) {
#pragma unroll
      for (int k = 0; k < N; ++k) dz[k] += grc.get(k);
    }
    if (grad_residual_in != nullptr) {
      store_side<T>(grad_residual_in, p.residual_fp32, col0, dz, valid, gri_vec && valid == N);
    }
    if (p.dropout.on) {
      float f[N];
      dropout_factors(p.dropout, p.keep_scale, row, col0, valid, f);
#pragma unroll
      for (int k = 0; k < N; ++k) dz[k] *= f[k];
    }
    store_chunk(grad_x + col0, dz, valid, gx_vec && valid == N);
  }
};

// The shared-memory sums of a rows kernel's row group: grad_out * zhat (which 0) and grad_out (which 1) of element
// k of chunk c of thread t, in float4 slots that thread t alone touches until the end (so no barrier), adjacent
// threads' slots adjacent (so a warp's 16-byte accesses are free of bank conflicts).
template <int G, int CH, int VEC>
struct AffineSums {
  static constexpr int kCap = G * CH * VEC;  // floats per sum: the row capacity
  float* base;                               // the group's 2 * kCap floats

  __device__ __forceinline__ float4* slot(int which, int t, int c, int quad) const {
    return reinterpret_cast<float4*>(base + which * kCap) + (c * (VEC / 4) + quad) * G + t;
  }
  // The float of column col (0 <= col < kCap) of sum `which`.
  __device__ __forceinline__ float at(int which, int col) const {
    const int chunk = col / VEC, k = col % VEC;
    return base[which * kCap + ((chunk / G * (VEC / 4) + k / 4) * G + chunk % G) * 4 + k % 4];
  }
};

// Rows held in registers, persistent: ROWS row groups of G threads per block (ROWS > 1 only when G < 256), group
// j of block i visiting rows ROWS * i + j, then that plus ROWS * gridDim.x, and so on; CH chunks a thread, whose
// raw bits stay in registers from the row sums to dz; the launcher guarantees n <= G * CH * VEC. Each thread adds
// grad_out * zhat and grad_out of its columns into its slots of the group's AffineSums; at the end the block adds
// its groups' sums and writes them as one partial row.
template <typename T, typename Z, int G, int ROWS, int CH>
__global__ void __launch_bounds__(G * ROWS, min_blocks(G * ROWS)) norm_backward_rows_kernel(const BackwardParams p) {
  constexpr int VEC = kVec<T>, kWarps = G / 32;
  static_assert(G % 32 == 0 && VEC % 4 == 0, "a row is one or more warps");
  using Sums = AffineSums<G, CH, VEC>;
  // Shared memory: each row group's Sums (when a grad_weight or grad_bias is wanted), then the row sums' buffers
  // (two, by step parity, so one barrier a step suffices: a buffer is rewritten two steps later, after every
  // thread has passed the barrier of the step in between).
  extern __shared__ float smem[];
  const bool affine = p.partial != nullptr;
  float* const reduce_buf = smem + (affine ? ROWS * 2 * Sums::kCap : 0);
  const int t = threadIdx.x % G, group = threadIdx.x / G;
  const Sums sums{smem + group * 2 * Sums::kCap};
  const int n = static_cast<int>(p.n);
  if (affine) {
#pragma unroll
    for (int which = 0; which < 2; ++which) {
#pragma unroll
      for (int c = 0; c < CH; ++c) {
#pragma unroll
        for (int quad = 0; quad < VEC / 4; ++quad) *sums.slot(which, t, c, quad) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    }
  }

  const int64_t groups = static_cast<int64_t>(gridDim.x) * ROWS;
  const int64_t steps = (p.rows + groups - 1) / groups;  // the same for every thread: the barriers match
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t row = step * groups + static_cast<int64_t>(blockIdx.x) * ROWS + group;
    const bool valid_row = row < p.rows;
    const BackwardRow<T, Z> r(p, valid_row ? row : p.rows - 1);  // a row past the end touches no memory
    float s1 = 0.0f, s2 = 0.0f;
    Chunk<T, VEC> goc[CH];
    Chunk<Z, VEC> zc[CH];
    if (valid_row) {
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const int col0 = (t + c * G) * VEC;
        r.template load<true>(col0, chunk_valid<VEC>(col0, n), goc[c], zc[c]);
      }
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const int col0 = (t + c * G) * VEC, valid = chunk_valid<VEC>(col0, n);
        float go[VEC], g[VEC], zhat[VEC];
        r.g_zhat(p, col0, valid, goc[c], zc[c], go, g, zhat);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (k < valid) {  // past the row go reads 0, but zhat is -mean * rstd
            s1 += g[k];
            s2 += g[k] * zhat[k];
          } else {
            zhat[k] = 0.0f;
          }
        }
        if (affine && valid > 0) {
#pragma unroll
          for (int quad = 0; quad < VEC / 4; ++quad) {
            float4* const w = sums.slot(0, t, c, quad);
            float4* const b = sums.slot(1, t, c, quad);
            float4 vw = *w, vb = *b;
            vw.x += go[4 * quad] * zhat[4 * quad];
            vw.y += go[4 * quad + 1] * zhat[4 * quad + 1];
            vw.z += go[4 * quad + 2] * zhat[4 * quad + 2];
            vw.w += go[4 * quad + 3] * zhat[4 * quad + 3];
            vb.x += go[4 * quad];
            vb.y += go[4 * quad + 1];
            vb.z += go[4 * quad + 2];
            vb.w += go[4 * quad + 3];
            *w = vw;
            *b = vb;
          }
        }
      }
    }
    row_sum2<G>(s1, s2, reduce_buf + (step % 2) * ROWS * 2 * kWarps + group * 2 * kWarps);
    if (!valid_row) continue;  // no barrier follows in this step

    const float a = p.rms ? 0.0f : s1 / static_cast<float>(n), b = s2 / static_cast<float>(n);
    // g and zhat again from the held bits. The row's statistics are re-read after the barrier so that the compiler
    // cannot keep pass 1's float copies alive instead (24 registers a chunk: it then spills).
    const BackwardRow<T, Z> r2(p, row);
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int col0 = (t + c * G) * VEC, valid = chunk_valid<VEC>(col0, n);
      if (valid == 0) continue;
      float go[VEC], g[VEC], zhat[VEC];
      r2.g_zhat(p, col0, valid, goc[c], zc[c], go, g, zhat);
      r2.store_dz(p, row, col0, valid, g, zhat, a, b);
    }
  }

  if (!affine) return;  // the same for every thread
  __syncthreads();
  float* const partial_w = p.partial + static_cast<int64_t>(blockIdx.x) * n;
  float* const partial_b = p.partial + (p.partials + blockIdx.x) * static_cast<int64_t>(n);
  for (int col = threadIdx.x; col < n; col += G * ROWS) {
    float w = 0.0f, b = 0.0f;
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const Sums other{smem + j * 2 * Sums::kCap};
      w += other.at(0, col);
      b += other.at(1, col);
    }
    partial_w[col] = w;
    partial_b[col] = b;
  }
}

// Long rows, first kernel: sum(g) and sum(g * zhat) of each row into row_sums; one block per row.
template <typename T, typename Z, int BLOCK, int U>
__global__ void __launch_bounds__(BLOCK, min_blocks(BLOCK)) norm_backward_row_sums_kernel(const BackwardParams p) {
  constexpr int VEC = kVec<T>;
  extern __shared__ float smem[];  // 2 * BLOCK / 32 floats
  const int64_t row = p.row_begin + blockIdx.x;
  const BackwardRow<T, Z> r(p, row);
  const int64_t n = p.n, chunks = (n + VEC - 1) / VEC;
  float s1 = 0.0f, s2 = 0.0f;
  for (int64_t base = 0; base < chunks; base += BLOCK * U) {
    Chunk<T, VEC> goc[U];
    Chunk<Z, VEC> zc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t col0 = (base + u * BLOCK + threadIdx.x) * VEC;
      r.template load<false>(col0, chunk_valid<VEC>(col0, n), goc[u], zc[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t col0 = (base + u * BLOCK + threadIdx.x) * VEC;
      const int valid = chunk_valid<VEC>(col0, n);
      float go[VEC], g[VEC], zhat[VEC];
      r.g_zhat(p, col0, valid, goc[u], zc[u], go, g, zhat);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (k < valid) {
          s1 += g[k];
          s2 += g[k] * zhat[k];
        }
      }
    }
  }
  row_sum2<BLOCK>(s1, s2, smem);
  if (threadIdx.x == 0) {
    p.row_sums[2 * row] = s1;
    p.row_sums[2 * row + 1] = s2;
  }
}

// Long rows, second kernel: block (blockIdx.x, blockIdx.y) covers chunk blockIdx.x * BLOCK + threadIdx.x of the
// rows of slice blockIdx.y (rows_per_slice rows), U rows a step; it writes dz and its slice's partial row of
// grad_weight and grad_bias.
template <typename T, typename Z, int BLOCK, int U>
__global__ void __launch_bounds__(BLOCK, min_blocks(BLOCK)) norm_backward_tiles_kernel(const BackwardParams p) {
  constexpr int VEC = kVec<T>;
  const int64_t n = p.n;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * BLOCK + threadIdx.x) * VEC;
  const int valid = chunk_valid<VEC>(col0, n);
  if (valid == 0) return;  // no barrier in this kernel
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * p.rows_per_slice;
  const int64_t end = begin + p.rows_per_slice < p.rows ? begin + p.rows_per_slice : p.rows;
  float dw[VEC], db[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) dw[k] = db[k] = 0.0f;

  for (int64_t row0 = begin; row0 < end; row0 += U) {
    Chunk<T, VEC> goc[U];
    Chunk<Z, VEC> zc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (row0 + u < end) BackwardRow<T, Z>(p, row0 + u).template load<true>(col0, valid, goc[u], zc[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = row0 + u;
      if (row >= end) continue;
      const BackwardRow<T, Z> r(p, row);
      float go[VEC], g[VEC], zhat[VEC];
      r.g_zhat(p, col0, valid, goc[u], zc[u], go, g, zhat);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        dw[k] += go[k] * zhat[k];  // columns past the row are never stored
        db[k] += go[k];
      }
      const float a = p.rms ? 0.0f : p.row_sums[2 * row] / static_cast<float>(n);
      const float b = p.row_sums[2 * row + 1] / static_cast<float>(n);
      r.store_dz(p, row, col0, valid, g, zhat, a, b);
    }
  }
  if (p.partial == nullptr) return;
  float* const partial_w = p.partial + static_cast<int64_t>(blockIdx.y) * n;
  float* const partial_b = p.partial + (p.partials + blockIdx.y) * n;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if (k < valid) {
      partial_w[col0 + k] = dw[k];
      partial_b[col0 + k] = db[k];
    }
  }
}

// grad_weight (blockIdx.y == 0) or grad_bias (1) from the (partials, n) float32 partial rows, in float32 when
// fp32, else T: 32 columns a block, each warp summing every 8th partial row of them, then warp 0 adding the 8 sums.
template <typename T>
__global__ void __launch_bounds__(256) norm_affine_grad_kernel(const float* partial, int64_t partials, int64_t n,
                                                               void* grad_weight, void* grad_bias, bool fp32) {
  constexpr int kSlices = 8;
  extern __shared__ float smem[];  // 256 floats
  void* const dst = blockIdx.y == 0 ? grad_weight : grad_bias;
  if (dst == nullptr) return;  // the whole block
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const float* const src = partial + blockIdx.y * partials * n;
  float s = 0.0f;
  if (col < n) {
    for (int64_t i = slice; i < partials; i += kSlices) s += src[i * n + col];
  }
  smem[threadIdx.x] = s;
  __syncthreads();
  if (slice == 0 && col < n) {
    float total = 0.0f;
#pragma unroll
    for (int j = 0; j < kSlices; ++j) total += smem[j * 32 + lane];
    if (fp32) {
      static_cast<float*>(dst)[col] = total;
    } else {
      Elem<T>::write(static_cast<T*>(dst) + col, Elem<T>::to_bits(total));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------------------------

constexpr int kWarpRowsBlock = 128;  // threads per block of the forward's warp-per-row kernels
constexpr int kBackwardBlock = 256;  // threads per block of the backward rows kernels (at least G)
constexpr int kLoopedBlock = 512;    // threads per block of the looped forward and row sums kernels
constexpr int kLoopedChunks = 2;     // chunks a thread per step of those
constexpr int kTileBlock = 256;      // threads per block of the backward tiles kernel
constexpr int kTileRows = 1;         // rows per step of the backward tiles kernel (two spill registers)

// Elements of the row a forward rows-kernel thread holds as float32 z: 32 for 16-bit x and residual, 16 when either
// is float32 (their raw loads, in flight beside z, would not fit 64 registers). Rows kernels cover 16384 elements
// (blocks of up to 512 threads, 1024 in the 16-element case).
template <typename T, typename R>
constexpr int forward_elements() {
  return sizeof(T) == 4 || sizeof(R) == 4 ? 16 : 32;
}
// Backward: 8 elements a thread (their raw bits held from the row sums to dz; the grad_weight and grad_bias sums
// live in shared memory), so rows kernels cover 8192 elements with blocks of up to 1024 threads. (16 elements, held
// or re-read, spill past the 64 registers a 1024-thread block allows.)
constexpr int kBackwardElements = 8;

// Launches kernel over p.rows rows, rows_per_block per block of `threads` with `smem` bytes of dynamic shared
// memory, splitting past the grid limit.
template <class Params>
cudaError_t launch_rows(void (*kernel)(Params), Params p, int rows_per_block, int threads, size_t smem,
                        cudaStream_t stream) {
  constexpr int64_t kMaxBlocks = 0x7fffffff;  // gridDim.x limit
  const int64_t rows_per_launch = kMaxBlocks * rows_per_block;
  for (int64_t begin = 0; begin < p.rows; begin += rows_per_launch) {
    p.row_begin = begin;
    const int64_t rows = p.rows - begin < rows_per_launch ? p.rows - begin : rows_per_launch;
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    kernel<<<static_cast<unsigned int>(blocks), threads, smem, stream>>>(p);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

template <typename T, typename R>
struct ForwardLauncher {
  const ForwardParams& p;
  cudaStream_t stream;

  template <int G, int CH>
  cudaError_t rows() const {
    constexpr int ROWS = G == 32 ? kWarpRowsBlock / 32 : 1;
    const size_t smem = G > 32 ? 2 * (G / 32) * sizeof(float) : 0;
    return launch_rows(norm_forward_rows_kernel<T, R, G, ROWS, CH>, p, ROWS, G * ROWS, smem, stream);
  }
  cudaError_t looped() const {
    return launch_rows(norm_forward_looped_kernel<T, R, kLoopedBlock, kLoopedChunks>, p, 1, kLoopedBlock,
                       3 * (kLoopedBlock / 32) * sizeof(float), stream);
  }
};

// The forward kernel for rows of `chunks` chunks: a warp with 1, 2 (and 4) chunks a lane, then a block of
// 64 .. 512 (1024) threads with forward_elements() a thread, then the looped kernel.
template <typename T, typename R>
cudaError_t forward_dispatch(const ForwardParams& p, cudaStream_t stream) {
  constexpr int VEC = kVec<T>, CH = forward_elements<T, R>() / VEC;
  const ForwardLauncher<T, R> launch{p, stream};
  const int64_t chunks = (p.n + VEC - 1) / VEC;
  if (chunks <= 32) return launch.template rows<32, 1>();
  if (chunks <= 64) return launch.template rows<32, 2>();
  if constexpr (CH >= 4) {
    if (chunks <= 128) return launch.template rows<32, 4>();
  }
  if (chunks <= 64 * CH) return launch.template rows<64, CH>();
  if (chunks <= 128 * CH) return launch.template rows<128, CH>();
  if (chunks <= 256 * CH) return launch.template rows<256, CH>();
  if (chunks <= 512 * CH) return launch.template rows<512, CH>();
  if constexpr (CH * VEC == 16) {
    if (chunks <= 1024 * CH) return launch.template rows<1024, CH>();
  }
  return launch.looped();
}

template <typename T>
cudaError_t forward_typed(const NormForwardArgs& a, cudaStream_t stream) {
  ForwardParams p{};
  p.x = a.x;
  p.residual = a.residual;
  p.weight = a.weight;
  p.bias = a.bias;
  p.out = a.out;
  p.residual_out = a.residual_out;
  p.mean = static_cast<float*>(a.mean);
  p.rstd = static_cast<float*>(a.rstd);
  p.rows = a.rows;
  p.n = a.n;
  p.xs = a.x_row_stride;
  p.rs = a.residual_row_stride;
  p.weight_fp32 = a.weight_dtype == Dtype::kFloat;
  p.residual_out_fp32 = a.residual_out_dtype == Dtype::kFloat;
  p.weight_vec = reinterpret_cast<uintptr_t>(a.weight) % 16 == 0;
  p.bias_vec = reinterpret_cast<uintptr_t>(a.bias) % 16 == 0;
  p.rms = a.rms;
  p.eps = static_cast<float>(a.eps);
  p.dropout = a.dropout;
  p.keep_scale = static_cast<float>(a.dropout.scale);
  if constexpr (!std::is_same_v<T, float>) {
    if (a.residual != nullptr && a.residual_dtype == Dtype::kFloat) return forward_dispatch<T, float>(p, stream);
  }
  return forward_dispatch<T, T>(p, stream);
}

// The backward's kernel for rows of `chunks` chunks, as a visitor's call: rows<G, CH>() for the rows kernel with
// G = 32 .. 1024 threads a row, looped() beyond.
template <typename T, class Visitor>
auto backward_select(int64_t chunks, const Visitor& v) {
  constexpr int CH = kBackwardElements / kVec<T>;
  if (chunks <= 32 * CH) return v.template rows<32, CH>();
  if (chunks <= 64 * CH) return v.template rows<64, CH>();
  if (chunks <= 128 * CH) return v.template rows<128, CH>();
  if (chunks <= 256 * CH) return v.template rows<256, CH>();
  if (chunks <= 512 * CH) return v.template rows<512, CH>();
  if (chunks <= 1024 * CH) return v.template rows<1024, CH>();
  return v.looped();
}

// Row groups per block of a backward rows kernel with G threads a row.
constexpr int backward_rows_per_block(int G) { return G >= kBackwardBlock ? 1 : kBackwardBlock / G; }

// Dynamic shared memory of a backward rows kernel: the row groups' AffineSums (affine) and the reduction buffers.
template <int G, int CH, int VEC>
constexpr size_t backward_rows_smem(bool affine) {
  constexpr int ROWS = backward_rows_per_block(G);
  return sizeof(float) * ((affine ? ROWS * 2 * AffineSums<G, CH, VEC>::kCap : 0) + 2 * ROWS * 2 * (G / 32));
}

// The plan of a problem, as the visitor of backward_select.
struct BackwardPlanner {
  int64_t rows, chunks, n;
  int sms, smem_limit;  // the device's multiprocessors and opt-in shared memory per block
  bool affine;          // a grad_weight or grad_bias is wanted

  template <int G, int CH, int VEC>
  NormBackwardPlan rows_kernel() const {
    constexpr int ROWS = backward_rows_per_block(G), kThreads = G * ROWS;
    const size_t smem = backward_rows_smem<G, CH, VEC>(affine);
    if (smem > static_cast<size_t>(smem_limit)) return looped_kernels();  // e.g. 128 KiB on an sm_86 class GPU
    // Resident blocks: 1024 threads an SM (64 registers a thread), shared memory permitting.
    int64_t per_sm = kThreads >= 1024 ? 1 : 1024 / kThreads;
    if (smem > 0 && static_cast<int64_t>(smem_limit / smem) < per_sm) per_sm = static_cast<int64_t>(smem_limit / smem);
    int64_t blocks = (rows + ROWS - 1) / ROWS;
    if (blocks > sms * per_sm) blocks = sms * per_sm;
    return finish({false, blocks, blocks, 0});
  }
  NormBackwardPlan looped_kernels() const {
    // About four blocks a multiprocessor over (column tiles, row slices).
    const int64_t tiles = (chunks + kTileBlock - 1) / kTileBlock;
    int64_t slices = (4 * static_cast<int64_t>(sms) + tiles - 1) / tiles;
    if (slices > rows) slices = rows;
    if (slices > 65535) slices = 65535;  // gridDim.y limit
    if (slices < 1) slices = 1;
    const int64_t per_slice = (rows + slices - 1) / slices;
    return finish({true, (rows + per_slice - 1) / per_slice, (rows + per_slice - 1) / per_slice, 0});
  }
  NormBackwardPlan finish(NormBackwardPlan plan) const {
    if (rows == 0) plan.blocks = plan.partials = 0;
    const size_t partial_floats = affine ? static_cast<size_t>(2 * plan.partials * n) : 0;
    const size_t row_sum_floats = plan.looped ? static_cast<size_t>(2 * rows) : 0;
    plan.workspace_bytes = sizeof(float) * ((partial_floats + 3) / 4 * 4 + row_sum_floats);
    return plan;
  }
};

// backward_select's visitor over BackwardPlanner for x's dtype T.
template <typename T>
struct PlanVisitor {
  const BackwardPlanner& planner;
  template <int G, int CH>
  NormBackwardPlan rows() const {
    return planner.template rows_kernel<G, CH, kVec<T>>();
  }
  NormBackwardPlan looped() const { return planner.looped_kernels(); }
};

template <typename T, typename Z>
struct BackwardLauncher {
  const BackwardParams& p;
  const NormBackwardPlan& plan;
  cudaStream_t stream;

  template <int G, int CH>
  cudaError_t rows() const {
    if (plan.looped) return looped();  // the planner found too little shared memory
    constexpr int ROWS = backward_rows_per_block(G);
    const auto kernel = norm_backward_rows_kernel<T, Z, G, ROWS, CH>;
    const size_t smem = backward_rows_smem<G, CH, kVec<T>>(p.partial != nullptr);
    if (smem > (48 << 10)) {
      const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(smem));
      if (error != cudaSuccess) return error;
    }
    kernel<<<static_cast<unsigned int>(plan.blocks), G * ROWS, smem, stream>>>(p);
    return cudaGetLastError();
  }
  cudaError_t looped() const {
    const cudaError_t error = launch_rows(norm_backward_row_sums_kernel<T, Z, kLoopedBlock, kLoopedChunks>, p, 1,
                                          kLoopedBlock, 2 * (kLoopedBlock / 32) * sizeof(float), stream);
    if (error != cudaSuccess) return error;
    const int64_t tiles = (p.n + kVec<T> * kTileBlock - 1) / (kVec<T> * kTileBlock);
    const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(plan.blocks));
    norm_backward_tiles_kernel<T, Z, kTileBlock, kTileRows><<<grid, kTileBlock, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

template <typename T>
NormBackwardPlan plan_typed(const NormBackwardArgs& a, int sms, int smem_limit) {
  const int64_t chunks = (a.n + kVec<T> - 1) / kVec<T>;
  const BackwardPlanner planner{a.rows, chunks, a.n, sms, smem_limit,
                                a.grad_weight != nullptr || a.grad_bias != nullptr};
  return backward_select<T>(chunks, PlanVisitor<T>{planner});
}

template <typename T>
cudaError_t backward_typed(const NormBackwardArgs& a, const NormBackwardPlan& plan, void* workspace,
                           cudaStream_t stream) {
  const bool affine = a.grad_weight != nullptr || a.grad_bias != nullptr;
  BackwardParams p{};
  p.grad_out = a.grad_out;
  p.grad_residual = a.grad_residual;
  p.z = a.z;
  p.weight = a.weight;
  p.mean = static_cast<const float*>(a.mean);
  p.rstd = static_cast<const float*>(a.rstd);
  p.grad_x = a.grad_x;
  p.grad_residual_in = a.grad_residual_in;
  const size_t partial_floats = affine ? static_cast<size_t>(2 * plan.partials * a.n) : 0;
  p.partial = affine ? static_cast<float*>(workspace) : nullptr;
  p.row_sums = workspace == nullptr ? nullptr : static_cast<float*>(workspace) + (partial_floats + 3) / 4 * 4;
  p.rows = a.rows;
  p.n = a.n;
  p.gs = a.grad_out_row_stride;
  p.grs = a.grad_residual_row_stride;
  p.zs = a.z_row_stride;
  p.partials = plan.partials;
  p.rows_per_slice = plan.blocks > 0 ? (a.rows + plan.blocks - 1) / plan.blocks : 0;
  p.weight_fp32 = a.weight_dtype == Dtype::kFloat;
  p.residual_fp32 = a.residual_dtype == Dtype::kFloat;
  p.weight_vec = reinterpret_cast<uintptr_t>(a.weight) % 16 == 0;
  p.rms = a.rms;
  p.dropout = a.dropout;
  p.keep_scale = static_cast<float>(a.dropout.scale);
  if (a.rows > 0) {
    const int64_t chunks = (a.n + kVec<T> - 1) / kVec<T>;
    cudaError_t error;
    if (!std::is_same_v<T, float> && a.z_dtype == Dtype::kFloat) {
      error = backward_select<T>(chunks, BackwardLauncher<T, float>{p, plan, stream});
    } else {
      error = backward_select<T>(chunks, BackwardLauncher<T, T>{p, plan, stream});
    }
    if (error != cudaSuccess) return error;
  }
  if (!affine) return cudaSuccess;
  const dim3 grid(static_cast<unsigned int>((a.n + 31) / 32), 2);
  norm_affine_grad_kernel<T><<<grid, 256, 256 * sizeof(float), stream>>>(p.partial, plan.partials, a.n,
                                                                         a.grad_weight, a.grad_bias, p.weight_fp32);
  return cudaGetLastError();
}

bool supported(Dtype d) { return d == Dtype::kHalf || d == Dtype::kBFloat16 || d == Dtype::kFloat; }

// Whether a tensor of dtype d (when present) is x's dtype or float32, as the kernels take it.
bool side_ok(bool present, Dtype d, Dtype x) { return !present || d == x || d == Dtype::kFloat; }

}  // namespace

cudaError_t norm_forward_cuda(const NormForwardArgs& a, cudaStream_t stream) {
  if (!supported(a.dtype) || !side_ok(a.residual != nullptr, a.residual_dtype, a.dtype) ||
      !side_ok(a.residual_out != nullptr, a.residual_out_dtype, a.dtype) ||
      !side_ok(a.weight != nullptr || a.bias != nullptr, a.weight_dtype, a.dtype)) {
    return cudaErrorInvalidValue;
  }
  if (a.rows == 0) return cudaSuccess;
  switch (a.dtype) {
    case Dtype::kHalf: return forward_typed<__half>(a, stream);
    case Dtype::kBFloat16: return forward_typed<__nv_bfloat16>(a, stream);
    default: return forward_typed<float>(a, stream);
  }
}

cudaError_t norm_backward_plan(const NormBackwardArgs& a, NormBackwardPlan* plan) {
  if (!supported(a.dtype)) return cudaErrorInvalidValue;
  int device = 0, sms = 0, smem_limit = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (error != cudaSuccess) return error;
  sms = sms > 0 ? sms : 1;
  switch (a.dtype) {
    case Dtype::kHalf: *plan = plan_typed<__half>(a, sms, smem_limit); break;
    case Dtype::kBFloat16: *plan = plan_typed<__nv_bfloat16>(a, sms, smem_limit); break;
    default: *plan = plan_typed<float>(a, sms, smem_limit); break;
  }
  return cudaSuccess;
}

cudaError_t norm_backward_cuda(const NormBackwardArgs& a, const NormBackwardPlan& plan, void* workspace,
                               cudaStream_t stream) {
  if (!supported(a.dtype) || !side_ok(true, a.z_dtype, a.dtype) ||
      !side_ok(a.grad_residual_in != nullptr, a.residual_dtype, a.dtype) ||
      !side_ok(a.weight != nullptr || a.grad_weight != nullptr || a.grad_bias != nullptr, a.weight_dtype,
               a.dtype)) {
    return cudaErrorInvalidValue;
  }
  if (a.n == 0) return cudaSuccess;
  switch (a.dtype) {
    case Dtype::kHalf: return backward_typed<__half>(a, plan, workspace, stream);
    case Dtype::kBFloat16: return backward_typed<__nv_bfloat16>(a, plan, workspace, stream);
    default: return backward_typed<float>(a, plan, workspace, stream);
  }
}

}  // namespace fastattn
