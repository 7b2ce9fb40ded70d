// A C ABI over the emulated CUDA attention launchers, loaded by tests/test_cuda_emulated.py with ctypes: raw
// pointers, strides and scalars in, AttentionForwardArgs / AttentionBackwardArgs (csrc/attention.h) filled as
// csrc/attention_binding.h fills them from tensors, then attention_forward_cuda / attention_backward_cuda.

// csrc/cuda/attention_kernel.cu as gen.py rewrites it (it includes emu.h), by the absolute path the build passes
// (-DEMULATED_KERNEL='"/path/attention_kernel_emu.cpp"'), so that no stale copy elsewhere is picked up.
#include EMULATED_KERNEL

// The library is compiled with -fvisibility=hidden: only these functions are exported, and the emulated CUDA
// runtime functions stay private, so that calls bind to them rather than to a libcudart that torch loaded.
#define EXPORT __attribute__((visibility("default")))

using fastattn::AttentionBackwardArgs;
using fastattn::AttentionForwardArgs;
using fastattn::Dtype;
using fastattn::MaskKind;

// The codes callers pass for dtype and mask kind are these enums' values.
static_assert(int(Dtype::kHalf) == 0 && int(Dtype::kBFloat16) == 1 && int(Dtype::kFloat) == 2, "dtype codes");
static_assert(int(MaskKind::kNone) == 0 && int(MaskKind::kBool) == 1 && int(MaskKind::kSame) == 2 &&
                  int(MaskKind::kFloat) == 3,
              "mask kind codes");

extern "C" {

// The size of the buffer emu_forward_args fills.
EXPORT size_t emu_forward_args_size() { return sizeof(AttentionForwardArgs); }

// Fills *args (emu_forward_args_size() bytes) with one problem of csrc/attention.h:
//   sizes: batch, heads_q, heads_kv, seq_q, seq_k, head_dim, head_dim_v
//   q, k, v and their strides over (batch, head, seq) (9 values; unit stride over the head dim)
//   mask (null: none) of kind mask_kind (1 bool, 2 the input's dtype, 3 float32), strides over (B, Hq, Sq, Sk)
//   key_padding (null: none; bool (B, Sk)) and alibi slopes (null: none; float32 (B, Hq)) with their strides
//   dropout_p and seed as fastattn_C::attention_forward takes them.
EXPORT void emu_forward_args(void* args, int dtype, const int64_t* sizes, const void* q, const void* k,
                             const void* v, const int64_t* qkv_strides, int mask_kind, const void* mask,
                             const int64_t* mask_strides, const void* key_padding, const int64_t* key_padding_strides,
                             const void* alibi, const int64_t* alibi_strides, double scale, int64_t diagonal,
                             int64_t window_left, int64_t window_right, double dropout_p, uint64_t seed) {
  AttentionForwardArgs a{};
  a.dtype = Dtype(dtype);
  a.batch = sizes[0];
  a.heads_q = sizes[1];
  a.heads_kv = sizes[2];
  a.seq_q = sizes[3];
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
  a.mask_kind = MaskKind(mask_kind);
  a.mask = mask;
  for (int i = 0; i < 4; ++i) a.mask_stride[i] = mask_strides[i];
  a.key_padding = static_cast<const uint8_t*>(key_padding);
  a.alibi = static_cast<const float*>(alibi);
  for (int i = 0; i < 2; ++i) {
    a.key_padding_stride[i] = key_padding_strides[i];
    a.alibi_stride[i] = alibi_strides[i];
  }
  a.scale = scale;
  a.diagonal = diagonal;
  a.window_left = window_left;
  a.window_right = window_right;
  a.dropout.on = dropout_p > 0.0;
  if (a.dropout.on) {  // as csrc/attention_binding.h
    a.dropout.threshold = static_cast<uint32_t>(std::ldexp(dropout_p, 32));
    a.dropout.scale = 1.0 / (1.0 - dropout_p);
    a.dropout.key0 = static_cast<uint32_t>(seed);
    a.dropout.key1 = static_cast<uint32_t>(seed >> 32);
  }
  std::memcpy(args, &a, sizeof(a));
}

// attention_forward_cuda on an emulated GPU with smem_limit bytes of opt-in shared memory per block, under
// emu::Schedule `schedule`: out (B, Hq, Sq, Dv) contiguous in the input's dtype, lse (B, Hq, Sq) contiguous
// float32. Returns the cudaError_t.
EXPORT int emu_attention_forward(const void* args, void* out, void* lse, int smem_limit, int schedule) {
  AttentionForwardArgs a;
  std::memcpy(&a, args, sizeof(a));
  a.out = out;
  a.lse = lse;
  emu::smem_limit = smem_limit;
  emu::schedule = emu::Schedule(schedule);
  return int(fastattn::attention_forward_cuda(a, nullptr));
}

// attention_backward_cuda likewise: grad_out with strides over (batch, head, seq), the forward's lse and delta
// (B, Hq, Sq) contiguous float32, dq, dk, dv contiguous in the input's dtype.
EXPORT int emu_attention_backward(const void* args, const void* grad_out, const int64_t* grad_out_strides,
                                  const void* lse, const void* delta, void* dq, void* dk, void* dv, int smem_limit,
                                  int schedule) {
  AttentionBackwardArgs b{};
  std::memcpy(&b.forward, args, sizeof(b.forward));
  b.grad_out = grad_out;
  for (int i = 0; i < 3; ++i) b.grad_out_stride[i] = grad_out_strides[i];
  b.lse = lse;
  b.delta = delta;
  b.dq = dq;
  b.dk = dk;
  b.dv = dv;
  emu::smem_limit = smem_limit;
  emu::schedule = emu::Schedule(schedule);
  return int(fastattn::attention_backward_cuda(b, nullptr));
}
}
