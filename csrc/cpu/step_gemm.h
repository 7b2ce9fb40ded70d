// A float32 GEMM for the small, latency-bound matmuls of the recurrent time loops: C (M, N) = A (M, K) W^T (+ add),
// with W (N, K) packed once per call into panels of kStepGemmPanel output columns, each panel (K, kStepGemmPanel)
// row-major and zero-padded past N. For a batch of a few dozen rows ATen's mm (MKL) runs such a product at about a
// third of the machine's peak; this kernel keeps up to 8 rows x 32 columns of C in AVX-512 registers over the
// whole K. No torch headers; AVX-512 only.
#pragma once
#include <cstdint>

namespace fastattn {
namespace cpu {

constexpr int64_t kStepGemmPanel = 32;

// Whether this CPU can run the kernel (AVX-512F), and whether the time loops use it: supported, and the environment
// variable FASTATTN_CPU_STEP_GEMM is not 0 (0 sends the steps back to oneDNN / ATen's mm).
bool step_gemm_supported();
bool step_gemm_available();
// Whether the kernel also takes large products (csrc/cpu/recurrent.cpp says which), where it is available: with
// FASTATTN_CPU_STEP_GEMM=1, and by default except on Intel CPUs, whose two 512-bit FMA units oneDNN's blocked GEMM
// keeps busier than this kernel's 8-row blocks do.
bool step_gemm_takes_large();

inline int64_t step_gemm_panels(int64_t n) { return (n + kStepGemmPanel - 1) / kStepGemmPanel; }

// Panels [panel_begin, panel_end) of packed (step_gemm_panels(N) * K * kStepGemmPanel floats) from B = W^T (K, N) with
// strides (k_stride, n_stride): W (N, K) row-major is (1, K), a (K, N) row-major B is (N, 1).
void step_gemm_pack(const float* b, int64_t k, int64_t n, int64_t k_stride, int64_t n_stride, float* packed,
                    int64_t panel_begin, int64_t panel_end);

// Columns [panel_begin, panel_end) * kStepGemmPanel (up to N) of C = A W^T + add. a: M rows of K, row stride lda
// (unit stride over K); add: null, a bias (N,) when add_ld is 0, else M rows of N with row stride add_ld; c: row
// stride ldc.
void step_gemm(const float* a, int64_t lda, int64_t m, const float* packed, int64_t n, int64_t k, const float* add,
               int64_t add_ld, float* c, int64_t ldc, int64_t panel_begin, int64_t panel_end);

}  // namespace cpu
}  // namespace fastattn
