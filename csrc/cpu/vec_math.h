// Helpers shared by the C++ CPU kernels (csrc/cpu/*_kernel.cpp): inlining and multi-versioning macros, the
// compute type, a branch-free exp that vectorises, row conversions between half/bfloat16 and float, and the
// staging of such rows through float scratch (RowStage).
// No torch headers beyond c10's Half and BFloat16.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__)
// Helpers are forced inline so that each target clone of an entry point compiles its own copy of them.
#define FASTATTN_INLINE inline __attribute__((always_inline))
#define FASTATTN_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FASTATTN_INLINE inline
#define FASTATTN_INLINE_LAMBDA
#endif

// Entry points compiled for AVX-512, AVX2 + FMA and baseline x86-64; the loader picks the best this CPU has.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTATTN_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTATTN_TARGET_CLONES
#endif

namespace fastattn {
namespace cpu {

// The type a kernel computes in for storage type T: float, or double for double.
template <class T> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };
template <class T> using compute_t = typename ComputeType<T>::type;

// Eight floats: one register in the AVX2 and AVX-512 clones, two in the baseline (SSE) one. Passed only between
// forced-inline functions, so the baseline's ABI for them (-Wpsabi) never applies.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float Float8 __attribute__((vector_size(32)));

FASTATTN_INLINE Float8 load_float8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class To, class From>
FASTATTN_INLINE To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// e^x in float without branches, so that loops calling it vectorise (for AVX2 only with -fno-trapping-math, which
// setup.py passes: the range checks below become selects). Write x = k ln2 + r with k an integer and
// |r| <= ln2 / 2; then e^x = 2^k e^r, with e^r = 1 + r + r^2 q(r) and q a degree-4 polynomial fitted for
// minimax relative error (3.8e-9 with float coefficients, so about 1 ulp after rounding). e^-inf is exactly 0,
// NaN stays NaN, results below FLT_MIN flush to 0 and x above 88.37 gives +inf (the kernels only pass x <= 0).
FASTATTN_INLINE float exp_of(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;      // ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 9 bits, so k * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kShift = 12582912.0f;       // 1.5 * 2^23: v + kShift rounds v to an integer in the low bits
  constexpr float kMinArg = -87.33654475f;    // ln(FLT_MIN)
  constexpr float kMaxArg = 88.37f;           // just under 127.5 ln 2, so that 2^k below is finite
  constexpr float kC2 = 0.49999994f, kC3 = 0.16666521f, kC4 = 0.04166839f, kC5 = 0.00836871f,
                  kC6 = 0.0013814613f;
  const float t = x * kLog2e + kShift;        // low mantissa bits of t hold k = round(x / ln2)
  const float k = t - kShift;
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  const float q = kC2 + r * (kC3 + r * (kC4 + r * (kC5 + r * kC6)));
  const float er = 1.0f + (r + r * r * q);
  // 2^k: bits(t) = bits(kShift) + k, and bits(kShift) << 23 vanishes, so (bits(t) + 127) << 23 = bits(2^k).
  const float two_k = bit_cast<float>((bit_cast<uint32_t>(t) + 127u) << 23);
  const float e = er * two_k;
  return x < kMinArg ? 0.0f : (x > kMaxArg ? std::numeric_limits<float>::infinity() : e);
}

// Double precision keeps libm's exp (the kernels' speed targets are float, half and bfloat16).
FASTATTN_INLINE double exp_of(double x) { return std::exp(x); }

// The logistic function 1 / (1 + e^-x) through exp_of (0 and 1 at the ends, no overflow trap).
template <class C> FASTATTN_INLINE C sigmoid_of(C x) { return C(1) / (C(1) + exp_of(-x)); }

// tanh without branches: (1 - e^-2|x|) / (1 + e^-2|x|) with x's sign, and below |x| = 0.3, where that
// difference would cancel, its Taylor polynomial to x^9 (error under 2e-8 relative there).
FASTATTN_INLINE float tanh_of(float x) {
  const float a = std::fabs(x);
  const float t = exp_of(-2.0f * a);
  const float large = (1.0f - t) / (1.0f + t);
  const float s = a * a;
  const float small = a * (1.0f + s * (-0.33333333f + s * (0.13333333f + s * (-0.053968254f + s * 0.021869488f))));
  return std::copysign(a < 0.3f ? small : large, x);
}

FASTATTN_INLINE double tanh_of(double x) { return std::tanh(x); }

// Row conversions between a storage type and the compute type. Half uses the CPU's F16C instructions when
// it has them (g++ does not vectorise half conversions itself), else c10's portable conversion.
#if defined(__GNUC__) && defined(__x86_64__)
inline bool cpu_has_f16c() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return has;
}

__attribute__((target("avx,f16c"))) inline void convert_row_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

__attribute__((target("avx,f16c"))) inline void convert_row_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), h);
  }
  for (; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}
#else
inline inline bool cpu_has_f16c() { return false; }
template <class From, class To> inline void convert_row_f16c(const From*, To*, int64_t) {}
#endif

template <class From, class To>
FASTATTN_INLINE void convert_row(const From* __restrict src, To* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<From, c10::Half> || std::is_same_v<To, c10::Half>) {
    if (cpu_has_f16c()) return convert_row_f16c(src, dst, n);
  }
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<To>(src[j]);
}

// Where a row of T meets the kernels: compute-type rows are used in place, reduced-precision rows are staged
// through per-thread scratch rows (input slots 0 and 1, one output slot).
template <class T>
class RowStage {
 public:
  using C = compute_t<T>;
  static constexpr bool kStaged = !std::is_same_v<T, C>;
  explicit RowStage(int64_t n) : scratch_(kStaged ? 3 * n : 0), n_(n) {}
  // Row `which` (0, 1) of an input as compute-type values.
  FASTATTN_INLINE const C* load(const T* src, int which) {
    if constexpr (kStaged) {
      C* dst = scratch_.data() + which * n_;
      convert_row(src, dst, n_);
      return dst;
    } else {
      return src;
    }
  }
  // Where the kernel writes an output row dst; then store(dst) puts it in place.
  FASTATTN_INLINE C* output(T* dst) {
    if constexpr (kStaged) return scratch_.data() + 2 * n_;
    else return dst;
  }
  FASTATTN_INLINE void store(T* dst) {
    if constexpr (kStaged) convert_row(scratch_.data() + 2 * n_, dst, n_);
  }

 private:
  std::vector<C> scratch_;
  int64_t n_;
};

// Independent partial sums in a reduction: two 512-bit registers of C.
template <class C> constexpr int64_t kLanes = 128 / sizeof(C);

// sum(f(0), ..., f(n - 1)) and, through f(j, a, b) adding to both, a second sum, returned in double: lane l
// accumulates the terms j = l mod kLanes of a block of kSumBlock terms (so the compiler vectorises across lanes
// without reordering a lane's additions), and the block sums are added in double. f may also write memory for
// column j.
template <class C, class F>
FASTATTN_INLINE void lane_sums(int64_t n, F f, double& sum_a, double& sum_b) {
  constexpr int64_t kL = kLanes<C>, kSumBlock = 8 * kLanes<C>;
  sum_a = 0;
  sum_b = 0;
  for (int64_t begin = 0; begin < n; begin += kSumBlock) {
    const int64_t count = std::min(kSumBlock, n - begin);
    C a[kL], b[kL];
    for (int64_t l = 0; l < kL; ++l) a[l] = b[l] = C(0);
    int64_t j = 0;
    for (; j + kL <= count; j += kL) {
      for (int64_t l = 0; l < kL; ++l) f(begin + j + l, a[l], b[l]);
    }
    for (int64_t l = 0; j + l < count; ++l) f(begin + j + l, a[l], b[l]);
    for (int64_t width = kL / 2; width > 0; width /= 2) {
      for (int64_t l = 0; l < width; ++l) {
        a[l] += a[l + width];
        b[l] += b[l + width];
      }
    }
    sum_a += a[0];
    sum_b += b[0];
  }
}

template <class C, class F>
FASTATTN_INLINE double lane_sum(int64_t n, F f) {
  double sum = 0, unused = 0;
  lane_sums<C>(n, [&](int64_t j, C& a, C&) FASTATTN_INLINE_LAMBDA { a += f(j); }, sum, unused);
  return sum;
}

// Per-thread scratch of `slots` rows of `width` compute-type values, for kernels with several input and output
// rows: compute-type rows are used in place, reduced-precision rows are converted into a slot (load) or out of
// one (store).
template <class T>
class SlotStage {
 public:
  using C = compute_t<T>;
  static constexpr bool kStaged = !std::is_same_v<T, C>;
  SlotStage(int64_t width, int slots) : scratch_(kStaged ? width * slots : 0), width_(width) {}
  // n values of src (nullptr stays nullptr) as compute-type values: src itself, or converted into `slot`.
  FASTATTN_INLINE const C* load(const T* src, int slot, int64_t n) {
    if (src == nullptr) return nullptr;
    if constexpr (kStaged) {
      C* dst = scratch_.data() + slot * width_;
      convert_row(src, dst, n);
      return dst;
    } else {
      return src;
    }
  }
  // Where a kernel writes values bound for dst: dst itself, or `slot`; then store(dst, slot, n) puts n in place.
  FASTATTN_INLINE C* output(T* dst, int slot) {
    if constexpr (kStaged) return scratch_.data() + slot * width_;
    else return dst;
  }
  FASTATTN_INLINE void store(T* dst, int slot, int64_t n) {
    if constexpr (kStaged) convert_row(scratch_.data() + slot * width_, dst, n);
  }

 private:
  std::vector<C> scratch_;
  int64_t width_;
};

}  // namespace cpu
}  // namespace fastattn
