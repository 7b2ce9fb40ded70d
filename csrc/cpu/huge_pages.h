// Transparent huge pages for large CPU outputs.
//
// A fresh output of tens of MiB comes from mmap, and first touching it costs one page fault per 4 KiB page:
// for a 32 MiB softmax output on the project's 2-core machine that is 8192 faults and about two thirds of
// the op's time. Asking the kernel for 2 MiB pages on the output before the kernel writes it cuts the faults
// 500-fold (PyTorch's allocator does the same when THP_MEM_ALLOC_ENABLE=1). A hint only: where it is not
// supported nothing changes. FASTATTN_HUGE_PAGES=0 turns it off (e.g. where memory is too fragmented for
// the kernel to find 2 MiB pages quickly).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastattn {

// Outputs smaller than this keep the allocator's pages (they are usually reused heap memory anyway).
constexpr size_t kHugePageMinBytes = size_t(4) << 20;

// Advises huge pages for the 2 MiB-aligned part of [data, data + bytes).
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* setting = std::getenv("FASTATTN_HUGE_PAGES");
    return setting == nullptr || std::strcmp(setting, "0") != 0;
  }();
  if (!enabled || bytes < kHugePageMinBytes) return;
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace fastattn
