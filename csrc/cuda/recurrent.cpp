// CUDA implementation of the fastattn_C recurrent ops (schemas in csrc/fastattn.cpp): the time loop of
// csrc/recurrent_driver.h, the per-step matmuls through ATen (cuBLAS) and the pointwise cells of
// csrc/cuda/recurrent_kernel.cu, all on the current stream of the tensors' device. Takes float16, bfloat16, float32
// and float64; c, the saved values and the cell's gradients are float32 (float64 for float64).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <optional>

#include "../recurrent_driver.h"
#include "recurrent_kernel.h"

namespace fastattn {
namespace {

constexpr const char* kForward = "fastattn_C::recurrent_forward";
constexpr const char* kBackward = "fastattn_C::recurrent_backward";

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

// The tensor the others follow: a CUDA tensor of float16, bfloat16, float32 or float64.
void check_main(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kHalf || d == at::kBFloat16 || d == at::kFloat || d == at::kDouble, op,
              ": the CUDA kernels take float16, bfloat16, float32 or float64, got ", name, " in ", d);
}

// t (when given) on main's device, in `dtype` (or in `other`, when that is given).
void check_beside(const std::optional<at::Tensor>& t, const at::Tensor& main, at::ScalarType dtype, const char* op,
                  const char* name, std::optional<at::ScalarType> other = std::nullopt) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == main.device(), op, ": ", name, " must be on ", main.device(), ", got ", t->device());
  TORCH_CHECK(t->scalar_type() == dtype || t->scalar_type() == other, op, ": ", name, " must be ", dtype,
              other.has_value() ? " or " : "", other.has_value() ? c10::toString(*other) : "", ", got ",
              t->scalar_type());
}

// The cells of the time loop: ATen's matmuls, then the launchers on `stream`.
struct CudaCells : AtenStepLinear {
  cudaStream_t stream;
  void forward(const RecurrentStepForwardArgs& a) const {
    check_launch(recurrent_step_forward_cuda(a, stream), kForward);
  }
  void backward(const RecurrentStepBackwardArgs& a) const {
    check_launch(recurrent_step_backward_cuda(a, stream), kBackward);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_forward_cuda(
    int64_t kind, const at::Tensor& x_proj, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse, bool save,
    const std::optional<at::Tensor>& norm_hh_weight, const std::optional<at::Tensor>& norm_hh_bias,
    const std::optional<at::Tensor>& norm_c_weight, const std::optional<at::Tensor>& norm_c_bias, double eps) {
  check_main(x_proj, kForward, "x_proj");
  const auto dtype = x_proj.scalar_type();
  check_beside(h0, x_proj, dtype, kForward, "h0");
  check_beside(c0, x_proj, dtype, kForward, "c0", recurrent_compute_type(x_proj));  // copied into the cell state
  check_beside(w_hh, x_proj, dtype, kForward, "w_hh");
  check_beside(b_hh, x_proj, dtype, kForward, "b_hh");
  check_beside(w_hr, x_proj, dtype, kForward, "w_hr");
  const c10::cuda::CUDAGuard guard(x_proj.device());
  const auto norms = cell_norms(norm_hh_weight, norm_hh_bias, norm_c_weight, norm_c_bias, w_hh.size(0) / 4, x_proj);
  return recurrent_forward_loop(kind, x_proj, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save, norms, eps,
                                CudaCells{{}, c10::cuda::getCurrentCUDAStream()});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_backward_cuda(
    int64_t kind, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& hstate, const at::Tensor& cstate, const at::Tensor& saved,
    const std::optional<at::Tensor>& lengths, bool reverse, const std::optional<at::Tensor>& norm_hh_weight,
    const std::optional<at::Tensor>& norm_hh_bias, const std::optional<at::Tensor>& norm_c_weight,
    const std::optional<at::Tensor>& norm_c_bias) {
  check_main(grad_out, kBackward, "grad_out");
  const auto dtype = grad_out.scalar_type(), compute = recurrent_compute_type(grad_out);
  const RecurrentKind k = recurrent_kind_of(kind);
  check_beside(grad_h_n, grad_out, dtype, kBackward, "grad_h_n", compute);
  check_beside(grad_c_n, grad_out, compute, kBackward, "grad_c_n", dtype);
  check_beside(w_hh, grad_out, dtype, kBackward, "w_hh");
  check_beside(w_hr, grad_out, dtype, kBackward, "w_hr");
  check_beside(hstate, grad_out, dtype, kBackward, "hstate");
  TORCH_CHECK(grad_out.dim() == 3 && w_hh.dim() == 2, kBackward, ": grad_out must be (S, B, P) and w_hh (G*H, P)");
  check_beside(lengths, grad_out, at::kLong, kBackward, "lengths");
  // The kernels read these in the compute type (their shapes: recurrent_backward_loop).
  if (recurrent_has_cell(k)) check_beside(cstate, grad_out, compute, kBackward, "cstate");
  if (saved.numel() > 0) check_beside(saved, grad_out, compute, kBackward, "saved");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto norms = cell_norms(norm_hh_weight, norm_hh_bias, norm_c_weight, norm_c_bias, w_hh.size(0) / 4, grad_out);
  return recurrent_backward_loop(kind, grad_out, grad_h_n, grad_c_n, w_hh, w_hr, hstate, cstate, saved, lengths,
                                 reverse, norms, CudaCells{{}, c10::cuda::getCurrentCUDAStream()});
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m) {
  m.impl("recurrent_forward", &fastattn::recurrent_forward_cuda);
  m.impl("recurrent_backward", &fastattn::recurrent_backward_cuda);
}
