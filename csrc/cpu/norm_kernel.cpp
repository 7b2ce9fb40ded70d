// CPU LayerNorm / RMSNorm kernels on raw pointers (arguments and maths: csrc/norm.h).
//
// Forward, per row of n values, in the compute type C (float; double for double x):
//   pass 1: z = x * keep + residual, written straight into residual_out when that is stored in C (else into a
//           scratch row, then rounded to residual_out's dtype and read back, so the norm sees the stored z);
//   pass 2: mean = z[0] + sum(z - z[0]) / n (LayerNorm; RMSNorm: mean = 0);
//   pass 3: var = sum((z - mean)^2) / n, rstd = 1 / sqrt(var + eps);
//   pass 4: out = (z - mean) * rstd * weight + bias.
// Only pass 1 (or pass 2, when z is x itself) reads memory and only pass 4 (and pass 1's residual_out) writes
// it; the other passes read a row that is still in L1 (n = 1024 float: 4 KiB) or L2. Shifting by z[0] and the
// two-pass variance keep rows with a large mean accurate, where sum(z^2) - n mean^2 would cancel.
//
// Backward, per row, with zhat = (z - mean) * rstd and g = grad_out * weight:
//   pass 1: sum(g), sum(g * zhat), and the row's grad_out * zhat and grad_out added to per-thread accumulators;
//   pass 2: dz = rstd * (g - zhat * mean(g * zhat) - mean(g)) + grad_residual  (RMSNorm: no mean(g) term),
//           grad_residual_in = dz, grad_x = dz * keep.
// grad_weight / grad_bias: each thread adds kAccRows rows at a time in C, then folds that into its own float64
// partial row; norm_backward_cpu_reduce sums the partials (no atomics, and the same result for the same thread
// count).
//
// Dropout keeps element (r, c) iff Philox word c % 4 at counter (c / 4, r, r >> 32, 1) is >= the threshold
// (csrc/philox.h); dropout_factors turns a row's Philox words into keep = 1 / (1 - p) for kept elements and 0
// for dropped ones, with AVX-512 or AVX2 intrinsics where the CPU has them.
//
// Loops are written so that g++ -O3 vectorises them without -ffast-math: reductions keep kLanes independent
// partial sums, folded into double every kSumBlock terms. Entry points are compiled for AVX-512, AVX2 + FMA
// and baseline x86-64 (target_clones).
#include "norm_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace fastattn {
namespace {

using cpu::lane_sum;
using cpu::lane_sums;

template <class C> constexpr Dtype kComputeDtype = std::is_same_v<C, double> ? Dtype::kDouble : Dtype::kFloat;

inline int64_t element_size(Dtype d) {
  switch (d) {
    case Dtype::kHalf:
    case Dtype::kBFloat16: return 2;
    case Dtype::kFloat: return 4;
    case Dtype::kDouble: return 8;
  }
  return 0;
}

// Element `offset` of an array of dtype d.
inline const void* element(const void* base, int64_t offset, Dtype d) {
  return static_cast<const char*>(base) + offset * element_size(d);
}
inline void* element(void* base, int64_t offset, Dtype d) {
  return static_cast<char*>(base) + offset * element_size(d);
}

// n values from src to dst, rounding to nearest. Half <-> float uses F16C where the CPU has it; the rare
// pairs without a direct conversion (half <-> double, half <-> bfloat16) go through float.
template <class From, class To>
FASTATTN_INLINE void convert(const From* src, To* dst, int64_t n) {
  constexpr bool kHalfFloat = (std::is_same_v<From, c10::Half> && std::is_same_v<To, float>) ||
                              (std::is_same_v<From, float> && std::is_same_v<To, c10::Half>);
  constexpr bool kViaFloat = !kHalfFloat && (std::is_same_v<From, c10::Half> || std::is_same_v<To, c10::Half>);
  if constexpr (std::is_same_v<From, To>) {
    if (static_cast<const void*>(src) != static_cast<const void*>(dst)) std::memcpy(dst, src, n * sizeof(To));
  } else if constexpr (kViaFloat) {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<To>(static_cast<float>(src[j]));
  } else {
    cpu::convert_row(src, dst, n);
  }
}

// A row of n values of dtype d as compute-type values: src itself when d is C's dtype, else converted into
// scratch.
template <class C>
FASTATTN_INLINE const C* load_row(const void* src, Dtype d, int64_t n, C* scratch) {
  switch (d) {
    case Dtype::kHalf: convert(static_cast<const c10::Half*>(src), scratch, n); return scratch;
    case Dtype::kBFloat16: convert(static_cast<const c10::BFloat16*>(src), scratch, n); return scratch;
    case Dtype::kFloat:
      if constexpr (std::is_same_v<C, float>) return static_cast<const float*>(src);
      convert(static_cast<const float*>(src), scratch, n);
      return scratch;
    case Dtype::kDouble:
      if constexpr (std::is_same_v<C, double>) return static_cast<const double*>(src);
      convert(static_cast<const double*>(src), scratch, n);
      return scratch;
  }
  return scratch;
}

// Where a kernel writes a compute-type output row bound for dst (dtype d): dst itself when d is C's dtype,
// else scratch; store_row then puts it in place.
template <class C>
FASTATTN_INLINE C* output_row(void* dst, Dtype d, C* scratch) {
  return d == kComputeDtype<C> ? static_cast<C*>(dst) : scratch;
}

// Writes n compute-type values to dst (dtype d); nothing when src is dst.
template <class C>
FASTATTN_INLINE void store_row(const C* src, void* dst, Dtype d, int64_t n) {
  switch (d) {
    case Dtype::kHalf: return convert(src, static_cast<c10::Half*>(dst), n);
    case Dtype::kBFloat16: return convert(src, static_cast<c10::BFloat16*>(dst), n);
    case Dtype::kFloat: return convert(src, static_cast<float*>(dst), n);
    case Dtype::kDouble: return convert(src, static_cast<double*>(dst), n);
  }
}

// Dropout factors: keep[c] = 1 / (1 - p) where element (row, c) is kept, else 0. The Philox calls (4 columns
// each) run 16 (AVX-512) or 8 (AVX2) to a vector with explicit intrinsics, because g++ vectorises the
// 32 x 32 -> 64-bit products of the rounds poorly or not at all. The calls' keep bits are interleaved into
// column order with pdep, then expanded to factors. The path is picked once from the CPU's features;
// FASTATTN_CPU_DROPOUT=avx2 or =scalar caps it (to test the other paths on an AVX-512 machine).
enum class DropoutPath : int { kScalar, kAvx2, kAvx512 };

inline DropoutPath dropout_path() {
  static const DropoutPath path = [] {
    DropoutPath best = DropoutPath::kScalar;
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2")) best = DropoutPath::kAvx2;
    if (best == DropoutPath::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      best = DropoutPath::kAvx512;
    }
#endif
    const char* cap = std::getenv("FASTATTN_CPU_DROPOUT");
    if (cap != nullptr && std::strcmp(cap, "scalar") == 0) best = DropoutPath::kScalar;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == DropoutPath::kAvx512) best = DropoutPath::kAvx2;
    return best;
  }();
  return path;
}

// Portable path: one philox4x32_10 (csrc/philox.h) per 4 columns.
template <class C>
void dropout_factors_scalar(const Dropout& d, uint64_t row, int64_t n, C* keep) {
  const C scale = static_cast<C>(d.scale);
  for (int64_t col = 0; col < n; col += 4) {
    const Philox4 bits = elementwise_dropout_bits(d, row, static_cast<uint32_t>(col / 4));
    for (int64_t w = 0; w < 4 && col + w < n; ++w) keep[col + w] = bits.x[w] >= d.threshold ? scale : C(0);
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
constexpr uint32_t kPhiloxMul0 = 0xD2511F53u, kPhiloxMul1 = 0xCD9E8D57u;  // as philox4x32_10 in csrc/philox.h
constexpr uint32_t kPhiloxWeyl0 = 0x9E3779B9u, kPhiloxWeyl1 = 0xBB67AE85u;
constexpr uint64_t kWordBits = 0x1111111111111111ull;  // bit 4 l of the column mask: word 0 of call l

// g++ 12 flags the deliberately undefined pass-through operand inside the AVX-512 intrinsics
// (_mm512_undefined_epi32) as maybe-uninitialized; a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTATTN_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,bmi2")))
#define FASTATTN_AVX2 __attribute__((target("avx2,fma,bmi2")))

// The high and low 32 bits of the products c * m of 16 unsigned 32-bit lanes (m in the low half of each 64-bit
// lane of mul): even lanes multiply in place, odd lanes shifted down, and the halves are blended back.
FASTATTN_AVX512 inline void mul_hi_lo_avx512(__m512i c, __m512i mul, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(c, mul), odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), mul);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Keep bits of columns 4 group .. 4 group + 63 of a row (bit c: column 4 group + c), from 16 Philox calls.
FASTATTN_AVX512 inline uint64_t keep_bits_avx512(const Dropout& d, uint32_t row_lo, uint32_t row_hi, uint32_t group) {
  const __m512i mul0 = _mm512_set1_epi64(kPhiloxMul0), mul1 = _mm512_set1_epi64(kPhiloxMul1);
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(group)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(row_lo)), c2 = _mm512_set1_epi32(static_cast<int>(row_hi));
  __m512i c3 = _mm512_set1_epi32(1);
  uint32_t key0 = d.key0, key1 = d.key1;
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mul_hi_lo_avx512(c0, mul0, hi0, lo0);
    mul_hi_lo_avx512(c2, mul1, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(key0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(key1)));
    c1 = lo1;
    c3 = lo0;
    key0 += kPhiloxWeyl0;
    key1 += kPhiloxWeyl1;
  }
  const __m512i threshold = _mm512_set1_epi32(static_cast<int>(d.threshold));
  return _pdep_u64(_mm512_cmpge_epu32_mask(c0, threshold), kWordBits) |
         _pdep_u64(_mm512_cmpge_epu32_mask(c1, threshold), kWordBits << 1) |
         _pdep_u64(_mm512_cmpge_epu32_mask(c2, threshold), kWordBits << 2) |
         _pdep_u64(_mm512_cmpge_epu32_mask(c3, threshold), kWordBits << 3);
}

template <class C>
FASTATTN_AVX512 void dropout_factors_avx512(const Dropout& d, uint64_t row, int64_t n, C* keep) {
  const uint32_t row_lo = static_cast<uint32_t>(row), row_hi = static_cast<uint32_t>(row >> 32);
  alignas(64) C block[64];
  for (int64_t col = 0; col < n; col += 64) {
    const uint64_t bits = keep_bits_avx512(d, row_lo, row_hi, static_cast<uint32_t>(col / 4));
    C* const dst = col + 64 <= n ? keep + col : block;
    if constexpr (std::is_same_v<C, float>) {
      const __m512 scale = _mm512_set1_ps(static_cast<float>(d.scale));
      for (int k = 0; k < 4; ++k) {
        _mm512_storeu_ps(dst + 16 * k, _mm512_maskz_mov_ps(__mmask16(bits >> (16 * k)), scale));
      }
    } else {
      const __m512d scale = _mm512_set1_pd(d.scale);
      for (int k = 0; k < 8; ++k) _mm512_storeu_pd(dst + 8 * k, _mm512_maskz_mov_pd(__mmask8(bits >> (8 * k)), scale));
    }
    if (dst == block) std::memcpy(keep + col, block, (n - col) * sizeof(C));
  }
}

FASTATTN_AVX2 inline void mul_hi_lo_avx2(__m256i c, __m256i mul, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, mul), odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), mul);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Keep bits (as 8 lanes) of word w: unsigned c >= threshold, through a signed compare of the flipped values.
FASTATTN_AVX2 inline uint32_t keep_lanes_avx2(__m256i c, __m256i threshold_flipped) {
  const __m256i flipped = _mm256_xor_si256(c, _mm256_set1_epi32(INT32_MIN));
  const __m256i below = _mm256_cmpgt_epi32(threshold_flipped, flipped);
  return ~static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(below))) & 0xFFu;
}

// Keep bits of columns 4 group .. 4 group + 31 of a row, from 8 Philox calls.
FASTATTN_AVX2 inline uint32_t keep_bits_avx2(const Dropout& d, uint32_t row_lo, uint32_t row_hi, uint32_t group) {
  const __m256i mul0 = _mm256_set1_epi64x(kPhiloxMul0), mul1 = _mm256_set1_epi64x(kPhiloxMul1);
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(group)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(row_lo)), c2 = _mm256_set1_epi32(static_cast<int>(row_hi));
  __m256i c3 = _mm256_set1_epi32(1);
  uint32_t key0 = d.key0, key1 = d.key1;
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mul_hi_lo_avx2(c0, mul0, hi0, lo0);
    mul_hi_lo_avx2(c2, mul1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(key0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(key1)));
    c1 = lo1;
    c3 = lo0;
    key0 += kPhiloxWeyl0;
    key1 += kPhiloxWeyl1;
  }
  const __m256i threshold = _mm256_set1_epi32(static_cast<int>(d.threshold ^ 0x80000000u));
  const uint32_t bits = static_cast<uint32_t>(kWordBits);
  return _pdep_u32(keep_lanes_avx2(c0, threshold), bits) | _pdep_u32(keep_lanes_avx2(c1, threshold), bits << 1) |
         _pdep_u32(keep_lanes_avx2(c2, threshold), bits << 2) | _pdep_u32(keep_lanes_avx2(c3, threshold), bits << 3);
}

template <class C>
FASTATTN_AVX2 void dropout_factors_avx2(const Dropout& d, uint64_t row, int64_t n, C* keep) {
  const uint32_t row_lo = static_cast<uint32_t>(row), row_hi = static_cast<uint32_t>(row >> 32);
  alignas(32) C block[32];
  for (int64_t col = 0; col < n; col += 32) {
    const uint32_t bits = keep_bits_avx2(d, row_lo, row_hi, static_cast<uint32_t>(col / 4));
    C* const dst = col + 32 <= n ? keep + col : block;
    if constexpr (std::is_same_v<C, float>) {
      const __m256 scale = _mm256_set1_ps(static_cast<float>(d.scale));
      const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
      for (int k = 0; k < 4; ++k) {
        const __m256i byte = _mm256_set1_epi32(static_cast<int>((bits >> (8 * k)) & 0xFFu));
        const __m256i kept = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bits), lane_bits);
        _mm256_storeu_ps(dst + 8 * k, _mm256_and_ps(_mm256_castsi256_ps(kept), scale));
      }
    } else {
      const __m256d scale = _mm256_set1_pd(d.scale);
      const __m256i lane_bits = _mm256_setr_epi64x(1, 2, 4, 8);
      for (int k = 0; k < 8; ++k) {
        const __m256i nibble = _mm256_set1_epi64x(static_cast<int64_t>((bits >> (4 * k)) & 0xFu));
        const __m256i kept = _mm256_cmpeq_epi64(_mm256_and_si256(nibble, lane_bits), lane_bits);
        _mm256_storeu_pd(dst + 4 * k, _mm256_and_pd(_mm256_castsi256_pd(kept), scale));
      }
    }
    if (dst == block) std::memcpy(keep + col, block, (n - col) * sizeof(C));
  }
}
#undef FASTATTN_AVX512
#undef FASTATTN_AVX2
#pragma GCC diagnostic pop
#endif

// Called once per row (not inlined into the target clones: each path carries its own target).
template <class C>
void dropout_factors(const Dropout& d, uint64_t row, int64_t n, C* keep) {
#if defined(__GNUC__) && defined(__x86_64__)
  switch (dropout_path()) {
    case DropoutPath::kAvx512: return dropout_factors_avx512(d, row, n, keep);
    case DropoutPath::kAvx2: return dropout_factors_avx2(d, row, n, keep);
    case DropoutPath::kScalar: break;
  }
#endif
  dropout_factors_scalar(d, row, n, keep);
}

// Per-thread scratch rows of n compute-type values each.
template <class C>
class Scratch {
 public:
  Scratch(int64_t rows, int64_t n) : data_(rows * n), n_(n) {}
  C* row(int64_t i) { return data_.data() + i * n_; }

 private:
  std::vector<C> data_;
  int64_t n_;
};

template <class C>
FASTATTN_INLINE void forward_rows(const NormForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  Scratch<C> scratch(7, n);
  C* const x_buf = scratch.row(0);
  C* const residual_buf = scratch.row(1);
  C* const z_buf = scratch.row(2);
  C* const keep = scratch.row(3);
  C* const out_buf = scratch.row(4);
  const C* const w = a.weight ? load_row<C>(a.weight, a.weight_dtype, n, scratch.row(5)) : nullptr;
  const C* const b = a.bias ? load_row<C>(a.bias, a.weight_dtype, n, scratch.row(6)) : nullptr;
  C* const mean_out = static_cast<C*>(a.mean);
  C* const rstd_out = static_cast<C*>(a.rstd);

  for (int64_t r = begin; r < end; ++r) {
    const C* const x = load_row<C>(element(a.x, r * a.x_row_stride, a.dtype), a.dtype, n, x_buf);
    void* const z_store = a.residual_out ? element(a.residual_out, r * n, a.residual_out_dtype) : nullptr;
    const C* z = x;
    if (a.dropout.on || a.residual) {
      C* const zw = z_store ? output_row<C>(z_store, a.residual_out_dtype, z_buf) : z_buf;
      const C* const res =
          a.residual ? load_row<C>(element(a.residual, r * a.residual_row_stride, a.residual_dtype), a.residual_dtype,
                                   n, residual_buf)
                     : nullptr;
      if (a.dropout.on) {
        dropout_factors(a.dropout, static_cast<uint64_t>(r), n, keep);
        if (res) {
          for (int64_t j = 0; j < n; ++j) zw[j] = x[j] * keep[j] + res[j];
        } else {
          for (int64_t j = 0; j < n; ++j) zw[j] = x[j] * keep[j];
        }
      } else {
        for (int64_t j = 0; j < n; ++j) zw[j] = x[j] + res[j];
      }
      z = zw;
    }
    if (z_store) {
      store_row<C>(z, z_store, a.residual_out_dtype, n);
      // The norm reads z as stored: rounded to residual_out's dtype.
      if (a.residual_out_dtype != kComputeDtype<C>) z = load_row<C>(z_store, a.residual_out_dtype, n, z_buf);
    }

    // The mean in double, from sum(z - z[0]): z - z[0] is exact (and small) for the values of a row with a
    // large mean, so the sum's rounding errors scale with the spread of z rather than with its mean. Split as
    // mean_hi + mean_lo in C: z - mean_hi is exact where z is near the mean, and mean_lo keeps what rounding the
    // mean to C lost.
    double mean = 0.0;
    if (!a.rms && n > 0) {
      const C shift = z[0];
      mean = shift + lane_sum<C>(n, [&](int64_t j) FASTATTN_INLINE_LAMBDA { return z[j] - shift; }) / n;
    }
    const C mean_hi = static_cast<C>(mean), mean_lo = static_cast<C>(mean - static_cast<double>(mean_hi));
    const double var = lane_sum<C>(n, [&](int64_t j) FASTATTN_INLINE_LAMBDA {
                         const C centred = (z[j] - mean_hi) - mean_lo;
                         return centred * centred;
                       }) /
                       n;
    const C rstd = static_cast<C>(1.0 / std::sqrt(var + a.eps));

    void* const out_dst = element(a.out, r * n, a.dtype);
    C* const o = output_row<C>(out_dst, a.dtype, out_buf);
    if (w && b) {
      for (int64_t j = 0; j < n; ++j) o[j] = ((z[j] - mean_hi) - mean_lo) * rstd * w[j] + b[j];
    } else if (w) {
      for (int64_t j = 0; j < n; ++j) o[j] = ((z[j] - mean_hi) - mean_lo) * rstd * w[j];
    } else if (b) {
      for (int64_t j = 0; j < n; ++j) o[j] = ((z[j] - mean_hi) - mean_lo) * rstd + b[j];
    } else {
      for (int64_t j = 0; j < n; ++j) o[j] = ((z[j] - mean_hi) - mean_lo) * rstd;
    }
    store_row<C>(o, out_dst, a.dtype, n);
    if (mean_out) mean_out[r] = mean_hi;
    rstd_out[r] = rstd;
  }
}

// Rows added up in C before they are folded into the float64 partials of grad_weight / grad_bias.
constexpr int64_t kAccRows = 16;

// kAcc: accumulate grad_weight / grad_bias (a weight-less call uses w = 1).
template <class C, bool kAcc>
FASTATTN_INLINE void backward_rows_impl(const NormBackwardArgs& a, int64_t begin, int64_t end, double* partial) {
  const int64_t n = a.n;
  Scratch<C> scratch(9, n);
  C* const go_buf = scratch.row(0);
  C* const z_buf = scratch.row(1);
  C* const gr_buf = scratch.row(2);
  C* const dz_buf = scratch.row(3);
  C* const gx_buf = scratch.row(4);
  C* const keep = scratch.row(5);
  C* const acc_w = scratch.row(6);  // this block of rows' sum of grad_out * zhat
  C* const acc_b = scratch.row(7);  // and of grad_out
  const C* w = scratch.row(8);
  if (a.weight) {
    w = load_row<C>(a.weight, a.weight_dtype, n, scratch.row(8));
  } else {
    std::fill(scratch.row(8), scratch.row(8) + n, C(1));
  }
  if constexpr (kAcc) {
    std::fill(acc_w, acc_w + n, C(0));
    std::fill(acc_b, acc_b + n, C(0));
    std::fill(partial, partial + 2 * n, 0.0);
  }
  const auto fold = [&] {
    for (int64_t j = 0; j < n; ++j) {
      partial[j] += acc_w[j];
      partial[n + j] += acc_b[j];
    }
    std::fill(acc_w, acc_w + n, C(0));
    std::fill(acc_b, acc_b + n, C(0));
  };
  const C* const mean_in = static_cast<const C*>(a.mean);
  const C* const rstd_in = static_cast<const C*>(a.rstd);

  for (int64_t r = begin; r < end; ++r) {
    const C* const go = load_row<C>(element(a.grad_out, r * a.grad_out_row_stride, a.dtype), a.dtype, n, go_buf);
    const C* const z = load_row<C>(element(a.z, r * a.z_row_stride, a.z_dtype), a.z_dtype, n, z_buf);
    const C* const gr =
        a.grad_residual
            ? load_row<C>(element(a.grad_residual, r * a.grad_residual_row_stride, a.z_dtype), a.z_dtype, n, gr_buf)
            : nullptr;
    const C mean = mean_in ? mean_in[r] : C(0);
    const C rstd = rstd_in[r];

    double sum_g, sum_gz;
    lane_sums<C>(
        n,
        [&](int64_t j, C& sg, C& sgz) FASTATTN_INLINE_LAMBDA {
          const C zhat = (z[j] - mean) * rstd;
          const C g = go[j] * w[j];
          sg += g;
          sgz += g * zhat;
          if constexpr (kAcc) {
            acc_w[j] += go[j] * zhat;
            acc_b[j] += go[j];
          }
        },
        sum_g, sum_gz);
    if constexpr (kAcc) {
      if ((r - begin) % kAccRows == kAccRows - 1) fold();
    }
    const C mean_g = a.rms ? C(0) : static_cast<C>(sum_g / n);
    const C mean_gz = static_cast<C>(sum_gz / n);

    void* const gx_dst = element(a.grad_x, r * n, a.dtype);
    void* const gri_dst = a.grad_residual_in ? element(a.grad_residual_in, r * n, a.residual_dtype) : nullptr;
    C* const dz = gri_dst ? output_row<C>(gri_dst, a.residual_dtype, dz_buf)
                          : (a.dropout.on ? dz_buf : output_row<C>(gx_dst, a.dtype, dz_buf));
    if (gr) {
      for (int64_t j = 0; j < n; ++j) {
        const C zhat = (z[j] - mean) * rstd;
        dz[j] = rstd * (go[j] * w[j] - zhat * mean_gz - mean_g) + gr[j];
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const C zhat = (z[j] - mean) * rstd;
        dz[j] = rstd * (go[j] * w[j] - zhat * mean_gz - mean_g);
      }
    }
    if (gri_dst) store_row<C>(dz, gri_dst, a.residual_dtype, n);
    if (a.dropout.on) {
      dropout_factors(a.dropout, static_cast<uint64_t>(r), n, keep);
      C* const gx = output_row<C>(gx_dst, a.dtype, gx_buf);
      for (int64_t j = 0; j < n; ++j) gx[j] = dz[j] * keep[j];
      store_row<C>(gx, gx_dst, a.dtype, n);
    } else {
      store_row<C>(dz, gx_dst, a.dtype, n);  // nothing when dz is grad_x itself
    }
  }
  if constexpr (kAcc) {
    if ((end - begin) % kAccRows != 0) fold();
  }
}

template <class C>
FASTATTN_INLINE void backward_rows(const NormBackwardArgs& a, int64_t begin, int64_t end, double* partial) {
  if (a.grad_weight || a.grad_bias) {
    backward_rows_impl<C, true>(a, begin, end, partial);
  } else {
    backward_rows_impl<C, false>(a, begin, end, partial);
  }
}

// Non-template entry points, one pair per compute type: target_clones needs plain functions.
#define FASTATTN_DEFINE_ENTRY_POINTS(C)                                                                          \
  FASTATTN_TARGET_CLONES void forward_rows_##C(const NormForwardArgs& a, int64_t begin, int64_t end) {          \
    forward_rows<C>(a, begin, end);                                                                            \
  }                                                                                                            \
  FASTATTN_TARGET_CLONES void backward_rows_##C(const NormBackwardArgs& a, int64_t begin, int64_t end,         \
                                                double* partial) {                                             \
    backward_rows<C>(a, begin, end, partial);                                                                  \
  }

FASTATTN_DEFINE_ENTRY_POINTS(float)
FASTATTN_DEFINE_ENTRY_POINTS(double)
#undef FASTATTN_DEFINE_ENTRY_POINTS

void store_value(double v, void* dst, int64_t j, Dtype d) {
  switch (d) {
    case Dtype::kHalf: static_cast<c10::Half*>(dst)[j] = static_cast<c10::Half>(static_cast<float>(v)); return;
    case Dtype::kBFloat16:
      static_cast<c10::BFloat16*>(dst)[j] = static_cast<c10::BFloat16>(static_cast<float>(v));
      return;
    case Dtype::kFloat: static_cast<float*>(dst)[j] = static_cast<float>(v); return;
    case Dtype::kDouble: static_cast<double*>(dst)[j] = v; return;
  }
}

}  // namespace

void norm_forward_cpu_rows(const NormForwardArgs& args, int64_t row_begin, int64_t row_end) {
  if (args.dtype == Dtype::kDouble) return forward_rows_double(args, row_begin, row_end);
  forward_rows_float(args, row_begin, row_end);
}

void norm_backward_cpu_rows(const NormBackwardArgs& args, int64_t row_begin, int64_t row_end, double* partial) {
  if (args.dtype == Dtype::kDouble) return backward_rows_double(args, row_begin, row_end, partial);
  backward_rows_float(args, row_begin, row_end, partial);
}

void norm_backward_cpu_reduce(const NormBackwardArgs& args, const double* partials, int64_t blocks, int64_t col_begin,
                              int64_t col_end) {
  const int64_t n = args.n;
  for (int64_t j = col_begin; j < col_end; ++j) {
    double sum_w = 0, sum_b = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      sum_w += partials[(2 * b) * n + j];
      sum_b += partials[(2 * b + 1) * n + j];
    }
    if (args.grad_weight) store_value(sum_w, args.grad_weight, j, args.weight_dtype);
    if (args.grad_bias) store_value(sum_b, args.grad_bias, j, args.weight_dtype);
  }
}

}  // namespace fastattn
