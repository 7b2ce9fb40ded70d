// Reused CPU memory for the scratch tensors of a call (packed weights, per-chunk buffers).
//
// glibc hands large freed blocks back to the system, so a scratch tensor of a few hundred KiB or more that every
// call allocates afresh is page-faulted in again on every call: about 1 us per 4 KiB page on the project's machine,
// 0.8 ms of a 1.8 ms batch-1 LSTM layer. The blocks of ScratchPool's tensors go back to the pool when the tensors
// die (up to kMaxKeptBytes in all; larger blocks, and those past the limit, go back to the system), and the next
// request that fits one takes it. Thread-safe: a tensor may die on any thread; fork-safe: the pool's lock is held
// across fork(), so that a child never inherits it locked by a thread that does not exist there. Their storage
// cannot be resized, so only for tensors that stay inside fastattn (not outputs or gradients a user may hold).
#pragma once
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace fastattn {
namespace cpu {

class ScratchPool {
 public:
  static constexpr size_t kMaxBlockBytes = size_t(16) << 20;  // larger tensors come from at::empty
  static constexpr size_t kMaxKeptBytes = size_t(32) << 20;   // idle blocks kept, in all
  static constexpr size_t kAlignment = 64;

  // An uninitialised contiguous CPU tensor whose memory comes from the pool.
  static at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
    const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
    if (bytes == 0 || bytes > kMaxBlockBytes) return at::empty(sizes, options);
    const auto [data, size] = pool().take(bytes);
    return at::from_blob(data, sizes, [size = size](void* p) { pool().give(p, size); }, options);
  }

 private:
  // Never destroyed: tensors may still die while the process exits.
  static ScratchPool& pool() {
    static ScratchPool* const instance = [] {
      auto* created = new ScratchPool();
#if defined(__unix__) || defined(__APPLE__)
      pthread_atfork([] { pool().mutex_.lock(); }, [] { pool().mutex_.unlock(); }, [] { pool().mutex_.unlock(); });
#endif
      return created;
    }();
    return *instance;
  }

  // The smallest kept block of bytes to 2 x bytes (of those, the last freed, likeliest still in cache), else a new
  // one: (data, its size).
  std::pair<void*, size_t> take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = blocks_.end();
      for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
        if (it->second >= bytes && it->second <= 2 * bytes && (best == blocks_.end() || it->second <= best->second)) {
          best = it;
        }
      }
      if (best != blocks_.end()) {
        const auto block = *best;
        blocks_.erase(best);
        kept_ -= block.second;
        return block;
      }
    }
    const size_t size = (bytes + kAlignment - 1) / kAlignment * kAlignment;  // aligned_alloc needs a multiple
    void* data = std::aligned_alloc(kAlignment, size);
    TORCH_CHECK(data != nullptr, "fastattn: out of memory allocating ", size, " bytes of CPU scratch");
    return {data, size};
  }

  void give(void* data, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (kept_ + size <= kMaxKeptBytes) {
        blocks_.emplace_back(data, size);
        kept_ += size;
        return;
      }
    }
    std::free(data);
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;  // (data, size), idle
  size_t kept_ = 0;
};

}  // namespace cpu
}  // namespace fastattn
