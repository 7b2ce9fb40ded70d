// CUDA attention kernels, forward and backward, on raw pointers (arguments and semantics: csrc/attention.h; the
// torch binding is csrc/cuda/attention.cpp; keeping torch headers out of this file keeps its compile short).
//
// FlashAttention-2 on mma.sync tensor cores (float16, bfloat16; fp32 accumulation) or on IEEE fp32 FMAs
// (float32: no TF32), with one code path for both: every product of tiles is a warp-level GEMM over shared
// memory whose result sits in the m16n8 accumulator layout of mma.sync, so masks, online softmax, dropout
// and stores are written once.
//
// Forward: a block per (batch, query head, block of kBM queries), each warp owning kWM tiles of 16 query rows
// (two for 16-bit head dims up to 128: every K / V fragment a warp loads then feeds two MMAs). It loads its
// queries once and streams the key / value tiles of kBN keys that the window lets it see through shared memory
// (cp.async, double-buffered when shared memory allows):
//   S = scale Q K^T (+ mask, + alibi, -inf where a bool mask, key padding, the window or the key range hides)
//   m_new = max(m, rowmax S),  P = exp(S - m_new),  l = exp(m - m_new) l + rowsum P
//   O = exp(m - m_new) O + (P * keep) V                     (P rounded to the input type before the MMA)
// then out = O / l (* 1 / (1 - p) with dropout), lse = m + log l; a query that saw no key (l = 0) gets 0 and
// -inf. A row whose running max is still -inf shifts by 0, so exp gives 0, never NaN.
//
// Backward (FlashAttention-2 without atomics, so results are deterministic):
//   kv kernel: a block per (batch, kv head, block of kBN keys), 16 keys per warp, dK and dV in registers. It
//     loops over the query heads of the group and the query blocks of kBM queries the window lets see its keys,
//     and per step recomputes S^T = K Q^T (keys x queries) and P^T = exp(S^T - lse):
//       dV += (P^T * keep) dO,   dP^T = V dO^T,   dS^T = P^T * (dP^T * z - delta),   dK += dS^T Q
//     then dK *= scale, dV *= 1 / (1 - p). For head dims above 128 the accumulators do not fit registers
//     together: one launch computes dV, a second dK.
//   q kernel: a block per (batch, query head, block of kBM queries), like the forward: S, P = exp(S - lse),
//     dP = dO V^T, dS = P * (dP * z - delta), dQ += dS K; then dQ *= scale.
//   z is the dropout factor: 1 / (1 - p) where kept, else 0 (1 without dropout).
//
// Warp GEMMs on kM tiles of 16 rows per warp (the accumulator c[m][n][0..3] holds rows 16m + g and 16m + g + 8,
// columns 8n + 2q and 8n + 2q + 1, with g = lane / 4 and q = lane % 4):
//   gemm_ss: C += A B with A's rows and B's columns (B^T's rows) in shared memory: 16-bit via ldmatrix + mma,
//            float32 via float4 loads and FMAs computing the same elements.
//   gemm_rs: C += A B with A in registers in the accumulator layout (P or dS) and B's rows in shared memory:
//            16-bit packs A into mma fragments and loads B with ldmatrix.trans; float32 gathers A's rows from
//            the four lanes of each quad by shuffles.
// Head dims are padded to a multiple of 16 (zero-filled in shared memory) and kernels are compiled for head dim
// buckets 64, 128 and 256 (the larger of q's and v's): within a bucket only the 16-wide steps the real head dims
// need are run. Shared-memory rows are padded by 16 bytes, so ldmatrix and the float4 loads of 8 rows hit
// distinct banks. Rows past the sequence ends are zero-filled and their scores masked, so padding never makes a
// NaN. Key (query) tiles that the window hides from every query (key) of a block are never visited, and the
// per-element window and bounds test runs only on tiles the window or a sequence end cuts.
//
// Dropout (csrc/philox.h): element (b, h, i, j) is kept iff word j % 4 of philox(j / 4, i, b * Hq + h, 0) is at
// least the threshold. Each lane computes one Philox call (4 consecutive keys of one query) per 8-column tile and
// the lanes exchange the keep bits by shuffles, so all four words of every call are used.
//
// Tile sizes (struct Tiles below; 16-bit / float32): forward 128x64 (d <= 128) and 64x32 (d <= 256) / 64 x 64,
// 32, 16; dK/dV 64 keys x 64 (d <= 128) or 32 queries / 64 or 32 keys x 32 or 16 queries; dQ 64 x 64 or 32 /
// 64 or 32 x 32 or 16. Shared memory: 55 to 135 KiB (cudaFuncSetAttribute above 48 KiB); where the device
// allows less (sm_86/89: 99 KiB), the streamed tiles are single-buffered, and a kernel that still does not fit
// returns cudaErrorNotSupported.
//
// Masks (bool / input dtype / float32) and key padding are read element by element from global memory (any
// strides; cached), and only on kernels compiled with kFeatures, which the launcher picks when a mask, key
// padding, ALiBi or dropout is present (float32 always uses it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../attention.h"
#include "../philox.h"
#include "attention_kernel.h"
#include "ptx.h"

namespace fastattn {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------------------
// Kernel arguments.
// ---------------------------------------------------------------------------------------------------------

struct KernelParams {
  const void* q;                  // (batch, heads_q, seq_q, head_dim), strides q_stride, unit over head_dim
  const void* k;                  // (batch, heads_kv, seq_k, head_dim)
  const void* v;                  // (batch, heads_kv, seq_k, head_dim_v)
  const void* mask;               // (batch, heads_q, seq_q, seq_k), strides mask_stride; null for none
  const uint8_t* key_padding;     // (batch, seq_k), nonzero = padding; null for none
  const float* alibi;             // (batch, heads_q) slopes; null for none
  void* out;                      // forward: contiguous (batch, heads_q, seq_q, head_dim_v)
  float* lse;                     // forward: contiguous (batch, heads_q, seq_q)
  const void* grad_out;           // backward: (batch, heads_q, seq_q, head_dim_v), strides do_stride
  const float* lse_in;            // backward: the forward's lse, contiguous
  const float* delta;             // backward: rowsum(dO * O) - dlse, contiguous
  void* dq;                       // backward: contiguous like q
  void* dk;                       // backward: contiguous like k
  void* dv;                       // backward: contiguous like v
  int64_t q_stride[3], k_stride[3], v_stride[3], do_stride[3];  // over (batch, head, seq)
  int64_t mask_stride[4], key_padding_stride[2], alibi_stride[2];
  int64_t batch, heads_q, heads_kv, group, seq_q, seq_k;  // group = heads_q / heads_kv
  int head_dim, head_dim_v;
  float scale;
  int64_t diagonal, window_left, window_right;
  MaskKind mask_kind;
  bool dropout;
  uint32_t threshold;             // dropped iff the Philox word is below it
  float dropout_scale;            // 1 / (1 - p)
  uint32_t key0, key1;            // Philox key
  bool q_vec, k_vec, v_vec, do_vec;  // every row of the tensor starts 16-byte aligned: loaded by cp.async
  int stages;                     // 2: the streamed tiles are double-buffered; 1: single
};

// ---------------------------------------------------------------------------------------------------------
// Element types (the PTX wrappers are in ptx.h).
// ---------------------------------------------------------------------------------------------------------

template <typename T>
constexpr bool kIs16 = !std::is_same_v<T, float>;
template <typename T>
constexpr int kChunk = 16 / int(sizeof(T));  // elements per 16-byte chunk
template <typename T, int kD>
constexpr int kLd = kD + kChunk<T>;  // shared-memory row stride of a tile of head dim bucket kD (16 bytes of pad)

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
__device__ __forceinline__ T zero_of() {
  if constexpr (std::is_same_v<T, float>) {
    return 0.0f;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(0.0f);
  } else {
    return __float2bfloat16_rn(0.0f);
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

// exp(s - shift) as exp_shift(s, prep_shift(shift)). 16-bit inputs use the hardware exp2 with log2(e) folded
// into one FMA (relative error about 2^-21, far below their rounding); float32 uses the accurate expf. A shift
// of +inf gives 0 for any finite or -inf score.
template <typename T>
__device__ __forceinline__ float prep_shift(float shift) {
  return kIs16<T> ? shift * kLog2e : shift;
}

template <typename T>
__device__ __forceinline__ float exp_shift(float s, float prepared) {
  if constexpr (kIs16<T>) {
    return exp2_approx(fmaf(s, kLog2e, -prepared));
  } else {
    return expf(s - prepared);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tiles: global <-> shared memory.
// ---------------------------------------------------------------------------------------------------------

// Loads a tile of kRows rows into dst (row stride kL): row r from src + r * stride, its first `cols` elements,
// zero-filled up to the next multiple of 16 columns; rows >= rows are zero. vec: every row starts 16-byte
// aligned, so 16-byte cp.async (the caller commits and waits); else element copies.
template <typename T, int kRows, int kL, int kThreads>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int rows, int cols, bool vec) {
  constexpr int kE = kChunk<T>;
  constexpr int kChunksMax = (kL - kE) / kE;
  const int chunks = (cols + 15) / 16 * (16 / kE);
  for (int idx = threadIdx.x; idx < kRows * kChunksMax; idx += kThreads) {
    const int r = idx / kChunksMax, ch = idx % kChunksMax;
    if (ch >= chunks) continue;
    const int c0 = ch * kE;
    T* d = dst + r * kL + c0;
    const int n = r < rows ? max(0, min(kE, cols - c0)) : 0;  // elements of the chunk inside the matrix
    if (n == 0) {
      *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
    } else if (vec) {
      cp_async16(d, src + r * stride + c0, n * int(sizeof(T)));
    } else {
      const T* s = src + r * stride + c0;
#pragma unroll
      for (int e = 0; e < kE; ++e) d[e] = e < n ? s[e] : zero_of<T>();
    }
  }
}

// Stores rows [0, rows) x columns [0, cols) of the shared tile src (row stride kL) to the contiguous matrix dst
// (row stride cols): 16-byte vectors when dst's rows are 16-byte aligned, else element by element.
template <typename T, int kRows, int kL, int kThreads>
__device__ __forceinline__ void store_tile(T* dst, const T* src, int rows, int cols) {
  constexpr int kE = kChunk<T>;
  constexpr int kChunksMax = (kL - kE) / kE;
  if ((cols * int(sizeof(T))) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    const int chunks = cols / kE;
    for (int idx = threadIdx.x; idx < kRows * kChunksMax; idx += kThreads) {
      const int r = idx / kChunksMax, ch = idx % kChunksMax;
      if (r < rows && ch < chunks) {
        *reinterpret_cast<uint4*>(dst + int64_t(r) * cols + ch * kE) =
            *reinterpret_cast<const uint4*>(src + r * kL + ch * kE);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
      const int r = idx / cols, c = idx % cols;
      dst[int64_t(r) * cols + c] = src[r * kL + c];
    }
  }
}

// Writes a warp's accumulator tile c (16 rows, the first n16 * 16 columns), row g + 8h times mul[h], rounded to
// T, to the shared rows at `rows` (row stride kL).
template <typename T, int kN, int kL>
__device__ __forceinline__ void frag_to_smem(T* rows, const float (&c)[kN][4], const float (&mul)[2], int n16) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    if (n / 2 < n16) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        T* d = rows + (g + 8 * hh) * kL + n * 8 + 2 * q;
        const float x = c[n][2 * hh] * mul[hh], y = c[n][2 * hh + 1] * mul[hh];
        if constexpr (kIs16<T>) {
          *reinterpret_cast<uint32_t*>(d) = pack2<T>(x, y);
        } else {
          *reinterpret_cast<float2*>(d) = make_float2(x, y);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Warp GEMMs (16 rows per warp; accumulator layout in the file comment).
// ---------------------------------------------------------------------------------------------------------

// c[m] (16 x 8 kN) += A_m (16 x 16 ksteps) B for m < kM: A_m(r, k) = a[(16 m + r) * kL + k], B(k, n) =
// bt[n * kL + k], for the first `ksteps` (<= kK / 16) 16-wide steps of the depth. Each B fragment loaded feeds
// kM products. Warp-uniform arguments.
template <typename T, int kM, int kN, int kK, int kL>
__device__ __forceinline__ void gemm_ss(float (&c)[kM][kN][4], const T* a, const T* bt, int ksteps) {
  const int lane = threadIdx.x % 32;
  if constexpr (kIs16<T>) {
    static_assert(kN % 2 == 0, "gemm_ss: B is loaded 16 columns at a time");
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      if (kk < ksteps) {
        uint32_t af[kM][4];
#pragma unroll
        for (int m = 0; m < kM; ++m) ldmatrix_x4(af[m], a + (16 * m + lane % 16) * kL + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int n = 0; n < kN; n += 2) {
          uint32_t bf[4];
          ldmatrix_x4(bf, bt + (n * 8 + lane % 8 + (lane / 16) * 8) * kL + kk * 16 + (lane / 8 % 2) * 8);
#pragma unroll
          for (int m = 0; m < kM; ++m) {
            mma16816<T>(c[m][n], af[m], bf[0], bf[1]);
            mma16816<T>(c[m][n + 1], af[m], bf[2], bf[3]);
          }
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
          float4 a0[kM], a1[kM];
#pragma unroll
          for (int m = 0; m < kM; ++m) {
            a0[m] = *reinterpret_cast<const float4*>(a + (16 * m + g) * kL + d);
            a1[m] = *reinterpret_cast<const float4*>(a + (16 * m + g + 8) * kL + d);
          }
#pragma unroll
          for (int n = 0; n < kN; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float4 b = *reinterpret_cast<const float4*>(bt + (n * 8 + 2 * q + e) * kL + d);
#pragma unroll
              for (int m = 0; m < kM; ++m) {
                float& c0 = c[m][n][e];
                float& c1 = c[m][n][2 + e];
                c0 = fmaf(a0[m].x, b.x, c0);
                c0 = fmaf(a0[m].y, b.y, c0);
                c0 = fmaf(a0[m].z, b.z, c0);
                c0 = fmaf(a0[m].w, b.w, c0);
                c1 = fmaf(a1[m].x, b.x, c1);
                c1 = fmaf(a1[m].y, b.y, c1);
                c1 = fmaf(a1[m].z, b.z, c1);
                c1 = fmaf(a1[m].w, b.w, c1);
              }
            }
          }
        }
      }
    }
  }
}

// c[m] (16 x 8 kN) += A_m (16 x 8 kK) B for m < kM, for the first n16 (<= kN / 2) 16-column groups of c: A_m in
// registers in the accumulator layout (a[m][t] holds columns 8t .. 8t + 7), element a[m][t][i] taken as 0 where
// bit 4t + i of keep[m] is 0; B(k, n) = b[k * kL + n]. Each B fragment loaded feeds kM products. Warp-uniform n16.
template <typename T, int kM, int kK, int kN, int kL>
__device__ __forceinline__ void gemm_rs(float (&c)[kM][kN][4], const float (&a)[kM][kK][4], const uint32_t (&keep)[kM],
                                        const T* b, int n16) {
  const int lane = threadIdx.x % 32;
  const auto kept = [](float x, uint32_t bits, int bit) { return (bits >> bit) & 1u ? x : 0.0f; };
  if constexpr (kIs16<T>) {
    static_assert(kK % 2 == 0 && kN % 2 == 0, "gemm_rs: 16-wide steps");
#pragma unroll
    for (int kt = 0; kt < kK / 2; ++kt) {
      const int t0 = 2 * kt, t1 = 2 * kt + 1;
      uint32_t af[kM][4];
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        const uint32_t k = keep[m];
        af[m][0] = pack2<T>(kept(a[m][t0][0], k, 4 * t0), kept(a[m][t0][1], k, 4 * t0 + 1));
        af[m][1] = pack2<T>(kept(a[m][t0][2], k, 4 * t0 + 2), kept(a[m][t0][3], k, 4 * t0 + 3));
        af[m][2] = pack2<T>(kept(a[m][t1][0], k, 4 * t1), kept(a[m][t1][1], k, 4 * t1 + 1));
        af[m][3] = pack2<T>(kept(a[m][t1][2], k, 4 * t1 + 2), kept(a[m][t1][3], k, 4 * t1 + 3));
      }
#pragma unroll
      for (int n = 0; n < kN / 2; ++n) {
        if (n < n16) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, b + (kt * 16 + lane % 8 + (lane / 8 % 2) * 8) * kL + n * 16 + (lane / 16) * 8);
#pragma unroll
          for (int m = 0; m < kM; ++m) {
            mma16816<T>(c[m][2 * n], af[m], bf[0], bf[1]);
            mma16816<T>(c[m][2 * n + 1], af[m], bf[2], bf[3]);
          }
        }
      }
    }
  } else {
    const int q = lane % 4;
#pragma unroll
    for (int t = 0; t < kK; ++t) {
      float own[kM][4];
#pragma unroll
      for (int m = 0; m < kM; ++m) {
#pragma unroll
        for (int i = 0; i < 4; ++i) own[m][i] = kept(a[m][t][i], keep[m], 4 * t + i);
      }
#pragma unroll
      for (int src = 0; src < 4; ++src) {
        // Lane src of this quad holds columns 8t + 2 src and 8t + 2 src + 1 of rows g and g + 8.
        float x[kM][4];
#pragma unroll
        for (int m = 0; m < kM; ++m) {
#pragma unroll
          for (int i = 0; i < 4; ++i) x[m][i] = __shfl_sync(0xffffffffu, own[m][i], (lane & ~3) | src);
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const T* brow = b + (t * 8 + 2 * src + e) * kL + 2 * q;
#pragma unroll
          for (int n = 0; n < kN; ++n) {
            if (n / 2 < n16) {
              const float2 bv = *reinterpret_cast<const float2*>(brow + n * 8);
#pragma unroll
              for (int m = 0; m < kM; ++m) {
                c[m][n][0] = fmaf(x[m][e], bv.x, c[m][n][0]);
                c[m][n][1] = fmaf(x[m][e], bv.y, c[m][n][1]);
                c[m][n][2] = fmaf(x[m][2 + e], bv.x, c[m][n][2]);
                c[m][n][3] = fmaf(x[m][2 + e], bv.y, c[m][n][3]);
              }
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Scores: masks, window, dropout.
// ---------------------------------------------------------------------------------------------------------

// v + mask + alibi for query i, key j, or -inf where a bool mask or key padding hides the key; out-of-range
// elements (never used) read nothing.
template <typename T>
__device__ __forceinline__ float add_features(float v, const KernelParams& p, int64_t b, int64_t h, int64_t i,
                                              int64_t j, float neg_slope) {
  if (i >= p.seq_q || j >= p.seq_k) return v;
  if (p.mask_kind != MaskKind::kNone) {
    const int64_t offset = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3];
    if (p.mask_kind == MaskKind::kBool) {
      if (static_cast<const uint8_t*>(p.mask)[offset] == 0) v = -kInf;
    } else if (p.mask_kind == MaskKind::kSame) {
      v += to_float(static_cast<const T*>(p.mask)[offset]);
    } else {
      v += static_cast<const float*>(p.mask)[offset];
    }
  }
  if (p.alibi != nullptr) {
    const int64_t distance = j - i - p.diagonal;
    v += neg_slope * static_cast<float>(distance < 0 ? -distance : distance);
  }
  if (p.key_padding != nullptr && p.key_padding[b * p.key_padding_stride[0] + j * p.key_padding_stride[1]] != 0) {
    v = -kInf;
  }
  return v;
}

// Turns a warp's accumulator tile of q . k products into scores: s[n][2h + e] is row r0 + g + 8h, column
// c0 + 8n + 2q + e. kRowsQ: rows are queries and columns keys (forward, dQ); else rows are keys and columns
// queries (dK, dV). Scales, adds the mask and ALiBi (kFeatures), and with `check` sets -inf outside the window,
// past the last key or query, and on rows past the last row.
template <typename T, int kN, bool kRowsQ, bool kFeatures>
__device__ __forceinline__ void score_tile(float (&s)[kN][4], const KernelParams& p, int64_t b, int64_t h, int64_t r0,
                                           int64_t c0, bool check, float neg_slope) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int64_t diag = p.diagonal, wl = p.window_left, wr = p.window_right;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t r = r0 + g + 8 * hh;
    int lo = 0, hi = 8 * kN;  // the columns [lo, hi) of the tile row r may see
    if (check) {
      int64_t lo_g, hi_g;
      if constexpr (kRowsQ) {  // query r sees keys [r + diag - wl, r + diag + wr] within [0, seq_k)
        lo_g = wl >= 0 ? r + diag - wl : 0;
        hi_g = wr >= 0 ? min(r + diag + wr + 1, p.seq_k) : p.seq_k;
        if (r >= p.seq_q) hi_g = lo_g;
      } else {  // key r is seen by queries [r - diag - wr, r - diag + wl] within [0, seq_q)
        lo_g = wr >= 0 ? r - diag - wr : 0;
        hi_g = wl >= 0 ? min(r - diag + wl + 1, p.seq_q) : p.seq_q;
        if (r >= p.seq_k) hi_g = lo_g;
      }
      lo = static_cast<int>(min64(max64(lo_g - c0, 0), 8 * kN));
      hi = static_cast<int>(min64(max64(hi_g - c0, 0), 8 * kN));
    }
#pragma unroll
    for (int n = 0; n < kN; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * n + 2 * q + e;
        float v = s[n][2 * hh + e] * p.scale;
        if constexpr (kFeatures) {
          v = add_features<T>(v, p, b, h, kRowsQ ? r : c0 + col, kRowsQ ? c0 + col : r, neg_slope);
        }
        if (col < lo || col >= hi) v = -kInf;
        s[n][2 * hh + e] = v;
      }
    }
  }
}

// Keep bits (bit i: word i >= threshold) of the Philox call for keys 4 c0 .. 4 c0 + 3 of query c1, head bh.
__device__ __forceinline__ uint32_t keep4(const KernelParams& p, uint32_t c0, uint32_t c1, uint32_t bh) {
  const Philox4 r = philox4x32_10(c0, c1, bh, 0u, p.key0, p.key1);
  return uint32_t(r.x[0] >= p.threshold) | uint32_t(r.x[1] >= p.threshold) << 1 |
         uint32_t(r.x[2] >= p.threshold) << 2 | uint32_t(r.x[3] >= p.threshold) << 3;
}

// Rows are queries i0 + 0..15, columns keys j0 + 0..7 (j0 a multiple of 8): the thread's keep bits, bit 2h + e
// for row g + 8h, column 2q + e. Lane L computes keys j0 + 4 (L / 16) .. + 3 of query i0 + L % 16.
__device__ __forceinline__ uint32_t keep_rows_q(const KernelParams& p, uint32_t bh, int64_t i0, int64_t j0) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const uint32_t mine = keep4(p, uint32_t(j0 / 4) + uint32_t(lane / 16), uint32_t(i0) + uint32_t(lane % 16), bh);
  uint32_t bits = 0;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const uint32_t v = __shfl_sync(0xffffffffu, mine, (q / 2) * 16 + g + 8 * hh);
    bits |= ((v >> (2 * (q % 2))) & 3u) << (2 * hh);
  }
  return bits;
}

// Rows are keys j0 + 0..15 (j0 a multiple of 4), columns queries i0 + 0..7: the thread's keep bits, bit 2h + e
// for row g + 8h, column 2q + e. Lane L computes keys j0 + 4 (L / 8) .. + 3 of query i0 + L % 8.
__device__ __forceinline__ uint32_t keep_rows_k(const KernelParams& p, uint32_t bh, int64_t j0, int64_t i0) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const uint32_t mine = keep4(p, uint32_t(j0 / 4) + uint32_t(lane / 8), uint32_t(i0) + uint32_t(lane % 8), bh);
  uint32_t bits = 0;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const uint32_t v = __shfl_sync(0xffffffffu, mine, (g / 4 + 2 * hh) * 8 + 2 * q + e);
      bits |= ((v >> (g % 4)) & 1u) << (2 * hh + e);
    }
  }
  return bits;
}

// The keys [lo, hi) some query of [q0, q0 + qn) may see.
__device__ __forceinline__ void key_range(const KernelParams& p, int64_t q0, int64_t qn, int64_t& lo, int64_t& hi) {
  lo = p.window_left >= 0 ? max64(0, q0 + p.diagonal - p.window_left) : 0;
  hi = p.window_right >= 0 ? min64(p.seq_k, q0 + qn - 1 + p.diagonal + p.window_right + 1) : p.seq_k;
}

// Whether every query of [q0, q0 + qn) sees every key of [k0, k0 + kn) (no masking by window or key range).
__device__ __forceinline__ bool tile_inside(const KernelParams& p, int64_t q0, int64_t qn, int64_t k0, int64_t kn) {
  return k0 + kn <= p.seq_k && q0 + qn <= p.seq_q &&
         (p.window_left < 0 || k0 >= q0 + qn - 1 + p.diagonal - p.window_left) &&
         (p.window_right < 0 || k0 + kn - 1 <= q0 + p.diagonal + p.window_right);
}

// ---------------------------------------------------------------------------------------------------------
// Forward kernel.
// ---------------------------------------------------------------------------------------------------------

// Block: (batch, query head) blockIdx.x, query block gridDim.y - 1 - blockIdx.y (the most keys first under a
// causal mask); kBM / (16 kWM) warps, each with kWM 16-row tiles of queries (rows 16 kWM w .. + 16 kWM - 1), so
// that each K and V fragment a warp loads feeds kWM MMAs. Shared memory: Q (kBM, kL), then `stages` K tiles and
// `stages` V tiles (kBN, kL).
template <typename T, int kD, int kBM, int kBN, int kWM, bool kFeatures>
__global__ void __launch_bounds__(kBM / kWM * 2) attention_forward_kernel(const __grid_constant__ KernelParams p) {
  constexpr int kThreads = kBM / kWM * 2, kL = kLd<T, kD>, kNT = kBN / 8, kOT = kD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sK = sQ + kBM * kL;
  T* const sV = sK + p.stages * kBN * kL;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q4 = lane % 4;

  const int64_t bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q, hk = h / p.group;
  const int64_t q0 = int64_t(gridDim.y - 1 - blockIdx.y) * kBM;
  const int qn = static_cast<int>(min64(kBM, p.seq_q - q0));
  int64_t k_lo, k_hi;
  key_range(p, q0, qn, k_lo, k_hi);
  const int64_t k_first = k_lo / kBN * kBN;
  const int n_tiles = k_lo < k_hi ? static_cast<int>((k_hi - k_first + kBN - 1) / kBN) : 0;

  const T* const k_head = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* const v_head = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const auto load_kv = [&](int t, int stage) {
    const int64_t k0 = k_first + int64_t(t) * kBN;
    const int kn = static_cast<int>(min64(kBN, p.seq_k - k0));
    load_tile<T, kBN, kL, kThreads>(sK + stage * kBN * kL, k_head + k0 * p.k_stride[2], p.k_stride[2], kn,
                                    p.head_dim, p.k_vec);
    load_tile<T, kBN, kL, kThreads>(sV + stage * kBN * kL, v_head + k0 * p.v_stride[2], p.v_stride[2], kn,
                                    p.head_dim_v, p.v_vec);
  };
  if (n_tiles > 0) {
    const T* q_rows = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + q0 * p.q_stride[2];
    load_tile<T, kBM, kL, kThreads>(sQ, q_rows, p.q_stride[2], qn, p.head_dim, p.q_vec);
    load_kv(0, 0);
    cp_async_commit();
  }

  const int ksteps = (p.head_dim + 15) / 16, n16 = (p.head_dim_v + 15) / 16;
  const bool dropout = kFeatures && p.dropout;
  const float neg_slope = kFeatures && p.alibi != nullptr ? -p.alibi[b * p.alibi_stride[0] + h * p.alibi_stride[1]]
                                                          : 0.0f;
  const int64_t row0 = q0 + warp * 16 * kWM;  // the warp's first query
  float o[kWM][kOT][4] = {};
  float m[kWM][2], l[kWM][2];
#pragma unroll
  for (int mt = 0; mt < kWM; ++mt) {
    m[mt][0] = m[mt][1] = -kInf;
    l[mt][0] = l[mt][1] = 0.0f;
  }

  for (int t = 0; t < n_tiles; ++t) {
    const int64_t k0 = k_first + int64_t(t) * kBN;
    const int stage = p.stages == 2 ? (t & 1) : 0;
    if (p.stages == 1 && t > 0) {
      load_kv(t, 0);
      cp_async_commit();
    }
    if (p.stages == 2 && t + 1 < n_tiles) {
      load_kv(t + 1, (t + 1) & 1);  // its buffer was last read in iteration t - 1, before its closing barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    float s[kWM][kNT][4] = {};
    gemm_ss<T, kWM, kNT, kD, kL>(s, sQ + warp * 16 * kWM * kL, sK + stage * kBN * kL, ksteps);
    const bool check = !tile_inside(p, q0, qn, k0, kBN);
    uint32_t keep[kWM];
#pragma unroll
    for (int mt = 0; mt < kWM; ++mt) {
      score_tile<T, kNT, true, kFeatures>(s[mt], p, b, h, row0 + 16 * mt, k0, check, neg_slope);
      // Online softmax: the row max over the quad's lanes; l stays per lane until the end.
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float mx = -kInf;
#pragma unroll
        for (int n = 0; n < kNT; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * hh], s[mt][n][2 * hh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[mt][hh], mx);
        const float shift = prep_shift<T>(m_new == -kInf ? 0.0f : m_new);
        const float alpha = exp_shift<T>(m[mt][hh], shift);
        m[mt][hh] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = exp_shift<T>(s[mt][n][2 * hh + e], shift);
            s[mt][n][2 * hh + e] = pv;
            sum += pv;
          }
        }
        l[mt][hh] = l[mt][hh] * alpha + sum;
#pragma unroll
        for (int n = 0; n < kOT; ++n) {
          o[mt][n][2 * hh] *= alpha;
          o[mt][n][2 * hh + 1] *= alpha;
        }
      }
      keep[mt] = 0xffffffffu;
      if (dropout) {
        keep[mt] = 0;
#pragma unroll 1
        for (int n = 0; n < kNT; ++n) {
          keep[mt] |= keep_rows_q(p, uint32_t(bh), row0 + 16 * mt, k0 + 8 * n) << (4 * n);
        }
      }
    }
    gemm_rs<T, kWM, kNT, kOT, kL>(o, s, keep, sV + stage * kBN * kL, n16);
    __syncthreads();
  }

  // out = O / l (times 1 / (1 - p)), lse = m + log l; 0 and -inf for a query that saw no key. Every read of sQ
  // ended before the loop's last barrier, and no copy is in flight.
#pragma unroll
  for (int mt = 0; mt < kWM; ++mt) {
    float mul[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float sum = l[mt][hh];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      mul[hh] = sum == 0.0f ? 0.0f : (dropout ? p.dropout_scale : 1.0f) / sum;
      const int row = warp * 16 * kWM + 16 * mt + g + 8 * hh;
      if (q4 == 0 && row < qn) p.lse[bh * p.seq_q + q0 + row] = sum == 0.0f ? -kInf : m[mt][hh] + logf(sum);
    }
    frag_to_smem<T, kOT, kL>(sQ + (warp * kWM + mt) * 16 * kL, o[mt], mul, n16);
  }
  __syncthreads();
  store_tile<T, kBM, kL, kThreads>(static_cast<T*>(p.out) + (bh * p.seq_q + q0) * p.head_dim_v, sQ, qn,
                                   p.head_dim_v);
}

// ---------------------------------------------------------------------------------------------------------
// Backward kernels.
// ---------------------------------------------------------------------------------------------------------

// dK (kDK) and dV (kDV) of a block of kBN keys, 16 per warp. Block: (batch, kv head) blockIdx.x, key block
// blockIdx.y. Shared memory: K, V (kBN, kL); then `stages` each of Q, dO (kBM, kL); then `stages` each of lse
// and delta (kBM floats).
template <typename T, int kD, int kBN, int kBM, int kMinBlocks, bool kFeatures, bool kDK, bool kDV>
__global__ void __launch_bounds__(kBN * 2, kMinBlocks)
    attention_backward_kv_kernel(const __grid_constant__ KernelParams p) {
  constexpr int kThreads = kBN * 2, kL = kLd<T, kD>, kMT = kBM / 8, kOT = kD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const sK = reinterpret_cast<T*>(smem);
  T* const sV = sK + kBN * kL;
  T* const sQ = sV + kBN * kL;
  T* const sO = sQ + p.stages * kBM * kL;
  float* const sLse = reinterpret_cast<float*>(sO + p.stages * kBM * kL);
  float* const sDelta = sLse + p.stages * kBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q4 = lane % 4;

  const int64_t bk = blockIdx.x, b = bk / p.heads_kv, hk = bk % p.heads_kv;
  const int64_t k0 = int64_t(blockIdx.y) * kBN;
  const int kn = static_cast<int>(min64(kBN, p.seq_k - k0));
  // The queries that may see a key of the block: key j is seen by [j - diag - wr, j - diag + wl].
  const int64_t q_lo = p.window_right >= 0 ? max64(0, k0 - p.diagonal - p.window_right) : 0;
  const int64_t q_hi =
      p.window_left >= 0 ? min64(p.seq_q, k0 + kn - 1 - p.diagonal + p.window_left + 1) : p.seq_q;
  const int64_t q_first = q_lo / kBM * kBM;
  const int64_t n_qblocks = q_lo < q_hi ? (q_hi - q_first + kBM - 1) / kBM : 0;
  const int64_t n_iter = p.group * n_qblocks;  // (query head of the group, query block)

  const auto load_q = [&](int64_t it, int stage) {
    const int64_t h = hk * p.group + it / n_qblocks, i0 = q_first + it % n_qblocks * kBM;
    const int qn = static_cast<int>(min64(kBM, p.seq_q - i0));
    load_tile<T, kBM, kL, kThreads>(sQ + stage * kBM * kL,
                                    static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] +
                                        i0 * p.q_stride[2],
                                    p.q_stride[2], qn, p.head_dim, p.q_vec);
    load_tile<T, kBM, kL, kThreads>(sO + stage * kBM * kL,
                                    static_cast<const T*>(p.grad_out) + b * p.do_stride[0] + h * p.do_stride[1] +
                                        i0 * p.do_stride[2],
                                    p.do_stride[2], qn, p.head_dim_v, p.do_vec);
    const int64_t stat0 = (b * p.heads_q + h) * p.seq_q + i0;
    for (int i = threadIdx.x; i < kBM; i += kThreads) {
      if (i < qn) {
        cp_async4(sLse + stage * kBM + i, p.lse_in + stat0 + i);
        if constexpr (kDK) cp_async4(sDelta + stage * kBM + i, p.delta + stat0 + i);
      } else {
        sLse[stage * kBM + i] = 0.0f;
        sDelta[stage * kBM + i] = 0.0f;
      }
    }
  };
  if (n_iter > 0) {
    const T* k_rows = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + k0 * p.k_stride[2];
    load_tile<T, kBN, kL, kThreads>(sK, k_rows, p.k_stride[2], kn, p.head_dim, p.k_vec);
    if constexpr (kDK) {
      const T* v_rows = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + k0 * p.v_stride[2];
      load_tile<T, kBN, kL, kThreads>(sV, v_rows, p.v_stride[2], kn, p.head_dim_v, p.v_vec);
    }
    load_q(0, 0);
    cp_async_commit();
  }

  const int ksteps_d = (p.head_dim + 15) / 16, ksteps_v = (p.head_dim_v + 15) / 16;
  const int n16_d = ksteps_d, n16_v = ksteps_v;
  const bool dropout = kFeatures && p.dropout;
  const float z_kept = dropout ? p.dropout_scale : 1.0f;
  const int64_t row0 = k0 + warp * 16;  // the warp's first key
  float dk[1][kDK ? kOT : 1][4] = {};
  float dv[1][kDV ? kOT : 1][4] = {};
  const uint32_t keep_all[1] = {0xffffffffu};

  for (int64_t it = 0; it < n_iter; ++it) {
    const int64_t h = hk * p.group + it / n_qblocks, i0 = q_first + it % n_qblocks * kBM;
    const int stage = p.stages == 2 ? int(it & 1) : 0;
    if (p.stages == 1 && it > 0) {
      load_q(it, 0);
      cp_async_commit();
    }
    if (p.stages == 2 && it + 1 < n_iter) {
      load_q(it + 1, int((it + 1) & 1));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* const q_s = sQ + stage * kBM * kL;
    const T* const o_s = sO + stage * kBM * kL;
    const float* const lse_s = sLse + stage * kBM;
    const float* const delta_s = sDelta + stage * kBM;

    // P^T (16 keys x kBM queries per warp) = exp(scores^T - lse); a query with lse -inf saw no key: P = 0.
    float s[1][kMT][4] = {};
    gemm_ss<T, 1, kMT, kD, kL>(s, sK + warp * 16 * kL, q_s, ksteps_d);
    const float neg_slope =
        kFeatures && p.alibi != nullptr ? -p.alibi[b * p.alibi_stride[0] + h * p.alibi_stride[1]] : 0.0f;
    score_tile<T, kMT, false, kFeatures>(s[0], p, b, h, row0, i0, !tile_inside(p, i0, kBM, k0, kBN), neg_slope);
#pragma unroll
    for (int n = 0; n < kMT; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float lse = lse_s[8 * n + 2 * q4 + e];
        const float shift = prep_shift<T>(lse == -kInf ? kInf : lse);
        s[0][n][e] = exp_shift<T>(s[0][n][e], shift);
        s[0][n][2 + e] = exp_shift<T>(s[0][n][2 + e], shift);
      }
    }
    uint32_t keep[1] = {0xffffffffu};
    if (dropout) {
      keep[0] = 0;
      const uint32_t bhq = uint32_t(b * p.heads_q + h);
#pragma unroll 1
      for (int n = 0; n < kMT; ++n) keep[0] |= keep_rows_k(p, bhq, row0, i0 + 8 * n) << (4 * n);
    }
    if constexpr (kDV) gemm_rs<T, 1, kMT, kOT, kL>(dv, s, keep, o_s, n16_v);  // dV += (P^T * keep) dO
    if constexpr (kDK) {
      float dp[1][kMT][4] = {};
      gemm_ss<T, 1, kMT, kD, kL>(dp, sV + warp * 16 * kL, o_s, ksteps_v);  // dP^T = V dO^T
#pragma unroll
      for (int n = 0; n < kMT; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float delta = delta_s[8 * n + 2 * q4 + e];
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int i = 2 * hh + e;
            const float z = (keep[0] >> (4 * n + i)) & 1u ? z_kept : 0.0f;
            dp[0][n][i] = s[0][n][i] * (dp[0][n][i] * z - delta);  // dS^T
          }
        }
      }
      gemm_rs<T, 1, kMT, kOT, kL>(dk, dp, keep_all, q_s, n16_d);  // dK += dS^T Q
    }
    __syncthreads();
  }

  // dK = scale dK, dV = dV / (1 - p), staged through the K and V tiles (no longer read, no copy in flight).
  const int64_t row_out = bk * p.seq_k + k0;
  if constexpr (kDK) {
    const float mul[2] = {p.scale, p.scale};
    frag_to_smem<T, kOT, kL>(sK + warp * 16 * kL, dk[0], mul, n16_d);
  }
  if constexpr (kDV) {
    const float mul[2] = {z_kept, z_kept};
    frag_to_smem<T, kOT, kL>(sV + warp * 16 * kL, dv[0], mul, n16_v);
  }
  __syncthreads();
  if constexpr (kDK) {
    store_tile<T, kBN, kL, kThreads>(static_cast<T*>(p.dk) + row_out * p.head_dim, sK, kn, p.head_dim);
  }
  if constexpr (kDV) {
    store_tile<T, kBN, kL, kThreads>(static_cast<T*>(p.dv) + row_out * p.head_dim_v, sV, kn, p.head_dim_v);
  }
}

// dQ of a block of kBM queries, 16 per warp. Block: (batch, query head) blockIdx.x, query block
// gridDim.y - 1 - blockIdx.y. Shared memory: Q, dO (kBM, kL); then `stages` each of K, V (kBN, kL).
template <typename T, int kD, int kBM, int kBN, int kMinBlocks, bool kFeatures>
__global__ void __launch_bounds__(kBM * 2, kMinBlocks)
    attention_backward_q_kernel(const __grid_constant__ KernelParams p) {
  constexpr int kThreads = kBM * 2, kL = kLd<T, kD>, kNT = kBN / 8, kOT = kD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sO = sQ + kBM * kL;
  T* const sK = sO + kBM * kL;
  T* const sV = sK + p.stages * kBN * kL;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;

  const int64_t bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q, hk = h / p.group;
  const int64_t q0 = int64_t(gridDim.y - 1 - blockIdx.y) * kBM;
  const int qn = static_cast<int>(min64(kBM, p.seq_q - q0));
  int64_t k_lo, k_hi;
  key_range(p, q0, qn, k_lo, k_hi);
  const int64_t k_first = k_lo / kBN * kBN;
  const int n_tiles = k_lo < k_hi ? static_cast<int>((k_hi - k_first + kBN - 1) / kBN) : 0;

  const T* const k_head = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* const v_head = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const auto load_kv = [&](int t, int stage) {
    const int64_t k0 = k_first + int64_t(t) * kBN;
    const int kn = static_cast<int>(min64(kBN, p.seq_k - k0));
    load_tile<T, kBN, kL, kThreads>(sK + stage * kBN * kL, k_head + k0 * p.k_stride[2], p.k_stride[2], kn,
                                    p.head_dim, p.k_vec);
    load_tile<T, kBN, kL, kThreads>(sV + stage * kBN * kL, v_head + k0 * p.v_stride[2], p.v_stride[2], kn,
                                    p.head_dim_v, p.v_vec);
  };
  if (n_tiles > 0) {
    load_tile<T, kBM, kL, kThreads>(
        sQ, static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + q0 * p.q_stride[2], p.q_stride[2],
        qn, p.head_dim, p.q_vec);
    load_tile<T, kBM, kL, kThreads>(
        sO, static_cast<const T*>(p.grad_out) + b * p.do_stride[0] + h * p.do_stride[1] + q0 * p.do_stride[2],
        p.do_stride[2], qn, p.head_dim_v, p.do_vec);
    load_kv(0, 0);
    cp_async_commit();
  }

  const int ksteps_d = (p.head_dim + 15) / 16, ksteps_v = (p.head_dim_v + 15) / 16;
  const int n16_d = ksteps_d;
  const bool dropout = kFeatures && p.dropout;
  const float z_kept = dropout ? p.dropout_scale : 1.0f;
  const float neg_slope = kFeatures && p.alibi != nullptr ? -p.alibi[b * p.alibi_stride[0] + h * p.alibi_stride[1]]
                                                          : 0.0f;
  const int64_t row0 = q0 + warp * 16;  // the warp's first query
  // Per row: the shift of P (lse; +inf for a query that saw no key or past the last query: P = 0) and delta.
  float shift[2], delta[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t i = row0 + g + 8 * hh;
    const float lse = i < p.seq_q ? p.lse_in[bh * p.seq_q + i] : -kInf;
    shift[hh] = prep_shift<T>(lse == -kInf ? kInf : lse);
    delta[hh] = i < p.seq_q ? p.delta[bh * p.seq_q + i] : 0.0f;
  }
  float dq[1][kOT][4] = {};
  const uint32_t keep_all[1] = {0xffffffffu};

  for (int t = 0; t < n_tiles; ++t) {
    const int64_t k0 = k_first + int64_t(t) * kBN;
    const int stage = p.stages == 2 ? (t & 1) : 0;
    if (p.stages == 1 && t > 0) {
      load_kv(t, 0);
      cp_async_commit();
    }
    if (p.stages == 2 && t + 1 < n_tiles) {
      load_kv(t + 1, (t + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* const k_s = sK + stage * kBN * kL;
    const T* const v_s = sV + stage * kBN * kL;

    float s[1][kNT][4] = {};
    gemm_ss<T, 1, kNT, kD, kL>(s, sQ + warp * 16 * kL, k_s, ksteps_d);
    score_tile<T, kNT, true, kFeatures>(s[0], p, b, h, row0, k0, !tile_inside(p, q0, qn, k0, kBN), neg_slope);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[0][n][i] = exp_shift<T>(s[0][n][i], shift[i / 2]);  // P
    }
    float dp[1][kNT][4] = {};
    gemm_ss<T, 1, kNT, kD, kL>(dp, sO + warp * 16 * kL, v_s, ksteps_v);  // dP = dO V^T
    uint32_t keep = 0xffffffffu;
    if (dropout) {
      keep = 0;
#pragma unroll 1
      for (int n = 0; n < kNT; ++n) keep |= keep_rows_q(p, uint32_t(bh), row0, k0 + 8 * n) << (4 * n);
    }
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float z = (keep >> (4 * n + i)) & 1u ? z_kept : 0.0f;
        dp[0][n][i] = s[0][n][i] * (dp[0][n][i] * z - delta[i / 2]);  // dS
      }
    }
    gemm_rs<T, 1, kNT, kOT, kL>(dq, dp, keep_all, k_s, n16_d);  // dQ += dS K
    __syncthreads();
  }

  const float mul[2] = {p.scale, p.scale};
  frag_to_smem<T, kOT, kL>(sQ + warp * 16 * kL, dq[0], mul, n16_d);
  __syncthreads();
  store_tile<T, kBM, kL, kThreads>(static_cast<T*>(p.dq) + (bh * p.seq_q + q0) * p.head_dim, sQ, qn, p.head_dim);
}

// ---------------------------------------------------------------------------------------------------------
// Tile sizes and launchers.
// ---------------------------------------------------------------------------------------------------------

// Per head dim bucket kD (64, 128, 256): 16-bit tiles feed the tensor cores (128x64 forward tiles up to 128);
// float32 tiles are smaller (twice the bytes per element, and no tensor cores to feed).
template <typename T, int kD>
struct Tiles {
  static constexpr bool k16 = kIs16<T>;
  // Forward: kFwdM queries per block, kFwdWM 16-row tiles per warp (two halve the shared-memory reads per MMA),
  // key tiles of kFwdN. With kFeatures (masks, ALiBi or dropout) at head dim 128, two tiles per warp spill
  // registers: one (8 warps) instead.
  static constexpr int kFwdM = k16 ? (kD <= 128 ? 128 : 64) : 64;
  template <bool kFeatures>
  static constexpr int kFwdWM = k16 && (kD <= 64 || (kD <= 128 && !kFeatures)) ? 2 : 1;
  static constexpr int kFwdN = k16 ? (kD <= 128 ? 64 : 32) : (kD <= 64 ? 64 : kD <= 128 ? 32 : 16);
  // Backward dK / dV: kKvN keys per block (16 per warp), query tiles of kKvM.
  static constexpr int kKvN = k16 ? 64 : (kD <= 128 ? 64 : 32);
  static constexpr int kKvM = k16 ? (kD <= 128 ? 64 : 32) : (kD <= 64 ? 32 : 16);
  // Backward dQ: kQM queries per block (16 per warp), key tiles of kQN.
  static constexpr int kQM = k16 ? 64 : (kD <= 128 ? 64 : 32);
  static constexpr int kQN = k16 ? (kD <= 128 ? 64 : 32) : (kD <= 64 ? 32 : 16);
  static constexpr int kL = kLd<T, kD>;
  static constexpr size_t kRow = size_t(kL) * sizeof(T);  // bytes per shared row

  static constexpr size_t fwd_smem(int stages) { return (kFwdM + 2 * stages * kFwdN) * kRow; }
  static constexpr size_t kv_smem(int stages) { return (2 * kKvN + 2 * stages * kKvM) * kRow + 2 * stages * kKvM * 4; }
  static constexpr size_t q_smem(int stages) { return (2 * kQM + 2 * stages * kQN) * kRow; }
};

// Whether every row of a (sizes[0], sizes[1], sizes[2], ...) tensor with these strides starts 16-byte aligned.
bool rows_aligned(const void* data, int element_size, const int64_t* sizes, const int64_t* strides) {
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i) {
    if (sizes[i] > 1 && (strides[i] * element_size) % 16 != 0) return false;
  }
  return true;
}

using Kernel = void (*)(KernelParams);

// Launches kernel on grid x threads with double-buffered tiles (smem2 bytes of shared memory) when the device
// allows it, else single-buffered (smem1); cudaErrorNotSupported when neither fits.
cudaError_t launch(Kernel kernel, int64_t grid_x, int64_t grid_y, int threads, size_t smem1, size_t smem2,
                   KernelParams p, cudaStream_t stream) {
  if (grid_x <= 0 || grid_y <= 0) return cudaSuccess;
  if (grid_x > 0x7fffffff || grid_y > 65535) return cudaErrorInvalidConfiguration;
  int device = 0, limit = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  error = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error != cudaSuccess) return error;
  size_t bytes;
  if (smem2 <= size_t(limit)) {
    p.stages = 2;
    bytes = smem2;
  } else if (smem1 <= size_t(limit)) {
    p.stages = 1;
    bytes = smem1;
  } else {
    return cudaErrorNotSupported;
  }
  error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (error != cudaSuccess) return error;
  kernel<<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), threads, bytes, stream>>>(p);
  return cudaGetLastError();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int kD, bool kFeatures>
cudaError_t forward_launch(const KernelParams& p, cudaStream_t stream) {
  using C = Tiles<T, kD>;
  constexpr int kWM = C::template kFwdWM<kFeatures>;
  return launch(attention_forward_kernel<T, kD, C::kFwdM, C::kFwdN, kWM, kFeatures>, p.batch * p.heads_q,
                ceil_div(p.seq_q, C::kFwdM), C::kFwdM / kWM * 2, C::fwd_smem(1), C::fwd_smem(2), p, stream);
}

template <typename T, int kD, bool kFeatures>
cudaError_t backward_launch(const KernelParams& p, cudaStream_t stream) {
  using C = Tiles<T, kD>;
  const int64_t kv_x = p.batch * p.heads_kv, kv_y = ceil_div(p.seq_k, C::kKvN);
  cudaError_t error;
  if constexpr (kD <= 128) {
    error = launch(attention_backward_kv_kernel<T, kD, C::kKvN, C::kKvM, 1, kFeatures, true, true>, kv_x, kv_y,
                   C::kKvN * 2, C::kv_smem(1), C::kv_smem(2), p, stream);
  } else {  // dK and dV do not fit in registers together: one launch each
    error = launch(attention_backward_kv_kernel<T, kD, C::kKvN, C::kKvM, 1, kFeatures, false, true>, kv_x, kv_y,
                   C::kKvN * 2, C::kv_smem(1), C::kv_smem(2), p, stream);
    if (error != cudaSuccess) return error;
    error = launch(attention_backward_kv_kernel<T, kD, C::kKvN, C::kKvM, 1, kFeatures, true, false>, kv_x, kv_y,
                   C::kKvN * 2, C::kv_smem(1), C::kv_smem(2), p, stream);
  }
  if (error != cudaSuccess) return error;
  return launch(attention_backward_q_kernel<T, kD, C::kQM, C::kQN, 1, kFeatures>, p.batch * p.heads_q,
                ceil_div(p.seq_q, C::kQM), C::kQM * 2, C::q_smem(1), C::q_smem(2), p, stream);
}

// Picks the head dim bucket and the kernel variant: 16-bit inputs without masks, ALiBi or dropout run kernels
// compiled without those paths; float32 always runs the general ones.
template <typename T, template <typename, int, bool> class Launch>
cudaError_t dispatch(const KernelParams& p, bool features, cudaStream_t stream) {
  const int width = p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v;
  const auto by_features = [&](auto bucket) {
    constexpr int kD = decltype(bucket)::value;
    if constexpr (kIs16<T>) {
      return features ? Launch<T, kD, true>::run(p, stream) : Launch<T, kD, false>::run(p, stream);
    } else {
      return Launch<T, kD, true>::run(p, stream);
    }
  };
  if (width <= 64) return by_features(std::integral_constant<int, 64>{});
  if (width <= 128) return by_features(std::integral_constant<int, 128>{});
  if (width <= 256) return by_features(std::integral_constant<int, 256>{});
  return cudaErrorInvalidValue;
}

template <typename T, int kD, bool kFeatures>
struct ForwardLaunch {
  static cudaError_t run(const KernelParams& p, cudaStream_t s) { return forward_launch<T, kD, kFeatures>(p, s); }
};

template <typename T, int kD, bool kFeatures>
struct BackwardLaunch {
  static cudaError_t run(const KernelParams& p, cudaStream_t s) { return backward_launch<T, kD, kFeatures>(p, s); }
};

// The kernel arguments of the forward's arguments, for element size `element_size`.
KernelParams make_params(const AttentionForwardArgs& a, int element_size) {
  KernelParams p{};
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = a.q_stride[i];
    p.k_stride[i] = a.k_stride[i];
    p.v_stride[i] = a.v_stride[i];
  }
  p.mask_kind = a.mask_kind;
  if (a.mask_kind != MaskKind::kNone) {
    p.mask = a.mask;
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = a.mask_stride[i];
  }
  if (a.key_padding != nullptr) {
    p.key_padding = a.key_padding;
    for (int i = 0; i < 2; ++i) p.key_padding_stride[i] = a.key_padding_stride[i];
  }
  if (a.alibi != nullptr) {
    p.alibi = a.alibi;
    for (int i = 0; i < 2; ++i) p.alibi_stride[i] = a.alibi_stride[i];
  }
  p.out = a.out;
  p.lse = static_cast<float*>(a.lse);
  p.batch = a.batch;
  p.heads_q = a.heads_q;
  p.heads_kv = a.heads_kv;
  p.group = a.heads_kv > 0 ? a.heads_q / a.heads_kv : 1;
  p.seq_q = a.seq_q;
  p.seq_k = a.seq_k;
  p.head_dim = static_cast<int>(a.head_dim);
  p.head_dim_v = static_cast<int>(a.head_dim_v);
  p.scale = static_cast<float>(a.scale);
  p.diagonal = a.diagonal;
  p.window_left = a.window_left;
  p.window_right = a.window_right;
  p.dropout = a.dropout.on;
  if (a.dropout.on) {
    p.threshold = a.dropout.threshold;
    p.dropout_scale = static_cast<float>(a.dropout.scale);
    p.key0 = a.dropout.key0;
    p.key1 = a.dropout.key1;
  }
  const int64_t q_sizes[3] = {a.batch, a.heads_q, a.seq_q};
  const int64_t kv_sizes[3] = {a.batch, a.heads_kv, a.seq_k};
  p.q_vec = rows_aligned(a.q, element_size, q_sizes, a.q_stride);
  p.k_vec = rows_aligned(a.k, element_size, kv_sizes, a.k_stride);
  p.v_vec = rows_aligned(a.v, element_size, kv_sizes, a.v_stride);
  p.stages = 2;
  return p;
}

bool has_features(const AttentionForwardArgs& a) {
  return a.mask_kind != MaskKind::kNone || a.key_padding != nullptr || a.alibi != nullptr || a.dropout.on;
}

bool supported(const AttentionForwardArgs& a) {
  return (a.dtype == Dtype::kHalf || a.dtype == Dtype::kBFloat16 || a.dtype == Dtype::kFloat) && a.head_dim >= 0 &&
         a.head_dim_v >= 0 && a.head_dim <= kAttentionCudaMaxHeadDim && a.head_dim_v <= kAttentionCudaMaxHeadDim;
}

int element_size(Dtype dtype) { return dtype == Dtype::kFloat ? 4 : 2; }

}  // namespace

cudaError_t attention_forward_cuda(const AttentionForwardArgs& args, cudaStream_t stream) {
  if (!supported(args)) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.heads_q == 0 || args.seq_q == 0) return cudaSuccess;
  const KernelParams p = make_params(args, element_size(args.dtype));
  const bool features = has_features(args);
  switch (args.dtype) {
    case Dtype::kHalf: return dispatch<__half, ForwardLaunch>(p, features, stream);
    case Dtype::kBFloat16: return dispatch<__nv_bfloat16, ForwardLaunch>(p, features, stream);
    case Dtype::kFloat: return dispatch<float, ForwardLaunch>(p, features, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t attention_backward_cuda(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const AttentionForwardArgs& f = args.forward;
  if (!supported(f)) return cudaErrorInvalidValue;
  if (f.batch == 0) return cudaSuccess;
  KernelParams p = make_params(f, element_size(f.dtype));
  p.out = nullptr;
  p.lse = nullptr;
  p.grad_out = args.grad_out;
  for (int i = 0; i < 3; ++i) p.do_stride[i] = args.grad_out_stride[i];
  const int64_t q_sizes[3] = {f.batch, f.heads_q, f.seq_q};
  p.do_vec = rows_aligned(args.grad_out, element_size(f.dtype), q_sizes, args.grad_out_stride);
  p.lse_in = static_cast<const float*>(args.lse);
  p.delta = static_cast<const float*>(args.delta);
  p.dq = args.dq;
  p.dk = args.dk;
  p.dv = args.dv;
  const bool features = has_features(f);
  switch (f.dtype) {
    case Dtype::kHalf: return dispatch<__half, BackwardLaunch>(p, features, stream);
    case Dtype::kBFloat16: return dispatch<__nv_bfloat16, BackwardLaunch>(p, features, stream);
    case Dtype::kFloat: return dispatch<float, BackwardLaunch>(p, features, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastattn
