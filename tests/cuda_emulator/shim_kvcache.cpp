// A C ABI over the emulated CUDA split-KV decoding launchers, loaded by tests/test_cuda_emulated_kvcache.py with
// ctypes: raw pointers, strides and scalars in, KvcacheArgs (csrc/kvcache.h) filled as csrc/kvcache_binding.h fills
// it from tensors, then kvcache_plan and kvcache_forward_cuda (csrc/cuda/kvcache_kernel.h) on an emulated device
// whose multiprocessor count and opt-in shared memory per block each call sets.

// csrc/cuda/kvcache_kernel.cu as gen.py rewrites it (it includes emu.h), by the absolute path the build passes
// (-DEMULATED_KERNEL='"/path/kvcache_kernel_emu.cpp"'). A translation unit of its own (shim.cpp holds the attention
// kernels): both .cu files define helpers of the same names in anonymous namespaces, and emu.h defines the runtime.
#include EMULATED_KERNEL

// Only these functions are exported (-fvisibility=hidden): calls to the CUDA runtime bind to emu.h's.
#define EXPORT __attribute__((visibility("default")))

using fastattn::Dtype;
using fastattn::KvcacheArgs;
using fastattn::KvcachePlan;

static_assert(int(Dtype::kHalf) == 0 && int(Dtype::kBFloat16) == 1 && int(Dtype::kFloat) == 2, "dtype codes");

namespace {
void set_device(int sm_count, int smem_limit) {
  emu::sm_count = sm_count;
  emu::smem_limit = smem_limit;
}
}  // namespace

extern "C" {

// The size of the buffer emu_kvcache_args fills.
EXPORT size_t emu_kvcache_args_size() { return sizeof(KvcacheArgs); }

// Fills *args (emu_kvcache_args_size() bytes) with one problem of csrc/kvcache.h:
//   sizes: batch, heads_q, heads_kv, n_queries, seq_k (the caches' capacity), head_dim, head_dim_v
//   q, k, v and their strides over (batch, head, seq) (9 values; unit stride over the head dim)
//   lengths (int64 (batch,)) with its stride, alibi slopes (null: none; float32 (B, Hq)) with their 2 strides
//   scale, window_left, window_right, split_size (0: planned) as KvcacheArgs takes them.
EXPORT void emu_kvcache_args(void* args, int dtype, const int64_t* sizes, const void* q, const void* k, const void* v,
                             const int64_t* qkv_strides, const void* lengths, int64_t lengths_stride,
                             const void* alibi, const int64_t* alibi_strides, double scale, int64_t window_left,
                             int64_t window_right, int64_t split_size) {
  KvcacheArgs a{};
  a.dtype = Dtype(dtype);
  a.batch = sizes[0];
  a.heads_q = sizes[1];
  a.heads_kv = sizes[2];
  a.n_queries = sizes[3];
  a.seq_k = sizes[4];
  a.head_dim = sizes[5];
  a.head_dim_v = sizes[6];
  a.q = q;
  a.k = k;
  a.v = v;
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = qkv_strides[i];
    a.k_stride[i] = qkv_strides[3 + i];
    a.v_stride[i] = qkv_strides[6 + i];
  }
  a.lengths = static_cast<const int64_t*>(lengths);
  a.lengths_stride = lengths_stride;
  a.alibi = static_cast<const float*>(alibi);
  a.alibi_stride[0] = alibi_strides[0];
  a.alibi_stride[1] = alibi_strides[1];
  a.scale = scale;
  a.window_left = window_left;
  a.window_right = window_right;
  a.split_size = split_size;
  std::memcpy(args, &a, sizeof(a));
}

// kvcache_plan on an emulated GPU with sm_count multiprocessors and smem_limit bytes of opt-in shared memory per
// block; plan receives (splits, split_size, scratch_bytes). Returns the cudaError_t.
EXPORT int emu_kvcache_plan(const void* args, int64_t* plan, int sm_count, int smem_limit) {
  KvcacheArgs a;
  std::memcpy(&a, args, sizeof(a));
  set_device(sm_count, smem_limit);
  KvcachePlan p{};
  const cudaError_t e = fastattn::kvcache_plan(a, &p);
  plan[0] = p.splits;
  plan[1] = p.split_size;
  plan[2] = int64_t(p.scratch_bytes);
  return int(e);
}

// kvcache_forward_cuda with the plan (splits, split_size, scratch_bytes) and its scratch on the same device, under
// emu::Schedule `schedule`: out (B, Hq, n, Dv) contiguous in the input's dtype, lse (B, Hq, n) contiguous float32.
// Returns the cudaError_t.
EXPORT int emu_kvcache_forward(const void* args, const int64_t* plan, void* scratch, void* out, void* lse,
                               int sm_count, int smem_limit, int schedule) {
  KvcacheArgs a;
  std::memcpy(&a, args, sizeof(a));
  a.out = out;
  a.lse = static_cast<float*>(lse);
  set_device(sm_count, smem_limit);
  emu::schedule = emu::Schedule(schedule);
  const KvcachePlan p{plan[0], plan[1], size_t(plan[2])};
  return int(fastattn::kvcache_forward_cuda(a, p, scratch, nullptr));
}
}
