// A C ABI over the emulated CUDA recurrent cell launchers, loaded by tests/test_cuda_emulated_recurrent.py with ctypes:
// raw pointers, row strides and scalars in, RecurrentStepForwardArgs / RecurrentStepBackwardArgs (csrc/recurrent.h)
// filled as csrc/recurrent_driver.h fills them for one step, then recurrent_step_forward_cuda /
// recurrent_step_backward_cuda (csrc/cuda/recurrent_kernel.h) under the emulator schedule each call names.

// csrc/cuda/recurrent_kernel.cu as gen.py rewrites it (it includes emu.h), by the absolute path the build passes
// (-DEMULATED_KERNEL='"/path/recurrent_kernel_emu.cpp"'). A translation unit and library of its own, as each kernel
// file.
#include EMULATED_KERNEL

// Only these functions are exported (-fvisibility=hidden): calls to the CUDA runtime bind to emu.h's.
#define EXPORT __attribute__((visibility("default")))

using fastattn::Dtype;
using fastattn::RecurrentCellNorms;
using fastattn::RecurrentKind;

static_assert(int(Dtype::kHalf) == 0 && int(Dtype::kBFloat16) == 1 && int(Dtype::kFloat) == 2 &&
                  int(Dtype::kDouble) == 3,
              "dtype codes");
static_assert(int(RecurrentKind::kLstm) == 0 && int(RecurrentKind::kLayerNormLstm) == 4, "kind codes");

namespace {
// norms = (hh_weight, hh_bias, c_weight, c_bias), null entries absent.
RecurrentCellNorms cell_norms(const void* const* norms, double eps) {
  return {norms[0], norms[1], norms[2], norms[3], eps};
}
}  // namespace

extern "C" {

// One forward step: sizes = (kind, dtype, batch, hidden, step, project) as RecurrentKind and Dtype codes; strides =
// (x, out) row strides; null pointers for absent tensors (b_hh, c_prev / c_new but for the LSTMs, out, saved, lengths,
// norms). Returns the cudaError_t.
EXPORT int emu_recurrent_forward(const int64_t* sizes, const void* x, const void* hh, const void* b_hh,
                                 const void* h_prev, const void* c_prev, void* c_new, void* h_new, void* out,
                                 void* saved, const int64_t* strides, const int64_t* lengths, const void* const* norms,
                                 double eps, int schedule) {
  fastattn::RecurrentStepForwardArgs a{};
  a.kind = RecurrentKind(sizes[0]);
  a.dtype = Dtype(sizes[1]);
  a.batch = sizes[2];
  a.hidden = sizes[3];
  a.step = sizes[4];
  a.project = sizes[5] != 0;
  a.x = x;
  a.x_stride = strides[0];
  a.hh = hh;
  a.b_hh = b_hh;
  a.h_prev = h_prev;
  a.c_prev = c_prev;
  a.c_new = c_new;
  a.h_new = h_new;
  a.out = out;
  a.out_stride = strides[1];
  a.saved = saved;
  a.lengths = lengths;
  a.norms = cell_norms(norms, eps);
  emu::schedule = emu::Schedule(schedule);
  return int(fastattn::recurrent_step_forward_cuda(a, nullptr));
}

// One backward step: sizes = (kind, dtype, batch, hidden, step); strides = (grad_out, d_x) row strides; null pointers
// for absent tensors (grad_out and dh_pass with a projection, and those the kind does not use). dc_prev may be dc.
// Returns the cudaError_t.
EXPORT int emu_recurrent_backward(const int64_t* sizes, const void* grad_out, const void* dh, const void* dc,
                                  void* dc_prev, const void* saved, const void* c_prev, const void* c_new,
                                  const void* h_prev, const void* h_new, void* d_hh, void* d_x, void* d_cn,
                                  void* dh_pass, const int64_t* strides, const int64_t* lengths,
                                  const void* const* norms, int schedule) {
  fastattn::RecurrentStepBackwardArgs a{};
  a.kind = RecurrentKind(sizes[0]);
  a.dtype = Dtype(sizes[1]);
  a.batch = sizes[2];
  a.hidden = sizes[3];
  a.step = sizes[4];
  a.grad_out = grad_out;
  a.grad_out_stride = strides[0];
  a.dh = dh;
  a.dc = dc;
  a.dc_prev = dc_prev;
  a.saved = saved;
  a.c_prev = c_prev;
  a.c_new = c_new;
  a.h_prev = h_prev;
  a.h_new = h_new;
  a.d_hh = d_hh;
  a.d_x = d_x;
  a.d_x_stride = strides[1];
  a.d_cn = d_cn;
  a.dh_pass = dh_pass;
  a.lengths = lengths;
  a.norms = cell_norms(norms, 0.0);
  emu::schedule = emu::Schedule(schedule);
  return int(fastattn::recurrent_step_backward_cuda(a, nullptr));
}
}
