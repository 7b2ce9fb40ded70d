// Device helpers shared by the row-wise CUDA kernels (softmax, norms): element types as raw bits and float32,
// and sums / maxima over groups of lanes of a warp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastattn {

// Elements of T per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

// ---------------------------------------------------------------------------------------------------------
// Element types: the stored bits of one element (in the low bits of a 32-bit word) and float32.
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  __device__ __forceinline__ static float to_float(uint32_t b) { return __uint_as_float(b); }
  __device__ __forceinline__ static uint32_t to_bits(float f) { return __float_as_uint(f); }
  __device__ __forceinline__ static uint32_t read(const float* p) { return __float_as_uint(*p); }
  __device__ __forceinline__ static void write(float* p, uint32_t b) { *p = __uint_as_float(b); }
};

template <>
struct Elem<__half> {
  __device__ __forceinline__ static float to_float(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  __device__ __forceinline__ static uint32_t to_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }
  __device__ __forceinline__ static uint32_t read(const __half* p) { return __half_as_ushort(*p); }
  __device__ __forceinline__ static void write(__half* p, uint32_t b) {
    *p = __ushort_as_half(static_cast<unsigned short>(b));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(uint32_t b) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
  }
  __device__ __forceinline__ static uint32_t to_bits(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
  __device__ __forceinline__ static uint32_t read(const __nv_bfloat16* p) { return __bfloat16_as_ushort(*p); }
  __device__ __forceinline__ static void write(__nv_bfloat16* p, uint32_t b) {
    *p = __ushort_as_bfloat16(static_cast<unsigned short>(b));
  }
};

// A bool mask: one byte, nonzero = keep. Only read.
template <>
struct Elem<uint8_t> {
  __device__ __forceinline__ static float to_float(uint32_t b) { return static_cast<float>(b); }
  __device__ __forceinline__ static uint32_t read(const uint8_t* p) { return *p; }
};

// ---------------------------------------------------------------------------------------------------------
// Reductions over lanes.
// ---------------------------------------------------------------------------------------------------------

struct MaxOp {
  // fmaxf drops a NaN; a softmax row still turns NaN through its sum (exp(NaN - m) is NaN).
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Reduces v over aligned groups of G consecutive lanes (G a power of two <= 32); every lane gets its group's
// result. All 32 lanes of the warp must call it.
template <int G, class Op>
__device__ __forceinline__ float group_reduce(float v, Op op) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

}  // namespace fastattn
