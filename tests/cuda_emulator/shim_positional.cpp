// A C ABI over the emulated CUDA positional-encoding launchers, loaded by tests/test_cuda_emulated_positional.py with
// ctypes: raw pointers, sizes, strides and scalars in, PositionalAddArgs / EmbeddingForwardArgs / EmbeddingScatterArgs
// (csrc/positional.h) filled as csrc/positional_binding.h fills them from tensors, then positional_add_cuda,
// embedding_forward_cuda and embedding_scatter_cuda (csrc/cuda/positional_kernel.h) on an emulated device whose
// multiprocessor count and schedule each call sets. Each call also reports emu::ldg_loads, the kernel's read-only
// loads by size, which tells its vector path from its element path.

// csrc/cuda/positional_kernel.cu as gen.py rewrites it (it includes emu.h), by the absolute path the build passes
// (-DEMULATED_KERNEL='"/path/positional_kernel_emu.cpp"'). A translation unit and library of its own, as each kernel
// file.
#include EMULATED_KERNEL

// Only these functions are exported (-fvisibility=hidden): calls to the CUDA runtime bind to emu.h's.
#define EXPORT __attribute__((visibility("default")))

using fastattn::Dtype;
using fastattn::EmbeddingForwardArgs;
using fastattn::EmbeddingScatterArgs;
using fastattn::PeKind;
using fastattn::PositionalAddArgs;

static_assert(int(Dtype::kHalf) == 0 && int(Dtype::kBFloat16) == 1 && int(Dtype::kFloat) == 2 &&
                  int(Dtype::kDouble) == 3,
              "dtype codes");
static_assert(int(PeKind::kNone) == 0 && int(PeKind::kSinusoid) == 1 && int(PeKind::kTable) == 2, "PE codes");

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
}  // namespace

extern "C" {

// positional_add_cuda for x viewed as (batch, seq, dim): sizes = (batch, seq, dim, table_rows); strides = (x batch,
// x seq, out batch, out seq, table row) in elements; the dropout row strides are out's divided by dim, as the
// binding sets them (out contiguous in x's layout); pe a PeKind code; null table / offsets when absent. Returns the
// cudaError_t.
EXPORT int emu_positional_add(const void* x, void* out, const void* table, const int64_t* offsets,
                              const int64_t* sizes, const int64_t* strides, int64_t offset, int dtype, int pe,
                              double scale, double base, double dropout_p, int64_t seed, int sm_count, int schedule,
                              int64_t* loads) {
  PositionalAddArgs a{};
  a.x = x;
  a.out = out;
  a.table = table;
  a.offsets = offsets;
  a.batch = sizes[0];
  a.seq = sizes[1];
  a.dim = sizes[2];
  a.table_rows = sizes[3];
  a.x_stride_b = strides[0];
  a.x_stride_s = strides[1];
  a.out_stride_b = strides[2];
  a.out_stride_s = strides[3];
  a.table_stride = strides[4];
  a.row_stride_b = a.dim > 0 ? a.out_stride_b / a.dim : 0;
  a.row_stride_s = a.dim > 0 ? a.out_stride_s / a.dim : 0;
  a.offset = offset;
  a.dtype = Dtype(dtype);
  a.pe = PeKind(pe);
  a.scale = scale;
  a.base = base;
  a.dropout = fastattn::make_dropout(dropout_p, seed);
  set_device(sm_count, schedule);
  const int error = int(fastattn::positional_add_cuda(a, nullptr));
  report_loads(loads);
  return error;
}

// embedding_forward_cuda: sizes = (batch, seq, dim, vocab, max_positions); strides = (token_weight row,
// position_weight row); tokens, positions (or null) contiguous (batch, seq); offsets (batch,) or null; out
// contiguous (batch, seq, dim). Returns the cudaError_t.
EXPORT int emu_embedding_forward(const int64_t* tokens, const int64_t* positions, const int64_t* offsets,
                                 const void* token_weight, const void* position_weight, void* out,
                                 const int64_t* sizes, const int64_t* strides, int64_t offset, int dtype,
                                 double token_scale, double dropout_p, int64_t seed, int sm_count, int schedule,
                                 int64_t* loads) {
  EmbeddingForwardArgs a{};
  a.tokens = tokens;
  a.positions = positions;
  a.offsets = offsets;
  a.token_weight = token_weight;
  a.position_weight = position_weight;
  a.out = out;
  a.batch = sizes[0];
  a.seq = sizes[1];
  a.dim = sizes[2];
  a.vocab = sizes[3];
  a.max_positions = sizes[4];
  a.token_stride = strides[0];
  a.position_stride = strides[1];
  a.offset = offset;
  a.dtype = Dtype(dtype);
  a.token_scale = token_scale;
  a.dropout = fastattn::make_dropout(dropout_p, seed);
  set_device(sm_count, schedule);
  const int error = int(fastattn::embedding_forward_cuda(a, nullptr));
  report_loads(loads);
  return error;
}

// embedding_scatter_cuda: sizes = (n, dim, num_rows); grad (n, dim) with row stride grad_stride; index (n,)
// contiguous; acc the zero-filled float32 (num_rows, dim) buffer the binding allocates. Returns the cudaError_t.
EXPORT int emu_embedding_scatter(const void* grad, const int64_t* index, float* acc, const int64_t* sizes,
                                 int64_t grad_stride, int64_t skip_row, int dtype, double scale, int sm_count,
                                 int schedule, int64_t* loads) {
  EmbeddingScatterArgs a{};
  a.grad = grad;
  a.index = index;
  a.out = acc;
  a.n = sizes[0];
  a.dim = sizes[1];
  a.num_rows = sizes[2];
  a.grad_stride = grad_stride;
  a.skip_row = skip_row;
  a.dtype = Dtype(dtype);
  a.scale = scale;
  set_device(sm_count, schedule);
  const int error = int(fastattn::embedding_scatter_cuda(a, nullptr));
  report_loads(loads);
  return error;
}
}
