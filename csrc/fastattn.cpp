// The op schemas of the fastattn._C extension.
//
// Every op is declared once here (TORCH_LIBRARY); the CPU and CUDA implementations register themselves in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp (TORCH_LIBRARY_IMPL) and PyTorch's dispatcher picks by device.
// The Python tier (fastattn/ops/<op>.py) wraps these in torch.library custom ops with fake kernels,
// autograd and backend selection.
#include <torch/library.h>

TORCH_LIBRARY(fastattn_C, m) {
  // x: (D0, D1, D2, N), unit stride over N; mask: None or (D0, D1, D2, N), any strides, bool/x.dtype/float32.
  // Returns softmax (or log-softmax) of z = x * scale + mask over N as a contiguous (D0, D1, D2, N) tensor;
  // causal masks column j of row i2 when j > i2 + N - D2.
  m.def("softmax_forward(Tensor x, Tensor? mask, float scale, bool causal, bool log) -> Tensor");
  // grad: (R, N), unit stride over N; out: contiguous (R, N), the forward's output. Returns dx (R, N).
  m.def("softmax_backward(Tensor grad, Tensor out, float scale, bool log) -> Tensor");
  // q: (B, Hq, Sq, D), k: (B, Hkv, Sk, D), v: (B, Hkv, Sk, Dv), unit stride over the last dim; mask: None or
  // (B, Hq, Sq, Sk), any strides, bool (True = attend) / q.dtype / float32 (added); key_padding: None or
  // (B, Sk) bool, True = padding; alibi: None or (B, Hq) float32 slopes, any strides; dropout_p in [0, 1) with
  // the 64-bit Philox seed (csrc/philox.h). See csrc/attention.h.
  // Returns out (B, Hq, Sq, Dv) contiguous in q.dtype and lse (B, Hq, Sq) float32 (float64 for float64).
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? key_padding, Tensor? alibi, "
        "float scale, int diagonal, int window_left, int window_right, float dropout_p, int seed) -> (Tensor, Tensor)");
  // The gradients of attention_forward: grad_out (B, Hq, Sq, Dv) and q, k, v, mask, key_padding, alibi as in the
  // forward (the same dropout_p and seed replay the forward's dropout); lse (B, Hq, Sq) the forward's; delta (B, Hq, Sq) = rowsum(grad_out * out) - grad_lse, float32
  // (float64 for float64). Returns dq (B, Hq, Sq, D), dk (B, Hkv, Sk, D), dv (B, Hkv, Sk, Dv) in q.dtype.
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, Tensor? mask, "
        "Tensor? key_padding, Tensor? alibi, float scale, int diagonal, int window_left, int window_right, "
        "float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
  // KV-cache decoding attention: q (B, Hq, n, D), k_cache (B, Hkv, S, D), v_cache (B, Hkv, S, Dv), unit stride over
  // the last dim; lengths (B,) int64 on q's device, the valid keys of each cache; alibi: None or (B, Hq) float32
  // slopes, any strides. Query i of batch b sits at position lengths[b] - n + i and sees keys j < lengths[b] with
  // -window_left <= j - position <= window_right (-1: unbounded; causal: window_right = 0). See csrc/kvcache.h.
  // Returns out (B, Hq, n, Dv) contiguous in q.dtype and lse (B, Hq, n) float32; no key seen: 0 and -inf.
  m.def("kvcache_forward(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, Tensor? alibi, float scale, "
        "int window_left, int window_right) -> (Tensor, Tensor)");
  // LayerNorm (rms = false) or RMSNorm of z = dropout(x) + residual over each row (see csrc/norm.h):
  // x (R, N) and residual None or (R, N), unit stride over N; weight, bias None or contiguous (N,) in x.dtype or
  // float32; dropout_p in [0, 1) with the 64-bit Philox seed (elementwise dropout, csrc/philox.h).
  // Returns out (R, N) contiguous in x.dtype; residual_out = z, contiguous (R, N) in residual_out_dtype, stored
  // only when that dtype is given (else an empty tensor); mean (R,) (empty for RMSNorm) and rstd (R,) in float32
  // (float64 for float64 x).
  m.def("norm_forward(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms, "
        "float dropout_p, int seed, ScalarType? residual_out_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  // The gradients of norm_forward: grad_out (R, N) in x_dtype, unit stride over N; grad_residual None or (R, N), the
  // gradient of residual_out, in z's dtype; z (R, N), unit stride over N: residual_out, or x when none was stored;
  // weight, mean, rstd, rms, dropout_p and seed as in the forward; has_bias: whether the forward had a bias.
  // Returns grad_x (R, N) in x_dtype; grad_residual_in (R, N) in residual_dtype (empty when None); grad_weight and
  // grad_bias (N,) in weight's dtype (empty without weight / bias).
  m.def("norm_backward(Tensor grad_out, Tensor? grad_residual, Tensor z, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool rms, bool has_bias, float dropout_p, int seed, ScalarType x_dtype, ScalarType? residual_dtype) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Rotary position embeddings (see csrc/rotary.h): rotates q (B, Hq, S, D) and k None or (B, Hk, S, D), unit
  // stride over D, into q_out / k_out (same shapes, unit stride over D; fresh tensors, or q / k themselves to
  // rotate in place). positions None or (B, S) int64, any strides; offsets None or contiguous (B,) int64;
  // cos, sin None or (P, rotary_dim / 2) tables in float32 (float64 for float64 q), unit stride over pairs; a
  // position outside the tables gives NaN. inverse rotates by minus the angles (the backward).
  m.def("rotary(Tensor q, Tensor? k, Tensor(a!) q_out, Tensor(b!)? k_out, Tensor? positions, Tensor? offsets, "
        "Tensor? cos, Tensor? sin, int offset, int rotary_dim, bool interleaved, float base, bool inverse) -> ()");
  // Positional encodings (see csrc/positional.h). positional_add: out = dropout(x * scale + PE[pos]) with x
  // (batch, seq, D) when batch_first else (seq, batch, D), unit stride over D; pos = offset + offsets[b] + s with
  // offsets None or (batch,) int64. PE: table[pos] for a (P, D) table in x.dtype (unit stride over D), else the
  // sinusoid of `base` when sinusoid, else 0. Elementwise dropout (csrc/philox.h) over the rows of the output,
  // which is contiguous in x's layout.
  m.def("positional_add(Tensor x, Tensor? table, Tensor? offsets, int offset, float scale, float base, bool sinusoid, "
        "bool batch_first, float dropout_p, int seed) -> Tensor");
  // out (batch, seq, D) = dropout(token_weight[tokens] * token_scale + position_weight[pos]): tokens and positions
  // contiguous (batch, seq) int64, pos = positions, else offset + offsets[b] + s; the weights (rows, D) in one dtype,
  // unit stride over D. Dropout row b * seq + s.
  m.def("embedding_forward(Tensor tokens, Tensor token_weight, Tensor position_weight, Tensor? positions, "
        "Tensor? offsets, int offset, float token_scale, float dropout_p, int seed) -> Tensor");
  // The backward of a gather: out (num_rows, D) in grad's dtype, out[v] = scale * sum of grad[n] over index[n] = v,
  // row skip_row (>= 0) zero. grad (n, D) unit stride over D; index (n,) int64 contiguous.
  m.def("embedding_scatter(Tensor grad, Tensor index, int num_rows, float scale, int skip_row) -> Tensor");
  // One direction of one recurrent layer over time (see csrc/recurrent.h, csrc/recurrent_driver.h): kind 0 LSTM
  // (gates i, f, g, o), 1 GRU (r, z, n), 2 tanh RNN, 3 ReLU RNN, 4 LayerNorm-LSTM; x_proj (S, B, G*H) = x W_ih^T
  // + b_ih (LayerNorm-LSTM: LN_ih(x W_ih^T), b_hh = b_ih + b_hh), unit stride over G*H; h0 (B, P) and c0 (B, H) (LSTM) in x_proj's dtype; w_hh (G*H, P); b_hh None or (G*H,); w_hr None or
  // (P, H), the LSTM's projection (else P = H); lengths None or contiguous (B,) int64: row b is live at steps
  // t < lengths[b] (others keep the state and output 0); reverse runs from step S - 1 down. Returns out (S, B, P),
  // hstate (S + 1, B, P) with the state before step t at t + reverse and after it at t + 1 - reverse, cstate
  // (S + 1, B, H) likewise in float32 (float64 for float64; empty but for the LSTM) and, when save, the saved
  // activations (S, B, W) in that type for the backward (else empty). The norm_* (None: weight 1, bias 0;
  // (4H,) for hh, (H,) for c, in x_proj's dtype) and eps are the LayerNorm-LSTM's, ignored by the other kinds.
  m.def("recurrent_forward(int kind, Tensor x_proj, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
        "Tensor? lengths, bool reverse, bool save, Tensor? norm_hh_weight, Tensor? norm_hh_bias, "
        "Tensor? norm_c_weight, Tensor? norm_c_bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Inference of one direction of one recurrent layer on its input x (S, B, I) with w_ih (G*H, I) and b_ih None or
  // (G*H,), the rest as recurrent_forward: chunk steps at a time, the input projection of each chunk one matmul. The
  // LayerNorm-LSTM's cells normalise the projection x W_ih^T with LN_ih (norm_ih_* (4H,)) and add b_ih + b_hh after
  // the norms. Returns out (S, B, P), h_n (B, P) and c_n (B, H) (empty but for the LSTMs). CPU only.
  m.def("recurrent_inference(int kind, Tensor x, Tensor w_ih, Tensor? b_ih, Tensor h0, Tensor? c0, Tensor w_hh, "
        "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, int chunk, Tensor? norm_ih_weight, "
        "Tensor? norm_ih_bias, Tensor? norm_hh_weight, Tensor? norm_hh_bias, Tensor? norm_c_weight, "
        "Tensor? norm_c_bias, float eps) -> (Tensor, Tensor, Tensor)");
  // Backward through time of recurrent_forward from grad_out (S, B, P) (unit stride over P) and the gradients of
  // h_n (B, P) and c_n (B, H) (None: zero), with the forward's w_hh, w_hr, hstate, cstate, saved, lengths and
  // reverse. Returns d_x_proj (S, B, G*H), d_h0 (B, P), d_c0 (B, H) (empty but for the LSTM), d_w_hh (G*H, P),
  // d_b_hh (G*H,), d_w_hr (P, H) (empty without a projection) and the LayerNorm-LSTM's d_norms (10H,): the
  // gradients of norm_hh_weight, norm_hh_bias, norm_c_weight, norm_c_bias concatenated (empty for the other
  // kinds), in grad_out's dtype.
  m.def("recurrent_backward(int kind, Tensor grad_out, Tensor? grad_h_n, Tensor? grad_c_n, Tensor w_hh, "
        "Tensor? w_hr, Tensor hstate, Tensor cstate, Tensor saved, Tensor? lengths, bool reverse, "
        "Tensor? norm_hh_weight, Tensor? norm_hh_bias, Tensor? norm_c_weight, Tensor? norm_c_bias) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // out (M, N) = a (M, K) b (K, N) (+ bias (N,)): the recurrent layers' input projections and their gradient, float32
  // on the CPU's packed step GEMM (csrc/cpu/step_gemm.h) where it runs (on Intel CPUs, not the largest), else oneDNN
  // or ATen's addmm. CPU only.
  m.def("recurrent_matmul(Tensor a, Tensor b, Tensor? bias) -> Tensor");
  // out (M, N) = x (M, K) weight^T (+ bias (N,)) for at most 16 rows (csrc/cpu/decode_linear_kernel.h), float32:
  // the linears of a decoding step. CPU only.
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Convolution epilogue (see csrc/conv_epilogue.h): out = maxpool2x2(act(y + bias[c])), the pool optional, with y
  // (N, C, H, W) NCHW (unit stride over W) or NHWC (unit stride over C, W's stride C), in y's dtype; bias None or
  // contiguous (C,) in float32 (float64 for float64 y); activation one of none, relu, gelu, gelu_tanh, silu; pool:
  // 2x2 windows, stride 2, floor-sized, the first maximum (or the last NaN) wins, as torch's max_pool2d. Returns out
  // (N, C, H', W') contiguous in y's layout (NHWC when C > 1, C's stride is 1 and W's is not).
  m.def("conv_epilogue_forward(Tensor y, Tensor? bias, str activation, bool pool) -> Tensor");
  // The gradients of conv_epilogue_forward from grad (N, C, H', W') in y's dtype and inner layout (any outer
  // strides) and the forward's y, bias, activation and pool: grad_y (N, C, H, W) contiguous in y's layout, and, when
  // bias_grad, grad_bias (C,) = grad_y summed over N, H, W in float32 (float64 for float64 y), else an empty tensor.
  m.def("conv_epilogue_backward(Tensor grad, Tensor y, Tensor? bias, str activation, bool pool, bool bias_grad) "
        "-> (Tensor, Tensor)");
}
