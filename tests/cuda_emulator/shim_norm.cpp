// A C ABI over the emulated CUDA LayerNorm / RMSNorm launchers, loaded by tests/test_cuda_emulated_norm.py with ctypes:
// raw pointers, row strides and scalars in, NormForwardArgs / NormBackwardArgs (csrc/norm.h) filled as
// csrc/norm_binding.h fills them from tensors, then norm_forward_cuda, norm_backward_plan and norm_backward_cuda
// (csrc/cuda/norm_kernel.h) on an emulated device whose multiprocessor count and opt-in shared memory per block each
// call sets.

// csrc/cuda/norm_kernel.cu as gen.py rewrites it (it includes emu.h), by the absolute path the build passes
// (-DEMULATED_KERNEL='"/path/norm_kernel_emu.cpp"'). A translation unit and library of its own, as each kernel file.
#include EMULATED_KERNEL

// Only these functions are exported (-fvisibility=hidden): calls to the CUDA runtime bind to emu.h's.
#define EXPORT __attribute__((visibility("default")))

using fastattn::Dtype;
using fastattn::NormBackwardArgs;
using fastattn::NormBackwardPlan;
using fastattn::NormForwardArgs;

static_assert(int(Dtype::kHalf) == 0 && int(Dtype::kBFloat16) == 1 && int(Dtype::kFloat) == 2, "dtype codes");

namespace {
void set_device(int sm_count, int smem_limit, int schedule) {
  emu::sm_count = sm_count;
  emu::smem_limit = smem_limit;
  emu::schedule = emu::Schedule(schedule);
}
}  // namespace

extern "C" {

EXPORT size_t emu_norm_forward_args_size() { return sizeof(NormForwardArgs); }
EXPORT size_t emu_norm_backward_args_size() { return sizeof(NormBackwardArgs); }

// Fills *args with one forward problem (csrc/norm.h): sizes = (rows, n); dtypes = (x, residual, residual_out,
// weight) as Dtype codes (those of absent tensors are ignored); strides = (x, residual) row strides; out and
// residual_out contiguous; null pointers for absent tensors; dropout p with its 64-bit seed.
EXPORT void emu_norm_forward_args(void* args, const int64_t* sizes, const int* dtypes, const void* x,
                                  const void* residual, const int64_t* strides, const void* weight, const void* bias,
                                  void* out, void* residual_out, void* mean, void* rstd, double eps, int rms,
                                  double dropout_p, int64_t seed) {
  NormForwardArgs a{};
  a.rows = sizes[0];
  a.n = sizes[1];
  a.dtype = Dtype(dtypes[0]);
  a.residual_dtype = Dtype(dtypes[1]);
  a.residual_out_dtype = Dtype(dtypes[2]);
  a.weight_dtype = Dtype(dtypes[3]);
  a.x = x;
  a.residual = residual;
  a.x_row_stride = strides[0];
  a.residual_row_stride = strides[1];
  a.weight = weight;
  a.bias = bias;
  a.out = out;
  a.residual_out = residual_out;
  a.mean = mean;
  a.rstd = rstd;
  a.eps = eps;
  a.rms = rms != 0;
  a.dropout = fastattn::make_dropout(dropout_p, seed);
  std::memcpy(args, &a, sizeof(a));
}

// norm_forward_cuda under emu::Schedule `schedule`. Returns the cudaError_t.
EXPORT int emu_norm_forward(const void* args, int sm_count, int smem_limit, int schedule) {
  NormForwardArgs a;
  std::memcpy(&a, args, sizeof(a));
  set_device(sm_count, smem_limit, schedule);
  return int(fastattn::norm_forward_cuda(a, nullptr));
}

// Fills *args with one backward problem: sizes = (rows, n); dtypes = (x, z, residual, weight); strides =
// (grad_out, grad_residual, z) row strides; grad_x, grad_residual_in, grad_weight, grad_bias outputs (null: not
// wanted); mean null for RMSNorm.
EXPORT void emu_norm_backward_args(void* args, const int64_t* sizes, const int* dtypes, const void* grad_out,
                                   const void* grad_residual, const void* z, const int64_t* strides,
                                   const void* weight, const void* mean, const void* rstd, void* grad_x,
                                   void* grad_residual_in, void* grad_weight, void* grad_bias, int rms,
                                   double dropout_p, int64_t seed) {
  NormBackwardArgs a{};
  a.rows = sizes[0];
  a.n = sizes[1];
  a.dtype = Dtype(dtypes[0]);
  a.z_dtype = Dtype(dtypes[1]);
  a.residual_dtype = Dtype(dtypes[2]);
  a.weight_dtype = Dtype(dtypes[3]);
  a.grad_out = grad_out;
  a.grad_residual = grad_residual;
  a.z = z;
  a.grad_out_row_stride = strides[0];
  a.grad_residual_row_stride = strides[1];
  a.z_row_stride = strides[2];
  a.weight = weight;
  a.mean = mean;
  a.rstd = rstd;
  a.grad_x = grad_x;
  a.grad_residual_in = grad_residual_in;
  a.grad_weight = grad_weight;
  a.grad_bias = grad_bias;
  a.rms = rms != 0;
  a.dropout = fastattn::make_dropout(dropout_p, seed);
  std::memcpy(args, &a, sizeof(a));
}

// norm_backward_plan on the emulated device; plan receives (looped, blocks, partials, workspace_bytes).
EXPORT int emu_norm_backward_plan(const void* args, int64_t* plan, int sm_count, int smem_limit) {
  NormBackwardArgs a;
  std::memcpy(&a, args, sizeof(a));
  set_device(sm_count, smem_limit, 0);
  NormBackwardPlan p{};
  const cudaError_t e = fastattn::norm_backward_plan(a, &p);
  plan[0] = p.looped;
  plan[1] = p.blocks;
  plan[2] = p.partials;
  plan[3] = int64_t(p.workspace_bytes);
  return int(e);
}

// norm_backward_cuda with that plan and its workspace, under emu::Schedule `schedule`. Returns the cudaError_t.
EXPORT int emu_norm_backward(const void* args, const int64_t* plan, void* workspace, int sm_count, int smem_limit,
                             int schedule) {
  NormBackwardArgs a;
  std::memcpy(&a, args, sizeof(a));
  set_device(sm_count, smem_limit, schedule);
  const NormBackwardPlan p{plan[0] != 0, plan[1], plan[2], size_t(plan[3])};
  return int(fastattn::norm_backward_cuda(a, p, workspace, nullptr));
}
}
