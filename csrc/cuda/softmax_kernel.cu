// CUDA softmax / log-softmax kernels, forward and backward, on raw pointers (the torch binding is
// csrc/cuda/softmax.cpp; keeping torch headers out of this file keeps its compile short).
//
// Forward, per row of z = x * scale + mask (entries hidden by a bool mask or the causal mask are -inf):
//
//     m = max_j z_j,   l = sum_j exp(z_j - m),   softmax_j = exp(z_j - m) / l,   log-softmax_j = (z_j - m) - log l
//
// with m replaced by 0 when it is -inf (a fully masked row: l = 0, softmax 0, log-softmax -inf, never NaN).
// A NaN or +inf score makes l NaN, and with it the whole row, as in torch.
//
// Backward, with y the forward output and g the incoming gradient:
//
//     softmax:      dx_j = scale * y_j * (g_j - sum_k g_k y_k)
//     log-softmax:  dx_j = scale * (g_j - exp(y_j) * sum_k g_k),   exactly 0 where y_j = -inf
//
// All arithmetic is in float32. Three kernel shapes, chosen by row length (see forward_dispatch and
// backward_dispatch at the end of the file):
//
//   rows kernel, G <= 32  a group of G lanes of a warp per row (G = 1 .. 32), several rows per block; the
//                         row lives in registers; reductions are warp shuffles.
//   rows kernel, G > 32   one block of G threads per row, the row in registers; reductions go through
//                         shared memory.
//   looped kernel         one block per row of any length: an online pass keeps each thread's running max
//                         and rescaled running sum, then a second pass re-reads the row (mostly from L2)
//                         and writes it.
//
// Memory layout. A row is cut into chunks of VEC = 16 / sizeof(T) elements that are 16-byte aligned in x:
// chunk c covers columns [c * VEC - shift, c * VEC - shift + VEC), where shift is the misalignment of the
// row's first element in elements. A chunk that lies wholly inside the row is read with one 16-byte load;
// the row's first and last chunks fall back to scalar accesses. Thread t of a row's group of G owns chunks
// t, t + G, t + 2G, ..., so each load instruction of a warp reads consecutive 16-byte pieces. The output (and
// a unit-stride mask) is accessed with vectors too when it shares x's alignment, element by element when
// not (e.g. a strided x whose rows start unaligned while the contiguous output's do not).
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../softmax.h"
#include "elements.h"
#include "softmax_kernel.h"

namespace fastattn {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// The stored type of a mask element, by mask kind (kNone: never read).
template <typename T, MaskKind MK>
struct MaskElem {
  using type = uint8_t;
};
template <typename T>
struct MaskElem<T, MaskKind::kSame> {
  using type = T;
};
template <typename T>
struct MaskElem<T, MaskKind::kFloat> {
  using type = float;
};

// N consecutive elements of type T held as raw 32-bit words (element k in bytes [k * size, (k+1) * size)),
// so that 16-bit data sits packed in registers and moves with vector loads and stores.
template <typename T, int N>
struct Pack {
  static constexpr int kSize = int(sizeof(T));
  static constexpr int kBytes = N * kSize;
  static_assert(kBytes % 4 == 0 && (kBytes <= 16 || kBytes % 16 == 0), "Pack: unsupported size");
  static constexpr int kWords = kBytes / 4;
  static constexpr int kAlign = kBytes < 16 ? kBytes : 16;  // the alignment load() and store() need
  uint32_t w[kWords];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0;
  }
  // The bits of element k (k is a compile-time constant after unrolling, so this is register shuffling).
  __device__ __forceinline__ uint32_t bits(int k) const {
    const uint32_t word = w[k * kSize / 4];
    if constexpr (kSize == 4) {
      return word;
    } else {
      return (word >> (8 * (k * kSize % 4))) & ((1u << (8 * kSize)) - 1u);
    }
  }
  // Sets element k's bits; the pack must have been cleared.
  __device__ __forceinline__ void or_bits(int k, uint32_t b) { w[k * kSize / 4] |= b << (8 * (k * kSize % 4)); }
  __device__ __forceinline__ float get(int k) const { return Elem<T>::to_float(bits(k)); }
  __device__ __forceinline__ void set(int k, float f) { or_bits(k, Elem<T>::to_bits(f)); }

  // Vector load from p (kAlign-aligned). kStream marks the last read of the data (evict first from the
  // caches); otherwise the read-only path.
  template <bool kStream>
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kBytes == 4) {
      const auto* q = reinterpret_cast<const unsigned int*>(p);
      if constexpr (kStream) w[0] = __ldcs(q); else w[0] = __ldg(q);
    } else if constexpr (kBytes == 8) {
      const auto* q = reinterpret_cast<const uint2*>(p);
      uint2 v;
      if constexpr (kStream) v = __ldcs(q); else v = __ldg(q);
      w[0] = v.x;
      w[1] = v.y;
    } else {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) {
        const auto* q = reinterpret_cast<const uint4*>(p) + i;
        uint4 v;
        if constexpr (kStream) v = __ldcs(q); else v = __ldg(q);
        w[4 * i] = v.x;
        w[4 * i + 1] = v.y;
        w[4 * i + 2] = v.z;
        w[4 * i + 3] = v.w;
      }
    }
  }

  // 16-byte vector store to p (used for outputs only, so kBytes is 16). kStream: streaming store.
  template <bool kStream>
  __device__ __forceinline__ void store(T* p) const {
    static_assert(kBytes == 16, "Pack::store: outputs are stored 16 bytes at a time");
    auto* q = reinterpret_cast<uint4*>(p);
    const uint4 v = make_uint4(w[0], w[1], w[2], w[3]);
    if constexpr (kStream) __stcs(q, v); else *q = v;
  }
};

// The first column of chunk c of a row whose first element is `shift` elements past a 16-byte boundary.
template <typename T, typename I>
__device__ __forceinline__ I chunk_col(I c, int shift) {
  return c * kVec<T> - shift;
}

// exp in float32. 16-bit outputs use the hardware exp (relative error about 2^-21 over the arguments that
// matter, far below their rounding); float32 outputs use the accurate expf, as torch does.
template <typename T>
__device__ __forceinline__ float exp_for(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return expf(v);
  } else {
    return __expf(v);
  }
}

// q = a / b and rem = a % b for non-negative a, b; 32-bit division when both fit (the usual case).
__device__ __forceinline__ int64_t divmod(int64_t a, int64_t b, int64_t& rem) {
  if (((a | b) >> 32) == 0) {
    const uint32_t q = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    rem = a - static_cast<int64_t>(q) * b;
    return q;
  }
  const int64_t q = a / b;
  rem = a - q * b;
  return q;
}

// Blocks per SM asked of ptxas (__launch_bounds__) for the big blocks: two of 512 threads (at most 64
// registers a thread), three of 256 (85 registers), so that a block-per-row kernel overlaps one row's
// reductions with another row's memory traffic. Smaller blocks fit several to an SM anyway.
constexpr int min_blocks(int threads) { return threads >= 512 ? 2 : threads >= 256 ? 3 : 1; }

// ---------------------------------------------------------------------------------------------------------
// Reductions over the G threads of a row.
// ---------------------------------------------------------------------------------------------------------

// Reduces v over the G threads of a row: a lane group when G <= 32, else the whole block (blockDim.x == G).
// buf: G / 32 floats of shared memory, used by this one call only (so no barrier is needed after it).
template <int G, class Op>
__device__ __forceinline__ float row_reduce(float v, Op op, float* buf) {
  v = group_reduce<(G < 32 ? G : 32)>(v, op);
  if constexpr (G > 32) {
    constexpr int kWarps = G / 32;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    // Every group of kWarps lanes reads all the partial results, so every lane ends with the total.
    v = group_reduce<kWarps>(buf[lane % kWarps], op);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------------------

struct ForwardParams {
  const void* x;        // (d0, d1, d2, n) with strides (xs0, xs1, xs2, 1)
  const void* mask;     // (d0, d1, d2, n) with strides (ms0, ms1, ms2, ms3); unused for MaskKind::kNone
  void* out;            // contiguous (rows, n)
  int64_t rows;         // d0 * d1 * d2
  int64_t row_begin;    // the first row of this launch (launches split only past the grid limit)
  int64_t d1, d2, n;
  int64_t xs0, xs1, xs2;
  int64_t ms0, ms1, ms2, ms3;
  float scale;          // z = x * scale (+ mask)
  bool causal;          // column j of row i2 is masked when j > i2 + n - d2
  bool log;             // log-softmax instead of softmax
};

// One row of the forward problem as a thread sees it: its pointers, its kept columns and its alignment.
// I: the type of column indices (int where the row fits registers, saving registers; else int64_t).
template <typename T, MaskKind MK, typename I>
struct ForwardRow {
  using M = typename MaskElem<T, MK>::type;
  static constexpr int VEC = kVec<T>;

  const T* x;       // column 0 of the row in x
  const M* mask;    // column 0 of the row in the mask (null for kNone)
  T* out;           // column 0 of the row in out
  I n;              // the row length; 0 for a row past the end (nothing is read or written)
  I hi;             // the last kept column: n - 1, lowered by the causal mask; -1 keeps nothing
  int64_t ms3;      // the mask's column stride (0 = one value per row)
  float scale;
  int shift;        // x's misalignment in elements: chunk c starts at column c * VEC - shift
  bool out_vec;     // out has x's alignment: whole chunks are stored with one 16-byte store
  bool mask_vec;    // the mask has unit column stride and x's alignment: whole chunks are one vector load

  __device__ __forceinline__ ForwardRow(const ForwardParams& p, int64_t row) {
    const bool valid = row < p.rows;
    if (!valid) row = p.rows - 1;  // keep the pointers inside the tensors; n = 0 below disables every access
    int64_t i1, i2;
    const int64_t i0 = divmod(divmod(row, p.d2, i2), p.d1, i1);
    x = static_cast<const T*>(p.x) + (i0 * p.xs0 + i1 * p.xs1 + i2 * p.xs2);
    out = static_cast<T*>(p.out) + row * p.n;
    n = static_cast<I>(valid ? p.n : 0);
    int64_t last = n - 1;
    if (p.causal && i2 + p.n - p.d2 < last) last = i2 + p.n - p.d2 < -1 ? -1 : i2 + p.n - p.d2;
    hi = static_cast<I>(last);
    scale = p.scale;
    const uintptr_t x_addr = reinterpret_cast<uintptr_t>(x);
    shift = static_cast<int>((x_addr % 16) / sizeof(T));
    out_vec = reinterpret_cast<uintptr_t>(out) % 16 == x_addr % 16;
    if constexpr (MK != MaskKind::kNone) {
      mask = static_cast<const M*>(p.mask) + (i0 * p.ms0 + i1 * p.ms1 + i2 * p.ms2);
      ms3 = p.ms3;
      // Chunk c of the mask starts at mask + c * VEC - shift: aligned for every c iff it is for c = 0.
      mask_vec = ms3 == 1 && (reinterpret_cast<uintptr_t>(mask) - shift * sizeof(M)) % Pack<M, VEC>::kAlign == 0;
    } else {
      mask = nullptr;
      ms3 = 0;
      mask_vec = false;
    }
  }

  // Scores z of the chunk starting at column col0; -inf where masked or outside [0, n).
  template <bool kStream = false>
  __device__ __forceinline__ void load(I col0, float (&z)[VEC]) const {
    if (col0 > hi) {  // wholly masked (causal) or past the row's end: no memory traffic
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = -kInf;
      return;
    }
    const bool whole = col0 >= 0 && col0 + VEC <= n;
    Pack<T, VEC> xv;
    if (whole) {
      xv.template load<kStream>(x + col0);
    } else {
      xv.clear();
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const I j = col0 + k;
        if (j >= 0 && j <= hi) xv.or_bits(k, Elem<T>::read(x + j));
      }
    }
    Pack<M, VEC> mv;
    if constexpr (MK != MaskKind::kNone) {
      if (whole && mask_vec) {
        mv.template load<false>(mask + col0);  // a broadcast mask is shared by other rows: keep it cached
      } else {
        mv.clear();
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const I j = col0 + k;
          if (j >= 0 && j <= hi) mv.or_bits(k, Elem<M>::read(mask + j * ms3));
        }
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const I j = col0 + k;
      float v = __fmul_rn(xv.get(k), scale);  // rounded as torch rounds x * scale (no fused multiply-add)
      if constexpr (MK == MaskKind::kBool) {
        v = mv.bits(k) != 0 ? v : -kInf;
      } else if constexpr (MK != MaskKind::kNone) {
        v += mv.get(k);
      }
      z[k] = (j >= 0 && j <= hi) ? v : -kInf;
    }
  }

  // Writes the chunk starting at column col0 (the columns inside [0, n)).
  template <bool kStream = false>
  __device__ __forceinline__ void store(I col0, const float (&y)[VEC]) const {
    if (col0 >= n) return;
    Pack<T, VEC> o;
    o.clear();
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.set(k, y[k]);
    if (out_vec && col0 >= 0 && col0 + VEC <= n) {
      o.template store<kStream>(out + col0);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const I j = col0 + k;
        if (j >= 0 && j < n) Elem<T>::write(out + j, o.bits(k));
      }
    }
  }
};

// Rows held in registers: G threads per row (G <= 32: a lane group, ROWS rows per block; G > 32: the whole
// block, ROWS = 1), each thread holding CH chunks of VEC scores. The launcher guarantees
// n + shift <= G * CH * VEC for every row.
template <typename T, MaskKind MK, int G, int ROWS, int CH>
__global__ void __launch_bounds__(G * ROWS, min_blocks(G * ROWS)) softmax_forward_rows_kernel(const ForwardParams p) {
  constexpr int VEC = kVec<T>;
  constexpr int kWarps = G > 32 ? G / 32 : 1;
  __shared__ float max_buf[kWarps];  // used only when G > 32
  __shared__ float sum_buf[kWarps];
  const int t = threadIdx.x % G;  // this thread's place in its row's group
  const int64_t row = p.row_begin + static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / G;
  const ForwardRow<T, MK, int> r(p, row);  // rows past the end read and write nothing but join the reductions

  float z[CH][VEC];
  float m = -kInf;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    r.load(chunk_col<T>(t + c * G, r.shift), z[c]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) m = fmaxf(m, z[c][k]);
  }
  m = row_reduce<G>(m, MaxOp(), max_buf);
  const float m0 = m == -kInf ? 0.0f : m;  // fully masked row: exp(-inf - 0) = 0 rather than exp(NaN)

  float l = 0.0f;
  if (p.log) {  // keep z - m for the output
#pragma unroll
    for (int c = 0; c < CH; ++c) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        z[c][k] -= m0;
        l += exp_for<T>(z[c][k]);
      }
    }
  } else {  // keep exp(z - m) for the output
#pragma unroll
    for (int c = 0; c < CH; ++c) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        z[c][k] = exp_for<T>(z[c][k] - m0);
        l += z[c][k];
      }
    }
  }
  l = row_reduce<G>(l, SumOp(), sum_buf);

  // l == 0 exactly when every score is -inf (otherwise the max term contributes exp(0) = 1).
  if (p.log) {
    const float log_l = l == 0.0f ? kInf : logf(l);  // fully masked: (-inf) - inf = -inf, not NaN
#pragma unroll
    for (int c = 0; c < CH; ++c) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[c][k] -= log_l;
    }
  } else {
    const float inv_l = l == 0.0f ? 0.0f : 1.0f / l;  // fully masked: 0 * 0 = 0
#pragma unroll
    for (int c = 0; c < CH; ++c) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[c][k] *= inv_l;
    }
  }
#pragma unroll
  for (int c = 0; c < CH; ++c) r.store(chunk_col<T>(t + c * G, r.shift), z[c]);
}

// Rows of any length: one block of BLOCK threads per row, U chunks per thread per step.
// Pass 1 (online): each thread keeps the running max m of the scores it has seen and their sum l of
// exp(z - m), rescaled by exp(m_old - m_new) whenever m grows; the block then combines the (m, l) pairs.
// Pass 2 re-reads the row (from L2 when the rows in flight fit there) and writes the output.
template <typename T, MaskKind MK, int BLOCK, int U>
__global__ void __launch_bounds__(BLOCK, min_blocks(BLOCK)) softmax_forward_looped_kernel(const ForwardParams p) {
  constexpr int VEC = kVec<T>;
  __shared__ float max_buf[BLOCK / 32];
  __shared__ float sum_buf[BLOCK / 32];
  const ForwardRow<T, MK, int64_t> r(p, p.row_begin + blockIdx.x);
  // Chunks holding a kept column (pass 1) and holding any column (pass 2).
  const int64_t kept_chunks = r.hi < 0 ? 0 : (r.hi + r.shift) / VEC + 1;
  const int64_t all_chunks = (r.n + r.shift + VEC - 1) / VEC;

  float m = -kInf;
  float l = 0.0f;
  for (int64_t base = 0; base < kept_chunks; base += BLOCK * U) {
    float z[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) r.load(chunk_col<T>(base + u * BLOCK + threadIdx.x, r.shift), z[u]);
    float m_new = m;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) m_new = fmaxf(m_new, z[u][k]);
    }
    const float m0 = m_new == -kInf ? 0.0f : m_new;  // never -inf - -inf
    float s = 0.0f;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += exp_for<T>(z[u][k] - m0);
    }
    l = l * exp_for<T>(m - m0) + s;  // m = -inf: exp(-inf) = 0 (l was 0); m = m_new = +inf: NaN, as it must
    m = m_new;
  }
  const float m_row = row_reduce<BLOCK>(m, MaxOp(), max_buf);
  const float m0 = m_row == -kInf ? 0.0f : m_row;
  // A thread that saw only -inf has m = -inf, l = 0: it adds 0 * exp(-inf) = 0.
  const float l_row = row_reduce<BLOCK>(l * exp_for<T>(m - m0), SumOp(), sum_buf);

  const float log_l = l_row == 0.0f ? kInf : logf(l_row);
  const float inv_l = l_row == 0.0f ? 0.0f : 1.0f / l_row;
  for (int64_t base = 0; base < all_chunks; base += BLOCK * U) {
    float z[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      r.template load<true>(chunk_col<T>(base + u * BLOCK + threadIdx.x, r.shift), z[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        z[u][k] = p.log ? (z[u][k] - m0) - log_l : exp_for<T>(z[u][k] - m0) * inv_l;
      }
      r.template store<true>(chunk_col<T>(base + u * BLOCK + threadIdx.x, r.shift), z[u]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------------------

struct BackwardParams {
  const void* grad;     // (rows, n) with strides (gs, 1)
  const void* out;      // contiguous (rows, n): the forward output y
  void* grad_x;         // contiguous (rows, n)
  int64_t rows;
  int64_t row_begin;    // the first row of this launch
  int64_t n;
  int64_t gs;           // grad's row stride
  float scale;
  bool log;
};

// One row of the backward problem; chunks are aligned to y (the contiguous forward output). I: as in
// ForwardRow.
template <typename T, typename I>
struct BackwardRow {
  static constexpr int VEC = kVec<T>;

  const T* g;      // column 0 of the row in grad
  const T* y;      // column 0 of the row in out
  T* dx;           // column 0 of the row in grad_x
  I n;            // the row length; 0 for a row past the end
  int shift;       // y's misalignment in elements
  bool g_vec;      // grad has y's alignment
  bool dx_vec;     // grad_x has y's alignment

  __device__ __forceinline__ BackwardRow(const BackwardParams& p, int64_t row) {
    const bool valid = row < p.rows;
    if (!valid) row = p.rows - 1;
    g = static_cast<const T*>(p.grad) + row * p.gs;
    y = static_cast<const T*>(p.out) + row * p.n;
    dx = static_cast<T*>(p.grad_x) + row * p.n;
    n = static_cast<I>(valid ? p.n : 0);
    const uintptr_t y_addr = reinterpret_cast<uintptr_t>(y);
    shift = static_cast<int>((y_addr % 16) / sizeof(T));
    g_vec = reinterpret_cast<uintptr_t>(g) % 16 == y_addr % 16;
    dx_vec = reinterpret_cast<uintptr_t>(dx) % 16 == y_addr % 16;
  }

  // g and y of the chunk starting at column col0; zeros outside [0, n) (they add nothing to the sums).
  template <bool kStream = false>
  __device__ __forceinline__ void load(I col0, Pack<T, VEC>& gv, Pack<T, VEC>& yv) const {
    gv.clear();
    yv.clear();
    if (col0 >= n) return;
    const bool whole = col0 >= 0 && col0 + VEC <= n;
    if (whole) {
      yv.template load<kStream>(y + col0);
      if (g_vec) {
        gv.template load<kStream>(g + col0);
        return;
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const I j = col0 + k;
      if (j >= 0 && j < n) {
        if (!whole) yv.or_bits(k, Elem<T>::read(y + j));
        gv.or_bits(k, Elem<T>::read(g + j));
      }
    }
  }

  template <bool kStream = false>
  __device__ __forceinline__ void store(I col0, const float (&d)[VEC]) const {
    if (col0 >= n) return;
    Pack<T, VEC> o;
    o.clear();
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.set(k, d[k]);
    if (dx_vec && col0 >= 0 && col0 + VEC <= n) {
      o.template store<kStream>(dx + col0);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const I j = col0 + k;
        if (j >= 0 && j < n) Elem<T>::write(dx + j, o.bits(k));
      }
    }
  }
};

// The per-element term whose row sum the backward needs: g * y (softmax) or g (log-softmax).
__device__ __forceinline__ float backward_term(float g, float y, bool log) { return log ? g : g * y; }

// dx from g, y and the row sum s of backward_term.
template <typename T>
__device__ __forceinline__ float backward_value(float g, float y, float s, float scale, bool log) {
  if (log) return y == -kInf ? 0.0f : (g - exp_for<T>(y) * s) * scale;
  return y * (g - s) * scale;
}

// Rows held in registers (as packed raw bits): G threads per row, CH chunks of g and y per thread; the
// launcher guarantees n + shift <= G * CH * VEC.
template <typename T, int G, int ROWS, int CH>
__global__ void __launch_bounds__(G * ROWS, min_blocks(G * ROWS)) softmax_backward_rows_kernel(const BackwardParams p) {
  constexpr int VEC = kVec<T>;
  constexpr int kWarps = G > 32 ? G / 32 : 1;
  __shared__ float sum_buf[kWarps];  // used only when G > 32
  const int t = threadIdx.x % G;
  const int64_t row = p.row_begin + static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / G;
  const BackwardRow<T, int> r(p, row);

  Pack<T, VEC> gv[CH], yv[CH];
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    r.load(chunk_col<T>(t + c * G, r.shift), gv[c], yv[c]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += backward_term(gv[c].get(k), yv[c].get(k), p.log);
  }
  s = row_reduce<G>(s, SumOp(), sum_buf);
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    float d[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) d[k] = backward_value<T>(gv[c].get(k), yv[c].get(k), s, p.scale, p.log);
    r.store(chunk_col<T>(t + c * G, r.shift), d);
  }
}

// Rows of any length: one block per row; pass 1 sums, pass 2 re-reads g and y and writes dx.
template <typename T, int BLOCK, int U>
__global__ void __launch_bounds__(BLOCK, min_blocks(BLOCK)) softmax_backward_looped_kernel(const BackwardParams p) {
  constexpr int VEC = kVec<T>;
  __shared__ float sum_buf[BLOCK / 32];
  const BackwardRow<T, int64_t> r(p, p.row_begin + blockIdx.x);
  const int64_t chunks = (r.n + r.shift + VEC - 1) / VEC;

  float s = 0.0f;
  for (int64_t base = 0; base < chunks; base += BLOCK * U) {
    Pack<T, VEC> gv[U], yv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) r.load(chunk_col<T>(base + u * BLOCK + threadIdx.x, r.shift), gv[u], yv[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += backward_term(gv[u].get(k), yv[u].get(k), p.log);
    }
  }
  s = row_reduce<BLOCK>(s, SumOp(), sum_buf);

  for (int64_t base = 0; base < chunks; base += BLOCK * U) {
    Pack<T, VEC> gv[U], yv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      r.template load<true>(chunk_col<T>(base + u * BLOCK + threadIdx.x, r.shift), gv[u], yv[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float d[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) d[k] = backward_value<T>(gv[u].get(k), yv[u].get(k), s, p.scale, p.log);
      r.template store<true>(chunk_col<T>(base + u * BLOCK + threadIdx.x, r.shift), d);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------------------------

constexpr int kGroupBlock = 128;    // threads per block of the lane-group (G <= 32) rows kernels
constexpr int kLoopedBlock = 256;   // threads per block of the looped kernels
constexpr int kLoopedElements = 16; // elements per thread per step of the looped kernels

// Rows per block of a rows kernel with G threads per row.
constexpr int rows_per_block(int G) { return G <= 32 ? kGroupBlock / G : 1; }

// Launches kernel over p.rows rows, rows_per_block per block of `threads`, splitting past the grid limit.
template <class Params>
cudaError_t launch_rows(void (*kernel)(Params), Params p, int rows_per_block, int threads, cudaStream_t stream) {
  constexpr int64_t kMaxBlocks = 0x7fffffff;  // gridDim.x limit
  const int64_t rows_per_launch = kMaxBlocks * rows_per_block;
  for (int64_t begin = 0; begin < p.rows; begin += rows_per_launch) {
    p.row_begin = begin;
    const int64_t rows = p.rows - begin < rows_per_launch ? p.rows - begin : rows_per_launch;
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    kernel<<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(p);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

// The kernel for rows of `chunks` chunks (n + pad elements rounded up to vectors), smallest first:
//   G = 1 .. 32 lanes per row with one chunk each, then a warp per row with 2 .. kWarpCH chunks per lane,
//   then a block of 64 .. 512 threads per row with kBlockCH chunks each, then the looped kernel.
// Launcher: rows<G, CH>() launches a rows kernel, looped() the looped kernel.
template <int kWarpCH, int kBlockCH, class Launcher>
cudaError_t select_kernel(int64_t chunks, const Launcher& launch) {
  if (chunks <= 1) return launch.template rows<1, 1>();
  if (chunks <= 2) return launch.template rows<2, 1>();
  if (chunks <= 4) return launch.template rows<4, 1>();
  if (chunks <= 8) return launch.template rows<8, 1>();
  if (chunks <= 16) return launch.template rows<16, 1>();
  if (chunks <= 32) return launch.template rows<32, 1>();
  if (chunks <= 64) return launch.template rows<32, 2>();
  if (chunks <= 128) return launch.template rows<32, 4>();
  if constexpr (kWarpCH >= 8) {
    if (chunks <= 256) return launch.template rows<32, 8>();
  }
  if constexpr (64 * kBlockCH > 32 * kWarpCH) {  // a block size that adds room over a warp
    if (chunks <= 64 * kBlockCH) return launch.template rows<64, kBlockCH>();
  }
  if (chunks <= 128 * kBlockCH) return launch.template rows<128, kBlockCH>();
  if (chunks <= 256 * kBlockCH) return launch.template rows<256, kBlockCH>();
  if (chunks <= 512 * kBlockCH) return launch.template rows<512, kBlockCH>();
  return launch.looped();
}

template <typename T, MaskKind MK>
struct ForwardLauncher {
  const ForwardParams& p;
  cudaStream_t stream;

  template <int G, int CH>
  cudaError_t rows() const {
    constexpr int ROWS = rows_per_block(G);
    return launch_rows(softmax_forward_rows_kernel<T, MK, G, ROWS, CH>, p, ROWS, G * ROWS, stream);
  }
  cudaError_t looped() const {
    return launch_rows(softmax_forward_looped_kernel<T, MK, kLoopedBlock, kLoopedElements / kVec<T>>, p, 1,
                       kLoopedBlock, stream);
  }
};

template <typename T>
struct BackwardLauncher {
  const BackwardParams& p;
  cudaStream_t stream;

  template <int G, int CH>
  cudaError_t rows() const {
    constexpr int ROWS = rows_per_block(G);
    return launch_rows(softmax_backward_rows_kernel<T, G, ROWS, CH>, p, ROWS, G * ROWS, stream);
  }
  cudaError_t looped() const {
    return launch_rows(softmax_backward_looped_kernel<T, kLoopedBlock, kLoopedElements / kVec<T>>, p, 1,
                       kLoopedBlock, stream);
  }
};

// Forward: a warp-per-row thread holds up to 32 float scores (8 chunks of float, 4 of 16-bit types); a
// block-per-row thread up to 4 chunks (16 floats or 32 16-bit elements), so that at least two 512-thread
// blocks fit an SM. Rows kernels reach 1024 elements with a warp, 8192 (float) or 16384 (16-bit) with a
// block. pad: the most any row's misalignment adds (0 when every row of x starts 16-byte aligned, else
// VEC - 1).
template <typename T, MaskKind MK>
cudaError_t forward_dispatch(const ForwardParams& p, int64_t pad, cudaStream_t stream) {
  constexpr int VEC = kVec<T>;
  return select_kernel<32 / VEC, 4>((p.n + pad + VEC - 1) / VEC, ForwardLauncher<T, MK>{p, stream});
}

// Backward: a thread holds up to 4 chunks each of g and y as packed bits (32 registers): rows kernels reach
// 512 (float) or 1024 (16-bit) elements with a warp, 8192 or 16384 with a block.
template <typename T>
cudaError_t backward_dispatch(const BackwardParams& p, int64_t pad, cudaStream_t stream) {
  constexpr int VEC = kVec<T>;
  return select_kernel<4, 4>((p.n + pad + VEC - 1) / VEC, BackwardLauncher<T>{p, stream});
}

// Whether every row of a tensor whose leading strides are `strides` (for sizes `sizes`) starts 16-byte
// aligned, given its data pointer and element size.
bool rows_aligned(const void* data, int element_size, const int64_t* sizes, const int64_t* strides, int dims) {
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  for (int i = 0; i < dims; ++i) {
    if (sizes[i] > 1 && (strides[i] * element_size) % 16 != 0) return false;
  }
  return true;
}

template <typename T>
cudaError_t forward_typed(const SoftmaxForwardArgs& a, cudaStream_t stream) {
  ForwardParams p{};
  p.x = a.x;
  p.mask = a.mask;
  p.out = a.out;
  p.rows = a.rows();
  p.d1 = a.d1;
  p.d2 = a.d2;
  p.n = a.n;
  p.xs0 = a.x_stride[0];
  p.xs1 = a.x_stride[1];
  p.xs2 = a.x_stride[2];
  if (a.mask_kind != MaskKind::kNone) {
    p.ms0 = a.mask_stride[0];
    p.ms1 = a.mask_stride[1];
    p.ms2 = a.mask_stride[2];
    p.ms3 = a.n > 1 ? a.mask_stride[3] : 0;  // a stride over a dim of size 1 is never used
  }
  p.scale = static_cast<float>(a.scale);
  p.causal = a.causal;
  p.log = a.log;
  const int64_t sizes[3] = {a.d0, a.d1, a.d2};
  const int64_t pad = rows_aligned(a.x, sizeof(T), sizes, a.x_stride, 3) ? 0 : kVec<T> - 1;
  switch (a.mask_kind) {
    case MaskKind::kNone: return forward_dispatch<T, MaskKind::kNone>(p, pad, stream);
    case MaskKind::kBool: return forward_dispatch<T, MaskKind::kBool>(p, pad, stream);
    case MaskKind::kSame: return forward_dispatch<T, MaskKind::kSame>(p, pad, stream);
    case MaskKind::kFloat:  // a float32 mask on float32 x is the same kernel as kSame
      if constexpr (std::is_same_v<T, float>) return forward_dispatch<T, MaskKind::kSame>(p, pad, stream);
      else return forward_dispatch<T, MaskKind::kFloat>(p, pad, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t backward_typed(const SoftmaxBackwardArgs& a, cudaStream_t stream) {
  BackwardParams p{};
  p.grad = a.grad;
  p.out = a.out;
  p.grad_x = a.grad_x;
  p.rows = a.rows;
  p.n = a.n;
  p.gs = a.grad_row_stride;
  p.scale = static_cast<float>(a.scale);
  p.log = a.log;
  const int64_t out_stride = a.n;
  const int64_t pad = rows_aligned(a.out, sizeof(T), &a.rows, &out_stride, 1) ? 0 : kVec<T> - 1;
  return backward_dispatch<T>(p, pad, stream);
}

}  // namespace

cudaError_t softmax_forward_cuda(const SoftmaxForwardArgs& args, cudaStream_t stream) {
  if (args.rows() == 0 || args.n == 0) return cudaSuccess;
  switch (args.dtype) {
    case Dtype::kHalf: return forward_typed<__half>(args, stream);
    case Dtype::kBFloat16: return forward_typed<__nv_bfloat16>(args, stream);
    case Dtype::kFloat: return forward_typed<float>(args, stream);
    default: return cudaErrorInvalidValue;  // float64: refused by the binding before it gets here
  }
}

cudaError_t softmax_backward_cuda(const SoftmaxBackwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.n == 0) return cudaSuccess;
  switch (args.dtype) {
    case Dtype::kHalf: return backward_typed<__half>(args, stream);
    case Dtype::kBFloat16: return backward_typed<__nv_bfloat16>(args, stream);
    case Dtype::kFloat: return backward_typed<float>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastattn
