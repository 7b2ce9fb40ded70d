// A C ABI over the emulated CUDA convolution epilogue launchers, loaded by tests/test_cuda_emulated_conv_epilogue.py
// with ctypes: raw pointers, sizes, strides and codes in, ConvEpilogueForwardArgs / ConvEpilogueBackwardArgs
// (csrc/conv_epilogue.h) filled as csrc/conv_epilogue_binding.h fills them from tensors, then
// conv_epilogue_forward_cuda, conv_epilogue_backward_plan and conv_epilogue_backward_cuda
// (csrc/cuda/conv_epilogue_kernel.h) on an emulated device whose multiprocessor count and schedule each call sets.
// The launching calls also report emu::ldg_loads, the kernels' read-only loads by size (vector or element path).

// csrc/cuda/conv_epilogue_kernel.cu as gen.py rewrites it (it includes emu.h), by the absolute path the build passes
// (-DEMULATED_KERNEL='"/path/conv_epilogue_kernel_emu.cpp"'). A translation unit and library of its own, as each
// kernel file.
#include EMULATED_KERNEL

// Only these functions are exported (-fvisibility=hidden): calls to the CUDA runtime bind to emu.h's.
#define EXPORT __attribute__((visibility("default")))

using fastattn::Activation;
using fastattn::ConvEpilogueBackwardArgs;
using fastattn::ConvEpilogueBackwardPlan;
using fastattn::ConvEpilogueForwardArgs;
using fastattn::ConvEpilogueShape;
using fastattn::Dtype;

static_assert(int(Dtype::kHalf) == 0 && int(Dtype::kBFloat16) == 1 && int(Dtype::kFloat) == 2 &&
                  int(Dtype::kDouble) == 3,
              "dtype codes");
static_assert(int(Activation::kNone) == 0 && int(Activation::kRelu) == 1 && int(Activation::kGelu) == 2 &&
                  int(Activation::kGeluTanh) == 3 && int(Activation::kSilu) == 4,
              "activation codes: the order of fastattn.reference.CONV_ACTIVATIONS");

namespace {
void set_device(int sm_count, int schedule) {
  emu::sm_count = sm_count;
  emu::schedule = emu::Schedule(schedule);
  std::memset(emu::ldg_loads, 0, sizeof(emu::ldg_loads));
}

// loads[0 .. 16]: the __ldg calls of each size in bytes since set_device.
void report_loads(int64_t* loads) {
  for (int i = 0; i < 17; ++i) loads[i] = int64_t(emu::ldg_loads[i]);
}

// sizes = (n, c, h, w); flags = (pool, channels_last).
ConvEpilogueShape shape_of(const int64_t* sizes, const int* flags) {
  return ConvEpilogueShape{sizes[0], sizes[1], sizes[2], sizes[3], flags[0] != 0, flags[1] != 0};
}

ConvEpilogueBackwardArgs backward_args(const void* grad, const void* y, const void* bias, void* grad_y,
                                       const int64_t* sizes, const int64_t* y_strides, const int64_t* grad_strides,
                                       const int* flags, int dtype, int activation) {
  ConvEpilogueBackwardArgs a{};
  a.grad = grad;
  a.y = y;
  a.bias = bias;
  a.grad_y = grad_y;
  a.shape = shape_of(sizes, flags);
  for (int i = 0; i < 4; ++i) {
    a.y_stride[i] = y_strides[i];
    a.grad_stride[i] = grad_strides[i];
  }
  a.dtype = Dtype(dtype);
  a.activation = Activation(activation);
  return a;
}
}  // namespace

extern "C" {

// conv_epilogue_forward_cuda: y (sizes, y_strides), bias float32 (c,) or null, out contiguous in y's layout.
// Returns the cudaError_t.
EXPORT int emu_conv_epilogue_forward(const void* y, const void* bias, void* out, const int64_t* sizes,
                                     const int64_t* y_strides, const int* flags, int dtype, int activation,
                                     int sm_count, int schedule, int64_t* loads) {
  ConvEpilogueForwardArgs a{};
  a.y = y;
  a.bias = bias;
  a.out = out;
  a.shape = shape_of(sizes, flags);
  for (int i = 0; i < 4; ++i) a.y_stride[i] = y_strides[i];
  a.dtype = Dtype(dtype);
  a.activation = Activation(activation);
  set_device(sm_count, schedule);
  const cudaError_t e = fastattn::conv_epilogue_forward_cuda(a, nullptr);
  report_loads(loads);
  return int(e);
}

// conv_epilogue_backward_plan on the emulated device; plan receives (slices, partials, workspace_bytes).
EXPORT int emu_conv_epilogue_backward_plan(const int64_t* sizes, const int64_t* y_strides,
                                           const int64_t* grad_strides, const int* flags, int dtype, int bias_grad,
                                           int sm_count, int64_t* plan) {
  const ConvEpilogueBackwardArgs a =
      backward_args(nullptr, nullptr, nullptr, nullptr, sizes, y_strides, grad_strides, flags, dtype, 0);
  set_device(sm_count, 0);
  ConvEpilogueBackwardPlan p{};
  const cudaError_t e = fastattn::conv_epilogue_backward_plan(a, bias_grad != 0, &p);
  plan[0] = p.slices;
  plan[1] = p.partials;
  plan[2] = int64_t(p.workspace_bytes);
  return int(e);
}

// conv_epilogue_backward_cuda with that plan: grad_y contiguous in y's layout; grad_bias float32 (c,) or null (not
// wanted); workspace of plan[2] bytes. Returns the cudaError_t.
EXPORT int emu_conv_epilogue_backward(const void* grad, const void* y, const void* bias, void* grad_y, void* grad_bias,
                                      void* workspace, const int64_t* sizes, const int64_t* y_strides,
                                      const int64_t* grad_strides, const int* flags, int dtype, int activation,
                                      const int64_t* plan, int sm_count, int schedule, int64_t* loads) {
  const ConvEpilogueBackwardArgs a =
      backward_args(grad, y, bias, grad_y, sizes, y_strides, grad_strides, flags, dtype, activation);
  const ConvEpilogueBackwardPlan p{plan[0], plan[1], size_t(plan[2])};
  set_device(sm_count, schedule);
  const cudaError_t e =
      fastattn::conv_epilogue_backward_cuda(a, p, static_cast<float*>(grad_bias), workspace, nullptr);
  report_loads(loads);
  return int(e);
}
}
