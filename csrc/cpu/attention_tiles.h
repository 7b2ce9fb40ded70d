// The tiles of the CPU attention kernels on raw pointers (arguments and semantics: csrc/attention.h): the GEMM
// micro-kernel, masking, online softmax and the forward kernel, which the backward (attention_backward_tiles.h)
// drives for its score tiles. Included by the two kernel files only.
//
// FlashAttention's tiled online softmax. A task is one (batch b, query head h, block of up to kBlockQ queries);
// it walks the keys in tiles of kBlockK and keeps, per query i, the running maximum m_i, the running sum
// l_i = sum_j exp(s_ij - m_i) and the unnormalised output o_i = sum_j exp(s_ij - m_i) v_j, in the compute type C
// (float for half/bfloat16/float, double for double). Per key tile [k0, k0 + kn):
//   1. S^T = K Q^T: the scores of the tile, key-major (kn, kBlockQ), from a small register-blocked GEMM;
//   2. s = S^T * scale, then + float mask / -inf where a bool mask is 0, + alibi, -inf for padding keys and
//      keys outside the window [i + diagonal - window_left, i + diagonal + window_right];
//   3. m_new = max(m, max_j s_j), alpha = exp(m - m_new), p_j = exp(s_j - m_new), l = alpha l + sum_j p_j;
//   4. with dropout, p_j *= z_j (1 / (1 - p) where csrc/philox.h keeps the element, else 0); l is unaffected;
//   5. o = alpha o + P V (the same GEMM; alpha is applied as o is loaded into registers).
// At the end out_i = o_i / l_i and lse_i = m_i + log(l_i); a query that saw no key (l_i = 0) gets out 0 and
// lse -inf. Key tiles that the window (causal: window_right = 0) hides from every query of the block are never
// visited, and the window is only applied element-wise on tiles it cuts.
//
// Layout. Scores are kept key-major (S^T) so that every per-query step (2 and 3: maxima, exp, sums) runs
// across queries, one query per SIMD lane, with no horizontal reduction. The queries are transposed once per
// task (Q^T, (head_dim, kBlockQ)), the GEMM's B panel for every key tile, while K is read in place as
// broadcast scalars (float input) or after a per-tile conversion (half, bfloat16). For P V the probabilities
// are again broadcast scalars and V (in place when float rows are whole vectors, else a zero-padded converted
// copy) is the B panel. A block of very few queries (decoding: seq_q 1) scores each key by dot products
// instead, which do not compute padding lanes. Masks are contiguous over keys, so a mask that varies over
// queries is staged query-major and added through in-register transposes (apply_mask). Memory per thread is
// O(kBlockQ * (head_dim + head_dim_v) + kBlockK * (kBlockQ + head_dim + head_dim_v)): no seq_q x seq_k buffer.
//
// Speed. The GEMM micro-kernel keeps a kMicroRows x (kMicroVectors * lanes) accumulator block in registers
// (16 512-bit registers for float on AVX-512); g++ -O3 keeps plain loops over fixed-size local arrays in
// registers and contracts a * b + c to FMA (on the project's 2-core AMD EPYC the micro-kernel alone runs at
// about 90 GFLOP/s per core in float, the whole forward at about 90% of that). exp is the branch-free
// polynomial of the softmax kernel (exp_of), so the softmax loops vectorise too. With AVX2 but no AVX-512 the float
// GEMM runs gemm_avx2 instead, whose 3 x 32 block fits the 16 AVX2 registers. The next key tile's rows are
// prefetched. The entry points are compiled for AVX-512, AVX2 + FMA and baseline x86-64 (target_clones); the
// loader picks the best one this CPU supports. Each task's result depends only on its inputs, so outputs are
// bitwise the same for any number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#include "../attention.h"
#include "vec_math.h"

namespace fastattn {
namespace attention_cpu {

using cpu::compute_t;
using cpu::convert_row;
using cpu::exp_of;

// Lanes of one 512-bit vector: the unit of the GEMM's column blocks and of the padded widths.
template <class C> constexpr int64_t kLanes = 64 / sizeof(C);

// Block sizes. A task's queries: 64 floats (32 doubles), i.e. 4 vectors, the micro-kernel's width in step 1.
// A key tile: 64 keys. With head_dim 64 in float each of Q^T, a K tile, S^T, a V tile and o is 16 KiB: the
// working set of a task stays in L2 and each GEMM's B panel (Q^T or V) in L1.
template <class C> constexpr int64_t kBlockQ = 4 * kLanes<C>;
constexpr int64_t kBlockK = 64;
// The GEMM micro-kernel: kMicroRows rows x kMicroVectors vectors of accumulators.
constexpr int kMicroRows = 4;
constexpr int kMicroVectors = 4;
// Terms of a GEMM's dot products summed in order before they are added to the result (see micro_kernel).
constexpr int64_t kDepthBlock = 32;

inline int64_t block_q(Dtype dtype) { return dtype == Dtype::kDouble ? kBlockQ<double> : kBlockQ<float>; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Prefetches `rows` rows of `bytes` bytes, `stride` bytes apart, into the caches.
FASTATTN_INLINE void prefetch_rows(const void* base, int64_t rows, int64_t stride, int64_t bytes) {
#if defined(__GNUC__)
  const char* p = static_cast<const char*>(base);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + r * stride + offset);
  }
#else
  (void)base, (void)rows, (void)stride, (void)bytes;
#endif
}

// A 64-byte aligned scratch array of C, zero-filled.
template <class C>
class Scratch {
 public:
  explicit Scratch(int64_t n) : size_(std::max<int64_t>(n, kLanes<C>)) {
    data_ = static_cast<C*>(::operator new[](size_ * sizeof(C), std::align_val_t(64)));
    std::fill(data_, data_ + size_, C(0));
  }
  ~Scratch() { ::operator delete[](data_, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  C* get() const { return data_; }

 private:
  int64_t size_;
  C* data_;
};

// The GEMM micro-kernel, for rows i < MR and columns j < NV * lanes:
//   c[i * ldc + j] = sum_k a[i * a_row + k * a_col] * b[k * ldb + j]                       (kScale false)
//   c[i * ldc + j] = c_scale[i] * c[i * ldc + j] + sum_k (the same)                       (kScale true)
// a's elements are broadcast, b's rows are loaded as vectors, and the MR x NV vectors of sums stay in
// registers. The sum over k < depth is blocked: runs of kDepthBlock terms are summed in order from zero and
// then added to c, which keeps the rounding error of long dot products near torch's (whose GEMMs block too).
template <class C, int MR, int NV, bool kScale>
FASTATTN_INLINE void micro_kernel(int64_t depth, const C* __restrict a, int64_t a_row, int64_t a_col,
                                  const C* __restrict b, int64_t ldb, C* __restrict c, int64_t ldc,
                                  const C* __restrict c_scale) {
  constexpr int kN = NV * static_cast<int>(kLanes<C>);
  if (depth <= 0) {
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < kN; ++j) c[i * ldc + j] = kScale ? c[i * ldc + j] * c_scale[i] : C(0);
    }
    return;
  }
  C acc[MR][kN];
  for (int64_t k0 = 0;; k0 += kDepthBlock) {
    const int64_t k1 = std::min(depth, k0 + kDepthBlock);
    // The first term initialises the sums (zeroing them first made g++ keep a copy of acc on the stack).
    const C* __restrict b0 = b + k0 * ldb;
    for (int i = 0; i < MR; ++i) {
      const C ai = a[i * a_row + k0 * a_col];
      for (int j = 0; j < kN; ++j) acc[i][j] = ai * b0[j];
    }
    for (int64_t k = k0 + 1; k < k1; ++k) {
      const C* __restrict bk = b + k * ldb;
      for (int i = 0; i < MR; ++i) {
        const C ai = a[i * a_row + k * a_col];
        for (int j = 0; j < kN; ++j) acc[i][j] += ai * bk[j];
      }
    }
    for (int i = 0; i < MR; ++i) {
      C* __restrict ci = c + i * ldc;
      if (k0 > 0) {
        for (int j = 0; j < kN; ++j) ci[j] += acc[i][j];
      } else if constexpr (kScale) {
        const C scale = c_scale[i];
        for (int j = 0; j < kN; ++j) ci[j] = ci[j] * scale + acc[i][j];
      } else {
        for (int j = 0; j < kN; ++j) ci[j] = acc[i][j];
      }
    }
    if (k1 >= depth) break;
  }
}

// The micro-kernel over `rows` rows of a and c: blocks of kMicroRows, then the rows left one at a time, or,
// without kScale, one more block that overlaps the one before it (its common rows come out the same twice).
template <class C, int NV, bool kScale>
FASTATTN_INLINE void gemm_rows(int64_t rows, int64_t depth, const C* a, int64_t a_row, int64_t a_col, const C* b,
                               int64_t ldb, C* c, int64_t ldc, const C* c_scale) {
  const auto block = [&](auto micro_rows, int64_t i) FASTATTN_INLINE_LAMBDA {
    micro_kernel<C, decltype(micro_rows)::value, NV, kScale>(depth, a + i * a_row, a_row, a_col, b, ldb,
                                                             c + i * ldc, ldc, kScale ? c_scale + i : nullptr);
  };
  int64_t i = 0;
  for (; i + kMicroRows <= rows; i += kMicroRows) block(std::integral_constant<int, kMicroRows>{}, i);
  if (i == rows) return;
  if (!kScale && rows >= kMicroRows) return block(std::integral_constant<int, kMicroRows>{}, rows - kMicroRows);
  for (; i < rows; ++i) block(std::integral_constant<int, 1>{}, i);
}

#if defined(__GNUC__) && defined(__x86_64__)
inline bool cpu_has_avx512f() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
  }();
  return has;
}

inline bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
  }();
  return has;
}

// The float GEMM for CPUs with AVX2 but not AVX-512, as gemm below (csrc/cpu/attention_gemm_avx2.cpp, compiled
// once, for AVX2 + FMA only: the target clones of the kernels call it instead of compiling it three times).
template <bool kScale>
void gemm_avx2(int64_t rows, int64_t vectors, int64_t depth, const float* a, int64_t a_row, int64_t a_col,
               const float* b, int64_t ldb, float* c, int64_t ldc, const float* c_scale);
#endif

// c (rows, vectors * lanes) = [c_scale * c +] a (rows, depth) b (depth, vectors * lanes): a's element (i, k) at
// a[i * a_row + k * a_col], b row-major with leading dimension ldb, c with ldc; b and c are padded to whole
// vectors by the caller.
template <class C, bool kScale>
FASTATTN_INLINE void gemm(int64_t rows, int64_t vectors, int64_t depth, const C* a, int64_t a_row, int64_t a_col,
                          const C* b, int64_t ldb, C* c, int64_t ldc, const C* c_scale) {
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (std::is_same_v<C, float>) {
    if (!cpu_has_avx512f() && cpu_has_avx2()) {
      return gemm_avx2<kScale>(rows, vectors, depth, a, a_row, a_col, b, ldb, c, ldc, c_scale);
    }
  }
#endif
  static_assert(kMicroVectors == 4, "the cases below assume 4 vectors");
  for (int64_t n = 0; n < vectors; n += kMicroVectors) {
    const C* bn = b + n * kLanes<C>;
    C* cn = c + n * kLanes<C>;
    switch (std::min<int64_t>(vectors - n, kMicroVectors)) {
      case 4: gemm_rows<C, 4, kScale>(rows, depth, a, a_row, a_col, bn, ldb, cn, ldc, c_scale); break;
      case 3: gemm_rows<C, 3, kScale>(rows, depth, a, a_row, a_col, bn, ldb, cn, ldc, c_scale); break;
      case 2: gemm_rows<C, 2, kScale>(rows, depth, a, a_row, a_col, bn, ldb, cn, ldc, c_scale); break;
      default: gemm_rows<C, 1, kScale>(rows, depth, a, a_row, a_col, bn, ldb, cn, ldc, c_scale); break;
    }
  }
}

// x . y over n terms: lanes-wide partial sums, then added pairwise.
template <class C>
FASTATTN_INLINE C dot(const C* __restrict x, const C* __restrict y, int64_t n) {
  constexpr int64_t kL = kLanes<C>;
  C acc[kL];
  for (int64_t l = 0; l < kL; ++l) acc[l] = C(0);
  int64_t d = 0;
  for (; d + kL <= n; d += kL) {
    for (int64_t l = 0; l < kL; ++l) acc[l] += x[d + l] * y[d + l];
  }
  for (int64_t l = 0; d + l < n; ++l) acc[l] += x[d + l] * y[d + l];
  for (int64_t width = kL / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

// Step 2 for a mask. Scores are key-major but masks are usually contiguous over keys, so a mask that varies
// over queries is first staged query-major as a bias tile b (kBlockQ, kBlockK) in C, converted row by row
// (vectorised), and then applied transposed: s[j][i] = op(s[j][i], b[i][j]) with op
//   kKeep (bool masks, b = 0 or -inf):  b < 0 ? -inf : s   (a masked NaN score is -inf, as in the reference)
//   add   (float masks):                 s + b
// The transposed application uses 16 x 16 (AVX-512) or 8 x 8 (AVX2) in-register transposes for float, else
// scalar code. A mask broadcast over queries (stride 0) is applied one key row at a time across all lanes.
template <bool kKeep, class C>
FASTATTN_INLINE C mask_op(C z, C bias) {
  if constexpr (kKeep) {
    return bias < C(0) ? bias : z;
  } else {
    return z + bias;
  }
}

template <bool kKeep, class C, class M>
FASTATTN_INLINE C bias_of(M value) {
  if constexpr (kKeep) {
    return value ? C(0) : -std::numeric_limits<C>::infinity();
  } else {
    return static_cast<C>(value);
  }
}

template <bool kKeep, class C>
FASTATTN_INLINE void apply_transposed_scalar(C* __restrict s, const C* __restrict bias, int64_t kn, int64_t nq) {
  constexpr int64_t kGroup = 8;  // queries per pass: both tiles stay within a few cache lines per key
  for (int64_t i0 = 0; i0 < nq; i0 += kGroup) {
    const int64_t i1 = std::min(nq, i0 + kGroup);
    for (int64_t j = 0; j < kn; ++j) {
      for (int64_t i = i0; i < i1; ++i) {
        s[j * kBlockQ<C> + i] = mask_op<kKeep>(s[j * kBlockQ<C> + i], bias[i * kBlockK + j]);
      }
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)

// s (kn, kBlockQ<float>) = op(s, bias^T), bias (nq, kBlockK) query-major; nq a multiple of 16.
template <bool kKeep>
__attribute__((target("avx512f"))) void apply_transposed_avx512(float* s, const float* bias, int64_t kn,
                                                                int64_t nq) {
  constexpr int64_t kLd = kBlockQ<float>;
  const __m512 zero = _mm512_setzero_ps();
  int64_t j0 = 0;
  for (; j0 + 16 <= kn; j0 += 16) {
    for (int64_t i0 = 0; i0 < nq; i0 += 16) {
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(bias + (i0 + i) * kBlockK + j0);
      // 16 x 16 transpose: interleave pairs of rows, then pairs of pairs, then 128-bit lanes twice.
      for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
      }
      for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
      }
      for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
      }
      for (int j = 0; j < 16; ++j) {
        float* dst = s + (j0 + j) * kLd + i0;
        const __m512 z = _mm512_loadu_ps(dst);
        if constexpr (kKeep) {
          _mm512_storeu_ps(dst, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(r[j], zero, _CMP_LT_OQ), z, r[j]));
        } else {
          _mm512_storeu_ps(dst, _mm512_add_ps(z, r[j]));
        }
      }
    }
  }
  apply_transposed_scalar<kKeep>(s + j0 * kLd, bias + j0, kn - j0, nq);
}

// The same with 8 x 8 transposes; nq a multiple of 8.
template <bool kKeep>
__attribute__((target("avx,avx2"))) void apply_transposed_avx2(float* s, const float* bias, int64_t kn, int64_t nq) {
  constexpr int64_t kLd = kBlockQ<float>;
  const __m256 zero = _mm256_setzero_ps();
  int64_t j0 = 0;
  for (; j0 + 8 <= kn; j0 += 8) {
    for (int64_t i0 = 0; i0 < nq; i0 += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(bias + (i0 + i) * kBlockK + j0);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
      }
      for (int i = 0; i < 4; ++i) {
        t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
      }
      for (int j = 0; j < 8; ++j) {
        float* dst = s + (j0 + j) * kLd + i0;
        const __m256 z = _mm256_loadu_ps(dst);
        if constexpr (kKeep) {
          _mm256_storeu_ps(dst, _mm256_blendv_ps(z, t[j], _mm256_cmp_ps(t[j], zero, _CMP_LT_OQ)));
        } else {
          _mm256_storeu_ps(dst, _mm256_add_ps(z, t[j]));
        }
      }
    }
  }
  apply_transposed_scalar<kKeep>(s + j0 * kLd, bias + j0, kn - j0, nq);
}
#endif

template <bool kKeep, class C>
FASTATTN_INLINE void apply_transposed(C* s, const C* bias, int64_t kn, int64_t nq) {
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (std::is_same_v<C, float>) {
    if (cpu_has_avx512f()) return apply_transposed_avx512<kKeep>(s, bias, kn, nq);
    if (cpu_has_avx2()) return apply_transposed_avx2<kKeep>(s, bias, kn, nq);
  }
#endif
  apply_transposed_scalar<kKeep>(s, bias, kn, nq);
}

// Applies a mask stored as M (uint8_t for kKeep) to the key-major score tile s (kn, kBlockQ): mask points at
// element (b, h, q0, k0), q_stride and k_stride are its strides over queries and keys; bias is scratch
// (kBlockQ, kBlockK).
template <bool kKeep, class C, class M>
FASTATTN_INLINE void apply_mask(C* __restrict s, const M* __restrict mask, int64_t q_stride, int64_t k_stride,
                                int64_t qn, int64_t nq_pad, int64_t kn, C* __restrict bias) {
  constexpr int64_t kLd = kBlockQ<C>;
  if (q_stride == 0) {
    for (int64_t j = 0; j < kn; ++j) {
      const C b = bias_of<kKeep, C>(mask[j * k_stride]);
      C* __restrict row = s + j * kLd;
      for (int64_t i = 0; i < nq_pad; ++i) row[i] = mask_op<kKeep>(row[i], b);
    }
    return;
  }
  for (int64_t i = 0; i < qn; ++i) {
    const M* __restrict src = mask + i * q_stride;
    C* __restrict dst = bias + i * kBlockK;
    if (k_stride == 1) {
      if constexpr (kKeep || std::is_same_v<M, C>) {
        for (int64_t j = 0; j < kn; ++j) dst[j] = bias_of<kKeep, C>(src[j]);
      } else {
        convert_row(src, dst, kn);
      }
    } else {
      for (int64_t j = 0; j < kn; ++j) dst[j] = bias_of<kKeep, C>(src[j * k_stride]);
    }
  }
  for (int64_t i = qn; i < nq_pad; ++i) std::fill(bias + i * kBlockK, bias + i * kBlockK + kn, C(0));
  apply_transposed<kKeep>(s, bias, kn, nq_pad);
}

// Step 3 of a task: online softmax over the key-major score tile s (kn, kBlockQ), one query per lane, for
// nq queries with running maxima m and sums l. Writes P^T over s and alpha = exp(m_old - m_new), the factor
// that rescales l and the output. A query with no finite score yet keeps m = -inf and shifts by 0, so its
// p = exp(-inf) = 0; a NaN score propagates to l and the output. shift, tile_max and tile_sum are scratch.
template <class C>
FASTATTN_INLINE void online_softmax(C* __restrict s, int64_t kn, int64_t nq, C* __restrict m, C* __restrict l,
                                    C* __restrict alpha, C* __restrict shift, C* __restrict tile_max,
                                    C* __restrict tile_sum) {
  constexpr C kInf = std::numeric_limits<C>::infinity();
  std::fill(tile_max, tile_max + nq, -kInf);
  for (int64_t j = 0; j < kn; ++j) {
    const C* __restrict srow = s + j * kBlockQ<C>;
    for (int64_t i = 0; i < nq; ++i) tile_max[i] = srow[i] > tile_max[i] ? srow[i] : tile_max[i];
  }
  for (int64_t i = 0; i < nq; ++i) {
    const C m_new = tile_max[i] > m[i] ? tile_max[i] : m[i];
    shift[i] = m_new == -kInf ? C(0) : m_new;
    alpha[i] = exp_of(m[i] - shift[i]);
    m[i] = m_new;
    tile_sum[i] = C(0);
  }
  for (int64_t j = 0; j < kn; ++j) {
    C* __restrict srow = s + j * kBlockQ<C>;
    for (int64_t i = 0; i < nq; ++i) {
      const C p = exp_of(srow[i] - shift[i]);
      srow[i] = p;
      tile_sum[i] += p;
    }
  }
  for (int64_t i = 0; i < nq; ++i) l[i] = l[i] * alpha[i] + tile_sum[i];
}

template <class T>
class BackwardKernel;

// The forward for storage type T: the per-thread scratch, and one method per step of a task.
template <class T>
class ForwardKernel {
  using C = compute_t<T>;
  static constexpr int64_t kW = kLanes<C>, kBQ = kBlockQ<C>, kBK = kBlockK;
  static constexpr C kInf = std::numeric_limits<C>::infinity();
  static constexpr bool kConvert = !std::is_same_v<T, C>;  // half, bfloat16: tiles are converted to float

 public:
  FASTATTN_INLINE explicit ForwardKernel(const AttentionForwardArgs& args)
      : a_(args),
        head_dim_(args.head_dim),
        head_dim_v_(args.head_dim_v),
        dv_pad_(ceil_div(args.head_dim_v, kW) * kW),
        stage_v_(kConvert || args.head_dim_v % kW != 0),
        q_blocks_(ceil_div(args.seq_q, kBQ)),
        mask_bytes_(args.mask_kind == MaskKind::kBool    ? 1
                    : args.mask_kind == MaskKind::kSame  ? int64_t(sizeof(T))
                    : args.mask_kind == MaskKind::kFloat ? 4
                                                         : 0),
        q_t_(head_dim_ * kBQ),
        q_rows_(kConvert ? kBQ * head_dim_ : 0),
        k_tile_(kConvert ? kBK * head_dim_ : 0),
        v_tile_(stage_v_ ? kBK * dv_pad_ : 0),
        s_(kBK * kBQ),
        bias_(args.mask_kind != MaskKind::kNone ? kBQ * kBK : 0),
        z_(args.dropout.on ? kBK * kBQ : 0),
        o_(kBQ * dv_pad_),
        row_(std::max(head_dim_, head_dim_v_)) {
    for (int64_t i = 0; i < kBQ; ++i) iota_[i] = static_cast<C>(i);
  }

  // Makes the current block batch b, query head h, queries [q0, q0 + kBQ) (cut at seq_q), and loads them.
  FASTATTN_INLINE void set_block(int64_t b, int64_t h, int64_t q0) {
    b_ = b;
    h_ = h;
    const int64_t hk = h_ / (a_.heads_q / a_.heads_kv);
    q0_ = q0;
    qn_ = std::min(kBQ, a_.seq_q - q0_);
    nq_vectors_ = ceil_div(qn_, kW);
    nq_pad_ = nq_vectors_ * kW;
    k_head_ = static_cast<const T*>(a_.k) + b_ * a_.k_stride[0] + hk * a_.k_stride[1];
    v_head_ = static_cast<const T*>(a_.v) + b_ * a_.v_stride[0] + hk * a_.v_stride[1];
    load_queries();
  }

  // Task t: batch b, query head h, query block qb.
  FASTATTN_INLINE void run(int64_t task) {
    // Query blocks alternate from both ends (0, n-1, 1, n-2, ...), so that under a causal mask any run of
    // consecutive tasks, such as one thread's share, mixes cheap and expensive blocks.
    const int64_t bh = task / q_blocks_, r = task % q_blocks_;
    const int64_t qb = r % 2 == 0 ? r / 2 : q_blocks_ - 1 - r / 2;
    set_block(bh / a_.heads_q, bh % a_.heads_q, qb * kBQ);
    std::fill(m_, m_ + kBQ, -kInf);
    std::fill(l_, l_ + kBQ, C(0));
    std::fill(o_.get(), o_.get() + qn_ * dv_pad_, C(0));

    // Keys some query of the block may see: [i + diagonal - window_left, i + diagonal + window_right].
    const int64_t diag = a_.diagonal, wl = a_.window_left, wr = a_.window_right;
    const int64_t k_begin = wl >= 0 ? std::max<int64_t>(0, q0_ + diag - wl) : 0;
    const int64_t k_end = wr >= 0 ? std::min<int64_t>(a_.seq_k, q0_ + qn_ - 1 + diag + wr + 1) : a_.seq_k;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
      const int64_t kn = std::min(kBK, k_end - k0);
      if (k0 + kBK < k_end) prefetch_tile(k0 + kBK, std::min(kBK, k_end - k0 - kBK));
      score_tile(k0, kn);
      mask_tile(k0, kn);
      softmax_tile(kn);
      if (a_.dropout.on) {
        dropout_tile(k0, kn);
        apply_dropout(s_.get(), kn);
      }
      accumulate_tile(k0, kn);
    }
    store_outputs();
  }

 private:
  // The block's queries, as Q^T (head_dim, kBQ) with zero columns past qn for the GEMM, or as rows for
  // scoring by dot products. Few queries are scored by dots (the GEMM would compute mostly padding lanes).
  // Vector operations per key: a dot takes ceil(head_dim / lanes) FMAs and about 6 more to add its lanes;
  // the GEMM nq_vectors * head_dim FMAs.
  FASTATTN_INLINE void load_queries() {
    const T* q_block = static_cast<const T*>(a_.q) + b_ * a_.q_stride[0] + h_ * a_.q_stride[1] +
                       q0_ * a_.q_stride[2];
    by_dots_ = qn_ * (ceil_div(head_dim_, kW) + 6) < nq_vectors_ * head_dim_;
    if (by_dots_) {
      if constexpr (kConvert) {
        for (int64_t i = 0; i < qn_; ++i) {
          convert_row(q_block + i * a_.q_stride[2], q_rows_.get() + i * head_dim_, head_dim_);
        }
        q_dot_rows_ = q_rows_.get();
        q_dot_stride_ = head_dim_;
      } else {
        q_dot_rows_ = q_block;
        q_dot_stride_ = a_.q_stride[2];
      }
      return;
    }
    C* q_t = q_t_.get();
    for (int64_t i = 0; i < qn_; ++i) {
      const T* src = q_block + i * a_.q_stride[2];
      const C* q_row;
      if constexpr (kConvert) {
        convert_row(src, row_.get(), head_dim_);
        q_row = row_.get();
      } else {
        q_row = src;
      }
      for (int64_t d = 0; d < head_dim_; ++d) q_t[d * kBQ + i] = q_row[d];
    }
    for (int64_t d = 0; d < head_dim_; ++d) std::fill(q_t + d * kBQ + qn_, q_t + d * kBQ + nq_pad_, C(0));
  }

  // Prefetches the K and V rows and the mask rows of the key tile [k0, k0 + kn): strided rows (a (B, S, H, D)
  // layout, a full mask) are short runs far apart, which the hardware prefetchers miss.
  FASTATTN_INLINE void prefetch_tile(int64_t k0, int64_t kn) {
    constexpr int64_t kBytes = sizeof(T);
    prefetch_rows(k_head_ + k0 * a_.k_stride[2], kn, a_.k_stride[2] * kBytes, head_dim_ * kBytes);
    prefetch_rows(v_head_ + k0 * a_.v_stride[2], kn, a_.v_stride[2] * kBytes, head_dim_v_ * kBytes);
    if (mask_bytes_ > 0 && a_.mask_stride[2] != 0 && a_.mask_stride[3] == 1) {
      const int64_t offset = b_ * a_.mask_stride[0] + h_ * a_.mask_stride[1] + q0_ * a_.mask_stride[2] + k0;
      prefetch_rows(static_cast<const char*>(a_.mask) + offset * mask_bytes_, qn_, a_.mask_stride[2] * mask_bytes_,
                    kn * mask_bytes_);
    }
  }

  // Step 1: S^T (kn, nq_pad) = K (kn, head_dim) Q^T (head_dim, nq_pad), K read in place when it is C. Scored by
  // dots, the lanes past qn are set to 0 (the GEMM gets 0 there from Q^T's zero columns).
  FASTATTN_INLINE void score_tile(int64_t k0, int64_t kn) {
    C* st = s_.get();
    const C* k_rows;
    int64_t k_row_stride;
    if constexpr (kConvert) {
      for (int64_t j = 0; j < kn; ++j) {
        convert_row(k_head_ + (k0 + j) * a_.k_stride[2], k_tile_.get() + j * head_dim_, head_dim_);
      }
      k_rows = k_tile_.get();
      k_row_stride = head_dim_;
    } else {
      k_rows = k_head_ + k0 * a_.k_stride[2];
      k_row_stride = a_.k_stride[2];
    }
    if (!by_dots_) {
      gemm<C, false>(kn, nq_vectors_, head_dim_, k_rows, k_row_stride, 1, q_t_.get(), kBQ, st, kBQ, nullptr);
      return;
    }
    for (int64_t j = 0; j < kn; ++j) {
      C* srow = st + j * kBQ;
      for (int64_t i = 0; i < qn_; ++i) {
        srow[i] = dot(k_rows + j * k_row_stride, q_dot_rows_ + i * q_dot_stride_, head_dim_);
      }
      std::fill(srow + qn_, srow + nq_pad_, C(0));
    }
  }

  // Step 2: scale, mask, alibi, key padding and window.
  FASTATTN_INLINE void mask_tile(int64_t k0, int64_t kn) {
    C* st = s_.get();
    const C scale = static_cast<C>(a_.scale);
    for (int64_t j = 0; j < kn; ++j) {
      C* __restrict srow = st + j * kBQ;
      for (int64_t i = 0; i < nq_pad_; ++i) srow[i] *= scale;
    }
    if (a_.mask_kind != MaskKind::kNone) {
      const int64_t offset = b_ * a_.mask_stride[0] + h_ * a_.mask_stride[1] + q0_ * a_.mask_stride[2] +
                             k0 * a_.mask_stride[3];
      const int64_t q_stride = a_.mask_stride[2], k_stride = a_.mask_stride[3];
      C* bias = bias_.get();
      switch (a_.mask_kind) {
        case MaskKind::kBool:
          apply_mask<true>(st, static_cast<const uint8_t*>(a_.mask) + offset, q_stride, k_stride, qn_, nq_pad_, kn,
                           bias);
          break;
        case MaskKind::kSame:
          apply_mask<false>(st, static_cast<const T*>(a_.mask) + offset, q_stride, k_stride, qn_, nq_pad_, kn, bias);
          break;
        case MaskKind::kFloat:
          apply_mask<false>(st, static_cast<const float*>(a_.mask) + offset, q_stride, k_stride, qn_, nq_pad_, kn,
                            bias);
          break;
        case MaskKind::kNone: break;
      }
    }
    const int64_t diag = a_.diagonal, wl = a_.window_left, wr = a_.window_right;
    if (a_.alibi) {
      // alibi_ij = -slope |(k0 + j) - (q0 + i) - diag|, the distance exact in C as in the reference.
      const C neg_slope = -static_cast<C>(a_.alibi[b_ * a_.alibi_stride[0] + h_ * a_.alibi_stride[1]]);
      for (int64_t j = 0; j < kn; ++j) {
        const C base = static_cast<C>(k0 + j - q0_ - diag);
        C* __restrict srow = st + j * kBQ;
        for (int64_t i = 0; i < nq_pad_; ++i) srow[i] += neg_slope * std::abs(base - iota_[i]);
      }
    }
    if (a_.key_padding) {
      const uint8_t* padding = a_.key_padding + b_ * a_.key_padding_stride[0];
      for (int64_t j = 0; j < kn; ++j) {
        if (padding[(k0 + j) * a_.key_padding_stride[1]]) std::fill(st + j * kBQ, st + j * kBQ + nq_pad_, -kInf);
      }
    }
    const bool inside_window =
        (wl < 0 || k0 >= q0_ + qn_ - 1 + diag - wl) && (wr < 0 || k0 + kn - 1 <= q0_ + diag + wr);
    if (!inside_window) {
      // Key k0 + j is seen by queries q0 + i with k0 + j - diag - wr <= q0 + i <= k0 + j - diag + wl.
      for (int64_t j = 0; j < kn; ++j) {
        const int64_t key = k0 + j - diag - q0_;
        const int64_t lo = wr >= 0 ? std::clamp<int64_t>(key - wr, 0, nq_pad_) : 0;
        const int64_t hi = wl >= 0 ? std::clamp<int64_t>(key + wl + 1, lo, nq_pad_) : nq_pad_;
        C* srow = st + j * kBQ;
        std::fill(srow, srow + lo, -kInf);
        std::fill(srow + hi, srow + nq_pad_, -kInf);
      }
    }
  }

  // Step 3 (online_softmax below).
  FASTATTN_INLINE void softmax_tile(int64_t kn) {
    online_softmax(s_.get(), kn, nq_pad_, m_, l_, alpha_, shift_, tile_max_, tile_sum_);
  }

  // Dropout factors of the key tile [k0, k0 + kn) in z_ (kn, kBQ), key-major: scale where element
  // (b, h, q0 + i, k0 + j) is kept (csrc/philox.h), else 0. One Philox call gives the words of 4 keys; the loop over
  // query lanes vectorises (the 32 x 32 -> 64-bit products are vector multiplies).
  FASTATTN_INLINE void dropout_tile(int64_t k0, int64_t kn) {
    const AttentionDropout& d = a_.dropout;
    const uint32_t bh = static_cast<uint32_t>(b_ * a_.heads_q + h_);
    const C scale = static_cast<C>(d.scale);
    alignas(64) uint32_t words[4][kBQ];
    for (int64_t g = k0 / 4; g * 4 < k0 + kn; ++g) {
      for (int64_t i = 0; i < nq_pad_; ++i) {
        const Philox4 r = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(q0_ + i), bh, 0, d.key0,
                                        d.key1);
        for (int w = 0; w < 4; ++w) words[w][i] = r.x[w];
      }
      for (int64_t w = 0; w < 4; ++w) {
        const int64_t j = g * 4 + w - k0;
        if (j < 0 || j >= kn) continue;
        C* __restrict z = z_.get() + j * kBQ;
        for (int64_t i = 0; i < nq_pad_; ++i) z[i] = words[w][i] >= d.threshold ? scale : C(0);
      }
    }
  }

  // tile (kn, kBQ) *= z_, dropped entries exactly 0 (also where the tile holds inf or NaN, as in the reference).
  FASTATTN_INLINE void apply_dropout(C* __restrict tile, int64_t kn) const {
    for (int64_t j = 0; j < kn; ++j) {
      C* __restrict row = tile + j * kBQ;
      const C* __restrict z = z_.get() + j * kBQ;
      for (int64_t i = 0; i < nq_pad_; ++i) row[i] = z[i] == C(0) ? C(0) : row[i] * z[i];
    }
  }

  // Step 5: o (qn, dv_pad) = alpha o + P (qn, kn) V (kn, dv_pad), P read from P^T; V in place when it is C and
  // its rows are whole vectors, else converted or copied to v_tile (zero-padded columns).
  FASTATTN_INLINE void accumulate_tile(int64_t k0, int64_t kn) {
    const C* v_rows;
    int64_t v_row_stride;
    if (stage_v_) {
      for (int64_t j = 0; j < kn; ++j) {
        convert_row(v_head_ + (k0 + j) * a_.v_stride[2], v_tile_.get() + j * dv_pad_, head_dim_v_);
      }
      v_rows = v_tile_.get();
      v_row_stride = dv_pad_;
    } else {
      v_rows = reinterpret_cast<const C*>(v_head_ + k0 * a_.v_stride[2]);
      v_row_stride = a_.v_stride[2];
    }
    gemm<C, true>(qn_, dv_pad_ / kW, kn, s_.get(), 1, kBQ, v_rows, v_row_stride, o_.get(), dv_pad_, alpha_);
  }

  // out = o / l, lse = m + log(l); a query that saw no key (l = 0): out 0, lse -inf.
  FASTATTN_INLINE void store_outputs() {
    T* out = static_cast<T*>(a_.out);
    C* lse = static_cast<C*>(a_.lse);  // float32 for half/bfloat16/float, float64 for double: C
    for (int64_t i = 0; i < qn_; ++i) {
      const int64_t index = (b_ * a_.heads_q + h_) * a_.seq_q + q0_ + i;
      const bool empty = l_[i] == C(0);
      const C inv = empty ? C(0) : C(1) / l_[i];
      const C* __restrict o_row = o_.get() + i * dv_pad_;
      T* out_row = out + index * head_dim_v_;
      if constexpr (kConvert) {
        for (int64_t d = 0; d < head_dim_v_; ++d) row_.get()[d] = o_row[d] * inv;
        convert_row(row_.get(), out_row, head_dim_v_);
      } else {
        for (int64_t d = 0; d < head_dim_v_; ++d) out_row[d] = o_row[d] * inv;
      }
      lse[index] = empty ? -kInf : m_[i] + std::log(l_[i]);
    }
  }

  template <class> friend class BackwardKernel;  // reuses set_block, score_tile, mask_tile, dropout_tile, s_ and z_

  const AttentionForwardArgs& a_;
  const int64_t head_dim_, head_dim_v_;
  const int64_t dv_pad_;       // head_dim_v rounded up to whole vectors
  const bool stage_v_;         // V tiles are converted or copied (else read in place)
  const int64_t q_blocks_;     // query blocks per (batch, head)
  const int64_t mask_bytes_;   // bytes per mask element (0: no mask)

  Scratch<C> q_t_;             // Q^T (head_dim, kBQ), zero beyond the block's queries
  Scratch<C> q_rows_;          // Q (qn, head_dim) converted, for blocks scored by dots
  Scratch<C> k_tile_;          // (kBK, head_dim), a converted K tile
  Scratch<C> v_tile_;          // (kBK, dv_pad), a converted or copied V tile
  Scratch<C> s_;               // S^T, then P^T (kn, kBQ)
  Scratch<C> bias_;            // (kBQ, kBK), a mask tile staged query-major
  Scratch<C> z_;               // (kBK, kBQ), dropout factors of a tile (key-major)
  Scratch<C> o_;               // (kBQ, dv_pad), the output accumulator
  Scratch<C> row_;             // one converted row
  alignas(64) C m_[kBQ];       // running maximum per query
  alignas(64) C l_[kBQ];       // running sum of exp(s - m) per query
  alignas(64) C alpha_[kBQ];   // exp(m_old - m_new): the rescaling of o
  alignas(64) C shift_[kBQ], tile_max_[kBQ], tile_sum_[kBQ];  // scratch of online_softmax
  alignas(64) C iota_[kBQ];    // 0, 1, 2, ...

  // The current task.
  int64_t b_ = 0, h_ = 0, q0_ = 0, qn_ = 0, nq_vectors_ = 0, nq_pad_ = 0;
  const T* k_head_ = nullptr;  // K and V of the task's kv head
  const T* v_head_ = nullptr;
  bool by_dots_ = false;
  const C* q_dot_rows_ = nullptr;  // with by_dots: Q (qn, head_dim), rows q_dot_stride apart
  int64_t q_dot_stride_ = 0;
};

}  // namespace attention_cpu
}  // namespace fastattn
