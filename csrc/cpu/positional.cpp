// CPU implementation of the fastattn_C positional-encoding ops (schemas in csrc/fastattn.cpp): checks and argument
// packing in csrc/positional_binding.h, the kernels in csrc/cpu/positional_kernel.cpp, work split over
// at::parallel_for. Indices out of range are found by the kernels as they go (no extra pass) and raised here.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../positional_binding.h"
#include "huge_pages.h"
#include "positional_kernel.h"

namespace fastattn {
namespace {

// Work per task: about this many elements at least, so that small inputs stay on the calling thread.
constexpr int64_t kMinElementsPerTask = 32768;

// Runs fn(begin, end) over [0, n) in parallel, fn returning the first bad index of its range or -1; returns the
// smallest bad index over all ranges, or -1.
template <class F>
int64_t parallel_first_bad(int64_t n, int64_t grain, const F& fn) {
  std::atomic<int64_t> first{-1};
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    const int64_t bad = fn(begin, end);
    if (bad < 0) return;
    int64_t seen = first.load();
    while ((seen < 0 || bad < seen) && !first.compare_exchange_weak(seen, bad)) {
    }
  });
  return first.load();
}

at::Tensor positional_add_cpu(const at::Tensor& x, const std::optional<at::Tensor>& table,
                              const std::optional<at::Tensor>& offsets, int64_t offset, double scale, double base,
                              bool sinusoid, bool batch_first, double dropout_p, int64_t seed) {
  at::Tensor out;
  const PositionalAddArgs args =
      positional_add_args(x, table, offsets, offset, scale, base, sinusoid, batch_first, dropout_p, seed, out);
  if (out.numel() == 0) return out;
  advise_huge_pages(out.data_ptr(), out.nbytes());
  const int64_t tile = positional_add_tile(args);
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / (tile * args.dim));
  const int64_t bad = parallel_first_bad(positional_add_tasks(args), grain, [&](int64_t begin, int64_t end) {
    return positional_add_cpu_tasks(args, begin, end);
  });
  TORCH_CHECK(bad < 0, "positional_add: the position of sequence ", bad / args.seq, ", step ", bad % args.seq,
              " is outside [0, ", args.table_rows, "), the rows of the table");
  return out;
}

at::Tensor embedding_forward_cpu(const at::Tensor& tokens, const at::Tensor& token_weight,
                                 const at::Tensor& position_weight, const std::optional<at::Tensor>& positions,
                                 const std::optional<at::Tensor>& offsets, int64_t offset, double token_scale,
                                 double dropout_p, int64_t seed) {
  at::Tensor out;
  const EmbeddingForwardArgs args = embedding_forward_args(tokens, token_weight, position_weight, positions, offsets,
                                                           offset, token_scale, dropout_p, seed, out);
  if (args.rows() == 0) return out;
  advise_huge_pages(out.data_ptr(), out.nbytes());
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(args.dim, 1));
  const int64_t bad = parallel_first_bad(args.rows(), grain, [&](int64_t begin, int64_t end) {
    return embedding_forward_cpu_rows(args, begin, end);
  });
  if (bad >= 0) {
    const int64_t b = bad / args.seq, s = bad % args.seq;
    const int64_t pos = args.positions ? args.positions[bad] : args.offset + (args.offsets ? args.offsets[b] : 0) + s;
    TORCH_CHECK(false, "embedding_forward: at (", b, ", ", s, ") the token ", args.tokens[bad], " (of [0, ",
                args.vocab, ")) or the position ", pos, " (of [0, ", args.max_positions, ")) is out of range");
  }
  return out;
}

// The first row v of [0, num_rows] with starts[v] + v >= target: rows are split so that each part has about the
// same number of entries plus rows to write.
int64_t row_at_work(const std::vector<int64_t>& starts, int64_t target) {
  int64_t lo = 0, hi = static_cast<int64_t>(starts.size()) - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (starts[mid] + mid >= target) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

at::Tensor embedding_scatter_cpu(const at::Tensor& grad, const at::Tensor& index, int64_t num_rows, double scale,
                                 int64_t skip_row) {
  EmbeddingScatterArgs args = embedding_scatter_args(grad, index, num_rows, scale, skip_row);
  at::Tensor out = at::empty({num_rows, args.dim}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  args.out = out.data_ptr();
  std::vector<int64_t> starts(num_rows + 1), order(args.n);
  const int64_t bad = embedding_scatter_plan(args, starts.data(), order.data());
  TORCH_CHECK(bad < 0, "embedding_scatter: index[", bad, "] = ", bad < 0 ? 0 : args.index[bad], " is outside [0, ",
              num_rows, ")");
  if (out.numel() == 0) return out;
  advise_huge_pages(out.data_ptr(), out.nbytes());
  const int64_t work = args.n + num_rows;  // rows of dim values read or written
  const int64_t parts = std::clamp<int64_t>(work * args.dim / kMinElementsPerTask, 1, 4 * at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t first = row_at_work(starts, work * part / parts);
      const int64_t last = row_at_work(starts, work * (part + 1) / parts);
      embedding_scatter_cpu_rows(args, starts.data(), order.data(), first, std::min(last, num_rows));
    }
  });
  return out;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn_C, CPU, m) {
  m.impl("positional_add", &fastattn::positional_add_cpu);
  m.impl("embedding_forward", &fastattn::embedding_forward_cpu);
  m.impl("embedding_scatter", &fastattn::embedding_scatter_cpu);
}
