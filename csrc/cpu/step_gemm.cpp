// The recurrent steps' small float32 GEMM (csrc/cpu/step_gemm.h): a register-blocked AVX-512 micro-kernel, kRows rows
// x 32 columns of C accumulated over K in 2 x kRows zmm registers, one packed weight panel at a time (it stays in L1
// or L2 while every row block of A passes over it).
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

// The packing of W's rows runs over K in blocks of this many values (about twice as fast as whole rows).
constexpr int64_t kPackKBlock = 64;

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
    } else {  // columns of B (rows of W = B^T), kPackKBlock values of each at a time (both sides stay in L1)
      for (int64_t k0 = 0; k0 < k; k0 += kPackKBlock) {
        const int64_t k1 = std::min(k, k0 + kPackKBlock);
        for (int64_t j = 0; j < kStepGemmPanel; ++j) {
          const float* column = j < cols ? b + (col0 + j) * n_stride : nullptr;
          for (int64_t kk = k0; kk < k1; ++kk) panel[kk * kStepGemmPanel + j] = column ? column[kk * k_stride] : 0.0f;
        }
      }
    }
  }
}

#if defined(FASTATTN_STEP_GEMM)
namespace {

constexpr int kMaxRows = 8;  // 16 accumulators, plus the two weight vectors and a broadcast
constexpr int64_t kKBlock = 128;

// C[0..kRows, cols) = A[0..kRows) panel (+ add) for one panel; cols <= 32 valid columns. K runs in blocks of
// kKBlock, each summed in registers and then added to C (the first to add), so that a long K sums as a short chain per
// block plus one per K / kKBlock (rounding error about that of MKL's blocked sums, not of one chain over all of K).
template <int kRows>
FASTATTN_AVX512F void panel_block(const float* a, int64_t lda, const float* panel, int64_t k, const float* add,
                                  int64_t add_ld, float* c, int64_t ldc, int64_t cols) {
  const __mmask16 mask_lo = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 mask_hi = cols >= 32   ? __mmask16(0xFFFF)
                            : cols <= 16 ? __mmask16(0)
                                         : __mmask16((1u << (cols - 16)) - 1);
  for (int64_t k0 = 0; k0 < k || k0 == 0; k0 += kKBlock) {
    __m512 lo[kRows], hi[kRows];
    for (int i = 0; i < kRows; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
    for (int64_t kk = k0; kk < std::min(k, k0 + kKBlock); ++kk) {
      const __m512 w_lo = _mm512_loadu_ps(panel + kk * kStepGemmPanel);
      const __m512 w_hi = _mm512_loadu_ps(panel + kk * kStepGemmPanel + 16);
      for (int i = 0; i < kRows; ++i) {
        const __m512 x = _mm512_set1_ps(a[i * lda + kk]);
        lo[i] = _mm512_fmadd_ps(x, w_lo, lo[i]);
        hi[i] = _mm512_fmadd_ps(x, w_hi, hi[i]);
      }
    }
    for (int i = 0; i < kRows; ++i) {
      const float* before = k0 > 0 ? c + i * ldc : add == nullptr ? nullptr : add + i * add_ld;
      if (before != nullptr) {
        lo[i] = _mm512_add_ps(lo[i], _mm512_maskz_loadu_ps(mask_lo, before));
        hi[i] = _mm512_add_ps(hi[i], _mm512_maskz_loadu_ps(mask_hi, before + 16));
      }
      _mm512_mask_storeu_ps(c + i * ldc, mask_lo, lo[i]);
      _mm512_mask_storeu_ps(c + i * ldc + 16, mask_hi, hi[i]);
    }
  }
}

using PanelBlock = void (*)(const float*, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                            int64_t);
constexpr PanelBlock kPanelBlocks[kMaxRows + 1] = {nullptr,           panel_block<1>, panel_block<2>,
                                                   panel_block<3>,    panel_block<4>, panel_block<5>,
                                                   panel_block<6>,    panel_block<7>, panel_block<8>};

}  // namespace
#endif

void step_gemm(const float* a, int64_t lda, int64_t m, const float* packed, int64_t n, int64_t k, const float* add,
               int64_t add_ld, float* c, int64_t ldc, int64_t panel_begin, int64_t panel_end) {
#if defined(FASTATTN_STEP_GEMM)
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    const int64_t col = p * kStepGemmPanel, cols = std::min(kStepGemmPanel, n - col);
    const float* panel = packed + p * k * kStepGemmPanel;
    for (int64_t row = 0; row < m; row += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, m - row);
      const float* add_block = add == nullptr ? nullptr : add + row * add_ld + col;
      kPanelBlocks[rows](a + row * lda, lda, panel, k, add_block, add_ld, c + row * ldc + col, ldc, cols);
    }
  }
#else
  (void)a, (void)lda, (void)m, (void)packed, (void)n, (void)k, (void)add, (void)add_ld, (void)c, (void)ldc;
  (void)panel_begin, (void)panel_end;
#endif
}

}  // namespace cpu
}  // namespace fastattn
