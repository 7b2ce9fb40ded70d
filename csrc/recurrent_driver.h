// The time loop of one recurrent layer and direction, shared by the CPU and CUDA implementations of the
// fastattn_C recurrent ops (schemas in csrc/fastattn.cpp). Each step is one matmul (h_prev W_hh^T; with an LSTM
// projection a second, h W_hr^T) and one fused pointwise kernel, `Cells::forward` / `Cells::backward` on the
// arguments of csrc/recurrent.h. Backward through time runs the steps in reverse with one matmul per step (the
// gradient reaching h_prev); the weight gradients are one ATen matmul each at the end. The per-step matmuls go
// through `Cells::prepare(w, batch)` once per call (a device may prepack w) and `Cells::linear(x, w, add, buffer)`
// = x w^T + add, written into buffer or into a new tensor (either returned); AtenStepLinear is the plain ATen
// version. Per-step slices are addressed by pointer (step_ptr), not by tensor indexing, to keep the per-step
// overhead of small, launch-bound problems low. Cells with kRowLoops (the CPU's) may instead run all the steps
// themselves, each thread on its own rows of the batch (forward_row_loops / backward_row_loops, on the same per-step
// arguments), when there is no projection.
//
// Buffers are in time order. hstate (S + 1, B, P) holds the states: the state before step t is
// hstate[t + reverse] and after it hstate[t + 1 - reverse], so h0 sits at hstate[S * reverse] and h_n at the
// other end; cstate (S + 1, B, H) likewise for the LSTM's cell, in the compute type.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "binding.h"
#include "recurrent.h"

namespace fastattn {

inline RecurrentKind recurrent_kind_of(int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 4,
              "recurrent: kind must be 0 (LSTM), 1 (GRU), 2 (tanh RNN), 3 (ReLU RNN) or 4 (LayerNorm-LSTM)");
  return static_cast<RecurrentKind>(kind);
}

inline at::ScalarType recurrent_compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

// The LayerNorm-LSTM's cell norms, each affine tensor contiguous or absent (kept alive by the caller's tensors);
// with normalise_x (CPU inference) also LN_ih's.
struct CellNormTensors {
  std::optional<at::Tensor> hh_weight, hh_bias, c_weight, c_bias;
  bool normalise_x = false;
  std::optional<at::Tensor> ih_weight, ih_bias;
  RecurrentCellNorms args(double eps) const {
    return {data_or_null(hh_weight), data_or_null(hh_bias), data_or_null(c_weight), data_or_null(c_bias), eps,
            normalise_x, data_or_null(ih_weight), data_or_null(ih_bias)};
  }
};

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t, int64_t size,
                                                    const at::Tensor& like, const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size && t->scalar_type() == like.scalar_type() &&
              t->device() == like.device(), "recurrent: ", name, " must be (", size, ",) in x_proj's dtype and device");
  return t->contiguous();
}

inline CellNormTensors cell_norms(const std::optional<at::Tensor>& hh_weight, const std::optional<at::Tensor>& hh_bias,
                                  const std::optional<at::Tensor>& c_weight, const std::optional<at::Tensor>& c_bias,
                                  int64_t hidden, const at::Tensor& like) {
  return {contiguous_or_none(hh_weight, 4 * hidden, like, "norm_hh_weight"),
          contiguous_or_none(hh_bias, 4 * hidden, like, "norm_hh_bias"),
          contiguous_or_none(c_weight, hidden, like, "norm_c_weight"),
          contiguous_or_none(c_bias, hidden, like, "norm_c_bias")};
}

// The per-step matmuls on plain ATen: y = x w^T (+ add: (M, N), or a bias (N,)), w (N, K) as given.
struct AtenStepLinear {
  static constexpr bool kRowLoops = false;  // see CpuCells (csrc/cpu/recurrent.cpp)
  at::Tensor prepare(const at::Tensor& w, int64_t /*batch*/) const { return w; }
  // A tensor for values that the loops use (CpuCells: from a pool that keeps freed blocks).
  at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& options) const { return at::empty(sizes, options); }
  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& add, at::Tensor& buffer) const {
    return add.defined() ? at::addmm_out(buffer, add, x, w.t()) : at::mm_out(buffer, x, w.t());
  }
};

// The address of slice i along dim 0 of t (t[i].data_ptr() without making a tensor).
inline void* step_ptr(const at::Tensor& t, int64_t i) {
  return static_cast<char*>(t.data_ptr()) + i * t.stride(0) * static_cast<int64_t>(t.element_size());
}

// Shapes of one layer's problem, checked against the schema's contract.
struct RecurrentShape {
  RecurrentKind kind;
  int64_t seq, batch, hidden, proj, gates;
};

inline RecurrentShape recurrent_shape(int64_t kind_id, const at::Tensor& x_proj, const at::Tensor& w_hh,
                                      const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths) {
  RecurrentShape s{};
  s.kind = recurrent_kind_of(kind_id);
  TORCH_CHECK(x_proj.dim() == 3 && x_proj.stride(2) == 1, "recurrent: x_proj must be (S, B, G*H) with unit stride "
              "over its last dim, got ", x_proj.sizes(), " strides ", x_proj.strides());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == x_proj.size(2), "recurrent: w_hh must be (G*H, P), got ",
              w_hh.sizes());
  s.seq = x_proj.size(0);
  s.batch = x_proj.size(1);
  s.gates = recurrent_gates(s.kind);
  TORCH_CHECK(x_proj.size(2) % s.gates == 0, "recurrent: the gate width ", x_proj.size(2), " is not a multiple of ",
              s.gates);
  s.hidden = x_proj.size(2) / s.gates;
  s.proj = w_hh.size(1);
  const bool project = w_hr.has_value() && w_hr->defined();
  TORCH_CHECK(!project || recurrent_has_cell(s.kind), "recurrent: w_hr (a projection) is for the LSTMs only");
  TORCH_CHECK(project ? w_hr->sizes() == at::IntArrayRef({s.proj, s.hidden}) : s.proj == s.hidden,
              "recurrent: w_hh (G*H, P) needs P = H without a projection and w_hr (P, H) with one");
  if (lengths.has_value() && lengths->defined()) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == s.batch &&
                lengths->is_contiguous() && lengths->device() == x_proj.device(),
                "recurrent: lengths must be a contiguous (B,) int64 tensor on x_proj's device");
  }
  return s;
}

// The forward's step weights, w_hh and w_hr (or undefined), as Cells::prepare makes them for `batch` rows.
struct StepWeights {
  at::Tensor w_hh, w_hr;
};

template <class Cells>
StepWeights prepare_step_weights(const Cells& cells, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                 int64_t batch) {
  return {cells.prepare(w_hh, batch), data_or_null(w_hr) ? cells.prepare(*w_hr, batch) : at::Tensor()};
}

// (out (S, B, P), hstate (S + 1, B, P), cstate (S + 1, B, H) or empty, saved (S, B, W) or empty). `prepared`, when
// given, holds the step weights already prepared; `out_into`, when defined, is the contiguous (S, B, P) out to write.
template <class Cells>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_forward_loop(
    int64_t kind_id, const at::Tensor& x_proj, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse, bool save, const CellNormTensors& norms, double eps,
    const Cells& cells, const StepWeights* prepared = nullptr, const at::Tensor& out_into = at::Tensor()) {
  const RecurrentShape s = recurrent_shape(kind_id, x_proj, w_hh, w_hr, lengths);
  const bool lstm = recurrent_has_cell(s.kind), project = data_or_null(w_hr) != nullptr;
  const auto compute = recurrent_compute_type(x_proj);
  const int64_t S = s.seq, B = s.batch, H = s.hidden, P = s.proj, GH = s.gates * H, rev = reverse ? 1 : 0;
  auto out = out_into.defined() ? out_into : at::empty({S, B, P}, x_proj.options());
  TORCH_INTERNAL_ASSERT(out.sizes() == at::IntArrayRef({S, B, P}) && out.is_contiguous());
  // The states reach the caller (h_n, c_n) except in recurrent_inference_loop's calls (those with out_into).
  const auto states = [&](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return out_into.defined() ? cells.scratch(sizes, options) : at::empty(sizes, options);
  };
  auto hstate = states({S + 1, B, P}, x_proj.options());
  hstate[S * rev].copy_(h0);
  at::Tensor cstate = at::empty({0}, x_proj.options().dtype(compute));
  if (lstm) {
    TORCH_CHECK(c0.has_value() && c0->defined(), "recurrent: the LSTM needs c0");
    cstate = states({S + 1, B, H}, x_proj.options().dtype(compute));
    cstate[S * rev].copy_(*c0);
  }
  const int64_t width = recurrent_saved_width(s.kind, H);
  auto saved = cells.scratch({save && width ? S : 0, B, width}, x_proj.options().dtype(compute));
  auto h_pre = project ? cells.scratch({B, H}, x_proj.options()) : at::Tensor();
  auto hh_buffer = cells.scratch({B, GH}, x_proj.options());
  auto hr_buffer = project ? cells.scratch({B, P}, x_proj.options()) : at::Tensor();
  const StepWeights weights = prepared != nullptr ? *prepared : prepare_step_weights(cells, w_hh, w_hr, B);
  const at::Tensor &w_hh_p = weights.w_hh, &w_hr_p = weights.w_hr;
  at::Tensor b = b_hh.has_value() && b_hh->defined() ? b_hh->contiguous() : at::Tensor();
  const int64_t* len = lengths.has_value() && lengths->defined() ? lengths->data_ptr<int64_t>() : nullptr;
  // Step k's cell arguments (pointers only; hh is hh_buffer's, which a device's linear may replace).
  const auto step_args = [&](int64_t k) {
    const int64_t t = reverse ? S - 1 - k : k, before = t + rev, after = t + 1 - rev;
    RecurrentStepForwardArgs a{};
    a.kind = s.kind;
    a.dtype = dtype_of(x_proj);
    a.batch = B;
    a.hidden = H;
    a.x = step_ptr(x_proj, t);
    a.x_stride = x_proj.stride(1);
    a.hh = hh_buffer.data_ptr();
    a.b_hh = b.defined() ? b.data_ptr() : nullptr;
    a.h_prev = step_ptr(hstate, before);
    a.c_prev = lstm ? step_ptr(cstate, before) : nullptr;
    a.c_new = lstm ? step_ptr(cstate, after) : nullptr;
    a.h_new = project ? h_pre.data_ptr() : step_ptr(hstate, after);
    a.out = project ? nullptr : step_ptr(out, t);
    a.out_stride = P;
    a.saved = saved.numel() ? step_ptr(saved, t) : nullptr;
    a.lengths = len;
    a.step = t;
    a.project = project;
    a.norms = norms.args(eps);
    return a;
  };
  if constexpr (Cells::kRowLoops) {
    if (!project && cells.forward_row_loops(S, w_hh_p, hh_buffer, step_args)) return {out, hstate, cstate, saved};
  }
  for (int64_t k = 0; k < S; ++k) {
    const int64_t t = reverse ? S - 1 - k : k, before = t + rev, after = t + 1 - rev;
    const at::Tensor h_prev = hstate[before];
    const at::Tensor hh = cells.linear(h_prev, w_hh_p, at::Tensor(), hh_buffer);  // alive through the cell
    RecurrentStepForwardArgs a = step_args(k);
    a.hh = hh.data_ptr();
    cells.forward(a);
    if (project) {
      at::Tensor h_next = hstate[after];
      h_next.copy_(cells.linear(h_pre, w_hr_p, at::Tensor(), hr_buffer));
      if (len != nullptr) {
        const auto live = lengths->gt(t).unsqueeze(1);
        h_next.copy_(at::where(live, h_next, h_prev));
        out[t].copy_(h_next * live);
      } else {
        out[t].copy_(h_next);
      }
    }
  }
  return {out, hstate, cstate, saved};
}

// Inference (nothing saved) on x (S, B, I), in chunks of `chunk` steps: per chunk one matmul for its input projections
// x W_ih^T + b_ih (in a buffer the chunks share, so that no fresh S x B x G*H buffer is paged in), then its steps,
// written into the one output. The weights are prepared once per call (Cells::prepare_input(w_ih, rows a chunk,
// S * B rows in all) for the projections). The LayerNorm-LSTM's projections leave out b_ih: its cells normalise
// them (norms with normalise_x) and add b_ih + b_hh after the norms.
// Returns (out (S, B, P), h_n (B, P), c_n (B, H) or empty), in x's dtype.
template <class Cells>
std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrent_inference_loop(
    int64_t kind_id, const at::Tensor& x, const at::Tensor& w_ih, const std::optional<at::Tensor>& b_ih,
    const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse, int64_t chunk, const CellNormTensors& norms, double eps,
    const Cells& cells) {
  const RecurrentKind kind = recurrent_kind_of(kind_id);
  const bool layernorm = kind == RecurrentKind::kLayerNormLstm;
  TORCH_INTERNAL_ASSERT(norms.normalise_x == layernorm);
  TORCH_CHECK(x.dim() == 3 && w_ih.dim() == 2 && w_ih.size(1) == x.size(2) && w_ih.size(0) == w_hh.size(0),
              "recurrent_inference: x must be (S, B, I) and w_ih (G*H, I) with w_hh's G*H, got x ", x.sizes(),
              ", w_ih ", w_ih.sizes(), ", w_hh ", w_hh.sizes());
  TORCH_CHECK(w_ih.scalar_type() == x.scalar_type() && w_ih.device() == x.device(),
              "recurrent_inference: w_ih must have x's dtype and device");
  TORCH_CHECK(chunk >= 1, "recurrent_inference: chunk must be at least 1 step, got ", chunk);
  const int64_t S = x.size(0), B = x.size(1), I = x.size(2), GH = w_hh.size(0), rows = std::min(chunk, S) * B;
  const bool lstm = recurrent_has_cell(kind);
  auto out = at::empty({S, B, w_hh.size(1)}, x.options());
  const StepWeights weights = prepare_step_weights(cells, w_hh, w_hr, B);
  const at::Tensor w_ih_p = cells.prepare_input(w_ih, rows, S * B);
  at::Tensor bias = data_or_null(b_ih) ? b_ih->contiguous() : at::Tensor();
  std::optional<at::Tensor> b_cell = b_hh;  // the bias the cells add
  if (layernorm && bias.defined()) {
    b_cell = data_or_null(b_hh) ? bias + *b_hh : bias;
    bias = at::Tensor();
  }
  auto proj_buffer = cells.scratch({rows, GH}, x.options());
  at::Tensor h = h0;
  std::optional<at::Tensor> c = c0;
  const int64_t chunks = S == 0 ? 0 : (S - 1) / chunk + 1;
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t begin = (reverse ? chunks - 1 - i : i) * chunk, n = std::min(chunk, S - begin);
    at::Tensor buffer = proj_buffer.narrow(0, 0, n * B);
    const at::Tensor x_proj = cells.linear(x.narrow(0, begin, n).reshape({n * B, I}), w_ih_p, bias, buffer);
    std::optional<at::Tensor> live;
    if (lengths.has_value() && lengths->defined()) live = (*lengths - begin).clamp_min(0);
    const auto [o, hstate, cstate, saved] =
        recurrent_forward_loop(kind_id, x_proj.view({n, B, GH}), h, c, w_hh, b_cell, w_hr, live, reverse, false,
                               norms, eps, cells, &weights, out.narrow(0, begin, n));
    const int64_t last = reverse ? 0 : n;
    h = hstate[last];
    if (lstm) c = cstate[last];
  }
  return {out, h.clone(), lstm ? c->to(x.scalar_type(), false, true) : at::empty({0}, x.options())};
}

// The LayerNorm-LSTM's norm gradients (10H,) in the compute type: LN_hh's weight and bias, LN_c's weight and bias,
// from d_x (S, B, 4H) = the gradient of LN_hh's output, d_cn (S, B, H) that of LN_c's, and the saved normalised
// values (zero, like both gradients, on rows not live).
inline at::Tensor cell_norm_gradients(const at::Tensor& d_x, const at::Tensor& d_cn, const at::Tensor& saved,
                                      int64_t H) {
  const auto d_pre = d_x.to(d_cn.scalar_type());
  const auto hh_hat = saved.narrow(2, 4 * H, 4 * H), c_hat = saved.narrow(2, 8 * H, H);
  const std::vector<int64_t> rows{0, 1};
  return at::cat({(d_pre * hh_hat).sum(rows), d_pre.sum(rows), (d_cn * c_hat).sum(rows), d_cn.sum(rows)});
}

// LN_c's output (S, B, H) in the compute type from the saved normalised c' and the affine pair of norms.
inline at::Tensor cell_norm_output(const at::Tensor& saved, const CellNormTensors& norms, int64_t H) {
  at::Tensor cn = saved.narrow(2, 8 * H, H);
  if (norms.c_weight.has_value()) cn = cn * norms.c_weight->to(cn.scalar_type());
  if (norms.c_bias.has_value()) cn = cn + norms.c_bias->to(cn.scalar_type());
  return cn;
}

// (d_x_proj (S, B, G*H), d_h0 (B, P), d_c0 (B, H) or empty, d_w_hh (G*H, P), d_b_hh (G*H,), d_w_hr (P, H) or
// empty, d_norms (10H,) or empty: see cell_norm_gradients), all in x's dtype.
template <class Cells>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_backward_loop(
    int64_t kind_id, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& hstate, const at::Tensor& cstate, const at::Tensor& saved,
    const std::optional<at::Tensor>& lengths, bool reverse, const CellNormTensors& norms, const Cells& cells) {
  const RecurrentKind kind = recurrent_kind_of(kind_id);
  const bool lstm = recurrent_has_cell(kind), layernorm = kind == RecurrentKind::kLayerNormLstm;
  const bool own_d_x = kind == RecurrentKind::kGru || layernorm;  // d_x differs from d_hh
  const bool project = data_or_null(w_hr) != nullptr;
  const int64_t S = grad_out.size(0), B = grad_out.size(1), P = grad_out.size(2);
  const int64_t GH = w_hh.size(0), H = GH / recurrent_gates(kind), rev = reverse ? 1 : 0;
  TORCH_CHECK(grad_out.stride(2) == 1 && hstate.sizes() == at::IntArrayRef({S + 1, B, P}) && hstate.is_contiguous(),
              "recurrent_backward: grad_out (S, B, P) with unit stride over P and hstate (S + 1, B, P) contiguous");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(1) == P && GH % recurrent_gates(kind) == 0,
              "recurrent_backward: w_hh must be (G*H, P) with grad_out's P = ", P, ", got ", w_hh.sizes());
  const int64_t width = recurrent_saved_width(kind, H);
  TORCH_CHECK(width == 0 || (saved.dim() == 3 && saved.size(0) == S),
              "recurrent_backward: the forward did not save its activations (save=False)");
  // The kernels read these by the forward's shapes.
  TORCH_CHECK(width == 0 || (saved.sizes() == at::IntArrayRef({S, B, width}) && saved.is_contiguous()),
              "recurrent_backward: saved must be contiguous (S, B, W) = (", S, ", ", B, ", ", width, "), got ",
              saved.sizes());
  TORCH_CHECK(!lstm || (cstate.sizes() == at::IntArrayRef({S + 1, B, H}) && cstate.is_contiguous()),
              "recurrent_backward: cstate must be contiguous (S + 1, B, H) = (", S + 1, ", ", B, ", ", H, "), got ",
              cstate.sizes());
  if (lengths.has_value() && lengths->defined()) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == B &&
                lengths->is_contiguous() && lengths->device() == grad_out.device(),
                "recurrent_backward: lengths must be a contiguous (B,) = (", B, ",) int64 tensor on grad_out's device");
  }
  const auto opts = grad_out.options();
  const auto compute = recurrent_compute_type(grad_out);
  auto d_hh = own_d_x ? cells.scratch({S, B, GH}, opts) : at::empty({S, B, GH}, opts);  // else returned as d_x
  auto d_x = own_d_x ? at::empty({S, B, GH}, opts) : d_hh;
  auto d_cn = layernorm ? cells.scratch({S, B, H}, opts.dtype(compute)) : at::Tensor();
  auto dh = data_or_null(grad_h_n) ? grad_h_n->to(grad_out.scalar_type()).contiguous().clone()
                                    : at::zeros({B, P}, opts);
  at::Tensor dc;
  if (lstm) {
    dc = data_or_null(grad_c_n) ? grad_c_n->to(compute).contiguous().clone() : at::zeros({B, H}, opts.dtype(compute));
  }
  auto pass = cells.scratch({B, P}, opts), dh_buffer = at::empty({B, P}, opts);  // dh ends as d_h0
  auto d_hp = project ? at::zeros({S, B, P}, opts) : at::Tensor();
  at::Tensor dh_pre, dh_pre_buffer = project ? cells.scratch({B, H}, opts) : at::Tensor();
  const int64_t* len = lengths.has_value() && lengths->defined() ? lengths->data_ptr<int64_t>() : nullptr;
  const auto w_hh_p = cells.prepare(w_hh.t(), B);  // dh_prev = d_hh W_hh
  const auto w_hr_p = project ? cells.prepare(w_hr->t(), B) : at::Tensor();
  // Step k's cell arguments (pointers only) but dh, which each loop sets.
  const auto step_args = [&](int64_t k) {
    const int64_t t = reverse ? S - 1 - k : k, before = t + rev, after = t + 1 - rev;
    RecurrentStepBackwardArgs a{};
    a.kind = kind;
    a.dtype = dtype_of(grad_out);
    a.batch = B;
    a.hidden = H;
    if (!project) {  // with a projection the loop adds grad_out to dh and passes dh on itself
      a.grad_out = step_ptr(grad_out, t);
      a.grad_out_stride = grad_out.stride(1);
      a.dh_pass = pass.data_ptr();
    }
    a.dc = lstm ? dc.data_ptr() : nullptr;
    a.dc_prev = lstm ? dc.data_ptr() : nullptr;  // updated in place
    a.saved = saved.numel() ? step_ptr(saved, t) : nullptr;
    a.c_prev = lstm ? step_ptr(cstate, before) : nullptr;
    a.c_new = lstm ? step_ptr(cstate, after) : nullptr;
    a.h_prev = step_ptr(hstate, before);
    a.h_new = step_ptr(hstate, after);
    a.d_hh = step_ptr(d_hh, t);
    a.d_x = own_d_x ? step_ptr(d_x, t) : nullptr;
    a.d_x_stride = GH;
    a.d_cn = layernorm ? step_ptr(d_cn, t) : nullptr;
    a.norms = norms.args(0.0);
    a.lengths = len;
    a.step = t;
    return a;
  };
  bool done = false;  // dh, dc and the per-step gradients complete
  if constexpr (Cells::kRowLoops) {
    done = !project && cells.backward_row_loops(S, w_hh_p, dh, pass, step_args);
  }
  for (int64_t k = S - 1; k >= 0 && !done; --k) {
    const int64_t t = reverse ? S - 1 - k : k;
    RecurrentStepBackwardArgs a = step_args(k);
    at::Tensor live;
    if (project) {  // dh_total = dh + grad_out[t] on live rows; through W_hr to the cell's h
      at::Tensor dh_total = dh + grad_out[t];
      if (len != nullptr) {
        live = lengths->gt(t).unsqueeze(1);
        dh_total = at::where(live, dh_total, dh);
      }
      d_hp[t].copy_(len != nullptr ? dh_total * live : dh_total);
      dh_pre = cells.linear(dh_total, w_hr_p, at::Tensor(), dh_pre_buffer);
      dh = dh_total;
      a.dh = dh_pre.data_ptr();
    } else {
      a.dh = dh.data_ptr();
    }
    cells.backward(a);
    if (project) {  // rows not live pass dh_total on untouched
      at::Tensor carry = len != nullptr ? dh * live.logical_not() : at::zeros_like(dh);
      dh = cells.linear(d_hh[t], w_hh_p, carry, dh_buffer);
    } else {
      dh = cells.linear(d_hh[t], w_hh_p, pass, dh_buffer);
    }
  }
  const auto d_hh_2d = d_hh.view({S * B, GH});
  auto d_w_hh = d_hh_2d.t().mm(hstate.narrow(0, rev, S).reshape({S * B, P}));
  auto d_b_hh = (layernorm ? d_x : d_hh).view({S * B, GH}).sum(0, false, compute).to(grad_out.scalar_type());
  at::Tensor d_w_hr = at::empty({0}, opts);
  if (project) {  // h_pre = o tanh(c'), or o tanh(LN_c(c')): zero on rows not live (o saved as 0)
    const auto o = saved.narrow(2, 3 * H, H);
    const auto h_pre = (o * (layernorm ? cell_norm_output(saved, norms, H) : cstate.narrow(0, 1 - rev, S)).tanh())
                           .to(grad_out.scalar_type());
    d_w_hr = d_hp.view({S * B, P}).t().mm(h_pre.reshape({S * B, H}));
  }
  auto d_c0 = lstm ? dc.to(grad_out.scalar_type()) : at::empty({0}, opts);
  auto d_norms = layernorm ? cell_norm_gradients(d_x, d_cn, saved, H).to(grad_out.scalar_type()) : at::empty({0}, opts);
  return {d_x, dh, d_c0, d_w_hh, d_b_hh, d_w_hr, d_norms};
}

}  // namespace fastattn
