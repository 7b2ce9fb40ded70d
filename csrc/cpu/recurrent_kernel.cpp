// CPU recurrent cell kernels: the pointwise part of one LSTM / GRU / RNN step, forward and backward, per row
// (csrc/recurrent.h has the arguments and the saved values). Rows of half or bfloat16 are converted to float in
// per-row scratch, every loop runs over the H hidden units in the compute type so that it vectorises.
//
// LSTM  (gates i, f, g, o):  c' = s(f) c + s(i) tanh(g),  h' = s(o) tanh(c')             s = sigmoid
// GRU   (gates r, z, n):     r = s(x_r + hh_r), z = s(x_z + hh_z), n = tanh(x_n + r hh_n),  h' = (1 - z) n + z h
// RNN:                       h' = tanh or relu(x + hh)
// with hh = h W_hh^T + b_hh, so the GRU's b_hn sits inside r's product as in torch.nn.GRU.
// LayerNorm-LSTM: the LSTM on pre = x + LN_hh(h W_hh^T) + b, with h' = s(o) tanh(LN_c(c')); LN over the row,
// then its affine pair; its backward is LN's: d_in = rstd (d_hat - mean(d_hat) - hat mean(d_hat hat)).
#include "recurrent_kernel.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "vec_math.h"

namespace fastattn {
namespace {

using cpu::compute_t;
using cpu::convert_row;
using cpu::lane_sums;
using cpu::SlotStage;
using cpu::sigmoid_of;
using cpu::tanh_of;

template <class T> FASTATTN_INLINE const T* row(const void* base, int64_t b, int64_t stride) {
  return base == nullptr ? nullptr : static_cast<const T*>(base) + b * stride;
}
template <class T> FASTATTN_INLINE T* row(void* base, int64_t b, int64_t stride) {
  return base == nullptr ? nullptr : static_cast<T*>(base) + b * stride;
}

inline int gates_of(RecurrentKind kind) { return static_cast<int>(recurrent_gates(kind)); }

// pre[j] = x[j] + hh[j] + b[j] for j < n (b may be null).
template <class C>
FASTATTN_INLINE void sum3(const C* __restrict x, const C* __restrict hh, const C* __restrict b, C* __restrict pre,
                          int64_t n) {
  if (b == nullptr) {
    for (int64_t j = 0; j < n; ++j) pre[j] = x[j] + hh[j];
  } else {
    for (int64_t j = 0; j < n; ++j) pre[j] = x[j] + hh[j] + b[j];
  }
}

// The LayerNorm-LSTM's affine pairs as compute-type rows (an absent weight reads 1, an absent bias 0); LN_ih's only
// when the cell normalises x.
template <class T>
class CellNorms {
 public:
  using C = compute_t<T>;
  CellNorms(const RecurrentCellNorms& n, int64_t H)
      : hh_weight_(affine(n.hh_weight, 4 * H, 1)), hh_bias_(affine(n.hh_bias, 4 * H, 0)),
        c_weight_(affine(n.c_weight, H, 1)), c_bias_(affine(n.c_bias, H, 0)),
        ih_weight_(affine(n.ih_weight, n.normalise_x ? 4 * H : 0, 1)),
        ih_bias_(affine(n.ih_bias, n.normalise_x ? 4 * H : 0, 0)) {}
  const C* hh_weight() const { return hh_weight_.data(); }
  const C* hh_bias() const { return hh_bias_.data(); }
  const C* c_weight() const { return c_weight_.data(); }
  const C* c_bias() const { return c_bias_.data(); }
  const C* ih_weight() const { return ih_weight_.data(); }
  const C* ih_bias() const { return ih_bias_.data(); }

 private:
  static std::vector<C> affine(const void* v, int64_t n, double absent) {
    std::vector<C> out(n, C(absent));
    if (v != nullptr && n > 0) convert_row(static_cast<const T*>(v), out.data(), n);
    return out;
  }
  std::vector<C> hh_weight_, hh_bias_, c_weight_, c_bias_, ih_weight_, ih_bias_;
};

// hat[j] = (v[j] - mean) / sqrt(var + eps) over v[0..n); returns 1 / sqrt(var + eps).
template <class C>
FASTATTN_INLINE C normalise(const C* __restrict v, int64_t n, double eps, C* __restrict hat) {
  double sum = 0, unused = 0;
  lane_sums<C>(n, [&](int64_t j, C& a, C&) FASTATTN_INLINE_LAMBDA { a += v[j]; }, sum, unused);
  const C mean = C(sum / n);
  double sq = 0;
  lane_sums<C>(n, [&](int64_t j, C& a, C&) FASTATTN_INLINE_LAMBDA { a += (v[j] - mean) * (v[j] - mean); }, sq,
               unused);
  const C rstd = C(1.0 / std::sqrt(sq / n + eps));
  for (int64_t j = 0; j < n; ++j) hat[j] = (v[j] - mean) * rstd;
  return rstd;
}

// d_in[j] = rstd (d_hat[j] - mean(d_hat) - hat[j] mean(d_hat hat)): LayerNorm's backward to its input.
template <class C>
FASTATTN_INLINE void normalise_backward(const C* __restrict d_hat, const C* __restrict hat, C rstd, int64_t n,
                                        C* __restrict d_in) {
  double sum_d = 0, sum_dh = 0;
  lane_sums<C>(n, [&](int64_t j, C& a, C& b) FASTATTN_INLINE_LAMBDA { a += d_hat[j]; b += d_hat[j] * hat[j]; },
               sum_d, sum_dh);
  const C mean_d = C(sum_d / n), mean_dh = C(sum_dh / n);
  for (int64_t j = 0; j < n; ++j) d_in[j] = rstd * (d_hat[j] - mean_d - hat[j] * mean_dh);
}

// pre[j] = x[j] + hat[j] w[j] + bias[j] + b[j] for j < n (b may be null).
template <class C>
FASTATTN_INLINE void affine_sum(const C* __restrict x, const C* __restrict hat, const C* __restrict w,
                                const C* __restrict bias, const C* __restrict b, C* __restrict pre, int64_t n) {
  if (b == nullptr) {
    for (int64_t j = 0; j < n; ++j) pre[j] = x[j] + hat[j] * w[j] + bias[j];
  } else {
    for (int64_t j = 0; j < n; ++j) pre[j] = x[j] + hat[j] * w[j] + bias[j] + b[j];
  }
}

// The LSTM cell on hidden units [j0, j1) of one row: pre(k) is gate pre-activation k < 4H (gates i, f, g, o). c'
// goes to c_new, with kWithH h' = s(o) tanh(c') to h, with kKeepGates the activated gates to gates (4H). One
// branch-free loop, so that it vectorises.
template <bool kWithH, bool kKeepGates, class C, class Pre>
FASTATTN_INLINE void lstm_cell_row(const Pre& pre, const C* __restrict c_prev, int64_t H, int64_t j0, int64_t j1,
                                   C* __restrict gates, C* __restrict c_new, C* __restrict h) {
  for (int64_t j = j0; j < j1; ++j) {
    const C i = sigmoid_of(pre(j)), f = sigmoid_of(pre(H + j)), g = tanh_of(pre(2 * H + j));
    const C o = sigmoid_of(pre(3 * H + j));
    const C c = f * c_prev[j] + i * g;
    c_new[j] = c;
    if constexpr (kWithH) h[j] = o * tanh_of(c);
    if constexpr (kKeepGates) {
      gates[j] = i;
      gates[H + j] = f;
      gates[2 * H + j] = g;
      gates[3 * H + j] = o;
    }
  }
}

// The plain LSTM's cell on x + hh (+ b), units [j0, j1), gates kept when `gates` is not null.
template <class C>
FASTATTN_INLINE void lstm_row(const C* __restrict x, const C* __restrict hh, const C* __restrict b,
                              const C* __restrict c_prev, int64_t H, int64_t j0, int64_t j1, C* __restrict gates,
                              C* __restrict c_new, C* __restrict h) {
  const auto with_b = [&](int64_t k) FASTATTN_INLINE_LAMBDA { return x[k] + hh[k] + b[k]; };
  const auto without_b = [&](int64_t k) FASTATTN_INLINE_LAMBDA { return x[k] + hh[k]; };
  if (gates != nullptr) {
    b != nullptr ? lstm_cell_row<true, true>(with_b, c_prev, H, j0, j1, gates, c_new, h)
                 : lstm_cell_row<true, true>(without_b, c_prev, H, j0, j1, gates, c_new, h);
  } else {
    b != nullptr ? lstm_cell_row<true, false>(with_b, c_prev, H, j0, j1, gates, c_new, h)
                 : lstm_cell_row<true, false>(without_b, c_prev, H, j0, j1, gates, c_new, h);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------------------

// Rows [row_begin, row_end), hidden units [j0, j1) of them (all H for the LayerNorm-LSTM, whose norms span the row).
template <class T>
FASTATTN_INLINE void forward_rows(const RecurrentStepForwardArgs& a, int64_t row_begin, int64_t row_end, int64_t j0,
                                  int64_t j1) {
  using C = compute_t<T>;
  const int64_t H = a.hidden, G = gates_of(a.kind), GH = G * H, n = j1 - j0, width = recurrent_saved_width(a.kind, H);
  // Slots: 0 x, 1 hh, 2 b_hh, 3 h_prev, 4 h out; plus compute-type work rows (pre-activations, h).
  SlotStage<T> scratch(GH, 5);
  std::vector<C> pre(GH), h_work(H);
  const C* b = scratch.load(static_cast<const T*>(a.b_hh), 2, GH);
  const bool layernorm = a.kind == RecurrentKind::kLayerNormLstm, lstm = recurrent_has_cell(a.kind);
  std::optional<CellNorms<T>> norms;
  std::vector<C> gates_work(lstm ? GH : 0), hh_hat_work(layernorm ? GH : 0), c_hat_work(layernorm ? H : 0);
  std::vector<C> x_work(layernorm && a.norms.normalise_x ? GH : 0);
  if (layernorm) norms.emplace(a.norms, H);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const bool live = a.lengths == nullptr || a.step < a.lengths[r];
    T* h_new = row<T>(a.h_new, r, H);
    T* out = row<T>(a.out, r, a.out_stride);
    C* c_new = row<C>(a.c_new, r, H);
    const C* c_prev = row<C>(a.c_prev, r, H);
    C* saved = row<C>(a.saved, r, width);
    if (!live) {  // the state carries over, the output is 0
      if (c_new != nullptr) std::copy(c_prev + j0, c_prev + j1, c_new + j0);
      if (!a.project) std::copy(row<T>(a.h_prev, r, H) + j0, row<T>(a.h_prev, r, H) + j1, h_new + j0);
      if (out != nullptr) std::fill(out + j0, out + j1, T(0));
      if (saved != nullptr) {  // the units of each H-wide block, and the LayerNorm-LSTM's two rstd (all units)
        for (int64_t g = 0; g < width / H; ++g) std::fill(saved + g * H + j0, saved + g * H + j1, C(0));
        std::fill(saved + width / H * H, saved + width, C(0));
      }
      continue;
    }
    C* h = std::is_same_v<T, C> ? reinterpret_cast<C*>(h_new) : h_work.data();  // h' straight into h_new
    const C* x = scratch.load(row<T>(a.x, r, a.x_stride), 0, GH);
    const C* hh = scratch.load(row<T>(a.hh, r, GH), 1, GH);
    if (layernorm && a.norms.normalise_x) {  // x = LN_ih(x)
      normalise(x, GH, a.norms.eps, x_work.data());
      const C *w = norms->ih_weight(), *bias = norms->ih_bias();
      for (int64_t j = 0; j < GH; ++j) x_work[j] = x_work[j] * w[j] + bias[j];
      x = x_work.data();
    }
    if (layernorm) {  // pre = x + LN_hh(hh) + b
      C* hh_hat = saved != nullptr ? saved + GH : hh_hat_work.data();
      const C rstd = normalise(hh, GH, a.norms.eps, hh_hat);
      if (saved != nullptr) saved[2 * GH + H] = rstd;
      affine_sum(x, hh_hat, norms->hh_weight(), norms->hh_bias(), b, pre.data(), GH);
    } else if (a.kind != RecurrentKind::kLstm) {
      for (int64_t g = 0; g < (a.kind == RecurrentKind::kGru ? 2 : 1); ++g) {  // GRU: r and z; RNN: the one gate
        const int64_t at = g * H + j0;
        sum3(x + at, hh + at, b == nullptr ? nullptr : b + at, pre.data() + at, n);
      }
    }
    if (a.kind == RecurrentKind::kLstm) {
      lstm_row(x, hh, b, c_prev, H, j0, j1, saved, c_new, h);
    } else if (layernorm) {
      C* gates = saved != nullptr ? saved : gates_work.data();
      const C* p = pre.data();
      lstm_cell_row<false, true>([p](int64_t k) FASTATTN_INLINE_LAMBDA { return p[k]; }, c_prev, H, 0, H, gates, c_new,
                                 h);
      // h = o tanh(LN_c(c'))
      C* c_hat = saved != nullptr ? saved + 2 * GH : c_hat_work.data();
      const C rstd = normalise(c_new, H, a.norms.eps, c_hat);
      if (saved != nullptr) saved[2 * GH + H + 1] = rstd;
      const C *w = norms->c_weight(), *bias = norms->c_bias(), *o = gates + 3 * H;
      for (int64_t j = 0; j < H; ++j) h[j] = o[j] * tanh_of(c_hat[j] * w[j] + bias[j]);
    } else if (a.kind == RecurrentKind::kGru) {
      const C* x_n = scratch.load(row<T>(a.x, r, a.x_stride), 0, GH) + 2 * H;
      const C* hh_n = scratch.load(row<T>(a.hh, r, GH), 1, GH) + 2 * H;
      const C* b_n = b == nullptr ? nullptr : b + 2 * H;
      const C* h_prev = scratch.load(row<T>(a.h_prev, r, H), 3, H);
      for (int64_t j = j0; j < j1; ++j) {
        const C rr = sigmoid_of(pre[j]), z = sigmoid_of(pre[H + j]);
        const C hn = hh_n[j] + (b_n == nullptr ? C(0) : b_n[j]);
        const C n = tanh_of(x_n[j] + rr * hn);
        h[j] = (C(1) - z) * n + z * h_prev[j];
        if (saved != nullptr) {
          saved[j] = rr;
          saved[H + j] = z;
          saved[2 * H + j] = n;
          saved[3 * H + j] = hn;
        }
      }
    } else if (a.kind == RecurrentKind::kRnnTanh) {
      for (int64_t j = j0; j < j1; ++j) h[j] = tanh_of(pre[j]);
    } else {
      for (int64_t j = j0; j < j1; ++j) h[j] = std::max(pre[j], C(0));
    }
    if constexpr (!std::is_same_v<T, C>) convert_row(h + j0, h_new + j0, n);
    if (out != nullptr) std::copy(h_new + j0, h_new + j1, out + j0);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------------------

// One live row of the LayerNorm-LSTM's backward: from dh (the gradient reaching h', output's included) and dc
// (reaching c'), the gradients of the gate pre-activations d_pre (= of x and b), of LN_c's output d_cn, of c_prev
// (dc_prev, may alias dc) and of hh (d_hh, through LN_hh). saved as forward_rows wrote it.
template <class T, class C>
FASTATTN_INLINE void layernorm_lstm_backward_row(const C* dh, const C* dc, const C* saved, const C* c_prev,
                                                 const CellNorms<T>& norms, int64_t H, C* d_hat, C* dc_norm, C* d_pre,
                                                 C* d_cn, C* dc_prev, C* d_hh) {
  const int64_t GH = 4 * H;
  const C *si = saved, *sf = si + H, *sg = sf + H, *so = sg + H, *hh_hat = saved + GH, *c_hat = saved + 2 * GH;
  const C rstd_hh = saved[2 * GH + H], rstd_c = saved[2 * GH + H + 1];
  const C *cw = norms.c_weight(), *cb = norms.c_bias();
  for (int64_t j = 0; j < H; ++j) {  // through h = o tanh(cn), cn = LN_c(c')
    const C o = so[j], tcn = tanh_of(c_hat[j] * cw[j] + cb[j]);
    d_cn[j] = dh[j] * o * (C(1) - tcn * tcn);
    d_hat[j] = d_cn[j] * cw[j];
    d_pre[3 * H + j] = dh[j] * tcn * o * (C(1) - o);
  }
  normalise_backward(d_hat, c_hat, rstd_c, H, dc_norm);
  for (int64_t j = 0; j < H; ++j) {
    const C i = si[j], f = sf[j], g = sg[j], dcj = dc[j] + dc_norm[j];
    d_pre[j] = dcj * g * i * (C(1) - i);
    d_pre[H + j] = dcj * c_prev[j] * f * (C(1) - f);
    d_pre[2 * H + j] = dcj * i * (C(1) - g * g);
    dc_prev[j] = dcj * f;
  }
  const C* hw = norms.hh_weight();
  for (int64_t j = 0; j < GH; ++j) d_hat[j] = d_pre[j] * hw[j];
  normalise_backward(d_hat, hh_hat, rstd_hh, GH, d_hh);
}

// The plain LSTM's backward on units [j0, j1) of one row: from dh (reaching h', output's included) and dc (reaching
// c') the gradients of the gate pre-activations d_pre (4H) and of c_prev, dc_prev (may be dc itself: each j reads
// dc[j] before writing dc_prev[j], hence ivdep rather than __restrict on the two).
template <class C>
FASTATTN_INLINE void lstm_backward_row(const C* __restrict dh, const C* dc, const C* __restrict saved,
                                       const C* __restrict c_prev, const C* __restrict c_new, int64_t H, int64_t j0,
                                       int64_t j1, C* __restrict d_pre, C* dc_prev) {
  const C *si = saved, *sf = si + H, *sg = sf + H, *so = sg + H;
#pragma GCC ivdep
  for (int64_t j = j0; j < j1; ++j) {
    const C i = si[j], f = sf[j], g = sg[j], o = so[j];
    const C tc = tanh_of(c_new[j]);
    const C dcj = dc[j] + dh[j] * o * (C(1) - tc * tc);
    d_pre[j] = dcj * g * i * (C(1) - i);
    d_pre[H + j] = dcj * c_prev[j] * f * (C(1) - f);
    d_pre[2 * H + j] = dcj * i * (C(1) - g * g);
    d_pre[3 * H + j] = dh[j] * tc * o * (C(1) - o);
    dc_prev[j] = dcj * f;
  }
}

// The GRU's backward on units [j0, j1) of one row: from dh (reaching h') the gradients of hh (d_hh: r's, z's and
// n's through r hh_n), of x (d_x: n's before r) and the part of dh that passes to h_prev directly (pass = dh z).
template <class C>
FASTATTN_INLINE void gru_backward_row(const C* __restrict dh, const C* __restrict saved, const C* __restrict h_prev,
                                      int64_t H, int64_t j0, int64_t j1, C* __restrict d_hh, C* __restrict d_x,
                                      C* __restrict pass) {
  const C *sr = saved, *sz = sr + H, *sn = sz + H, *shn = sn + H;
  for (int64_t j = j0; j < j1; ++j) {
    const C rr = sr[j], z = sz[j], n = sn[j];
    const C dn_pre = dh[j] * (C(1) - z) * (C(1) - n * n);
    const C dr_pre = dn_pre * shn[j] * rr * (C(1) - rr);
    const C dz_pre = dh[j] * (h_prev[j] - n) * z * (C(1) - z);
    d_hh[j] = d_x[j] = dr_pre;
    d_hh[H + j] = d_x[H + j] = dz_pre;
    d_hh[2 * H + j] = dn_pre * rr;
    d_x[2 * H + j] = dn_pre;
    pass[j] = dh[j] * z;
  }
}

// Rows [row_begin, row_end), hidden units [j0, j1) of them (all H for the LayerNorm-LSTM).
template <class T>
FASTATTN_INLINE void backward_rows(const RecurrentStepBackwardArgs& a, int64_t row_begin, int64_t row_end, int64_t j0,
                                   int64_t j1) {
  using C = compute_t<T>;
  const int64_t H = a.hidden, G = gates_of(a.kind), GH = G * H, W = recurrent_saved_width(a.kind, H), n = j1 - j0;
  // Slots: 0 dh, 1 grad_out, 2 h_prev / h_new, 3 d_hh out, 4 d_x out, 5 dh_pass out.
  SlotStage<T> scratch(GH, 6);
  // Units [j0, j1) of each of `blocks` H-wide blocks of `slot` into dst, when the rows are staged (low precision).
  const auto store = [&](T* dst, int slot, int64_t blocks) {
    if constexpr (SlotStage<T>::kStaged) {
      const C* src = scratch.output(dst, slot);
      for (int64_t g = 0; g < blocks; ++g) convert_row(src + g * H + j0, dst + g * H + j0, n);
    }
  };
  // Units [j0, j1) of each gate of a (B, G*H) row set to 0.
  const auto zero_gates = [&](T* dst) {
    for (int64_t g = 0; g < G; ++g) std::fill(dst + g * H + j0, dst + g * H + j1, T(0));
  };
  std::vector<C> dh_work(H);
  const bool layernorm = a.kind == RecurrentKind::kLayerNormLstm;
  std::optional<CellNorms<T>> norms;
  std::vector<C> d_hat_work(layernorm ? GH : 0), dc_work(layernorm ? H : 0);
  if (layernorm) norms.emplace(a.norms, H);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const bool live = a.lengths == nullptr || a.step < a.lengths[r];
    const T* dh_in = row<T>(a.dh, r, H);
    T* d_hh_row = row<T>(a.d_hh, r, GH);
    T* d_x_row = row<T>(a.d_x, r, a.d_x_stride);
    T* pass_row = row<T>(a.dh_pass, r, H);
    const C* dc = row<C>(a.dc, r, H);
    C* dc_prev = row<C>(a.dc_prev, r, H);
    if (!live) {  // nothing flows into this step's gates; the state's gradients pass through
      zero_gates(d_hh_row);
      if (d_x_row != nullptr) zero_gates(d_x_row);
      if (pass_row != nullptr) std::copy(dh_in + j0, dh_in + j1, pass_row + j0);
      if (dc_prev != nullptr && dc_prev != dc) std::copy(dc + j0, dc + j1, dc_prev + j0);
      if (a.d_cn != nullptr) std::fill(row<C>(a.d_cn, r, H) + j0, row<C>(a.d_cn, r, H) + j1, C(0));
      continue;
    }
    C* dh = dh_work.data();
    const C* dh_c = scratch.load(dh_in, 0, H);
    const C* g_out = scratch.load(row<T>(a.grad_out, r, a.grad_out_stride), 1, H);
    if (g_out == nullptr) {
      std::copy(dh_c + j0, dh_c + j1, dh + j0);
    } else {
      for (int64_t j = j0; j < j1; ++j) dh[j] = dh_c[j] + g_out[j];
    }
    const C* saved = row<C>(a.saved, r, W);
    C* d_hh = scratch.output(d_hh_row, 3);
    if (layernorm) {
      layernorm_lstm_backward_row(dh, dc, saved, row<C>(a.c_prev, r, H), *norms, H, d_hat_work.data(),
                                  dc_work.data(), scratch.output(d_x_row, 4), row<C>(a.d_cn, r, H), dc_prev, d_hh);
      store(d_x_row, 4, G);
    } else if (a.kind == RecurrentKind::kLstm) {
      lstm_backward_row(dh, dc, saved, row<C>(a.c_prev, r, H), row<C>(a.c_new, r, H), H, j0, j1, d_hh, dc_prev);
    } else if (a.kind == RecurrentKind::kGru) {
      const C* h_prev = scratch.load(row<T>(a.h_prev, r, H), 2, H);
      C* d_x = scratch.output(d_x_row, 4);
      C* pass = scratch.output(pass_row, 5);
      gru_backward_row(dh, saved, h_prev, H, j0, j1, d_hh, d_x, pass);
      store(d_x_row, 4, G);
      store(pass_row, 5, 1);
    } else {
      const C* h_new = scratch.load(row<T>(a.h_new, r, H), 2, H);
      if (a.kind == RecurrentKind::kRnnTanh) {
        for (int64_t j = j0; j < j1; ++j) d_hh[j] = dh[j] * (C(1) - h_new[j] * h_new[j]);
      } else {
        for (int64_t j = j0; j < j1; ++j) d_hh[j] = h_new[j] > C(0) ? dh[j] : C(0);
      }
    }
    store(d_hh_row, 3, G);
    if (pass_row != nullptr && a.kind != RecurrentKind::kGru) std::fill(pass_row + j0, pass_row + j1, T(0));
  }
}

// Non-template entry points, one pair per dtype: target_clones needs plain functions.
#define FASTATTN_DEFINE_ENTRY_POINTS(T, name)                                                                \
  FASTATTN_TARGET_CLONES void forward_##name(const RecurrentStepForwardArgs& a, int64_t begin, int64_t end,      \
                                              int64_t j0, int64_t j1) {                                      \
    forward_rows<T>(a, begin, end, j0, j1);                                                                  \
  }                                                                                                          \
  FASTATTN_TARGET_CLONES void backward_##name(const RecurrentStepBackwardArgs& a, int64_t begin, int64_t end,    \
                                               int64_t j0, int64_t j1) {                                     \
    backward_rows<T>(a, begin, end, j0, j1);                                                                 \
  }

FASTATTN_DEFINE_ENTRY_POINTS(c10::Half, half)
FASTATTN_DEFINE_ENTRY_POINTS(c10::BFloat16, bfloat16)
FASTATTN_DEFINE_ENTRY_POINTS(float, float)
FASTATTN_DEFINE_ENTRY_POINTS(double, double)
#undef FASTATTN_DEFINE_ENTRY_POINTS

}  // namespace

void recurrent_step_forward_cpu_rows(const RecurrentStepForwardArgs& args, int64_t row_begin, int64_t row_end) {
  recurrent_step_forward_cpu_units(args, row_begin, row_end, 0, args.hidden);
}

void recurrent_step_forward_cpu_units(const RecurrentStepForwardArgs& args, int64_t row_begin, int64_t row_end,
                                      int64_t unit_begin, int64_t unit_end) {
  switch (args.dtype) {
    case Dtype::kHalf: return forward_half(args, row_begin, row_end, unit_begin, unit_end);
    case Dtype::kBFloat16: return forward_bfloat16(args, row_begin, row_end, unit_begin, unit_end);
    case Dtype::kFloat: return forward_float(args, row_begin, row_end, unit_begin, unit_end);
    case Dtype::kDouble: return forward_double(args, row_begin, row_end, unit_begin, unit_end);
  }
}

void recurrent_step_backward_cpu_rows(const RecurrentStepBackwardArgs& args, int64_t row_begin, int64_t row_end) {
  recurrent_step_backward_cpu_units(args, row_begin, row_end, 0, args.hidden);
}

void recurrent_step_backward_cpu_units(const RecurrentStepBackwardArgs& args, int64_t row_begin, int64_t row_end,
                                       int64_t unit_begin, int64_t unit_end) {
  switch (args.dtype) {
    case Dtype::kHalf: return backward_half(args, row_begin, row_end, unit_begin, unit_end);
    case Dtype::kBFloat16: return backward_bfloat16(args, row_begin, row_end, unit_begin, unit_end);
    case Dtype::kFloat: return backward_float(args, row_begin, row_end, unit_begin, unit_end);
    case Dtype::kDouble: return backward_double(args, row_begin, row_end, unit_begin, unit_end);
  }
}

}  // namespace fastattn
