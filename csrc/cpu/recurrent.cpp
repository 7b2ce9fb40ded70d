// CPU implementation of the fastattn_C recurrent ops (schemas in csrc/fastattn.cpp): the time loop of
// csrc/recurrent_driver.h with the pointwise cells of csrc/cpu/recurrent_kernel.cpp, each step's rows split over
// at::parallel_for. Float32 steps multiply on csrc/cpu/step_gemm.h's AVX-512 kernel with the weight packed once per
// call (on Intel CPUs only steps below kLargeStepMinMacs); otherwise large float32 steps go through oneDNN with the
// weight prepacked (ATen's own mkldnn::_reorder_linear_weight and _linear_pointwise ops, about 1.6x MKL's sgemm at
// LSTM step shapes), and small steps and other dtypes use ATen's mm. With the packed kernel, each thread usually
// runs every step on its own rows (row_groups), or for small batches on its own hidden units (unit_threads).
// recurrent_inference chunks the steps of large inference and adds the input projections (prepacked for oneDNN when
// large); recurrent_matmul runs the training path's projections on the packed kernel too (large ones as the steps).
// Scratch tensors come from cpu::ScratchPool.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <optional>
#include <string_view>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../recurrent_driver.h"
#include "recurrent_kernel.h"
#include "scratch_pool.h"
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
// Large products: steps of at least kLargeStepMinMacs (an LSTM's from batch 32 and hidden 512) and projections of at
// least kProjectionPrepackMinMacs in all. Unless cpu::step_gemm_takes_large(), oneDNN takes them from the packed
// kernel (on a 2-core Xeon, LSTM 100x64x512x512 inference 0.87-0.91x nn.LSTM -> 0.91-0.99x).
constexpr int64_t kLargeStepMinMacs = int64_t(1) << 25;

// Whether a float32 product of `macs` multiply-adds (`large` or more is large) runs on the packed kernel.
bool packed_takes(int64_t macs, int64_t large) {
  return cpu::step_gemm_available() &&
         (macs < large || cpu::step_gemm_takes_large() || OneDnnLinear::get() == nullptr);
}

// Float32 step matmuls run on the packed AVX-512 kernel of csrc/cpu/step_gemm.h where the CPU has it (near peak from a
// batch of 8 up, where MKL and oneDNN pay per-call overheads), split over threads by weight panels of at least this
// many multiply-adds each.
constexpr int64_t kStepGemmMinMacsPerTask = int64_t(1) << 18;

// Packing runs on several threads from this many floats per task.
constexpr int64_t kPackMinValuesPerTask = int64_t(1) << 16;
// Rows of A per task in a product of many rows (the block stays in L2 while the weight panels pass over it).
constexpr int64_t kRowBlock = 128;

// w (N, K) float32, any strides, packed for cpu::step_gemm: (panels, K, kStepGemmPanel).
at::Tensor pack_step_weight(const at::Tensor& w) {
  RECORD_FUNCTION("fastattn_C::pack_step_weight", std::vector<c10::IValue>());  // visible to torch.profiler
  const int64_t n = w.size(0), k = w.size(1), panels = cpu::step_gemm_panels(n);
  auto packed = cpu::ScratchPool::empty({panels, k, cpu::kStepGemmPanel}, at::kFloat);
  const int64_t grain = std::max<int64_t>(1, kPackMinValuesPerTask / std::max<int64_t>(1, k * cpu::kStepGemmPanel));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    cpu::step_gemm_pack(w.data_ptr<float>(), k, n, w.stride(1), w.stride(0), packed.data_ptr<float>(), begin, end);
  });
  return packed;
}

// buffer (M, N) = x (M, K) w^T + add (a bias (N,), (M, N) or undefined), w packed by pack_step_weight. The threads
// split (row block, panel) tasks, a row block's in order, each task at least kStepGemmMinMacsPerTask.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& add, at::Tensor& buffer) {
  const int64_t m = x.size(0), k = x.size(1), n = buffer.size(1), panels = packed.size(0);
  TORCH_INTERNAL_ASSERT(packed.size(1) == k && panels == cpu::step_gemm_panels(n) && buffer.size(0) == m &&
                        buffer.is_contiguous() && x.scalar_type() == at::kFloat);
  const at::Tensor a = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor b = add.defined() ? add.contiguous() : add;
  const float* add_data = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t add_ld = b.defined() && b.dim() == 2 ? n : 0, lda = a.stride(0);
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
  const int64_t task_macs = std::max<int64_t>(1, std::min(m, kRowBlock) * k * cpu::kStepGemmPanel);
  const int64_t grain = std::max<int64_t>(1, kStepGemmMinMacsPerTask / task_macs);
  at::parallel_for(0, blocks * panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end;) {
      const int64_t block = task / panels, p0 = task % panels, p1 = std::min(panels, p0 + end - task);
      const int64_t row = block * kRowBlock, rows = std::min(kRowBlock, m - row);
      cpu::step_gemm(a.data_ptr<float>() + row * lda, lda, rows, packed.data_ptr<float>(), n, k,
                     add_data == nullptr ? nullptr : add_data + row * add_ld, add_ld,
                     buffer.data_ptr<float>() + row * n, n, p0, p1);
      task += p1 - p0;
    }
  });
  return buffer;
}

// The rows of a batch never meet in a recurrent layer, so with the packed kernel each thread can run every step on
// its own group of rows (step GEMM and cell), with no synchronisation between steps. row_groups(B, N, K) says how many
// groups for steps of B x N x K multiply-adds, or 0 to keep the step-by-step loop (each step's GEMM split over weight
// panels, its cell over rows; there each thread reads only its panels of W, which may then stay in its L2):
//  - a group per thread when every thread gets kMinRowsPerGroup rows and either W is small enough to stay in each
//    thread's L2 or the groups are large enough to repay each thread reading all of W every step;
//  - one group when a step is small enough for one thread;
//  - else 0.
constexpr int64_t kMinRowsPerGroup = 4;
constexpr int64_t kRowsToShareWeight = 8;
constexpr int64_t kL2WeightBytes = int64_t(1) << 20;
constexpr int64_t kSerialStepMaxMacs = int64_t(1) << 19;
// Steps of more multiply-adds than this split their hidden units over the threads (unit groups: one barrier a step)
// where row groups do not run: W_hh's panels then also split between the threads' caches.
constexpr int64_t kUnitStepMinMacs = int64_t(1) << 14;

int64_t row_groups(int64_t batch, int64_t n, int64_t k) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t groups = std::clamp<int64_t>(batch / kMinRowsPerGroup, 1, threads);
  const bool weight_in_l2 = n * k * int64_t(sizeof(float)) <= kL2WeightBytes;
  if (groups == threads && (weight_in_l2 || batch / groups >= kRowsToShareWeight)) return groups;
  return batch * n * k <= kSerialStepMaxMacs ? 1 : 0;
}

// Unit groups, where row groups do not run: each thread takes its own hidden units of every step (the step GEMM's
// panels of their columns in each gate, and their cells), the threads meeting once a step, since the next GEMM (the
// forward's) or this one (the backward's) reads every unit. unit_threads(kind, H): how many threads, at most one per
// panel of a gate's units, or 0 where unit groups cannot run: without OpenMP (the barrier), on one thread, when the
// gates' units do not start at panels (H not a multiple of the panel width), and for the LayerNorm-LSTM (its norms
// span every unit).
int64_t unit_threads(RecurrentKind kind, int64_t hidden) {
#if defined(_OPENMP)
  if (kind == RecurrentKind::kLayerNormLstm || hidden % cpu::kStepGemmPanel != 0) return 0;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  return threads >= 2 && hidden >= 2 * cpu::kStepGemmPanel ? std::min(threads, hidden / cpu::kStepGemmPanel) : 0;
#else
  (void)kind, (void)hidden;
  return 0;
#endif
}

// For i = 0..S-1: before(i, p0, p1), a barrier, after(i, p0, p1), on each of `threads` threads of one OpenMP team,
// [p0, p1) its own panels of the `panels` of a gate's units. The first exception a thread raises is rethrown once
// the team is done (the threads skip their remaining work but still meet at every barrier).
template <class Before, class After>
void for_unit_groups(int64_t threads, int64_t S, int64_t panels, const Before& before, const After& after) {
#if defined(_OPENMP)
  RECORD_FUNCTION("fastattn_C::recurrent_unit_loops", std::vector<c10::IValue>());  // visible to torch.profiler
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  const auto run = [&](const auto& phase, int64_t i, int64_t p0, int64_t p1) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      phase(i, p0, p1);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed = true;
    }
  };
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t p0 = panels * t / team, p1 = panels * (t + 1) / team;
    for (int64_t i = 0; i < S; ++i) {
      run(before, i, p0, p1);
#pragma omp barrier
      run(after, i, p0, p1);
    }
  }
  if (error) std::rethrow_exception(error);
#else
  (void)threads, (void)S, (void)panels, (void)before, (void)after;
#endif
}

// rows(r0, r1) on each of `groups` groups of B rows, a task each; false (nothing run) when groups is 0.
template <class Rows>
bool for_row_groups(int64_t B, int64_t groups, const Rows& rows) {
  if (groups == 0) return false;
  RECORD_FUNCTION("fastattn_C::recurrent_row_loops", std::vector<c10::IValue>());  // visible to torch.profiler
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) { rows(B * g0 / groups, B * g1 / groups); });
  return true;
}

struct CpuCells {
  static constexpr bool kRowLoops = true;
  static int64_t grain(int64_t kind_width) { return std::max<int64_t>(1, kMinElementsPerTask / kind_width); }
  // Runs the S forward steps in row groups when w (G*H, H) is packed and row_groups allows, else in unit groups when
  // a step has over kUnitStepMinMacs and unit_threads allows; returns whether it did. step_args(k): step k's cell
  // arguments, hh (B, G*H) the step GEMM's output.
  template <class StepArgs>
  bool forward_row_loops(int64_t S, const at::Tensor& w, const at::Tensor& hh, const StepArgs& step_args) const {
    if (w.dim() != 3 || S == 0) return false;
    const int64_t B = hh.size(0), N = hh.size(1), K = w.size(1), groups = row_groups(B, N, K);
    const RecurrentStepForwardArgs first = step_args(0);
    const int64_t H = first.hidden, panels = H / cpu::kStepGemmPanel;
    const int64_t units = groups <= 1 && B * N * K > kUnitStepMinMacs ? unit_threads(first.kind, H) : 0;
    if (units > 0) {
      const float* weight = w.data_ptr<float>();
      float* out = hh.data_ptr<float>();
      const auto step = [&](int64_t k, int64_t p0, int64_t p1) {  // then a barrier: the next step reads all of h
        const RecurrentStepForwardArgs a = step_args(k);
        for (int64_t g = 0; g < N / H; ++g) {  // the columns of each gate for units [p0, p1) * panel width
          cpu::step_gemm(static_cast<const float*>(a.h_prev), K, B, weight, N, K, nullptr, 0, out, N,
                         g * panels + p0, g * panels + p1);
        }
        recurrent_step_forward_cpu_units(a, 0, B, p0 * cpu::kStepGemmPanel, p1 * cpu::kStepGemmPanel);
      };
      for_unit_groups(units, S, panels, step, [](int64_t, int64_t, int64_t) {});
      return true;
    }
    return for_row_groups(B, groups, [&](int64_t r0, int64_t r1) {
      for (int64_t k = 0; k < S; ++k) {
        const RecurrentStepForwardArgs a = step_args(k);
        cpu::step_gemm(static_cast<const float*>(a.h_prev) + r0 * K, K, r1 - r0, w.data_ptr<float>(), N, K, nullptr,
                       0, hh.data_ptr<float>() + r0 * N, N, 0, w.size(0));
        recurrent_step_forward_cpu_rows(a, r0, r1);
      }
    });
  }
  // The backward's steps likewise, w = W_hh^T (H, G*H) packed: dh (B, H) = the gradient reaching h, updated in place
  // (each step's cell reads it before its GEMM writes dh = d_hh W_hh + pass); pass (B, H) the cells' dh_pass.
  template <class StepArgs>
  bool backward_row_loops(int64_t S, const at::Tensor& w, const at::Tensor& dh, const at::Tensor& pass,
                          const StepArgs& step_args) const {
    if (w.dim() != 3 || S == 0) return false;
    const int64_t B = dh.size(0), N = dh.size(1), K = w.size(1), groups = row_groups(B, N, K);
    const RecurrentStepBackwardArgs first = step_args(S - 1);
    const int64_t units = groups <= 1 && B * N * K > kUnitStepMinMacs ? unit_threads(first.kind, N) : 0;
    if (units > 0) {  // dh's columns are the units
      const float *weight = w.data_ptr<float>(), *pass_data = pass.data_ptr<float>();
      float* dh_data = dh.data_ptr<float>();
      const auto cell = [&](int64_t i, int64_t p0, int64_t p1) {  // then a barrier: the GEMM reads all of d_hh
        RecurrentStepBackwardArgs a = step_args(S - 1 - i);
        a.dh = dh_data;
        recurrent_step_backward_cpu_units(a, 0, B, p0 * cpu::kStepGemmPanel, p1 * cpu::kStepGemmPanel);
      };
      const auto gemm = [&](int64_t i, int64_t p0, int64_t p1) {  // its units of dh, which only its cells read
        cpu::step_gemm(static_cast<const float*>(step_args(S - 1 - i).d_hh), K, B, weight, N, K, pass_data, N, dh_data,
                       N, p0, p1);
      };
      for_unit_groups(units, S, N / cpu::kStepGemmPanel, cell, gemm);
      return true;
    }
    return for_row_groups(B, groups, [&](int64_t r0, int64_t r1) {
      for (int64_t k = S - 1; k >= 0; --k) {
        RecurrentStepBackwardArgs a = step_args(k);
        a.dh = dh.data_ptr();
        recurrent_step_backward_cpu_rows(a, r0, r1);
        cpu::step_gemm(static_cast<const float*>(a.d_hh) + r0 * K, K, r1 - r0, w.data_ptr<float>(), N, K,
                       pass.data_ptr<float>() + r0 * N, N, dh.data_ptr<float>() + r0 * N, N, 0, w.size(0));
      }
    });
  }
  at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return cpu::ScratchPool::empty(sizes, options.dtype().toScalarType());
  }
  // w (N, K) float32 for steps of `batch` rows: packed for cpu::step_gemm where packed_takes them, else prepacked for
  // oneDNN when large enough; otherwise w itself (ATen's mm).
  at::Tensor prepare(const at::Tensor& w, int64_t batch) const {
    if (w.scalar_type() != at::kFloat) return w;
    const int64_t macs = batch * w.size(0) * w.size(1);
    if (packed_takes(macs, kLargeStepMinMacs)) return pack_step_weight(w);
    if (macs >= kOneDnnMinMacs && OneDnnLinear::get() != nullptr) {
      return OneDnnLinear::get()->prepack(w.contiguous(), batch);
    }
    return w;
  }
  // w_ih (G*H, I) for input projections of `rows` rows a call, `total` rows in all: as prepare, except that oneDNN
  // takes only projections large enough to repay its reorder.
  at::Tensor prepare_input(const at::Tensor& w, int64_t rows, int64_t total) const {
    if (w.scalar_type() != at::kFloat) return w;
    const int64_t macs = total * w.size(0) * w.size(1);
    if (packed_takes(macs, kProjectionPrepackMinMacs)) return pack_step_weight(w);
    if (macs >= kProjectionPrepackMinMacs && OneDnnLinear::get() != nullptr) {
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

at::Tensor recurrent_matmul_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "recurrent_matmul: a (M, K) and b (K, N) "
              "expected, got ", a.sizes(), " and ", b.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (!has_bias || bias->scalar_type() == a.scalar_type()),
              "recurrent_matmul: a, b and bias must share a dtype");
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == b.size(1)), "recurrent_matmul: bias must be (N,) = (",
              b.size(1), ",), got ", bias->sizes());
  if (a.scalar_type() == at::kFloat && packed_takes(a.size(0) * a.size(1) * b.size(1), kProjectionPrepackMinMacs)) {
    auto out = at::empty({a.size(0), b.size(1)}, a.options());  // not pooled: it may become a user's gradient
    return packed_linear(a, pack_step_weight(b.t()), has_bias ? *bias : at::Tensor(), out);
  }
  if (a.scalar_type() == at::kFloat && b.t().is_contiguous() && OneDnnLinear::get() != nullptr) {
    return OneDnnLinear::get()->linear(a, b.t(), has_bias ? *bias : at::Tensor());
  }
  return has_bias ? at::addmm(*bias, a, b) : at::mm(a, b);
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("recurrent_inference", &fastattn::recurrent_inference_cpu);
  m.impl("recurrent_forward", &fastattn::recurrent_forward_cpu);
  m.impl("recurrent_backward", &fastattn::recurrent_backward_cpu);
  m.impl("recurrent_matmul", &fastattn::recurrent_matmul_cpu);
}
