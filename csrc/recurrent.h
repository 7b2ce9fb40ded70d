// Recurrent cell kernel arguments (LSTM, GRU, tanh/ReLU RNN, LayerNorm-LSTM) shared by the CPU and CUDA kernels. No torch headers:
// csrc/recurrent_driver.h runs the time loop (the matmuls through ATen) and fills these for each step.
//
// One step of one layer and direction, for a batch of B rows; H = hidden size, G = gates per cell (LSTM 4 in the
// order i, f, g, o; GRU 3 in the order r, z, n; RNN 1), P = the size of h (the LSTM's proj_size, else H).
// A row b is live at this step when lengths is null or step < lengths[b]; a row that is not live keeps its
// state (h, c), outputs 0 and passes its gradients through unchanged.
#pragma once
#include <cstdint>

#include "types.h"

namespace fastattn {

// The LayerNorm-LSTM (Ba et al. 2016, as fastattn.reference.layer_norm_lstm_cell) gets x
// with its norm LN_ih already applied (x = LN_ih(x W_ih^T)); the cell normalises hh over all 4H (LN_hh, then
// its affine pair), adds x and b (b_ih + b_hh), and normalises c' over H (LN_c) for h' = s(o) tanh(LN_c(c')).
enum class RecurrentKind : int { kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3, kLayerNormLstm = 4 };

inline int64_t recurrent_gates(RecurrentKind kind) {
  return kind == RecurrentKind::kGru ? 3 : (kind == RecurrentKind::kRnnTanh || kind == RecurrentKind::kRnnRelu ? 1 : 4);
}

inline bool recurrent_has_cell(RecurrentKind kind) {
  return kind == RecurrentKind::kLstm || kind == RecurrentKind::kLayerNormLstm;
}

// Saved per-step values of each kind, per row (in the compute type: float, double for double):
//   LSTM: i, f, g, o after their activations (4H); GRU: r, z, n and h_prev W_hn^T + b_hn (4H); RNN: none;
//   LayerNorm-LSTM: i, f, g, o (4H), hh normalised (4H), c' normalised (H), then 1/std of hh and of c' (2).
inline int64_t recurrent_saved_width(RecurrentKind kind, int64_t hidden) {
  if (kind == RecurrentKind::kLayerNormLstm) return 9 * hidden + 2;
  return kind == RecurrentKind::kLstm || kind == RecurrentKind::kGru ? 4 * hidden : 0;
}

// The LayerNorm-LSTM's norms inside the cell: affine pairs in the step's dtype (any may be null: weight 1,
// bias 0), and eps.
struct RecurrentCellNorms {
  const void* hh_weight;       // (4H,)
  const void* hh_bias;         // (4H,)
  const void* c_weight;        // (H,)
  const void* c_bias;          // (H,)
  double eps;
  // CPU inference only (recurrent_inference): x is the plain projection x W_ih^T and the cell applies LN_ih itself,
  // with this affine pair (4H,) (either may be null).
  bool normalise_x = false;
  const void* ih_weight = nullptr;
  const void* ih_bias = nullptr;
};

struct RecurrentStepForwardArgs {
  RecurrentKind kind;
  Dtype dtype;                 // of x, hh, b_hh, h_prev, h_new, out; c and saved are in the compute type
  int64_t batch, hidden;       // B, H (P = H here: with a projection the driver finishes h itself)
  const void* x;               // (B, G*H), row stride x_stride: the step's input projection (b_ih included)
  int64_t x_stride;
  const void* hh;              // contiguous (B, G*H): h_prev W_hh^T (no bias)
  const void* b_hh;            // (G*H,) or null
  const void* h_prev;          // contiguous (B, H) (GRU: the state; others: copied to h_new for rows not live)
  const void* c_prev;          // contiguous (B, H), LSTM only
  void* c_new;                 // contiguous (B, H), LSTM only
  void* h_new;                 // contiguous (B, H): the new state (rows not live: h_prev); with a projection
                               // (project = true): the cell's h before it, sigma(o) tanh(c') (LayerNorm-LSTM:
                               // tanh(LN_c(c'))), on live rows (others may stay unwritten: the driver keeps
                               // their state), nothing else written
  void* out;                   // (B, H), row stride out_stride: h_new, 0 for rows not live; null with a projection
  int64_t out_stride;
  void* saved;                 // contiguous (B, recurrent_saved_width) or null (inference)
  const int64_t* lengths;      // (B,) or null
  int64_t step;
  bool project;
  RecurrentCellNorms norms;    // LayerNorm-LSTM
};

struct RecurrentStepBackwardArgs {
  RecurrentKind kind;
  Dtype dtype;                 // of grad_out, dh, h_prev, h_new, d_hh, d_x, dh_pass
  int64_t batch, hidden;
  const void* grad_out;        // (B, H), row stride grad_out_stride: the output's gradient, added for live rows;
  int64_t grad_out_stride;     // null with a projection (then dh already holds it, times W_hr)
  const void* dh;              // contiguous (B, H): the gradient reaching h_new from later steps (and h_n)
  const void* dc;              // contiguous (B, H), compute type, LSTM: the gradient reaching c_new
  void* dc_prev;               // contiguous (B, H), compute type, LSTM: the gradient of c_prev (may be dc itself)
  const void* saved;           // contiguous (B, recurrent_saved_width), compute type
  const void* c_prev;          // contiguous (B, H), compute type, LSTM
  const void* c_new;           // contiguous (B, H), compute type, LSTM
  const void* h_prev;          // contiguous (B, H), GRU
  const void* h_new;           // contiguous (B, H), RNN: the step's new state
  void* d_hh;                  // contiguous (B, G*H): gradient of hh + b_hh (0 for rows not live)
  void* d_x;                   // (B, G*H), row stride d_x_stride, GRU and LayerNorm-LSTM: gradient of x (and
  int64_t d_x_stride;          // of b), which differs from d_hh's (GRU: in n; LayerNorm-LSTM: by LN_hh's backward)
  void* d_cn;                  // contiguous (B, H), compute type, LayerNorm-LSTM: gradient of LN_c's output
  void* dh_pass;               // contiguous (B, H): the gradient of h_prev not through W_hh (GRU z dh; rows not
                               // live: dh itself); null with a projection (the driver does it)
  const int64_t* lengths;
  int64_t step;
  RecurrentCellNorms norms;    // LayerNorm-LSTM (eps unused: the saved 1/std carry it)
};

}  // namespace fastattn
