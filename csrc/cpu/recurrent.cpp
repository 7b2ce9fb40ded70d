// CPU implementation of the fastattn_C recurrent ops (schemas in csrc/fastattn.cpp): the time loop of
// csrc/recurrent_driver.h with the pointwise cells of csrc/cpu/recurrent_kernel.cpp, each step's rows split over
// at::parallel_for. Float32 steps multiply on csrc/cpu/step_gemm.h's AVX-512 kernel with the weight packed once per
// call; without AVX-512, large float32 steps go through oneDNN with the weight prepacked (ATen's own
// mkldnn::_reorder_linear_weight and _linear_pointwise ops, about 1.6x MKL's sgemm at LSTM step shapes), and small
// steps and other dtypes use ATen's mm. recurrent_inference chunks the steps of large inference and adds the input
// projections (prepacked for oneDNN when large).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>

#include "../recurrent_driver.h"
#include "recurrent_kernel.h"
#include "step_gemm.h"

namespace fastattn {
namespace {

// Rows per task: about this many gate values at least, so that small steps stay on the calling thread.
constexpr int64_t kMinElementsPerTask = 16384;

// y = x w^T (+ add) through ATen's oneDNN linear ops, when this torch has them.
class OneDnnLinear {
 public:
  static const OneDnnLinear* get() {
    static const std::optional<OneDnnLinear> ops = find();
    return ops.has_value() ? &*ops : nullptr;
  }
  at::Tensor prepack(const at::Tensor& w, int64_t batch) const { return reorder_.call(w, batch); }
  // x w^T + add, add (M, N), a bias (N,) or undefined.
  at::Tensor linear(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& add) const {
    if (add.defined() && add.dim() == 2) return linear_add_.call(x, add, w_packed, std::nullopt, "add");
    const auto bias = add.defined() ? std::optional<at::Tensor>(add) : std::nullopt;
    return linear_.call(x, w_packed, bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }

 private:
  using Reorder = at::Tensor(const at::Tensor&, std::optional<int64_t>);
  using Linear = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, std::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<std::string_view>);
  using LinearAdd = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, std::string_view);
  static std::optional<OneDnnLinear> find() {
    auto& dispatcher = c10::Dispatcher::singleton();
    auto reorder = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
    auto linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
    auto linear_add = dispatcher.findSchema({"mkldnn::_linear_pointwise", "binary"});
    if (!reorder || !linear || !linear_add) return std::nullopt;
    return OneDnnLinear{reorder->typed<Reorder>(), linear->typed<Linear>(), linear_add->typed<LinearAdd>()};
  }
  OneDnnLinear(c10::TypedOperatorHandle<Reorder> reorder, c10::TypedOperatorHandle<Linear> linear,
               c10::TypedOperatorHandle<LinearAdd> linear_add)
      : reorder_(reorder), linear_(linear), linear_add_(linear_add) {}
  c10::TypedOperatorHandle<Reorder> reorder_;
  c10::TypedOperatorHandle<Linear> linear_;
  c10::TypedOperatorHandle<LinearAdd> linear_add_;
};

// Below this many multiply-adds per step (batch * N * K) MKL's small-matrix path beats oneDNN's call overhead.
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 22;
// The input projections' weight is prepacked when they take this many multiply-adds in all (the reorder costs
// about 0.1 ms even for a small weight).
constexpr int64_t kProjectionPrepackMinMacs = int64_t(1) << 28;

// Float32 step matmuls run on the packed AVX-512 kernel of csrc/cpu/step_gemm.h where the CPU has it (near peak from a
// batch of 8 up, where MKL and oneDNN pay per-call overheads), split over threads by weight panels of at least this
// many multiply-adds each.
constexpr int64_t kStepGemmMinMacsPerTask = int64_t(1) << 18;

// w (N, K) float32 packed for cpu::step_gemm: (panels, K, kStepGemmPanel).
at::Tensor pack_step_weight(const at::Tensor& w) {
  RECORD_FUNCTION("fastattn_C::pack_step_weight", std::vector<c10::IValue>());  // visible to torch.profiler
  const at::Tensor dense = w.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  auto packed = at::empty({cpu::step_gemm_panels(n), k, cpu::kStepGemmPanel}, w.options());
  cpu::step_gemm_pack(dense.data_ptr<float>(), n, k, packed.data_ptr<float>());
  return packed;
}

// buffer (M, N) = x (M, K) w^T + add (a bias (N,), (M, N) or undefined), w packed by pack_step_weight.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& add, at::Tensor& buffer) {
  const int64_t m = x.size(0), k = x.size(1), n = buffer.size(1), panels = packed.size(0);
  TORCH_INTERNAL_ASSERT(packed.size(1) == k && panels == cpu::step_gemm_panels(n) && buffer.size(0) == m &&
                        buffer.is_contiguous() && x.scalar_type() == at::kFloat);
  const at::Tensor a = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor b = add.defined() ? add.contiguous() : add;
  const float* add_data = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t add_ld = b.defined() && b.dim() == 2 ? n : 0;
  const int64_t panel_macs = std::max<int64_t>(1, m * k * cpu::kStepGemmPanel);
  const int64_t grain = std::max<int64_t>(1, kStepGemmMinMacsPerTask / panel_macs);
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    cpu::step_gemm(a.data_ptr<float>(), a.stride(0), m, packed.data_ptr<float>(), n, k, add_data, add_ld,
                   buffer.data_ptr<float>(), n, begin, end);
  });
  return buffer;
}

struct CpuCells {
  static int64_t grain(int64_t kind_width) { return std::max<int64_t>(1, kMinElementsPerTask / kind_width); }
  // w (N, K) in float32 packed for cpu::step_gemm where the CPU runs it, else prepacked for oneDNN when large enough;
  // otherwise w itself (ATen's mm).
  at::Tensor prepare(const at::Tensor& w, int64_t batch) const {
    if (w.scalar_type() != at::kFloat) return w;
    if (cpu::step_gemm_available()) return pack_step_weight(w);
    const bool large = batch * w.size(0) * w.size(1) >= kOneDnnMinMacs;
    if (large && OneDnnLinear::get() != nullptr) return OneDnnLinear::get()->prepack(w, batch);
    return w;
  }
  // w_ih (G*H, I) for input projections of `rows` rows a call, `total` rows in all: as prepare, except that oneDNN
  // takes only projections large enough to repay its reorder.
  at::Tensor prepare_input(const at::Tensor& w, int64_t rows, int64_t total) const {
    if (w.scalar_type() == at::kFloat && cpu::step_gemm_available()) return pack_step_weight(w);
    const bool large = total * w.size(0) * w.size(1) >= kProjectionPrepackMinMacs;
    if (large && w.scalar_type() == at::kFloat && OneDnnLinear::get() != nullptr) {
      return OneDnnLinear::get()->prepack(w, rows);
    }
    return w;
  }
  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& add, at::Tensor& buffer) const {
    if (w.is_mkldnn()) return OneDnnLinear::get()->linear(x, w, add);
    if (w.dim() == 3) return packed_linear(x, w, add, buffer);
    return AtenStepLinear{}.linear(x, w, add, buffer);
  }
  void forward(const RecurrentStepForwardArgs& a) const {
    at::parallel_for(0, a.batch, grain(4 * a.hidden),
                     [&](int64_t begin, int64_t end) { recurrent_step_forward_cpu_rows(a, begin, end); });
  }
  void backward(const RecurrentStepBackwardArgs& a) const {
    at::parallel_for(0, a.batch, grain(4 * a.hidden),
                     [&](int64_t begin, int64_t end) { recurrent_step_backward_cpu_rows(a, begin, end); });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_forward_cpu(
    int64_t kind, const at::Tensor& x_proj, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse, bool save,
    const std::optional<at::Tensor>& norm_hh_weight, const std::optional<at::Tensor>& norm_hh_bias,
    const std::optional<at::Tensor>& norm_c_weight, const std::optional<at::Tensor>& norm_c_bias, double eps) {
  const auto norms = cell_norms(norm_hh_weight, norm_hh_bias, norm_c_weight, norm_c_bias, w_hh.size(0) / 4, x_proj);
  return recurrent_forward_loop(kind, x_proj, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save, norms, eps,
                                CpuCells{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_backward_cpu(
    int64_t kind, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& hstate, const at::Tensor& cstate, const at::Tensor& saved,
    const std::optional<at::Tensor>& lengths, bool reverse, const std::optional<at::Tensor>& norm_hh_weight,
    const std::optional<at::Tensor>& norm_hh_bias, const std::optional<at::Tensor>& norm_c_weight,
    const std::optional<at::Tensor>& norm_c_bias) {
  const auto norms = cell_norms(norm_hh_weight, norm_hh_bias, norm_c_weight, norm_c_bias, w_hh.size(0) / 4, grad_out);
  return recurrent_backward_loop(kind, grad_out, grad_h_n, grad_c_n, w_hh, w_hr, hstate, cstate, saved, lengths,
                                 reverse, norms, CpuCells{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrent_inference_cpu(
    int64_t kind, const at::Tensor& x, const at::Tensor& w_ih, const std::optional<at::Tensor>& b_ih,
    const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse, int64_t chunk,
    const std::optional<at::Tensor>& norm_ih_weight, const std::optional<at::Tensor>& norm_ih_bias,
    const std::optional<at::Tensor>& norm_hh_weight, const std::optional<at::Tensor>& norm_hh_bias,
    const std::optional<at::Tensor>& norm_c_weight, const std::optional<at::Tensor>& norm_c_bias, double eps) {
  CellNormTensors norms;
  if (recurrent_kind_of(kind) == RecurrentKind::kLayerNormLstm) {
    const int64_t hidden = w_hh.size(0) / 4;
    norms = cell_norms(norm_hh_weight, norm_hh_bias, norm_c_weight, norm_c_bias, hidden, x);
    norms.normalise_x = true;
    norms.ih_weight = contiguous_or_none(norm_ih_weight, 4 * hidden, x, "norm_ih_weight");
    norms.ih_bias = contiguous_or_none(norm_ih_bias, 4 * hidden, x, "norm_ih_bias");
  }
  return recurrent_inference_loop(kind, x, w_ih, b_ih, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, chunk, norms, eps,
                                  CpuCells{});
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("recurrent_inference", &fastattn::recurrent_inference_cpu);
  m.impl("recurrent_forward", &fastattn::recurrent_forward_cpu);
  m.impl("recurrent_backward", &fastattn::recurrent_backward_cpu);
}
