// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a counter-based
// generator, so any element's random bits are a pure function of (seed, its index) and the backward
// regenerates the forward's dropout mask instead of storing it. Host and device code; no torch headers.
//
// Attention dropout (csrc/attention.h): probability (b, h, i, j) of the (B, Hq, Sq, Sk) matrix is kept iff
//   philox(key = (seed mod 2^32, seed / 2^32), counter = (j / 4, i, b * Hq + h, 0))[j % 4] >= floor(p * 2^32)
// and kept values are scaled by 1 / (1 - p). fastattn/reference.py (philox, attention_dropout_mask) and the
// Triton kernels compute the same bits.
//
// Elementwise dropout (norms, positional encodings) of a (rows, n) tensor: element (r, c) is kept iff
//   philox(key = (seed mod 2^32, seed / 2^32), counter = (c / 4, r mod 2^32, r / 2^32, 1))[c % 4] >= floor(p * 2^32)
// (the last counter word, 1, keeps these bits apart from attention's); reference.elementwise_dropout_mask.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTATTN_HOST_DEVICE inline
#endif

namespace fastattn {

struct Philox4 {
  uint32_t x[4];
};

// The four 32-bit words of Philox4x32 with 10 rounds for `counter` under the 64-bit key (key0, key1).
FASTATTN_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t key0,
                                           uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // round multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key0 += kWeyl0;
      key1 += kWeyl1;
    }
    const uint64_t p0 = uint64_t(kMul0) * c0, p1 = uint64_t(kMul1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ key0, n2 = uint32_t(p0 >> 32) ^ c3 ^ key1;
    c0 = n0;
    c1 = uint32_t(p1);
    c2 = n2;
    c3 = uint32_t(p0);
  }
  return {{c0, c1, c2, c3}};
}

// Dropout with probability p from a 64-bit seed, as the kernels take it.
struct Dropout {
  bool on;             // p > 0
  uint32_t threshold;  // floor(p * 2^32): an element is dropped iff its Philox word is below it
  double scale;        // 1 / (1 - p), applied to kept elements
  uint32_t key0, key1; // the seed's low and high 32 bits
};

inline Dropout make_dropout(double p, int64_t seed) {
  Dropout d{};
  d.on = p > 0.0;
  if (d.on) {
    d.threshold = static_cast<uint32_t>(p * 4294967296.0);  // exact product, then floored
    d.scale = 1.0 / (1.0 - p);
    d.key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
    d.key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  }
  return d;
}

// The four Philox words of elementwise dropout for columns 4 * group .. 4 * group + 3 of row `row`.
FASTATTN_HOST_DEVICE Philox4 elementwise_dropout_bits(const Dropout& d, uint64_t row, uint32_t group) {
  return philox4x32_10(group, static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), 1u, d.key0, d.key1);
}

}  // namespace fastattn
