// CUDA recurrent cell kernels: the pointwise part of one LSTM / GRU / RNN / LayerNorm-LSTM step, forward and backward,
// on raw pointers (arguments and saved values: csrc/recurrent.h; the time loop and the torch binding:
// csrc/recurrent_driver.h, csrc/cuda/recurrent.cpp). The maths of the CPU kernels (csrc/cpu/recurrent_kernel.cpp):
//
//   LSTM  (gates i, f, g, o):  c' = s(f) c + s(i) tanh(g),  h' = s(o) tanh(c')             s = sigmoid
//   GRU   (gates r, z, n):     r = s(x_r + hh_r), z = s(x_z + hh_z), n = tanh(x_n + r hh_n),  h' = (1 - z) n + z h
//   RNN:                       h' = tanh or relu(x + hh)
//   LayerNorm-LSTM:            the LSTM on pre = x + LN_hh(hh) + b, with h' = s(o) tanh(LN_c(c')); LN's backward is
//                              d_in = rstd (d_hat - mean(d_hat) - hat mean(d_hat hat))
//
// with hh = h W_hh^T + b_hh. Arithmetic in float32 for float16, bfloat16 and float32 tensors, in float64 for
// float64; c, the saved values and the cell's gradients are in that compute type.
//
// Kernel shapes:
//   element kernels (LSTM, GRU, RNN)  one thread per element of the flattened (B, H) grid: thread e owns hidden unit
//       j = e % H of row b = e / H, reads its G gate columns j, H + j, ... of x, hh and b_hh and writes the unit's c',
//       h', output, saved values and gradients. Consecutive threads take consecutive units of a row, then of the
//       next row, so each warp's access to a tensor's row is to consecutive addresses (coalesced), and no thread idles
//       whatever H is (a block per row would leave most of a block idle at small H).
//   row kernels (LayerNorm-LSTM)  one block per row (32 .. 512 threads, by H), thread t owning units t, t + blockDim,
//       ... of the row, so that any H runs. The norms' row sums are block reductions: warp shuffles, one partial per
//       warp in shared memory, then shuffles again. Mean and variance are two passes over the row, as on the CPU.
//       Values needed after a reduction are recomputed from the row (in L1 / L2) rather than held in registers,
//       which cannot hold a row of any length.
// A row not live at this step (lengths) is one uniform branch: in the row kernels its whole block skips the
// reductions, so every barrier is reached by all of a block's threads or by none. With a projection (project) such a
// row's h_new is not written, as on the CPU: the driver keeps the state itself.
//
// dc_prev may be dc itself (the driver updates the cell's gradient in place): each element of dc is read, and the
// same element of dc_prev written, only by the thread owning its unit, the write after the last read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../recurrent.h"
#include "recurrent_kernel.h"

namespace fastattn {
namespace {

constexpr int kElementThreads = 256;            // threads per block of the element kernels
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid size cap: beyond it, blocks loop over more elements / rows
constexpr int kMaxRowThreads = 512;             // threads per block of the row kernels
constexpr int kRowBuffers = 4;                  // the row kernels' reduction buffers of 32 values each

// ---------------------------------------------------------------------------------------------------------
// Element types and maths in the compute type C (float, or double for double).
// ---------------------------------------------------------------------------------------------------------

template <class T>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};
template <class T>
using compute_t = typename ComputeOf<T>::type;

__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }

// v rounded to the storage type T (to nearest even).
template <class T, class C>
__device__ __forceinline__ T to_storage(C v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float tanh_of(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_of(double x) { return tanh(x); }
template <class C>
__device__ __forceinline__ C sigmoid_of(C x) {
  return C(1) / (C(1) + exp_of(-x));
}

// p[k] of a T tensor in the compute type, or `absent` when p is null (b_hh, the norms' affine pairs).
template <class T>
__device__ __forceinline__ compute_t<T> load_or(const void* p, int64_t k, compute_t<T> absent) {
  return p == nullptr ? absent : to_compute(static_cast<const T*>(p)[k]);
}

// Row `row` of a (rows, stride) tensor of S, or null for an absent tensor.
template <class S>
__device__ __forceinline__ const S* row_of(const void* base, int64_t row, int64_t stride) {
  return base == nullptr ? nullptr : static_cast<const S*>(base) + row * stride;
}
template <class S>
__device__ __forceinline__ S* row_of(void* base, int64_t row, int64_t stride) {
  return base == nullptr ? nullptr : static_cast<S*>(base) + row * stride;
}

__device__ __forceinline__ bool live_row(const int64_t* lengths, int64_t step, int64_t row) {
  return lengths == nullptr || step < lengths[row];
}

template <RecurrentKind K>
constexpr int64_t kGates = K == RecurrentKind::kGru ? 3 : (K == RecurrentKind::kLstm ? 4 : 1);

// ---------------------------------------------------------------------------------------------------------
// Element kernels: LSTM, GRU, tanh and ReLU RNN.
// ---------------------------------------------------------------------------------------------------------

template <class T, RecurrentKind K>
__global__ void __launch_bounds__(kElementThreads) cell_forward_kernel(const RecurrentStepForwardArgs a) {
  using C = compute_t<T>;
  constexpr int64_t G = kGates<K>;
  constexpr bool kSaves = K == RecurrentKind::kLstm || K == RecurrentKind::kGru;  // 4H values a row
  const int64_t H = a.hidden, total = a.batch * H;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / H, j = e - b * H;
    T* h_new = row_of<T>(a.h_new, b, H);
    T* out = row_of<T>(a.out, b, a.out_stride);
    C* saved = kSaves ? row_of<C>(a.saved, b, 4 * H) : nullptr;
    if (!live_row(a.lengths, a.step, b)) {  // the state carries over, the output is 0
      if constexpr (K == RecurrentKind::kLstm) row_of<C>(a.c_new, b, H)[j] = row_of<C>(a.c_prev, b, H)[j];
      if (!a.project) h_new[j] = row_of<T>(a.h_prev, b, H)[j];
      if (out != nullptr) out[j] = to_storage<T>(C(0));
      if (saved != nullptr) {
        for (int g = 0; g < 4; ++g) saved[g * H + j] = C(0);
      }
      continue;
    }
    const T* x = row_of<T>(a.x, b, a.x_stride) + j;
    const T* hh = row_of<T>(a.hh, b, G * H) + j;
    // Gate g's pre-activation x + hh + b_hh, summed in the CPU kernel's order.
    const auto pre = [&](int g) {
      return to_compute(x[g * H]) + to_compute(hh[g * H]) + load_or<T>(a.b_hh, g * H + j, C(0));
    };
    C h;
    if constexpr (K == RecurrentKind::kLstm) {
      const C i = sigmoid_of(pre(0)), f = sigmoid_of(pre(1)), g = tanh_of(pre(2)), o = sigmoid_of(pre(3));
      const C c = f * row_of<C>(a.c_prev, b, H)[j] + i * g;
      row_of<C>(a.c_new, b, H)[j] = c;
      h = o * tanh_of(c);
      if (saved != nullptr) {
        saved[j] = i;
        saved[H + j] = f;
        saved[2 * H + j] = g;
        saved[3 * H + j] = o;
      }
    } else if constexpr (K == RecurrentKind::kGru) {
      const C r = sigmoid_of(pre(0)), z = sigmoid_of(pre(1));
      const C hn = to_compute(hh[2 * H]) + load_or<T>(a.b_hh, 2 * H + j, C(0));
      const C n = tanh_of(to_compute(x[2 * H]) + r * hn);
      h = (C(1) - z) * n + z * to_compute(row_of<T>(a.h_prev, b, H)[j]);
      if (saved != nullptr) {
        saved[j] = r;
        saved[H + j] = z;
        saved[2 * H + j] = n;
        saved[3 * H + j] = hn;
      }
    } else if constexpr (K == RecurrentKind::kRnnTanh) {
      h = tanh_of(pre(0));
    } else {
      const C v = pre(0);
      h = v < C(0) ? C(0) : v;  // NaN stays NaN, as in torch.relu
    }
    const T hv = to_storage<T>(h);
    h_new[j] = hv;
    if (out != nullptr) out[j] = hv;
  }
}

template <class T, RecurrentKind K>
__global__ void __launch_bounds__(kElementThreads) cell_backward_kernel(const RecurrentStepBackwardArgs a) {
  using C = compute_t<T>;
  constexpr int64_t G = kGates<K>;
  const int64_t H = a.hidden, total = a.batch * H;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / H, j = e - b * H;
    T* d_hh = row_of<T>(a.d_hh, b, G * H) + j;
    T* d_x = row_of<T>(a.d_x, b, a.d_x_stride);  // the GRU's
    T* pass = row_of<T>(a.dh_pass, b, H);
    const C* dc = row_of<C>(a.dc, b, H);  // the LSTM's
    C* dc_prev = row_of<C>(a.dc_prev, b, H);
    const T dh_in = row_of<T>(a.dh, b, H)[j];
    if (!live_row(a.lengths, a.step, b)) {  // nothing flows into this step's gates; the state's gradients pass
      for (int g = 0; g < G; ++g) {
        d_hh[g * H] = to_storage<T>(C(0));
        if (d_x != nullptr) d_x[g * H + j] = to_storage<T>(C(0));
      }
      if (pass != nullptr) pass[j] = dh_in;
      if (dc_prev != nullptr && dc_prev != dc) dc_prev[j] = dc[j];
      continue;
    }
    C dh = to_compute(dh_in);
    if (a.grad_out != nullptr) dh += to_compute(row_of<T>(a.grad_out, b, a.grad_out_stride)[j]);
    C pass_value = C(0);
    if constexpr (K == RecurrentKind::kLstm) {
      const C* s = row_of<C>(a.saved, b, 4 * H) + j;
      const C i = s[0], f = s[H], g = s[2 * H], o = s[3 * H];
      const C tc = tanh_of(row_of<C>(a.c_new, b, H)[j]);
      const C dcj = dc[j] + dh * o * (C(1) - tc * tc);
      d_hh[0] = to_storage<T>(dcj * g * i * (C(1) - i));
      d_hh[H] = to_storage<T>(dcj * row_of<C>(a.c_prev, b, H)[j] * f * (C(1) - f));
      d_hh[2 * H] = to_storage<T>(dcj * i * (C(1) - g * g));
      d_hh[3 * H] = to_storage<T>(dh * tc * o * (C(1) - o));
      dc_prev[j] = dcj * f;  // after the read of dc[j]: dc_prev may be dc
    } else if constexpr (K == RecurrentKind::kGru) {
      const C* s = row_of<C>(a.saved, b, 4 * H) + j;
      const C r = s[0], z = s[H], n = s[2 * H], hn = s[3 * H];
      const C dn_pre = dh * (C(1) - z) * (C(1) - n * n);
      const C dr_pre = dn_pre * hn * r * (C(1) - r);
      const C dz_pre = dh * (to_compute(row_of<T>(a.h_prev, b, H)[j]) - n) * z * (C(1) - z);
      const T dr = to_storage<T>(dr_pre), dz = to_storage<T>(dz_pre);
      d_hh[0] = dr;
      d_hh[H] = dz;
      d_hh[2 * H] = to_storage<T>(dn_pre * r);
      d_x[j] = dr;
      d_x[H + j] = dz;
      d_x[2 * H + j] = to_storage<T>(dn_pre);
      pass_value = dh * z;
    } else {
      const C hn = to_compute(row_of<T>(a.h_new, b, H)[j]);
      if constexpr (K == RecurrentKind::kRnnTanh) {
        d_hh[0] = to_storage<T>(dh * (C(1) - hn * hn));
      } else {
        d_hh[0] = to_storage<T>(hn > C(0) ? dh : C(0));
      }
    }
    if (pass != nullptr) pass[j] = to_storage<T>(pass_value);  // 0 but for the GRU: h_prev reaches h' via W_hh only
  }
}

// ---------------------------------------------------------------------------------------------------------
// Row kernels: the LayerNorm-LSTM.
// ---------------------------------------------------------------------------------------------------------

// v with its 32-bit words exchanged with lane (lane ^ offset): a shuffle of any type of whole words (double too).
template <class V>
__device__ __forceinline__ V shfl_xor(V v, int offset) {
  static_assert(sizeof(V) % 4 == 0, "shuffles move 32-bit words");
  uint32_t w[sizeof(V) / 4];
  memcpy(w, &v, sizeof(V));
#pragma unroll
  for (int i = 0; i < int(sizeof(V) / 4); ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], offset);
  memcpy(&v, w, sizeof(V));
  return v;
}

// Replaces each of v[0 .. N) by its sum over the block, in every thread (the butterfly gives every lane the same
// bits). buf: 32 N values of shared memory that only this call uses until the block's next barrier but one, so no
// barrier is needed after it. Every thread of the block must call it.
template <int N, class C>
__device__ __forceinline__ void block_sums(C (&v)[N], C* buf) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v[n] += shfl_xor(v[n], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) buf[32 * n + warp] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    v[n] = lane < warps ? buf[32 * n + lane] : C(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v[n] += shfl_xor(v[n], offset);
  }
}

// 1 / sqrt(mean + eps), in double as the CPU kernel (once a row).
template <class C>
__device__ __forceinline__ C inverse_std(C sum_of_squares, int64_t n, double eps) {
  return C(1.0 / sqrt(double(sum_of_squares) / double(n) + eps));
}

// One live or dead row of the LayerNorm-LSTM forward (the whole block). buf: kRowBuffers * 32 values.
template <class T>
__device__ __forceinline__ void layernorm_lstm_forward_row(const RecurrentStepForwardArgs& a, int64_t row,
                                                           compute_t<T>* buf) {
  using C = compute_t<T>;
  const int64_t H = a.hidden, GH = 4 * H, W = 9 * H + 2;  // csrc/recurrent.h's recurrent_saved_width
  const int t = threadIdx.x, threads = blockDim.x;
  const C* c_prev = row_of<C>(a.c_prev, row, H);
  C* c_new = row_of<C>(a.c_new, row, H);
  T* h_new = row_of<T>(a.h_new, row, H);
  T* out = row_of<T>(a.out, row, a.out_stride);
  C* saved = row_of<C>(a.saved, row, W);
  if (!live_row(a.lengths, a.step, row)) {  // the state carries over, the output is 0
    for (int64_t j = t; j < H; j += threads) {
      c_new[j] = c_prev[j];
      if (!a.project) h_new[j] = row_of<T>(a.h_prev, row, H)[j];
      if (out != nullptr) out[j] = to_storage<T>(C(0));
    }
    if (saved != nullptr) {
      for (int64_t k = t; k < W; k += threads) saved[k] = C(0);
    }
    return;
  }
  const T* x = row_of<T>(a.x, row, a.x_stride);
  const T* hh = row_of<T>(a.hh, row, GH);
  const RecurrentCellNorms& norms = a.norms;

  // LN_hh's statistics over the row's 4H values of hh: the mean, then the mean squared deviation from it.
  C sum[1] = {C(0)};
  for (int64_t k = t; k < GH; k += threads) sum[0] += to_compute(hh[k]);
  block_sums(sum, buf);
  const C mean = sum[0] / C(GH);
  C squares[1] = {C(0)};
  for (int64_t k = t; k < GH; k += threads) {
    const C d = to_compute(hh[k]) - mean;
    squares[0] += d * d;
  }
  block_sums(squares, buf + 32);
  const C rstd = inverse_std(squares[0], GH, norms.eps);

  // Gate column k's pre-activation x + LN_hh(hh) + b (b_ih + b_hh), with hh's normalised value in hat.
  const auto gate_pre = [&](int64_t k, C& hat) {
    hat = (to_compute(hh[k]) - mean) * rstd;
    return to_compute(x[k]) + hat * load_or<T>(norms.hh_weight, k, C(1)) + load_or<T>(norms.hh_bias, k, C(0)) +
           load_or<T>(a.b_hh, k, C(0));
  };
  // The cell c' (stored in c_new, which the thread re-reads below) and the sum of the row's c' for LN_c.
  C c_sum[1] = {C(0)};
  for (int64_t j = t; j < H; j += threads) {
    C hat[4], pre[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) pre[g] = gate_pre(g * H + j, hat[g]);
    const C i = sigmoid_of(pre[0]), f = sigmoid_of(pre[1]), g = tanh_of(pre[2]), o = sigmoid_of(pre[3]);
    const C c = f * c_prev[j] + i * g;
    c_new[j] = c;
    c_sum[0] += c;
    if (saved != nullptr) {
      saved[j] = i;
      saved[H + j] = f;
      saved[2 * H + j] = g;
      saved[3 * H + j] = o;
#pragma unroll
      for (int q = 0; q < 4; ++q) saved[GH + q * H + j] = hat[q];
    }
  }
  block_sums(c_sum, buf + 64);
  const C mean_c = c_sum[0] / C(H);
  C c_squares[1] = {C(0)};
  for (int64_t j = t; j < H; j += threads) {
    const C d = c_new[j] - mean_c;
    c_squares[0] += d * d;
  }
  block_sums(c_squares, buf + 96);
  const C rstd_c = inverse_std(c_squares[0], H, norms.eps);

  // h' = s(o) tanh(LN_c(c')), o recomputed (cheaper than holding it for any H).
  for (int64_t j = t; j < H; j += threads) {
    const C c_hat = (c_new[j] - mean_c) * rstd_c;
    C unused;
    const C o = sigmoid_of(gate_pre(3 * H + j, unused));
    const T hv =
        to_storage<T>(o * tanh_of(c_hat * load_or<T>(norms.c_weight, j, C(1)) + load_or<T>(norms.c_bias, j, C(0))));
    h_new[j] = hv;
    if (out != nullptr) out[j] = hv;
    if (saved != nullptr) saved[2 * GH + j] = c_hat;
  }
  if (saved != nullptr && t == 0) {
    saved[2 * GH + H] = rstd;
    saved[2 * GH + H + 1] = rstd_c;
  }
}

// One row of the LayerNorm-LSTM backward (the whole block): from dh (+ grad_out) reaching h' and dc reaching c',
// d_cn (LN_c's output), d_x (the gate pre-activations, = of b), dc_prev and d_hh (through LN_hh). buf: 128 values.
template <class T>
__device__ __forceinline__ void layernorm_lstm_backward_row(const RecurrentStepBackwardArgs& a, int64_t row,
                                                            compute_t<T>* buf) {
  using C = compute_t<T>;
  const int64_t H = a.hidden, GH = 4 * H;
  const int t = threadIdx.x, threads = blockDim.x;
  T* d_hh = row_of<T>(a.d_hh, row, GH);
  T* d_x = row_of<T>(a.d_x, row, a.d_x_stride);
  C* d_cn = row_of<C>(a.d_cn, row, H);
  T* pass = row_of<T>(a.dh_pass, row, H);
  const T* dh_in = row_of<T>(a.dh, row, H);
  const C* dc = row_of<C>(a.dc, row, H);
  C* dc_prev = row_of<C>(a.dc_prev, row, H);
  if (!live_row(a.lengths, a.step, row)) {  // nothing flows into this step's gates; the state's gradients pass
    for (int64_t k = t; k < GH; k += threads) {
      d_hh[k] = to_storage<T>(C(0));
      d_x[k] = to_storage<T>(C(0));
    }
    for (int64_t j = t; j < H; j += threads) {
      d_cn[j] = C(0);
      if (pass != nullptr) pass[j] = dh_in[j];
      if (dc_prev != dc) dc_prev[j] = dc[j];
    }
    return;
  }
  const T* grad_out = row_of<T>(a.grad_out, row, a.grad_out_stride);
  const C* saved = row_of<C>(a.saved, row, 9 * H + 2);
  const C *hh_hat = saved + GH, *c_hat = saved + 2 * GH;
  const C rstd_hh = saved[2 * GH + H], rstd_c = saved[2 * GH + H + 1];
  const C* c_prev = row_of<C>(a.c_prev, row, H);
  const RecurrentCellNorms& norms = a.norms;
  const auto dh_of = [&](int64_t j) {  // the gradient reaching h' of unit j, the output's included
    C d = to_compute(dh_in[j]);
    if (grad_out != nullptr) d += to_compute(grad_out[j]);
    return d;
  };
  const auto c_weight = [&](int64_t j) { return load_or<T>(norms.c_weight, j, C(1)); };
  const auto tanh_cn = [&](int64_t j) {  // tanh(LN_c(c')) of unit j
    return tanh_of(c_hat[j] * c_weight(j) + load_or<T>(norms.c_bias, j, C(0)));
  };

  // Through h' = o tanh(cn): d_cn, and LN_c's backward sums of d_hat = d_cn w_c.
  C sums_c[2] = {C(0), C(0)};
  for (int64_t j = t; j < H; j += threads) {
    const C o = saved[3 * H + j], tcn = tanh_cn(j);
    const C dcn = dh_of(j) * o * (C(1) - tcn * tcn);
    d_cn[j] = dcn;  // re-read below by this thread
    const C d_hat = dcn * c_weight(j);
    sums_c[0] += d_hat;
    sums_c[1] += d_hat * c_hat[j];
  }
  block_sums(sums_c, buf);
  const C mean_d_c = sums_c[0] / C(H), mean_dh_c = sums_c[1] / C(H);

  // Unit j's gate pre-activation gradients (d_pre, in gate order) and the gradient reaching c' (returned).
  const auto gate_grads = [&](int64_t j, C(&d_pre)[4]) {
    const C i = saved[j], f = saved[H + j], g = saved[2 * H + j], o = saved[3 * H + j];
    const C dc_norm = rstd_c * (d_cn[j] * c_weight(j) - mean_d_c - c_hat[j] * mean_dh_c);
    const C dcj = dc[j] + dc_norm;
    d_pre[0] = dcj * g * i * (C(1) - i);
    d_pre[1] = dcj * c_prev[j] * f * (C(1) - f);
    d_pre[2] = dcj * i * (C(1) - g * g);
    d_pre[3] = dh_of(j) * tanh_cn(j) * o * (C(1) - o);
    return dcj;
  };
  // d_x, and LN_hh's backward sums of d_hat = d_pre w_hh.
  C sums_hh[2] = {C(0), C(0)};
  for (int64_t j = t; j < H; j += threads) {
    C d_pre[4];
    gate_grads(j, d_pre);
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int64_t k = g * H + j;
      d_x[k] = to_storage<T>(d_pre[g]);
      const C d_hat = d_pre[g] * load_or<T>(norms.hh_weight, k, C(1));
      sums_hh[0] += d_hat;
      sums_hh[1] += d_hat * hh_hat[k];
    }
  }
  block_sums(sums_hh, buf + 64);
  const C mean_d_hh = sums_hh[0] / C(GH), mean_dh_hh = sums_hh[1] / C(GH);

  // d_hh through LN_hh, and dc_prev (written last: it may be dc).
  for (int64_t j = t; j < H; j += threads) {
    C d_pre[4];
    const C dcj = gate_grads(j, d_pre);
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int64_t k = g * H + j;
      const C d_hat = d_pre[g] * load_or<T>(norms.hh_weight, k, C(1));
      d_hh[k] = to_storage<T>(rstd_hh * (d_hat - mean_d_hh - hh_hat[k] * mean_dh_hh));
    }
    dc_prev[j] = dcj * saved[H + j];
    if (pass != nullptr) pass[j] = to_storage<T>(C(0));
  }
}

template <class T>
__global__ void __launch_bounds__(kMaxRowThreads) layernorm_lstm_forward_kernel(const RecurrentStepForwardArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];  // kRowBuffers * 32 values of the compute type
  for (int64_t row = blockIdx.x; row < a.batch; row += gridDim.x) {
    layernorm_lstm_forward_row<T>(a, row, reinterpret_cast<compute_t<T>*>(smem));
  }
}

template <class T>
__global__ void __launch_bounds__(kMaxRowThreads) layernorm_lstm_backward_kernel(const RecurrentStepBackwardArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];  // kRowBuffers * 32 values of the compute type
  for (int64_t row = blockIdx.x; row < a.batch; row += gridDim.x) {
    layernorm_lstm_backward_row<T>(a, row, reinterpret_cast<compute_t<T>*>(smem));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------------------------

unsigned int grid_of(int64_t blocks) { return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks); }

// Threads per block of the row kernels: about 8 of the row's 4H gate columns a thread, 32 .. 512.
int row_threads(int64_t hidden) {
  int threads = 32;
  while (threads < kMaxRowThreads && int64_t(threads) * 8 < 4 * hidden) threads *= 2;
  return threads;
}

// The kernels of one step's direction (Args: forward or backward) and dtype T: the element kernel of kind K, the
// LayerNorm-LSTM's row kernel.
template <class T, RecurrentKind K, class Args>
void (*element_kernel())(Args) {
  if constexpr (std::is_same_v<Args, RecurrentStepForwardArgs>) {
    return cell_forward_kernel<T, K>;
  } else {
    return cell_backward_kernel<T, K>;
  }
}
template <class T, class Args>
void (*row_kernel())(Args) {
  if constexpr (std::is_same_v<Args, RecurrentStepForwardArgs>) {
    return layernorm_lstm_forward_kernel<T>;
  } else {
    return layernorm_lstm_backward_kernel<T>;
  }
}

template <class T, class Args>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  using K = RecurrentKind;
  void (*element)(Args) = nullptr;
  switch (a.kind) {
    case K::kLstm: element = element_kernel<T, K::kLstm, Args>(); break;
    case K::kGru: element = element_kernel<T, K::kGru, Args>(); break;
    case K::kRnnTanh: element = element_kernel<T, K::kRnnTanh, Args>(); break;
    case K::kRnnRelu: element = element_kernel<T, K::kRnnRelu, Args>(); break;
    case K::kLayerNormLstm: break;
  }
  if (element != nullptr) {
    element<<<grid_of((a.batch * a.hidden + kElementThreads - 1) / kElementThreads), kElementThreads, 0, stream>>>(a);
  } else {
    const auto rows = row_kernel<T, Args>();
    const size_t smem = kRowBuffers * 32 * sizeof(compute_t<T>);
    rows<<<grid_of(a.batch), row_threads(a.hidden), smem, stream>>>(a);
  }
  return cudaGetLastError();
}

// Whether every pointer the step reads or writes is there (null only where csrc/recurrent.h allows it).
bool complete(const RecurrentStepForwardArgs& a) {
  const bool cell = recurrent_has_cell(a.kind);
  return a.x != nullptr && a.hh != nullptr && a.h_prev != nullptr && a.h_new != nullptr &&
         (!cell || (a.c_prev != nullptr && a.c_new != nullptr));
}

bool complete(const RecurrentStepBackwardArgs& a) {
  using K = RecurrentKind;
  const K k = a.kind;
  const bool cell = recurrent_has_cell(k), own_d_x = k == K::kGru || k == K::kLayerNormLstm;
  return a.dh != nullptr && a.d_hh != nullptr && (recurrent_saved_width(k, a.hidden) == 0 || a.saved != nullptr) &&
         (!cell || (a.dc != nullptr && a.dc_prev != nullptr && a.c_prev != nullptr)) &&
         (k != K::kLstm || a.c_new != nullptr) && (k != K::kGru || a.h_prev != nullptr) &&
         ((k != K::kRnnTanh && k != K::kRnnRelu) || a.h_new != nullptr) && (!own_d_x || a.d_x != nullptr) &&
         (k != K::kLayerNormLstm || a.d_cn != nullptr);
}

// One step: cudaErrorInvalidValue for arguments the kernels do not take, cudaSuccess when there is nothing to do.
template <class Args>
cudaError_t step(const Args& a, cudaStream_t stream) {
  const int dtype = int(a.dtype), kind = int(a.kind);
  if (dtype < int(Dtype::kHalf) || dtype > int(Dtype::kDouble) || kind < int(RecurrentKind::kLstm) ||
      kind > int(RecurrentKind::kLayerNormLstm) || a.batch < 0 || a.hidden < 0) {
    return cudaErrorInvalidValue;
  }
  if (a.batch == 0 || a.hidden == 0) return cudaSuccess;
  if (!complete(a)) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case Dtype::kHalf: return launch<__half>(a, stream);
    case Dtype::kBFloat16: return launch<__nv_bfloat16>(a, stream);
    case Dtype::kFloat: return launch<float>(a, stream);
    case Dtype::kDouble: return launch<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t recurrent_step_forward_cuda(const RecurrentStepForwardArgs& args, cudaStream_t stream) {
  return step(args, stream);
}

cudaError_t recurrent_step_backward_cuda(const RecurrentStepBackwardArgs& args, cudaStream_t stream) {
  return step(args, stream);
}

}  // namespace fastattn
