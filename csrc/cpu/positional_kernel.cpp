// CPU positional-encoding kernels on raw pointers (arguments and maths: csrc/positional.h).
//
// positional_add: out = dropout(x * scale + PE) over rows of dim values, in the compute type C (float for
// half/bfloat16/float, double for double). A task is a tile of T consecutive positions of one sequence; the
// sinusoid of a tile (T x dim values, about 32 KiB) is computed once and reused by the tasks of every sequence
// that follow it on the same thread, so the sin/cos work is divided by the batch size when positions do not
// depend on the sequence (no per-sequence offsets). The sinusoid loop is branch-free and vectorises (double
// reduction, float Taylor polynomials, selects).
//
// embedding_forward: out = dropout(token_weight[token] * token_scale + position_weight[position]), row by row.
//
// embedding_scatter: a counting sort groups the entries by table row (serial, O(n + rows)), then each table row
// sums its entries in entry order in the compute type and is written once: no atomics, no per-thread copies of
// the table, and the same bits for any number of threads.
//
// Half and bfloat16 rows are converted to float through per-thread scratch rows (vec_math.h), as in softmax.
// The per-dtype entry points are compiled for AVX-512, AVX2 + FMA and baseline x86-64 (target_clones).
#include "positional_kernel.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace fastattn {
namespace {

using cpu::compute_t;

// The sinusoid tile of a task: about this many bytes of compute-type values.
constexpr int64_t kTileBytes = 32 * 1024;

// The dropout factor of each column of dropout row `row`: 1 / (1 - p) where kept, 0 where dropped. mult holds
// dim rounded up to a multiple of 4 values.
template <class C>
FASTATTN_INLINE void dropout_factors(const Dropout& d, uint64_t row, int64_t dim, C* __restrict mult) {
  const C keep = static_cast<C>(d.scale);
  const int64_t groups = (dim + 3) / 4;
  for (int64_t g = 0; g < groups; ++g) {
    const Philox4 w = elementwise_dropout_bits(d, row, static_cast<uint32_t>(g));
    for (int k = 0; k < 4; ++k) mult[4 * g + k] = w.x[k] >= d.threshold ? keep : C(0);
  }
}

// Per-column rates of the sinusoid: turns per position (float compute) or radians per position (double).
template <class C>
void column_rates(int64_t dim, double base, double* rate) {
  for (int64_t c = 0; c < dim; ++c) {
    const double f = pe::frequency(c / 2, dim, base);
    rate[c] = std::is_same_v<C, double> ? f : f * pe::kInvTwoPi;
  }
}

// One row of the sinusoid at position pos.
FASTATTN_INLINE void sinusoid_row(double pos, const double* __restrict turns, int64_t dim, float* __restrict out) {
  for (int64_t c = 0; c < dim; ++c) {
    int quadrant;
    const float r = pe::reduce_quarter_turns(pos, turns[c], quadrant);
    out[c] = pe::select_quadrant(pe::sin_small(r), pe::cos_small(r), quadrant + static_cast<int>(c & 1));
  }
}

FASTATTN_INLINE void sinusoid_row(double pos, const double* __restrict radians, int64_t dim, double* __restrict out) {
  for (int64_t c = 0; c < dim; ++c) {
    const double angle = pos * radians[c];
    out[c] = (c & 1) ? std::cos(angle) : std::sin(angle);
  }
}

// Tasks [begin, end) of positional_add; returns the first row whose table position is out of range, or -1.
template <class T, PeKind kPe, bool kDropout>
FASTATTN_INLINE int64_t add_tasks(const PositionalAddArgs& a, int64_t begin, int64_t end) {
  using C = compute_t<T>;
  const int64_t dim = a.dim, tile = positional_add_tile(a);
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const T* table = static_cast<const T*>(a.table);
  const C scale = static_cast<C>(a.scale);
  cpu::RowStage<T> stage(dim);
  std::vector<double> rates(kPe == PeKind::kSinusoid ? dim : 0);
  std::vector<C> pe_tile(kPe == PeKind::kSinusoid ? tile * dim : 0);
  std::vector<C> mult(kDropout ? (dim + 3) / 4 * 4 : 0);
  if constexpr (kPe == PeKind::kSinusoid) column_rates<C>(dim, a.base, rates.data());
  int64_t cached_tile = -1;  // the tile pe_tile holds when positions do not depend on the sequence
  int64_t bad = -1;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t tile_index = t / a.batch, b = t % a.batch;
    const int64_t s_begin = tile_index * tile, s_end = std::min(a.seq, s_begin + tile);
    const int64_t first = a.offset + (a.offsets ? a.offsets[b] : 0);  // the position of s = 0
    if constexpr (kPe == PeKind::kSinusoid) {
      if (a.offsets || tile_index != cached_tile) {
        for (int64_t s = s_begin; s < s_end; ++s) {
          sinusoid_row(static_cast<double>(first + s), rates.data(), dim, pe_tile.data() + (s - s_begin) * dim);
        }
        cached_tile = a.offsets ? -1 : tile_index;
      }
    }
    for (int64_t s = s_begin; s < s_end; ++s) {
      const C* pe_row = nullptr;
      if constexpr (kPe == PeKind::kSinusoid) pe_row = pe_tile.data() + (s - s_begin) * dim;
      if constexpr (kPe == PeKind::kTable) {
        const int64_t pos = first + s;
        if (pos < 0 || pos >= a.table_rows) {
          if (bad < 0) bad = b * a.seq + s;
          continue;
        }
        pe_row = stage.load(table + pos * a.table_stride, 1);
      }
      if constexpr (kDropout) {
        dropout_factors(a.dropout, static_cast<uint64_t>(b * a.row_stride_b + s * a.row_stride_s), dim, mult.data());
      }
      T* out_row = out + b * a.out_stride_b + s * a.out_stride_s;
      const C* __restrict xv = stage.load(x + b * a.x_stride_b + s * a.x_stride_s, 0);
      C* __restrict ov = stage.output(out_row);
      for (int64_t c = 0; c < dim; ++c) {
        C v = xv[c] * scale;
        if constexpr (kPe != PeKind::kNone) v += pe_row[c];
        if constexpr (kDropout) v *= mult[c];
        ov[c] = v;
      }
      stage.store(out_row);
    }
  }
  return bad;
}

template <class T, PeKind kPe>
FASTATTN_INLINE int64_t add_tasks_dropout(const PositionalAddArgs& a, int64_t begin, int64_t end) {
  return a.dropout.on ? add_tasks<T, kPe, true>(a, begin, end) : add_tasks<T, kPe, false>(a, begin, end);
}

template <class T>
FASTATTN_INLINE int64_t add_tasks_any(const PositionalAddArgs& a, int64_t begin, int64_t end) {
  switch (a.pe) {
    case PeKind::kNone: return add_tasks_dropout<T, PeKind::kNone>(a, begin, end);
    case PeKind::kSinusoid: return add_tasks_dropout<T, PeKind::kSinusoid>(a, begin, end);
    case PeKind::kTable: return add_tasks_dropout<T, PeKind::kTable>(a, begin, end);
  }
  return -1;
}

// Rows [begin, end) of embedding_forward; returns the first row with an index out of range, or -1.
template <class T, bool kDropout>
FASTATTN_INLINE int64_t embed_rows(const EmbeddingForwardArgs& a, int64_t begin, int64_t end) {
  using C = compute_t<T>;
  const int64_t dim = a.dim;
  const T* token_weight = static_cast<const T*>(a.token_weight);
  const T* position_weight = static_cast<const T*>(a.position_weight);
  T* out = static_cast<T*>(a.out);
  const C token_scale = static_cast<C>(a.token_scale);
  cpu::RowStage<T> stage(dim);
  std::vector<C> mult(kDropout ? (dim + 3) / 4 * 4 : 0);
  int64_t bad = -1;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / a.seq, s = r % a.seq;
    const int64_t token = a.tokens[r];
    const int64_t pos = a.positions ? a.positions[r] : a.offset + (a.offsets ? a.offsets[b] : 0) + s;
    if (token < 0 || token >= a.vocab || pos < 0 || pos >= a.max_positions) {
      if (bad < 0) bad = r;
      continue;
    }
    if constexpr (kDropout) dropout_factors(a.dropout, static_cast<uint64_t>(r), dim, mult.data());
    const C* __restrict tv = stage.load(token_weight + token * a.token_stride, 0);
    const C* __restrict pv = stage.load(position_weight + pos * a.position_stride, 1);
    T* out_row = out + r * dim;
    C* __restrict ov = stage.output(out_row);
    for (int64_t c = 0; c < dim; ++c) {
      C v = tv[c] * token_scale + pv[c];
      if constexpr (kDropout) v *= mult[c];
      ov[c] = v;
    }
    stage.store(out_row);
  }
  return bad;
}

// Rows [begin, end) of embedding_scatter from the plan.
template <class T>
FASTATTN_INLINE void scatter_rows(const EmbeddingScatterArgs& a, const int64_t* starts, const int64_t* order,
                                  int64_t begin, int64_t end) {
  using C = compute_t<T>;
  const int64_t dim = a.dim;
  const T* grad = static_cast<const T*>(a.grad);
  T* out = static_cast<T*>(a.out);
  const C scale = static_cast<C>(a.scale);
  cpu::RowStage<T> stage(dim);
  std::vector<C> acc(dim);
  for (int64_t v = begin; v < end; ++v) {
    T* out_row = out + v * dim;
    if (v == a.skip_row || starts[v] == starts[v + 1]) {
      std::fill(out_row, out_row + dim, T(0));
      continue;
    }
    C* __restrict sum = acc.data();
    std::fill(sum, sum + dim, C(0));
    for (int64_t k = starts[v]; k < starts[v + 1]; ++k) {
      const C* __restrict g = stage.load(grad + order[k] * a.grad_stride, 0);
      for (int64_t c = 0; c < dim; ++c) sum[c] += g[c];
    }
    C* __restrict ov = stage.output(out_row);
    for (int64_t c = 0; c < dim; ++c) ov[c] = sum[c] * scale;
    stage.store(out_row);
  }
}

// Non-template entry points, one set per dtype: target_clones needs plain functions.
#define FASTATTN_DEFINE_ENTRY_POINTS(T, name)                                                                  \
  FASTATTN_TARGET_CLONES int64_t add_tasks_##name(const PositionalAddArgs& a, int64_t begin, int64_t end) {    \
    return add_tasks_any<T>(a, begin, end);                                                                    \
  }                                                                                                            \
  FASTATTN_TARGET_CLONES int64_t embed_rows_##name(const EmbeddingForwardArgs& a, int64_t begin, int64_t end) { \
    return a.dropout.on ? embed_rows<T, true>(a, begin, end) : embed_rows<T, false>(a, begin, end);            \
  }                                                                                                            \
  FASTATTN_TARGET_CLONES void scatter_rows_##name(const EmbeddingScatterArgs& a, const int64_t* starts,        \
                                                  const int64_t* order, int64_t begin, int64_t end) {          \
    scatter_rows<T>(a, starts, order, begin, end);                                                             \
  }

FASTATTN_DEFINE_ENTRY_POINTS(c10::Half, half)
FASTATTN_DEFINE_ENTRY_POINTS(c10::BFloat16, bfloat16)
FASTATTN_DEFINE_ENTRY_POINTS(float, float)
FASTATTN_DEFINE_ENTRY_POINTS(double, double)
#undef FASTATTN_DEFINE_ENTRY_POINTS

}  // namespace

int64_t positional_add_tile(const PositionalAddArgs& args) {
  const int64_t bytes = args.dim * (args.dtype == Dtype::kDouble ? 8 : 4);
  return std::clamp<int64_t>(kTileBytes / std::max<int64_t>(bytes, 1), 1, std::max<int64_t>(args.seq, 1));
}

int64_t positional_add_cpu_tasks(const PositionalAddArgs& args, int64_t task_begin, int64_t task_end) {
  switch (args.dtype) {
    case Dtype::kHalf: return add_tasks_half(args, task_begin, task_end);
    case Dtype::kBFloat16: return add_tasks_bfloat16(args, task_begin, task_end);
    case Dtype::kFloat: return add_tasks_float(args, task_begin, task_end);
    case Dtype::kDouble: return add_tasks_double(args, task_begin, task_end);
  }
  return -1;
}

int64_t embedding_forward_cpu_rows(const EmbeddingForwardArgs& args, int64_t row_begin, int64_t row_end) {
  switch (args.dtype) {
    case Dtype::kHalf: return embed_rows_half(args, row_begin, row_end);
    case Dtype::kBFloat16: return embed_rows_bfloat16(args, row_begin, row_end);
    case Dtype::kFloat: return embed_rows_float(args, row_begin, row_end);
    case Dtype::kDouble: return embed_rows_double(args, row_begin, row_end);
  }
  return -1;
}

int64_t embedding_scatter_plan(const EmbeddingScatterArgs& args, int64_t* starts, int64_t* order) {
  std::fill(starts, starts + args.num_rows + 1, int64_t(0));
  for (int64_t n = 0; n < args.n; ++n) {
    const int64_t v = args.index[n];
    if (v < 0 || v >= args.num_rows) return n;
    ++starts[v + 1];
  }
  for (int64_t v = 0; v < args.num_rows; ++v) starts[v + 1] += starts[v];
  std::vector<int64_t> next(starts, starts + args.num_rows);
  for (int64_t n = 0; n < args.n; ++n) order[next[args.index[n]]++] = n;
  return -1;
}

void embedding_scatter_cpu_rows(const EmbeddingScatterArgs& args, const int64_t* starts, const int64_t* order,
                                int64_t row_begin, int64_t row_end) {
  switch (args.dtype) {
    case Dtype::kHalf: return scatter_rows_half(args, starts, order, row_begin, row_end);
    case Dtype::kBFloat16: return scatter_rows_bfloat16(args, starts, order, row_begin, row_end);
    case Dtype::kFloat: return scatter_rows_float(args, starts, order, row_begin, row_end);
    case Dtype::kDouble: return scatter_rows_double(args, starts, order, row_begin, row_end);
  }
}

}  // namespace fastattn
