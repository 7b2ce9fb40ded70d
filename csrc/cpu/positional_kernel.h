// CPU positional-encoding kernels on raw pointers. No torch headers: csrc/cpu/positional.cpp binds them to tensors
// and splits the work over threads.
#pragma once
#include <cstdint>

#include "../positional.h"

namespace fastattn {

// positional_add is split into tasks: task t covers positions [tile * T, tile * T + T) of sequence b, where
// tile = t / batch and b = t % batch, T = positional_add_tile(args). Tasks in order share a sinusoid tile across the
// batch (computed once per tile and run of tasks when there are no per-sequence offsets).
int64_t positional_add_tile(const PositionalAddArgs& args);
inline int64_t positional_add_tasks(const PositionalAddArgs& args) {
  const int64_t tile = positional_add_tile(args);
  return (args.seq + tile - 1) / tile * args.batch;
}

// Runs tasks [task_begin, task_end): writes the output rows they cover only, so disjoint task ranges may run on
// different threads. Returns the first row (b * seq + s) whose table position is out of range (its output is left
// unwritten), or -1.
int64_t positional_add_cpu_tasks(const PositionalAddArgs& args, int64_t task_begin, int64_t task_end);

// Rows [row_begin, row_end) of embedding_forward (row r = b * seq + s). Returns the first row whose token or
// position is out of range (its output is left unwritten), or -1.
int64_t embedding_forward_cpu_rows(const EmbeddingForwardArgs& args, int64_t row_begin, int64_t row_end);

// embedding_scatter in two steps. plan (serial, O(n + num_rows)): a counting sort of the entries by index, stable, so
// that order[starts[v] .. starts[v + 1]) lists the entries of row v in increasing order; starts has num_rows + 1
// elements, order n. Returns the first entry whose index is out of range, or -1 (then starts/order are partial).
int64_t embedding_scatter_plan(const EmbeddingScatterArgs& args, int64_t* starts, int64_t* order);

// Rows [row_begin, row_end) of the output from the plan: each row sums its entries in entry order, so the result
// is the same for any split of the rows over threads (deterministic).
void embedding_scatter_cpu_rows(const EmbeddingScatterArgs& args, const int64_t* starts, const int64_t* order,
                                int64_t row_begin, int64_t row_end);

}  // namespace fastattn
