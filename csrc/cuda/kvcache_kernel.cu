// CUDA split-KV ("flash-decoding") KV-cache attention on raw pointers (semantics: csrc/kvcache.h; the torch
// binding is csrc/cuda/kvcache.cpp; the Triton twin is fastattn/triton_kernels/kvcache.py).
//
// Decoding reads the whole cache once for a handful of queries, so it is bound by memory bandwidth, and one block
// per (batch, head) would leave most of a GPU idle. The keys are therefore cut into splits:
//
// 1. kvcache_split_kernel, a block of 4 warps per (batch, kv head, block of rows, split). The rows are the queries
//    of every query head that shares the kv head (group heads x n queries, row r: head h_kv * group + r / n, query
//    r % n), so each key and value is read from memory once per group. Blocks hold kRows = 16 kWM rows (kWM = 1,
//    2, 4: 16, 32 or 64 rows; more rows take more row blocks). The block streams the split's keys in tiles of kBN
//    keys through shared memory (16-byte cp.async, coalesced: consecutive threads load consecutive 16-byte chunks
//    of a row; double-buffered where shared memory allows). Warp w owns m-tile w % kWM of the rows (16 rows) and
//    the kKW = kBN kWM / 4 keys (w / kWM) of each tile; it keeps its own online softmax over its keys:
//      S = scale log2(e) Q K^T  - slope log2(e) |j - pos|   (-inf where a key is hidden)
//      m_new = max(m, rowmax S),  P = exp2(S - m_new),  l = exp2(m - m_new) l + rowsum P,
//      O = exp2(m - m_new) O + P V                                   (P rounded to the input type for the MMA)
//    At the end the warps of an m-tile merge their (m, l, O) through shared memory and the block writes the
//    split's partial, out_s = O / l and lse_s = ln(2) (m + log2 l) (0 and -inf where the split holds no key the
//    row sees), to a float32 scratch. With a single split it writes out and lse directly.
// 2. kvcache_merge_kernel, a warp per (batch, query head, query): lse = log sum_s exp(lse_s), out = sum_s
//    exp(lse_s - lse) out_s; a row no split saw gets 0 and -inf.
//
// Products of tiles are warp-level GEMMs in the m16n8 accumulator layout of mma.sync (c[n][0..3] holds rows g and
// g + 8, columns 8n + 2q and 8n + 2q + 1, with g = lane / 4 and q = lane % 4): float16 / bfloat16 use ldmatrix +
// mma.sync tensor cores with fp32 accumulation (rows are padded to 16 per warp, which costs nothing here: the
// tensor cores idle while the cache streams in), float32 computes the same elements with IEEE FMAs (no TF32).
// Head dims are padded to a multiple of 16 with zeros in shared memory and compiled for buckets 64, 128, 256 (of
// the larger of q's and v's head dims); within a bucket only the 16-wide steps the real head dims need are run.
// Shared-memory rows are padded by 16 bytes so ldmatrix and the float4 loads of 8 rows hit distinct banks. Keys
// past a sequence's end are zero-filled, not read, and masked; so are keys outside the window, and a split starts
// at the first key the window lets the first query see.
//
// Tiles (kBN keys): 64 (float32 with head dims above 128: 32). Shared memory per block: Q (kRows rows) + stages x
// (K and V tiles), e.g. 16-bit head dim 128, 16 rows: 4.3 + 2 x 34.8 KiB; the launcher falls back to one stage
// where the device allows less, and returns cudaErrorNotSupported where even that does not fit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../kvcache.h"
#include "kvcache_kernel.h"
#include "ptx.h"

namespace fastattn {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr double kLog2eD = 1.4426950408889634;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// ---------------------------------------------------------------------------------------------------------
// Kernel arguments.
// ---------------------------------------------------------------------------------------------------------

struct KvParams {
  const void* q;             // (batch, heads_q, n, head_dim), strides q_stride
  const void* k;             // (batch, heads_kv, seq_k, head_dim), strides k_stride
  const void* v;             // (batch, heads_kv, seq_k, head_dim_v), strides v_stride
  const int64_t* lengths;    // (batch,), stride lengths_stride
  const float* alibi;        // (batch, heads_q) slopes; null for none
  void* out;                 // contiguous (batch, heads_q, n, head_dim_v), q's dtype (used with one split)
  float* lse;                // contiguous (batch, heads_q, n)                       (used with one split)
  float* o_part;             // (splits, batch * heads_q * n, head_dim_v) partial outputs (with several splits)
  float* lse_part;           // (splits, batch * heads_q * n) partial natural log-sum-exps
  int64_t q_stride[3], k_stride[3], v_stride[3];
  int64_t lengths_stride, alibi_stride[2];
  int64_t batch, heads_q, heads_kv, n, seq_k;
  int64_t rows;              // group * n: rows per kv head
  int64_t row_blocks;        // ceil(rows / kRows)
  int64_t split_size, splits;
  int head_dim, head_dim_v;
  float scale_log2;          // scale * log2(e)
  int64_t window_left, window_right;
  bool q_vec, k_vec, v_vec;  // every row of the tensor starts 16-byte aligned: 16-byte loads
  int stages;                // 2: K / V tiles double-buffered; 1: single
};

// ---------------------------------------------------------------------------------------------------------
// Element types (the PTX wrappers are in ptx.h).
// ---------------------------------------------------------------------------------------------------------

template <typename T>
constexpr bool kIs16 = !std::is_same_v<T, float>;
template <typename T>
constexpr int kChunk = 16 / int(sizeof(T));  // elements per 16-byte chunk
template <typename T, int kD>
constexpr int kLd = kD + kChunk<T>;  // shared row stride of head dim bucket kD: 16 bytes of padding
template <typename T, int kD>
constexpr int kTileKeys = (!kIs16<T> && kD > 128) ? 32 : 64;  // kBN

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// Two floats rounded to T and packed into one 32-bit word (lo in the low half), as mma fragments hold them.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// 2^x: the hardware approximation for 16-bit inputs (relative error about 2^-22, far below their rounding),
// the accurate exp2f for float32. exp2(-inf) = 0.
template <typename T>
__device__ __forceinline__ float exp2_of(float x) {
  if constexpr (kIs16<T>) {
    return exp2_approx(x);
  } else {
    return exp2f(x);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Global -> shared memory.
// ---------------------------------------------------------------------------------------------------------

// Loads kRows rows into dst (row stride kL): row r from src + r * stride, its first `cols` elements, zero-filled up
// to `chunks` 16-byte chunks; rows >= rows are zero. vec: rows start 16-byte aligned, so 16-byte cp.async (the
// caller commits and waits); else element loads.
template <typename T, int kRows, int kL>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t stride, int rows, int cols, int chunks,
                                          bool vec) {
  constexpr int kE = kChunk<T>;
  for (int idx = threadIdx.x; idx < kRows * chunks; idx += kThreads) {
    const int r = idx / chunks, c0 = idx % chunks * kE;
    T* d = dst + r * kL + c0;
    const int n = r < rows ? max(0, min(kE, cols - c0)) : 0;  // elements of the chunk inside the matrix
    if (n == 0) {
      *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
    } else if (vec) {
      cp_async16(d, src + r * stride + c0, n * int(sizeof(T)));
    } else {
      const T* s = src + r * stride + c0;
#pragma unroll
      for (int e = 0; e < kE; ++e) d[e] = e < n ? s[e] : from_float<T>(0.0f);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Warp GEMMs (16 rows per warp; accumulator layout in the file comment).
// ---------------------------------------------------------------------------------------------------------

// c (16 x 8 kN) += A B^T over the first `ksteps` 16-wide steps of the depth: A(r, k) = a[r * kL + k] (the warp's
// 16 query rows), B(n, k) = bt[n * kL + k] (its 8 kN keys). Warp-uniform ksteps.
template <typename T, int kN, int kK, int kL>
__device__ __forceinline__ void gemm_qk(float (&c)[kN][4], const T* a, const T* bt, int ksteps) {
  const int lane = threadIdx.x % 32;
  if constexpr (kIs16<T>) {
    static_assert(kN % 2 == 0, "gemm_qk: keys are loaded 16 at a time");
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      if (kk < ksteps) {
        uint32_t af[4];
        ldmatrix_x4(af, a + (lane % 16) * kL + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int n = 0; n < kN; n += 2) {
          uint32_t bf[4];
          ldmatrix_x4(bf, bt + (n * 8 + lane % 8 + (lane / 16) * 8) * kL + kk * 16 + (lane / 8 % 2) * 8);
          mma16816<T>(c[n], af, bf[0], bf[1]);
          mma16816<T>(c[n + 1], af, bf[2], bf[3]);
        }
      }
    }
  } else {
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      if (kk < ksteps) {
#pragma unroll
        for (int d = kk * 16; d < kk * 16 + 16; d += 4) {
          const float4 a0 = *reinterpret_cast<const float4*>(a + g * kL + d);
          const float4 a1 = *reinterpret_cast<const float4*>(a + (g + 8) * kL + d);
#pragma unroll
          for (int n = 0; n < kN; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float4 b = *reinterpret_cast<const float4*>(bt + (n * 8 + 2 * q + e) * kL + d);
              float& c0 = c[n][e];
              float& c1 = c[n][2 + e];
              c0 = fmaf(a0.x, b.x, c0);
              c0 = fmaf(a0.y, b.y, c0);
              c0 = fmaf(a0.z, b.z, c0);
              c0 = fmaf(a0.w, b.w, c0);
              c1 = fmaf(a1.x, b.x, c1);
              c1 = fmaf(a1.y, b.y, c1);
              c1 = fmaf(a1.z, b.z, c1);
              c1 = fmaf(a1.w, b.w, c1);
            }
          }
        }
      }
    }
  }
}

// c (16 x 8 kN) += P V for the first n16 16-column groups of c: P (16 x 8 kK) in registers in the accumulator
// layout, V(k, n) = b[k * kL + n]. Warp-uniform n16.
template <typename T, int kK, int kN, int kL>
__device__ __forceinline__ void gemm_pv(float (&c)[kN][4], const float (&p)[kK][4], const T* b, int n16) {
  const int lane = threadIdx.x % 32;
  if constexpr (kIs16<T>) {
    static_assert(kK % 2 == 0 && kN % 2 == 0, "gemm_pv: 16-wide steps");
#pragma unroll
    for (int kt = 0; kt < kK / 2; ++kt) {
      uint32_t af[4];
      af[0] = pack2<T>(p[2 * kt][0], p[2 * kt][1]);
      af[1] = pack2<T>(p[2 * kt][2], p[2 * kt][3]);
      af[2] = pack2<T>(p[2 * kt + 1][0], p[2 * kt + 1][1]);
      af[3] = pack2<T>(p[2 * kt + 1][2], p[2 * kt + 1][3]);
#pragma unroll
      for (int n = 0; n < kN / 2; ++n) {
        if (n < n16) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, b + (kt * 16 + lane % 8 + (lane / 8 % 2) * 8) * kL + n * 16 + (lane / 16) * 8);
          mma16816<T>(c[2 * n], af, bf[0], bf[1]);
          mma16816<T>(c[2 * n + 1], af, bf[2], bf[3]);
        }
      }
    }
  } else {
    const int q = lane % 4;
#pragma unroll
    for (int t = 0; t < kK; ++t) {
#pragma unroll
      for (int src = 0; src < 4; ++src) {
        // Lane src of this quad holds keys 8t + 2 src and 8t + 2 src + 1 of rows g and g + 8.
        float x[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = __shfl_sync(0xffffffffu, p[t][i], (lane & ~3) | src);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const T* brow = b + (t * 8 + 2 * src + e) * kL + 2 * q;
#pragma unroll
          for (int n = 0; n < kN; ++n) {
            if (n / 2 < n16) {
              const float2 bv = *reinterpret_cast<const float2*>(brow + n * 8);
              c[n][0] = fmaf(x[e], bv.x, c[n][0]);
              c[n][1] = fmaf(x[e], bv.y, c[n][1]);
              c[n][2] = fmaf(x[2 + e], bv.x, c[n][2]);
              c[n][3] = fmaf(x[2 + e], bv.y, c[n][3]);
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------------------------------------

// One block per (batch, kv head, row block) (x: row block fastest, so the row blocks of a kv head share its keys
// in L2) and split (y). Dynamic shared memory: Q [kRows][kL] | stages x (K [kBN][kL], V [kBN][kL]); after the key
// loop the tiles are reused for the warps' (m, l, O) (kWarps x 16 rows x (kD + 2) floats).
template <typename T, int kD, int kWM>
__global__ void __launch_bounds__(kThreads) kvcache_split_kernel(const KvParams p) {
  constexpr int kL = kLd<T, kD>;
  constexpr int kRows = 16 * kWM;
  constexpr int kBN = kTileKeys<T, kD>;
  constexpr int kKW = kBN * kWM / kWarps;  // keys per warp per tile
  constexpr int kNS = kKW / 8;             // 8-key column tiles of S per warp
  constexpr int kNO = kD / 8;              // 8-column tiles of O per warp
  static_assert(!kIs16<T> || kKW % 16 == 0, "16-bit P V steps over 16 keys");
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* tiles = q_s + kRows * kL;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q4 = lane % 4;
  const int mt = warp % kWM, kg = warp / kWM;
  const int64_t row_block = blockIdx.x % p.row_blocks;
  const int64_t bh = blockIdx.x / p.row_blocks;  // b * heads_kv + h_kv
  const int64_t b = bh / p.heads_kv, h_kv = bh % p.heads_kv;
  const int64_t split = blockIdx.y;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t r0 = row_block * kRows;  // first row of the block (rows of this kv head)
  const int rows = static_cast<int>(min64(kRows, p.rows - r0));
  const int ksteps = (p.head_dim + 15) / 16, n16 = (p.head_dim_v + 15) / 16;

  // The keys of this split that some row may see: [start, end).
  const int64_t length = p.lengths[b * p.lengths_stride];
  int64_t start = split * p.split_size;
  const int64_t end = min64(min64(start + p.split_size, length), p.seq_k);
  if (p.window_left >= 0) start = max64(start, length - p.n - p.window_left);

  // Q rows of the block: row r is query r % n of head h_kv * group + r / n.
  {
    constexpr int kE = kChunk<T>;
    const int chunks = ksteps * 16 / kE;
    const T* qb = static_cast<const T*>(p.q) + b * p.q_stride[0];
    for (int idx = threadIdx.x; idx < kRows * chunks; idx += kThreads) {
      const int r = idx / chunks, c0 = idx % chunks * kE;
      T* d = q_s + r * kL + c0;
      const int n = r < rows ? max(0, min(kE, p.head_dim - c0)) : 0;
      const int64_t row = r0 + r, head = h_kv * group + row / p.n, query = row % p.n;
      const T* s = qb + head * p.q_stride[1] + query * p.q_stride[2] + c0;
      if (n == kE && p.q_vec) {
        *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(s);
      } else {
#pragma unroll
        for (int e = 0; e < kE; ++e) d[e] = e < n ? s[e] : from_float<T>(0.0f);
      }
    }
  }

  // This lane's two rows (g and g + 8 of the warp's m-tile): position and ALiBi slope (log2 units).
  int64_t pos[2];
  float slope[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t row = r0 + mt * 16 + g + 8 * hh;
    const int64_t query = row % p.n, head = h_kv * group + min64(row, p.rows - 1) / p.n;
    pos[hh] = length - p.n + query;
    slope[hh] = p.alibi != nullptr
                    ? p.alibi[b * p.alibi_stride[0] + head * p.alibi_stride[1]] * static_cast<float>(kLog2eD)
                    : 0.0f;
  }

  const T* k_base = static_cast<const T*>(p.k) + b * p.k_stride[0] + h_kv * p.k_stride[1];
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_stride[0] + h_kv * p.v_stride[1];
  const int chunks_k = ksteps * 16 / kChunk<T>, chunks_v = n16 * 16 / kChunk<T>;
  const int tiles_n = start < end ? static_cast<int>((end - start + kBN - 1) / kBN) : 0;
  auto load_tile = [&](int t, int stage) {
    const int64_t key0 = start + int64_t(t) * kBN;
    const int valid = static_cast<int>(min64(kBN, end - key0));
    T* k_s = tiles + stage * 2 * kBN * kL;
    load_rows<T, kBN, kL>(k_s, k_base + key0 * p.k_stride[2], p.k_stride[2], valid, p.head_dim, chunks_k, p.k_vec);
    load_rows<T, kBN, kL>(k_s + kBN * kL, v_base + key0 * p.v_stride[2], p.v_stride[2], valid, p.head_dim_v,
                          chunks_v, p.v_vec);
  };

  float m[2] = {-kInf, -kInf}, l[2] = {0.0f, 0.0f};
  float o[kNO][4];
#pragma unroll
  for (int n = 0; n < kNO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

  if (p.stages == 2 && tiles_n > 0) load_tile(0, 0);
  cp_async_commit();
  for (int t = 0; t < tiles_n; ++t) {
    const int stage = p.stages == 2 ? t & 1 : 0;
    if (p.stages == 2) {
      if (t + 1 < tiles_n) load_tile(t + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      load_tile(t, 0);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();  // the tile (and, at t = 0, Q) is in shared memory

    const T* k_s = tiles + stage * 2 * kBN * kL + kg * kKW * kL;
    const T* v_s = tiles + stage * 2 * kBN * kL + kBN * kL + kg * kKW * kL;
    float s[kNS][4];
#pragma unroll
    for (int n = 0; n < kNS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    gemm_qk<T, kNS, kD, kL>(s, q_s + mt * 16 * kL, k_s, ksteps);

    // Scores, masks and the online softmax of this warp's keys.
    const int64_t key0 = start + int64_t(t) * kBN + kg * kKW;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = -kInf;
#pragma unroll
      for (int n = 0; n < kNS; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = key0 + 8 * n + 2 * q4 + e;
          const int64_t distance = j - pos[hh];
          float x = s[n][2 * hh + e] * p.scale_log2;
          if (p.alibi != nullptr) x -= slope[hh] * static_cast<float>(distance < 0 ? -distance : distance);
          const bool visible = j < end && (p.window_left < 0 || distance >= -p.window_left) &&
                               (p.window_right < 0 || distance <= p.window_right);
          x = visible ? x : -kInf;
          s[n][2 * hh + e] = x;
          mx = fmaxf(mx, x);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[hh], mx);
      const float shift = m_new == -kInf ? 0.0f : m_new;  // no key seen yet: exp2(-inf - 0) = 0, never NaN
      const float alpha = exp2_of<T>(m[hh] - shift);
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kNS; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pe = exp2_of<T>(s[n][2 * hh + e] - shift);
          s[n][2 * hh + e] = pe;
          sum += pe;
        }
      }
      l[hh] = l[hh] * alpha + sum;  // this lane's columns only; the quad is summed at the end
      m[hh] = m_new;
#pragma unroll
      for (int n = 0; n < kNO; ++n) {
        o[n][2 * hh] *= alpha;
        o[n][2 * hh + 1] *= alpha;
      }
    }
    gemm_pv<T, kNS, kNO, kL>(o, s, v_s, n16);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();

  // Merge the warps of each m-tile: warp w writes m, l and O of its 16 rows; the block combines.
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
  }
  constexpr int kRedLd = kD + 2;  // per row: O (kD), then m, l
  float* red = reinterpret_cast<float*>(tiles);
  __syncthreads();  // tiles are free (also when the loop ran no tile: nothing reads them)
  {
    float* mine = red + warp * 16 * kRedLd;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float* row = mine + (g + 8 * hh) * kRedLd;
#pragma unroll
      for (int n = 0; n < kNO; ++n) {
        if (n / 2 < n16) {
          row[8 * n + 2 * q4] = o[n][2 * hh];
          row[8 * n + 2 * q4 + 1] = o[n][2 * hh + 1];
        }
      }
      if (q4 == 0) {
        row[kD] = m[hh];
        row[kD + 1] = l[hh];
      }
    }
  }
  __syncthreads();

  const int dv = p.head_dim_v, cols = dv > 0 ? dv : 1;
  const int64_t row_out0 = bh * p.rows + r0;  // (b * heads_q + h) * n + i of row r0
  const int64_t total_rows = p.batch * p.heads_q * p.n;
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int r = idx / cols, c = idx % cols;
    const int tile = r / 16, rr = r % 16;
    float mm = -kInf;
#pragma unroll
    for (int w = 0; w < kWarps / kWM; ++w) mm = fmaxf(mm, red[((tile + kWM * w) * 16 + rr) * kRedLd + kD]);
    float ll = 0.0f, oo = 0.0f;
    if (mm != -kInf) {
#pragma unroll
      for (int w = 0; w < kWarps / kWM; ++w) {
        const float* src = red + ((tile + kWM * w) * 16 + rr) * kRedLd;
        const float f = exp2f(src[kD] - mm);
        ll += src[kD + 1] * f;
        if (c < dv) oo += src[c] * f;
      }
    }
    const bool empty = mm == -kInf;
    const float value = empty ? 0.0f : oo / ll;
    const float lse = empty ? -kInf : (mm + log2f(ll)) * kLn2;
    const int64_t row_out = row_out0 + r;
    if (p.splits == 1) {
      if (c < dv) static_cast<T*>(p.out)[row_out * dv + c] = from_float<T>(value);
      if (c == 0) p.lse[row_out] = lse;
    } else {
      if (c < dv) p.o_part[(split * total_rows + row_out) * dv + c] = value;
      if (c == 0) p.lse_part[split * total_rows + row_out] = lse;
    }
  }
}

// A warp per row (b, h, i) of out: merges the splits' partials.
template <typename T>
__global__ void __launch_bounds__(kThreads) kvcache_merge_kernel(const KvParams p) {
  const int64_t total_rows = p.batch * p.heads_q * p.n;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= total_rows) return;
  float top = -kInf;
  for (int64_t s = lane; s < p.splits; s += 32) top = fmaxf(top, p.lse_part[s * total_rows + row]);
#pragma unroll
  for (int x = 16; x > 0; x /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, x));
  const float shift = top == -kInf ? 0.0f : top;  // no split saw a key: every weight is exp(-inf) = 0
  float total = 0.0f;
  for (int64_t s = lane; s < p.splits; s += 32) total += expf(p.lse_part[s * total_rows + row] - shift);
#pragma unroll
  for (int x = 16; x > 0; x /= 2) total += __shfl_xor_sync(0xffffffffu, total, x);
  const bool empty = total == 0.0f;
  const float inv = empty ? 0.0f : 1.0f / total;
  const int dv = p.head_dim_v;
  T* out = static_cast<T*>(p.out) + row * dv;
  for (int c = lane; c < dv; c += 32) {
    float acc = 0.0f;
    for (int64_t s = 0; s < p.splits; ++s) {
      const float w = p.lse_part[s * total_rows + row];
      if (w != -kInf) acc += expf(w - shift) * p.o_part[(s * total_rows + row) * dv + c];
    }
    out[c] = from_float<T>(acc * inv);
  }
  if (lane == 0) p.lse[row] = empty ? -kInf : shift + logf(total);
}

// ---------------------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------------------

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int head_dim_bucket(const KvcacheArgs& a) {
  const int64_t d = a.head_dim > a.head_dim_v ? a.head_dim : a.head_dim_v;
  return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

int tile_keys(const KvcacheArgs& a) { return a.dtype == Dtype::kFloat && head_dim_bucket(a) > 128 ? 32 : 64; }

// Warps over rows: 16 rows per block while the group's rows fit, up to 64.
int warps_m(const KvcacheArgs& a) {
  const int64_t rows = a.heads_kv > 0 ? a.heads_q / a.heads_kv * a.n_queries : 0;
  return rows <= 16 ? 1 : rows <= 32 ? 2 : 4;
}

bool supported(const KvcacheArgs& a) {
  return (a.dtype == Dtype::kHalf || a.dtype == Dtype::kBFloat16 || a.dtype == Dtype::kFloat) &&
         a.head_dim >= 0 && a.head_dim_v >= 0 && a.head_dim <= kKvcacheCudaMaxHeadDim &&
         a.head_dim_v <= kKvcacheCudaMaxHeadDim && a.heads_kv > 0 && a.heads_q % a.heads_kv == 0 &&
         a.n_queries >= 0 && a.seq_k >= 0 && a.split_size >= 0 && a.window_left >= -1 && a.window_right >= -1;
}

template <typename T>
bool rows_aligned(const void* base, const int64_t (&stride)[3]) {
  constexpr int64_t kE = kChunk<T>;
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride[0] % kE == 0 && stride[1] % kE == 0 &&
         stride[2] % kE == 0;
}

template <typename T, int kD, int kWM>
cudaError_t launch_split(KvParams& p, cudaStream_t stream) {
  constexpr int kL = kLd<T, kD>;
  constexpr int kBN = kTileKeys<T, kD>;
  const size_t q_bytes = size_t(16 * kWM) * kL * sizeof(T);
  const size_t stage_bytes = size_t(2) * kBN * kL * sizeof(T);
  const size_t red_bytes = size_t(kWarps) * 16 * (kD + 2) * sizeof(float);
  auto bytes_for = [&](int stages) {
    const size_t tiles = stages * stage_bytes;
    return q_bytes + (tiles > red_bytes ? tiles : red_bytes);
  };
  int device = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return e;
  p.stages = bytes_for(2) <= size_t(optin) ? 2 : 1;
  const size_t bytes = bytes_for(p.stages);
  if (bytes > size_t(optin)) return cudaErrorNotSupported;
  auto kernel = kvcache_split_kernel<T, kD, kWM>;
  if (bytes > 48 * 1024) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (e != cudaSuccess) return e;
  }
  const int64_t grid_x = p.batch * p.heads_kv * p.row_blocks, grid_y = p.splits;
  kernel<<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t dispatch_rows(KvParams& p, int wm, cudaStream_t stream) {
  switch (wm) {
    case 1: return launch_split<T, kD, 1>(p, stream);
    case 2: return launch_split<T, kD, 2>(p, stream);
    default: return launch_split<T, kD, 4>(p, stream);
  }
}

template <typename T>
cudaError_t run(const KvcacheArgs& a, KvParams& p, int bucket, int wm, cudaStream_t stream) {
  p.q_vec = rows_aligned<T>(a.q, a.q_stride);
  p.k_vec = rows_aligned<T>(a.k, a.k_stride);
  p.v_vec = rows_aligned<T>(a.v, a.v_stride);
  cudaError_t e = bucket == 64    ? dispatch_rows<T, 64>(p, wm, stream)
                  : bucket == 128 ? dispatch_rows<T, 128>(p, wm, stream)
                                  : dispatch_rows<T, 256>(p, wm, stream);
  if (e != cudaSuccess || p.splits == 1) return e;
  const int64_t total_rows = p.batch * p.heads_q * p.n;
  kvcache_merge_kernel<T><<<static_cast<unsigned>(cdiv(total_rows, kWarps)), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t kvcache_plan(const KvcacheArgs& a, KvcachePlan* plan) {
  if (!supported(a)) return cudaErrorInvalidValue;
  const int64_t capacity = a.seq_k > 0 ? a.seq_k : 1;
  int64_t split_size = a.split_size;
  if (split_size == 0) {
    int device = 0, sms = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess) return e;
    e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return e;
    const int64_t rows = a.heads_q / a.heads_kv * a.n_queries;
    const int64_t blocks = a.batch * a.heads_kv * cdiv(rows > 0 ? rows : 1, 16 * warps_m(a));
    const int64_t bn = tile_keys(a);
    // About two blocks per multiprocessor, each split at least 4 tiles long.
    int64_t splits = cdiv(2 * int64_t(sms), blocks > 0 ? blocks : 1);
    const int64_t most = cdiv(capacity, 4 * bn);
    splits = splits < most ? splits : most;
    splits = splits > 1 ? splits : 1;
    split_size = cdiv(cdiv(capacity, splits), bn) * bn;
  }
  constexpr int64_t kMaxSplits = 65535;  // grid y
  if (cdiv(capacity, split_size) > kMaxSplits) split_size = cdiv(capacity, kMaxSplits);
  plan->split_size = split_size;
  plan->splits = cdiv(capacity, split_size);
  const int64_t total_rows = a.batch * a.heads_q * a.n_queries;
  plan->scratch_bytes =
      plan->splits > 1 ? size_t(plan->splits) * size_t(total_rows) * size_t(a.head_dim_v + 1) * sizeof(float) : 0;
  return cudaSuccess;
}

cudaError_t kvcache_forward_cuda(const KvcacheArgs& a, const KvcachePlan& plan, void* scratch, cudaStream_t stream) {
  if (!supported(a) || plan.splits < 1 || plan.split_size < 1 || (plan.splits > 1 && scratch == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t total_rows = a.batch * a.heads_q * a.n_queries;
  if (total_rows == 0) return cudaSuccess;
  KvParams p{};
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.lengths = a.lengths;
  p.alibi = a.alibi;
  p.out = a.out;
  p.lse = a.lse;
  p.o_part = static_cast<float*>(scratch);
  p.lse_part = p.o_part + plan.splits * total_rows * a.head_dim_v;  // 16-byte aligned is not needed here
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = a.q_stride[i];
    p.k_stride[i] = a.k_stride[i];
    p.v_stride[i] = a.v_stride[i];
  }
  p.lengths_stride = a.lengths_stride;
  p.alibi_stride[0] = a.alibi_stride[0];
  p.alibi_stride[1] = a.alibi_stride[1];
  p.batch = a.batch;
  p.heads_q = a.heads_q;
  p.heads_kv = a.heads_kv;
  p.n = a.n_queries;
  p.seq_k = a.seq_k;
  const int wm = warps_m(a);
  p.rows = a.heads_q / a.heads_kv * a.n_queries;
  p.row_blocks = cdiv(p.rows, 16 * wm);
  p.split_size = plan.split_size;
  p.splits = plan.splits;
  p.head_dim = static_cast<int>(a.head_dim);
  p.head_dim_v = static_cast<int>(a.head_dim_v);
  p.scale_log2 = static_cast<float>(a.scale * kLog2eD);
  p.window_left = a.window_left;
  p.window_right = a.window_right;
  if (p.batch * p.heads_kv * p.row_blocks > int64_t(0x7fffffff)) return cudaErrorInvalidValue;
  const int bucket = head_dim_bucket(a);
  switch (a.dtype) {
    case Dtype::kHalf: return run<__half>(a, p, bucket, wm, stream);
    case Dtype::kBFloat16: return run<__nv_bfloat16>(a, p, bucket, wm, stream);
    case Dtype::kFloat: return run<float>(a, p, bucket, wm, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastattn
