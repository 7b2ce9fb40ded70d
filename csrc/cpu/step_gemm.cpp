// The recurrent steps' small float32 GEMM (csrc/cpu/step_gemm.h): a register-blocked AVX-512 micro-kernel, kRows rows
// x 32 columns of C accumulated over K in 2 x kRows zmm registers, one packed weight panel at a time (it stays in L1
// or L2 while every row block of A passes over it); fewer than 4 rows take 2 or 4 panels at a time.
#include "step_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTATTN_STEP_GEMM 1
#define FASTATTN_AVX512F __attribute__((target("avx512f")))
#endif

namespace fastattn {
namespace cpu {

bool step_gemm_supported() {
#if defined(FASTATTN_STEP_GEMM)
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return supported;
#else
  return false;
#endif
}

bool step_gemm_available() {
  const char* setting = std::getenv("FASTATTN_CPU_STEP_GEMM");  // read each time, so that tests can switch it
  return step_gemm_supported() && (setting == nullptr || std::strcmp(setting, "0") != 0);
}

bool step_gemm_takes_large() {
  const char* setting = std::getenv("FASTATTN_CPU_STEP_GEMM");
  if (setting != nullptr && std::strcmp(setting, "1") == 0) return true;
#if defined(FASTATTN_STEP_GEMM)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return !intel;
#else
  return false;
#endif
}

// The packing of W's rows runs over K in blocks of this many values (about twice as fast as whole rows).
constexpr int64_t kPackKBlock = 64;

#if defined(FASTATTN_STEP_GEMM)
namespace {

// dst[c * kStepGemmPanel + i] = w[i * ld + c] for c < kn <= 16 and i < 16, rows i >= rows read as 0: 16 rows of W
// (unit stride within a row) into 16 columns of kn panel rows, transposed in registers.
FASTATTN_AVX512F void pack_transposed(const float* w, int64_t ld, int64_t rows, int64_t kn, float* dst) {
  const __mmask16 mask = __mmask16((1u << kn) - 1);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(mask, w + i * ld) : _mm512_setzero_ps();
  // Pairs of rows interleaved, then quads: t[4j + m]'s 128-bit lane L holds rows 4j..4j+3 of column 4L + m.
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512d lo_a = _mm512_castps_pd(t[4 * j]), lo_b = _mm512_castps_pd(t[4 * j + 2]);
    const __m512d hi_a = _mm512_castps_pd(t[4 * j + 1]), hi_b = _mm512_castps_pd(t[4 * j + 3]);
    r[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo_a, lo_b));
    r[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo_a, lo_b));
    r[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi_a, hi_b));
    r[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi_a, hi_b));
  }
  // Then the 4 x 4 lanes of r[m], r[4 + m], r[8 + m], r[12 + m] transposed: column 4L + m.
  for (int m = 0; m < 4; ++m) {
    const __m512 c0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x44), c1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xEE);
    const __m512 c2 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x44);
    const __m512 c3 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xEE);
    t[m] = _mm512_shuffle_f32x4(c0, c2, 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(c0, c2, 0xDD);
    t[8 + m] = _mm512_shuffle_f32x4(c1, c3, 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(c1, c3, 0xDD);
  }
  for (int c = 0; c < kn; ++c) _mm512_storeu_ps(dst + c * kStepGemmPanel, t[c]);
}

}  // namespace
#endif

void step_gemm_pack(const float* b, int64_t k, int64_t n, int64_t k_stride, int64_t n_stride, float* packed,
                    int64_t panel_begin, int64_t panel_end) {
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    float* panel = packed + p * k * kStepGemmPanel;
    const int64_t col0 = p * kStepGemmPanel, cols = std::min(kStepGemmPanel, n - col0);
    if (n_stride == 1) {  // rows of B: each panel row a copy
      for (int64_t kk = 0; kk < k; ++kk) {
        float* dst = panel + kk * kStepGemmPanel;
        std::copy(b + kk * k_stride + col0, b + kk * k_stride + col0 + cols, dst);
        std::fill(dst + cols, dst + kStepGemmPanel, 0.0f);
      }
      continue;
    }
#if defined(FASTATTN_STEP_GEMM)
    if (k_stride == 1 && step_gemm_supported()) {  // rows of W: 16 x 16 blocks transposed
      for (int64_t k0 = 0; k0 < k; k0 += 16) {
        for (int64_t j = 0; j < kStepGemmPanel; j += 16) {
          pack_transposed(b + (col0 + j) * n_stride + k0, n_stride, std::clamp<int64_t>(cols - j, 0, 16),
                          std::min<int64_t>(16, k - k0), panel + k0 * kStepGemmPanel + j);
        }
      }
      continue;
    }
#endif
    // columns of B (rows of W = B^T), kPackKBlock values of each at a time (both sides stay in L1)
    for (int64_t k0 = 0; k0 < k; k0 += kPackKBlock) {
      const int64_t k1 = std::min(k, k0 + kPackKBlock);
      for (int64_t j = 0; j < kStepGemmPanel; ++j) {
        const float* column = j < cols ? b + (col0 + j) * n_stride : nullptr;
        for (int64_t kk = k0; kk < k1; ++kk) panel[kk * kStepGemmPanel + j] = column ? column[kk * k_stride] : 0.0f;
      }
    }
  }
}

#if defined(FASTATTN_STEP_GEMM)
namespace {

constexpr int kMaxRows = 8;  // 16 accumulators, plus the two weight vectors and a broadcast
constexpr int kWideMaxRows = 3;  // blocks of fewer rows run several panels at once
constexpr int64_t kKBlock = 128;

// C[0..kRows, cols) = A[0..kRows) W^T (+ add) for kPanels panels side by side, panel_stride floats apart: cols <= 32
// kPanels valid columns. K runs in blocks of kKBlock, each summed in registers and then added to C (the first to
// add), so that a long K sums as a short chain per block plus one per K / kKBlock (rounding error about that of MKL's
// blocked sums, not of one chain over all of K). Each value sums in the same order whatever kRows and kPanels: with
// few rows, more panels only put more independent sums in flight (one row on one panel keeps two, and waits on the
// FMA latency).
template <int kRows, int kPanels>
FASTATTN_AVX512F void panel_block(const float* a, int64_t lda, const float* panel, int64_t panel_stride, int64_t k,
                                  const float* add, int64_t add_ld, float* c, int64_t ldc, int64_t cols) {
  constexpr int kVecs = 2 * kPanels;  // of 16 columns
  __mmask16 mask[kVecs];
  for (int q = 0; q < kVecs; ++q) mask[q] = __mmask16((1u << std::clamp<int64_t>(cols - 16 * q, 0, 16)) - 1);
  for (int64_t k0 = 0; k0 < k || k0 == 0; k0 += kKBlock) {
    __m512 acc[kRows][kVecs];
    for (int i = 0; i < kRows; ++i) {
      for (int q = 0; q < kVecs; ++q) acc[i][q] = _mm512_setzero_ps();
    }
    for (int64_t kk = k0; kk < std::min(k, k0 + kKBlock); ++kk) {
      __m512 w[kVecs];
      for (int q = 0; q < kVecs; ++q) {
        w[q] = _mm512_loadu_ps(panel + q / 2 * panel_stride + kk * kStepGemmPanel + q % 2 * 16);
      }
      for (int i = 0; i < kRows; ++i) {
        const __m512 x = _mm512_set1_ps(a[i * lda + kk]);
        for (int q = 0; q < kVecs; ++q) acc[i][q] = _mm512_fmadd_ps(x, w[q], acc[i][q]);
      }
    }
    for (int i = 0; i < kRows; ++i) {
      const float* before = k0 > 0 ? c + i * ldc : add == nullptr ? nullptr : add + i * add_ld;
      for (int q = 0; q < kVecs; ++q) {
        if (before != nullptr) acc[i][q] = _mm512_add_ps(acc[i][q], _mm512_maskz_loadu_ps(mask[q], before + 16 * q));
        _mm512_mask_storeu_ps(c + i * ldc + 16 * q, mask[q], acc[i][q]);
      }
    }
  }
}

using PanelBlock = void (*)(const float*, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                            int64_t, int64_t);
constexpr PanelBlock kPanelBlocks[kMaxRows + 1] = {nullptr,           panel_block<1, 1>, panel_block<2, 1>,
                                                   panel_block<3, 1>, panel_block<4, 1>, panel_block<5, 1>,
                                                   panel_block<6, 1>, panel_block<7, 1>, panel_block<8, 1>};
// Rows -> panels at once and the kernel for fewer than 4 rows: at least 8 sums in flight.
constexpr int64_t kWidePanels[kWideMaxRows + 1] = {0, 4, 2, 2};
constexpr PanelBlock kWideBlocks[kWideMaxRows + 1] = {nullptr, panel_block<1, 4>, panel_block<2, 2>,
                                                      panel_block<3, 2>};

}  // namespace
#endif

void step_gemm(const float* a, int64_t lda, int64_t m, const float* packed, int64_t n, int64_t k, const float* add,
               int64_t add_ld, float* c, int64_t ldc, int64_t panel_begin, int64_t panel_end) {
#if defined(FASTATTN_STEP_GEMM)
  const int64_t panel_size = k * kStepGemmPanel;
  const int64_t width = m <= kWideMaxRows ? kWidePanels[m] : 1;  // panels a call: one row block of m rows
  for (int64_t p = panel_begin; p < panel_end;) {
    const int64_t col = p * kStepGemmPanel;
    if (width > 1 && p + width <= panel_end) {
      kWideBlocks[m](a, lda, packed + p * panel_size, panel_size, k, add == nullptr ? nullptr : add + col, add_ld,
                     c + col, ldc, std::min(width * kStepGemmPanel, n - col));
      p += width;
      continue;
    }
    const int64_t cols = std::min(kStepGemmPanel, n - col);
    for (int64_t row = 0; row < m; row += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, m - row);
      const float* add_block = add == nullptr ? nullptr : add + row * add_ld + col;
      kPanelBlocks[rows](a + row * lda, lda, packed + p * panel_size, panel_size, k, add_block, add_ld,
                         c + row * ldc + col, ldc, cols);
    }
    ++p;
  }
#else
  (void)a, (void)lda, (void)m, (void)packed, (void)n, (void)k, (void)add, (void)add_ld, (void)c, (void)ldc;
  (void)panel_begin, (void)panel_end;
#endif
}

}  // namespace cpu
}  // namespace fastattn
