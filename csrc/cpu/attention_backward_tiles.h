// CPU attention backward kernel (BackwardKernel<T>) and the macro that instantiates its entry points for one dtype.
// Each dtype's entry points live in their own translation unit (attention_backward_<dtype>.cpp) so that the four,
// each compiled three times by target_clones, build in parallel; attention_backward_kernel.cpp dispatches on dtype.
#pragma once
#include "attention_kernel.h"

#include "attention_tiles.h"

namespace fastattn {
namespace attention_cpu {

// The backward for storage type T. It drives a ForwardKernel for the score tiles (set_block, score_tile and
// mask_tile: S^T (kn, kBQ) of one query block and one key tile, masked exactly as in the forward) and turns
// them into P^T = exp(S^T - lse) (one query per lane; 0 for a query whose lse is -inf and for padding lanes),
// dP^T = (V dO^T) * Z^T and dS^T = P^T * (dP^T - delta), all with the forward's GEMM micro-kernel; Z are the
// dropout factors, regenerated from the seed.
//   Pass 1 (run_kv): task = (batch, kv head, key tile); over the query heads of the group and the query blocks
//     the window lets see the tile: dV += (P Z)^T dO, dK += dS^T Q; then dK *= scale (Z: dropout factors).
//   Pass 2 (run_q): task = the forward's (batch, query head, query block); over the key tiles it sees:
//     dQ += dS K; then dQ *= scale.
//   Fused (run_fused): task = (batch, kv head); pass 1 over every key tile in order, adding each dS tile's
//     dQ += dS K into a (group, seq_q, d_pad) accumulator on the way: 5 GEMMs per tile instead of the two
//     passes' 7 (pass 2 recomputes S and dP), but only batch x kv heads tasks to share among threads.
// Accumulation in C (float, double for double); each task's result depends only on its inputs, so the outputs
// are bitwise the same from run to run, and for any number of threads within one scheme (which the thread
// count picks: attention_backward_cpu_fused_tasks).
template <class T>
class BackwardKernel {
  using C = compute_t<T>;
  static constexpr int64_t kW = kLanes<C>, kBQ = kBlockQ<C>, kBK = kBlockK;
  static constexpr C kInf = std::numeric_limits<C>::infinity();
  static constexpr bool kConvert = !std::is_same_v<T, C>;

 public:
  FASTATTN_INLINE BackwardKernel(const AttentionBackwardArgs& args, bool fused)
      : g_(args),
        a_(args.forward),
        f_(args.forward),
        d_(a_.head_dim),
        dv_(a_.head_dim_v),
        d_pad_(ceil_div(d_, kW) * kW),
        dv_pad_(ceil_div(dv_, kW) * kW),
        k_blocks_(ceil_div(a_.seq_k, kBK)),
        do_t_(dv_ * kBQ),
        do_rows_(kBQ * dv_pad_),
        q_rows_(kBQ * d_pad_),
        k_tile_(kBK * d_pad_),
        v_tile_(kConvert ? kBK * dv_ : 0),
        dp_(kBK * kBQ),
        acc_k_(kBK * d_pad_),
        acc_v_(kBK * dv_pad_),
        acc_q_(kBQ * d_pad_),
        dq_acc_(fused ? a_.heads_q / std::max<int64_t>(a_.heads_kv, 1) * a_.seq_q * d_pad_ : 0),
        row_(std::max(d_pad_, dv_pad_)) {
    std::fill(ones_, ones_ + kOnes, C(1));
  }

  // Pass 1, task t: batch b, kv head hk, keys [k0, k0 + kBK).
  FASTATTN_INLINE void run_kv(int64_t task) {
    const int64_t bh = task / k_blocks_;
    key_tile(bh / a_.heads_kv, bh % a_.heads_kv, (task % k_blocks_) * kBK, nullptr);
  }

  // The fused backward, task t: batch b, kv head hk.
  FASTATTN_INLINE void run_fused(int64_t task) {
    const int64_t b = task / a_.heads_kv, hk = task % a_.heads_kv;
    const int64_t group = a_.heads_q / a_.heads_kv;
    C* dq_acc = dq_acc_.get();
    std::fill(dq_acc, dq_acc + group * a_.seq_q * d_pad_, C(0));
    for (int64_t k0 = 0; k0 < a_.seq_k; k0 += kBK) key_tile(b, hk, k0, dq_acc);
    const int64_t row0 = (b * a_.heads_q + hk * group) * a_.seq_q;
    store_rows(dq_acc, d_pad_, static_cast<T*>(g_.dq) + row0 * d_, d_, group * a_.seq_q, static_cast<C>(a_.scale));
  }

  // Pass 2, task t: the forward's task t (batch, query head, query block).
  FASTATTN_INLINE void run_q(int64_t task) {
    const int64_t q_blocks = f_.q_blocks_;
    const int64_t bh = task / q_blocks, r = task % q_blocks;
    const int64_t qb = r % 2 == 0 ? r / 2 : q_blocks - 1 - r / 2;
    const int64_t b = bh / a_.heads_q, h = bh % a_.heads_q;
    f_.set_block(b, h, qb * kBQ);
    load_block(false);
    const int64_t q0 = f_.q0_, qn = f_.qn_;
    std::fill(acc_q_.get(), acc_q_.get() + qn * d_pad_, C(0));
    const int64_t diag = a_.diagonal, wl = a_.window_left, wr = a_.window_right;
    const int64_t k_begin = wl >= 0 ? std::max<int64_t>(0, q0 + diag - wl) : 0;
    const int64_t k_end = wr >= 0 ? std::min<int64_t>(a_.seq_k, q0 + qn - 1 + diag + wr + 1) : a_.seq_k;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
      const int64_t kn = std::min(kBK, k_end - k0);
      const C* v_rows;
      int64_t v_row_stride;
      load_v(k0, kn, v_rows, v_row_stride);
      tile_grads(k0, kn, v_rows, v_row_stride, false);
      const C* k_rows;
      int64_t k_row_stride;
      load_k(k0, kn, k_rows, k_row_stride);
      add_dq(qn, kn, k_rows, k_row_stride, acc_q_.get());
    }
    const int64_t row0 = (b * a_.heads_q + h) * a_.seq_q + q0;
    store_rows(acc_q_.get(), d_pad_, static_cast<T*>(g_.dq) + row0 * d_, d_, qn, static_cast<C>(a_.scale));
  }

 private:
  // The key tile [k0, k0 + kn) of batch b, kv head hk: dK and dV over the query heads of the group and the query
  // blocks the window lets see the tile; with dq_acc (group, seq_q, d_pad), also their dQ += dS K.
  FASTATTN_INLINE void key_tile(int64_t b, int64_t hk, int64_t k0, C* dq_acc) {
    const int64_t kn = std::min(kBK, a_.seq_k - k0);
    const int64_t group = a_.heads_q / a_.heads_kv;
    std::fill(acc_k_.get(), acc_k_.get() + kn * d_pad_, C(0));
    std::fill(acc_v_.get(), acc_v_.get() + kn * dv_pad_, C(0));
    // Queries that may see a key of the tile: k - diag - wr <= i <= k - diag + wl.
    const int64_t diag = a_.diagonal, wl = a_.window_left, wr = a_.window_right;
    const int64_t q_begin = wr >= 0 ? std::max<int64_t>(0, k0 - diag - wr) : 0;
    const int64_t q_end = wl >= 0 ? std::min<int64_t>(a_.seq_q, k0 + kn - 1 - diag + wl + 1) : a_.seq_q;
    bool loaded = false;
    const C *v_rows = nullptr, *k_rows = nullptr;
    int64_t v_row_stride = 0, k_row_stride = 0;
    for (int64_t h = hk * group; h < (hk + 1) * group && q_begin < q_end; ++h) {
      for (int64_t q0 = q_begin / kBQ * kBQ; q0 < q_end; q0 += kBQ) {
        f_.set_block(b, h, q0);
        if (!loaded) {  // after set_block: the tile's rows come from the block's kv head
          loaded = true;
          load_v(k0, kn, v_rows, v_row_stride);
          if (dq_acc) load_k(k0, kn, k_rows, k_row_stride);
        }
        load_block(true);
        const int64_t qn = f_.qn_;
        tile_grads(k0, kn, v_rows, v_row_stride, true);
        // dV (kn, dv_pad) += P^T (kn, qn) dO (qn, dv_pad); dK (kn, d_pad) += dS^T (kn, qn) Q (qn, d_pad).
        gemm<C, true>(kn, dv_pad_ / kW, qn, f_.s_.get(), kBQ, 1, do_rows_.get(), dv_pad_, acc_v_.get(), dv_pad_,
                      ones_);
        gemm<C, true>(kn, d_pad_ / kW, qn, dp_.get(), kBQ, 1, q_rows_.get(), d_pad_, acc_k_.get(), d_pad_, ones_);
        if (dq_acc) add_dq(qn, kn, k_rows, k_row_stride, dq_acc + ((h - hk * group) * a_.seq_q + q0) * d_pad_);
      }
    }
    const int64_t row0 = (b * a_.heads_kv + hk) * a_.seq_k + k0;
    store_rows(acc_k_.get(), d_pad_, static_cast<T*>(g_.dk) + row0 * d_, d_, kn, static_cast<C>(a_.scale));
    store_rows(acc_v_.get(), dv_pad_, static_cast<T*>(g_.dv) + row0 * dv_, dv_, kn, C(1));
  }

  // dq (qn, d_pad) += dS (qn, kn) K (kn, d_pad), dS read from dS^T in dp_.
  FASTATTN_INLINE void add_dq(int64_t qn, int64_t kn, const C* k_rows, int64_t k_row_stride, C* dq) {
    gemm<C, true>(qn, d_pad_ / kW, kn, dp_.get(), 1, kBQ, k_rows, k_row_stride, dq, d_pad_, ones_);
  }

  // K rows [k0, k0 + kn) of the current kv head as C in whole vectors: in place when they are, else converted
  // to k_tile (kn, d_pad) with zero padding.
  FASTATTN_INLINE void load_k(int64_t k0, int64_t kn, const C*& rows, int64_t& stride) {
    if (!kConvert && d_ % kW == 0) {
      rows = reinterpret_cast<const C*>(f_.k_head_ + k0 * a_.k_stride[2]);
      stride = a_.k_stride[2];
      return;
    }
    for (int64_t j = 0; j < kn; ++j) {
      convert_row(f_.k_head_ + (k0 + j) * a_.k_stride[2], k_tile_.get() + j * d_pad_, d_);
    }
    rows = k_tile_.get();
    stride = d_pad_;
  }

  // V rows [k0, k0 + kn) of the current kv head as C: in place, or converted to v_tile (kn, dv).
  FASTATTN_INLINE void load_v(int64_t k0, int64_t kn, const C*& rows, int64_t& stride) {
    if constexpr (kConvert) {
      for (int64_t j = 0; j < kn; ++j) {
        convert_row(f_.v_head_ + (k0 + j) * a_.v_stride[2], v_tile_.get() + j * dv_, dv_);
      }
      rows = v_tile_.get();
      stride = dv_;
    } else {
      rows = reinterpret_cast<const C*>(f_.v_head_ + k0 * a_.v_stride[2]);
      stride = a_.v_stride[2];
    }
  }

  // For the ForwardKernel's current block: dO^T (dv, kBQ) zero past qn, the shift of P (lse; +inf for a query
  // that sees no key and for padding lanes, so that their P is 0) and delta (0 for padding lanes); with rows,
  // also dO (qn, dv_pad) and Q (qn, d_pad) as zero-padded rows.
  FASTATTN_INLINE void load_block(bool rows) {
    const int64_t b = f_.b_, h = f_.h_, q0 = f_.q0_, qn = f_.qn_, nq_pad = f_.nq_pad_;
    const T* grad_out = static_cast<const T*>(g_.grad_out) + b * g_.grad_out_stride[0] + h * g_.grad_out_stride[1] +
                        q0 * g_.grad_out_stride[2];
    const int64_t stat0 = (b * a_.heads_q + h) * a_.seq_q + q0;
    const C* lse = static_cast<const C*>(g_.lse) + stat0;
    const C* delta = static_cast<const C*>(g_.delta) + stat0;
    C* do_t = do_t_.get();
    for (int64_t i = 0; i < qn; ++i) {
      const T* src = grad_out + i * g_.grad_out_stride[2];
      const C* row;
      if constexpr (kConvert) {
        convert_row(src, row_.get(), dv_);
        row = row_.get();
      } else {
        row = src;
      }
      for (int64_t d = 0; d < dv_; ++d) do_t[d * kBQ + i] = row[d];
      if (rows) {
        C* dst = do_rows_.get() + i * dv_pad_;
        std::copy(row, row + dv_, dst);
        std::fill(dst + dv_, dst + dv_pad_, C(0));
      }
    }
    for (int64_t d = 0; d < dv_; ++d) std::fill(do_t + d * kBQ + qn, do_t + d * kBQ + nq_pad, C(0));
    for (int64_t i = 0; i < kBQ; ++i) {
      shift_[i] = i < qn && lse[i] != -kInf ? lse[i] : kInf;
      delta_[i] = i < qn ? delta[i] : C(0);
    }
    if (rows) {
      const T* q = static_cast<const T*>(a_.q) + b * a_.q_stride[0] + h * a_.q_stride[1] + q0 * a_.q_stride[2];
      for (int64_t i = 0; i < qn; ++i) {
        C* dst = q_rows_.get() + i * d_pad_;
        convert_row(q + i * a_.q_stride[2], dst, d_);
        std::fill(dst + d_, dst + d_pad_, C(0));
      }
    }
  }

  // The key tile [k0, k0 + kn) of the current block: P^T over the forward kernel's s_ (times the dropout factors
  // when `kept`: the P of dV) and dS^T in dp_.
  FASTATTN_INLINE void tile_grads(int64_t k0, int64_t kn, const C* v_rows, int64_t v_row_stride, bool kept) {
    const int64_t nq_pad = f_.nq_pad_;
    f_.score_tile(k0, kn);
    f_.mask_tile(k0, kn);
    C* st = f_.s_.get();
    for (int64_t j = 0; j < kn; ++j) {
      C* __restrict srow = st + j * kBQ;
      for (int64_t i = 0; i < nq_pad; ++i) srow[i] = exp_of(srow[i] - shift_[i]);
    }
    // dP^T (kn, nq_pad) = V (kn, dv) dO^T (dv, nq_pad), times the dropout factors.
    C* dp = dp_.get();
    gemm<C, false>(kn, f_.nq_vectors_, dv_, v_rows, v_row_stride, 1, do_t_.get(), kBQ, dp, kBQ, nullptr);
    if (a_.dropout.on) {
      f_.dropout_tile(k0, kn);
      f_.apply_dropout(dp, kn);
    }
    for (int64_t j = 0; j < kn; ++j) {
      const C* __restrict prow = st + j * kBQ;
      C* __restrict drow = dp + j * kBQ;
      for (int64_t i = 0; i < nq_pad; ++i) drow[i] = prow[i] * (drow[i] - delta_[i]);
    }
    if (kept && a_.dropout.on) f_.apply_dropout(st, kn);
  }

  // dst rows (n, cols) in T = scale * src rows (n, ld) in C.
  FASTATTN_INLINE void store_rows(const C* src, int64_t ld, T* dst, int64_t cols, int64_t n, C scale) {
    for (int64_t i = 0; i < n; ++i) {
      C* tmp = row_.get();
      for (int64_t d = 0; d < cols; ++d) tmp[d] = src[i * ld + d] * scale;
      convert_row(tmp, dst + i * cols, cols);
    }
  }

  static constexpr int64_t kOnes = kBK > kBQ ? kBK : kBQ;

  const AttentionBackwardArgs& g_;
  const AttentionForwardArgs& a_;
  ForwardKernel<T> f_;
  const int64_t d_, dv_, d_pad_, dv_pad_;
  const int64_t k_blocks_;   // key tiles per (batch, kv head)
  Scratch<C> do_t_;          // dO^T (dv, kBQ), zero beyond the block's queries
  Scratch<C> do_rows_;       // dO (kBQ, dv_pad), pass 1
  Scratch<C> q_rows_;        // Q (kBQ, d_pad), pass 1
  Scratch<C> k_tile_;        // (kBK, d_pad), a converted or padded K tile (dQ)
  Scratch<C> v_tile_;        // (kBK, dv), a converted V tile
  Scratch<C> dp_;            // dP^T, then dS^T (kBK, kBQ)
  Scratch<C> acc_k_;         // (kBK, d_pad), dK of pass 1's tile
  Scratch<C> acc_v_;         // (kBK, dv_pad), dV of pass 1's tile
  Scratch<C> acc_q_;         // (kBQ, d_pad), dQ of pass 2's block
  Scratch<C> dq_acc_;        // (group, seq_q, d_pad), dQ of the fused task's query heads
  Scratch<C> row_;           // one converted row
  alignas(64) C shift_[kBQ];  // lse per query (+inf: P = 0)
  alignas(64) C delta_[kBQ];
  alignas(64) C ones_[kOnes];  // the GEMM's c_scale: accumulate
};

// The entry points of one dtype: plain functions (target_clones needs them) behind external wrappers.
#define FASTATTN_DEFINE_BACKWARD_ENTRY_POINTS(T, name)                                                      \
  namespace {                                                                                             \
  FASTATTN_TARGET_CLONES void kv_tasks(const AttentionBackwardArgs& a, int64_t begin, int64_t end) {      \
    BackwardKernel<T> kernel(a, false);                                                                   \
    for (int64_t task = begin; task < end; ++task) kernel.run_kv(task);                                   \
  }                                                                                                       \
  FASTATTN_TARGET_CLONES void q_tasks(const AttentionBackwardArgs& a, int64_t begin, int64_t end) {       \
    BackwardKernel<T> kernel(a, false);                                                                   \
    for (int64_t task = begin; task < end; ++task) kernel.run_q(task);                                    \
  }                                                                                                       \
  FASTATTN_TARGET_CLONES void fused_tasks(const AttentionBackwardArgs& a, int64_t begin, int64_t end) {   \
    BackwardKernel<T> kernel(a, true);                                                                    \
    for (int64_t task = begin; task < end; ++task) kernel.run_fused(task);                                \
  }                                                                                                       \
  }                                                                                                       \
  void backward_kv_tasks_##name(const AttentionBackwardArgs& a, int64_t b, int64_t e) { kv_tasks(a, b, e); } \
  void backward_q_tasks_##name(const AttentionBackwardArgs& a, int64_t b, int64_t e) { q_tasks(a, b, e); }   \
  void backward_fused_tasks_##name(const AttentionBackwardArgs& a, int64_t b, int64_t e) { fused_tasks(a, b, e); }

#define FASTATTN_DECLARE_BACKWARD_ENTRY_POINTS(name)                                     \
  void backward_kv_tasks_##name(const AttentionBackwardArgs& a, int64_t b, int64_t e);    \
  void backward_q_tasks_##name(const AttentionBackwardArgs& a, int64_t b, int64_t e);     \
  void backward_fused_tasks_##name(const AttentionBackwardArgs& a, int64_t b, int64_t e);

FASTATTN_DECLARE_BACKWARD_ENTRY_POINTS(half)
FASTATTN_DECLARE_BACKWARD_ENTRY_POINTS(bfloat16)
FASTATTN_DECLARE_BACKWARD_ENTRY_POINTS(float)
FASTATTN_DECLARE_BACKWARD_ENTRY_POINTS(double)
#undef FASTATTN_DECLARE_BACKWARD_ENTRY_POINTS

}  // namespace attention_cpu
}  // namespace fastattn
