// Tensor checks and argument packing shared by csrc/cpu/positional.cpp and csrc/cuda/positional.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "binding.h"
#include "positional.h"

namespace fastattn {

inline void check_dropout_p(double dropout_p, const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

// An int64 index tensor on `device` with `numel` elements, contiguous.
inline void check_index(const at::Tensor& t, int64_t numel, const at::Device& device, const char* op,
                        const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.numel() == numel && t.is_contiguous(), op, ": ", name, " must be contiguous with ", numel,
              " elements, got shape ", t.sizes());
}

// A (rows, dim) table in `dtype` on `device` with unit stride over dim.
inline void check_table(const at::Tensor& t, int64_t dim, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == dim, op, ": ", name, " must be (rows, ", dim, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must be ", like.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(dim <= 1 || t.stride(1) == 1, op, ": ", name, " must have unit stride over its last dim");
}

// x: (batch, seq, dim) when batch_first, else (seq, batch, dim); unit stride over dim. Allocates out contiguous in
// x's layout, so that a dropout row is a row of out in memory order.
inline PositionalAddArgs positional_add_args(const at::Tensor& x, const std::optional<at::Tensor>& table,
                                             const std::optional<at::Tensor>& offsets, int64_t offset, double scale,
                                             double base, bool sinusoid, bool batch_first, double dropout_p,
                                             int64_t seed, at::Tensor& out) {
  const char* op = "positional_add";
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D, got ", x.sizes());
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, op, ": x must have unit stride over its last dim");
  TORCH_CHECK(!(sinusoid && table.has_value()), op, ": pass a table or sinusoid=True, not both");
  check_dropout_p(dropout_p, op);
  const int b = batch_first ? 0 : 1, s = batch_first ? 1 : 0;
  PositionalAddArgs a{};
  a.dtype = dtype_of(x);
  out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  a.x = x.data_ptr();
  a.out = out.data_ptr();
  a.batch = x.size(b);
  a.seq = x.size(s);
  a.dim = x.size(2);
  a.x_stride_b = x.stride(b);
  a.x_stride_s = x.stride(s);
  a.out_stride_b = out.stride(b);
  a.out_stride_s = out.stride(s);
  a.row_stride_b = a.dim > 0 ? a.out_stride_b / a.dim : 0;
  a.row_stride_s = a.dim > 0 ? a.out_stride_s / a.dim : 0;
  a.pe = table.has_value() ? PeKind::kTable : sinusoid ? PeKind::kSinusoid : PeKind::kNone;
  if (table.has_value()) {
    check_table(*table, a.dim, x, op, "table");
    a.table = table->data_ptr();
    a.table_rows = table->size(0);
    a.table_stride = table->stride(0);
  }
  if (offsets.has_value()) {
    check_index(*offsets, a.batch, x.device(), op, "offsets");
    a.offsets = offsets->data_ptr<int64_t>();
  }
  a.offset = offset;
  a.scale = scale;
  TORCH_CHECK(!sinusoid || base > 0.0, op, ": base must be positive, got ", base);
  a.base = base;
  a.dropout = make_dropout(dropout_p, seed);
  return a;
}

// tokens, positions: contiguous (batch, seq) int64; offsets (batch,) int64; the weights (rows, dim), unit stride
// over dim, one dtype. Allocates out, contiguous (batch, seq, dim).
inline EmbeddingForwardArgs embedding_forward_args(const at::Tensor& tokens, const at::Tensor& token_weight,
                                                   const at::Tensor& position_weight,
                                                   const std::optional<at::Tensor>& positions,
                                                   const std::optional<at::Tensor>& offsets, int64_t offset,
                                                   double token_scale, double dropout_p, int64_t seed,
                                                   at::Tensor& out) {
  const char* op = "embedding_forward";
  TORCH_CHECK(tokens.dim() == 2, op, ": tokens must be (batch, seq), got ", tokens.sizes());
  check_index(tokens, tokens.numel(), token_weight.device(), op, "tokens");
  TORCH_CHECK(token_weight.dim() == 2, op, ": token_weight must be (vocab, dim), got ", token_weight.sizes());
  const int64_t dim = token_weight.size(1);
  check_table(token_weight, dim, token_weight, op, "token_weight");
  check_table(position_weight, dim, token_weight, op, "position_weight");
  check_dropout_p(dropout_p, op);
  EmbeddingForwardArgs a{};
  a.dtype = dtype_of(token_weight);
  a.batch = tokens.size(0);
  a.seq = tokens.size(1);
  a.dim = dim;
  out = at::empty({a.batch, a.seq, dim}, token_weight.options().memory_format(at::MemoryFormat::Contiguous));
  a.tokens = tokens.data_ptr<int64_t>();
  if (positions.has_value()) {
    TORCH_CHECK(positions->sizes() == tokens.sizes(), op, ": positions must have the shape of tokens, got ",
                positions->sizes());
    check_index(*positions, tokens.numel(), token_weight.device(), op, "positions");
    a.positions = positions->data_ptr<int64_t>();
  }
  if (offsets.has_value()) {
    check_index(*offsets, a.batch, token_weight.device(), op, "offsets");
    a.offsets = offsets->data_ptr<int64_t>();
  }
  a.token_weight = token_weight.data_ptr();
  a.position_weight = position_weight.data_ptr();
  a.out = out.data_ptr();
  a.vocab = token_weight.size(0);
  a.max_positions = position_weight.size(0);
  a.token_stride = token_weight.stride(0);
  a.position_stride = position_weight.stride(0);
  a.offset = offset;
  a.token_scale = token_scale;
  a.dropout = make_dropout(dropout_p, seed);
  return a;
}

// grad: (n, dim), unit stride over dim; index: (n,) int64 contiguous. Leaves out for the caller to allocate.
inline EmbeddingScatterArgs embedding_scatter_args(const at::Tensor& grad, const at::Tensor& index, int64_t num_rows,
                                                   double scale, int64_t skip_row) {
  const char* op = "embedding_scatter";
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be (n, dim), got ", grad.sizes());
  TORCH_CHECK(grad.size(1) <= 1 || grad.stride(1) == 1, op, ": grad must have unit stride over dim");
  check_index(index, grad.size(0), grad.device(), op, "index");
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  EmbeddingScatterArgs a{};
  a.dtype = dtype_of(grad);
  a.grad = grad.data_ptr();
  a.index = index.data_ptr<int64_t>();
  a.n = grad.size(0);
  a.dim = grad.size(1);
  a.num_rows = num_rows;
  a.grad_stride = grad.stride(0);
  a.skip_row = skip_row;
  a.scale = scale;
  return a;
}

}  // namespace fastattn
