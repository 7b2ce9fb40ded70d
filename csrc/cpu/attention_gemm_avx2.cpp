// The CPU attention kernels' float GEMM for CPUs with AVX2 but not AVX-512 (declared in attention_tiles.h). Its
// 16 256-bit registers cannot hold micro_kernel's 4 x 64 block of sums, so this one keeps kRows x (NV * 16), NV <= 2,
// in explicit 8-float vectors: about twice the throughput of micro_kernel compiled for AVX2, with micro_kernel's
// results bit for bit (the same sums in the same order). Compiled once, for AVX2 + FMA only.
#include "attention_tiles.h"

#if defined(__GNUC__) && defined(__x86_64__)

// Everything below, the helpers inlined into it included, is compiled for AVX2 + FMA. Only functions local to this
// file or forced inline are instantiated here, so no other file can link to an AVX2 copy of a shared function.
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastattn {
namespace attention_cpu {
namespace {

using cpu::Float8;
using cpu::load_float8;

constexpr int kRows = 3;

template <int MR, int NV, bool kScale>
FASTATTN_INLINE void micro_kernel(int64_t depth, const float* __restrict a, int64_t a_row, int64_t a_col,
                                  const float* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc,
                                  const float* __restrict c_scale) {
  constexpr int kV = 2 * NV;  // 8-float vectors per row
  for (int64_t k0 = 0; k0 < depth || k0 == 0; k0 += kDepthBlock) {
    const int64_t k1 = std::min(depth, k0 + kDepthBlock);
    Float8 acc[MR][kV] = {};
    for (int64_t k = k0; k < k1; ++k) {
      Float8 bk[kV];
      for (int v = 0; v < kV; ++v) bk[v] = load_float8(b + k * ldb + 8 * v);
      for (int i = 0; i < MR; ++i) {
        const Float8 ai = Float8{} + a[i * a_row + k * a_col];
        for (int v = 0; v < kV; ++v) acc[i][v] += ai * bk[v];
      }
    }
    for (int i = 0; i < MR; ++i) {
      for (int v = 0; v < kV; ++v) {
        float* ci = c + i * ldc + 8 * v;
        Float8 out = acc[i][v];
        if (k0 > 0) {
          out += load_float8(ci);
        } else if constexpr (kScale) {
          out = load_float8(ci) * (Float8{} + c_scale[i]) + out;
        }
        std::memcpy(ci, &out, sizeof out);
      }
    }
  }
}

template <int NV, bool kScale>
FASTATTN_INLINE void gemm_rows(int64_t rows, int64_t depth, const float* a, int64_t a_row, int64_t a_col,
                               const float* b, int64_t ldb, float* c, int64_t ldc, const float* c_scale) {
  const auto block = [&](auto micro_rows, int64_t i) FASTATTN_INLINE_LAMBDA {
    micro_kernel<decltype(micro_rows)::value, NV, kScale>(depth, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc,
                                                          ldc, kScale ? c_scale + i : nullptr);
  };
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows) block(std::integral_constant<int, kRows>{}, i);
  for (; i < rows; ++i) block(std::integral_constant<int, 1>{}, i);
}

}  // namespace

template <bool kScale>
void gemm_avx2(int64_t rows, int64_t vectors, int64_t depth, const float* a, int64_t a_row, int64_t a_col,
               const float* b, int64_t ldb, float* c, int64_t ldc, const float* c_scale) {
  for (int64_t n = 0; n < vectors; n += 2) {
    const float* bn = b + n * kLanes<float>;
    float* cn = c + n * kLanes<float>;
    if (vectors - n >= 2) {
      gemm_rows<2, kScale>(rows, depth, a, a_row, a_col, bn, ldb, cn, ldc, c_scale);
    } else {
      gemm_rows<1, kScale>(rows, depth, a, a_row, a_col, bn, ldb, cn, ldc, c_scale);
    }
  }
}

template void gemm_avx2<false>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                               float*, int64_t, const float*);
template void gemm_avx2<true>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                              float*, int64_t, const float*);

}  // namespace attention_cpu
}  // namespace fastattn

#pragma GCC pop_options
#endif
