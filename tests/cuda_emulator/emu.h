// A CPU emulator for the CUDA features csrc/cuda/attention_kernel.cu, kvcache_kernel.cu, norm_kernel.cu and
// positional_kernel.cu use, so that tests/test_cuda_emulated*.py can run those kernels on a machine without a GPU.
//
// gen.py rewrites the .cu into C++ that includes this header. It swaps only the bodies of the inline-PTX wrappers
// (cp.async, ldmatrix, mma.sync, ex2.approx) for the emu:: functions below, each `kernel<<<...>>>(...)` for
// emu::launch, and the `extern __shared__` array for emu::shared_memory(). Everything else (tiling, indexing,
// masking, online softmax, Philox, the launcher's choices) is the unmodified CUDA source compiled by g++.
//
// Execution model
//   - A launch runs its blocks one after another (blockIdx.x fastest, then y, then z).
//   - Each CUDA thread of a block is a fiber: its own stack, switched cooperatively on one OS thread. A thread
//     runs until it blocks at a barrier; then the next ready thread runs. emu::schedule picks one of two fixed,
//     legal interleavings (Schedule below). A kernel correct under every schedule is correct under both, and a
//     race shows up only where one of them exposes it.
//   - __syncthreads is a barrier of the block. Each warp collective (__shfl_sync, __shfl_xor_sync, ldmatrix,
//     mma) is a barrier of the warp: all 32 lanes must reach the same kind of collective (else the emulator
//     reports that the lanes diverged), and the collective takes effect when the last lane arrives, before any
//     lane runs on, as on the hardware.
//   - A block whose threads all wait and can never be woken (a barrier some threads skip) is reported as a
//     deadlock, naming who waits where.
//   - Shared memory is filled with 0xFF bytes (NaN in float32, float16 and bfloat16) when each block starts and
//     ends at an inaccessible page: reading shared memory that no thread wrote poisons the results, and a write
//     past the end of the dynamic allocation crashes. ldmatrix and cp.async check that their shared-memory
//     operands lie inside the allocation and are aligned as the PTX ISA requires.
//   - cp.async copies land at one of the two extremes the PTX ISA allows: when their thread waits for their
//     group (cp.async.wait_group), so that a tile read before the wait and the barrier after it reads poison;
//     or when issued, so that a copy into a buffer other warps still read corrupts their results. A thread that
//     exits with copies it never waited for is an error.
//   - The CUDA runtime calls of the launchers (cudaGetDevice, cudaDeviceGetAttribute, cudaFuncSetAttribute,
//     cudaGetLastError) are emulated for one device whose opt-in shared memory per block is emu::smem_limit and
//     whose multiprocessor count is emu::sm_count (the callers set both per call); as
//     on a GPU, a launch asking for more than 48 KiB of dynamic shared memory fails unless
//     cudaFuncSetAttribute(MaxDynamicSharedMemorySize) allowed it first.
//
//   - A crash (an access past the end of a guarded buffer, a stack overflow) is reported with its block and
//     thread before the process dies.
//
// Numerics: mma.sync adds the 16 exact products of the 16-bit operands to the fp32 accumulator in double and
// rounds once; ex2.approx.ftz is exp2f with subnormal results flushed to zero; expf, logf, fmaf are the host's.
// Real tensor cores and the SFU round differently, within the PTX ISA's bounds.
//
// Include this header in exactly one translation unit: it defines the emulated runtime functions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <vector>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// The CUDA qualifiers mean nothing on the host.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__

// The built-in variables; the scheduler sets threadIdx before it resumes a thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// Device-side integer min / max, as CUDA's math headers give device code.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace emu {

// Reports a kernel bug the emulator detected (or a feature it lacks) and aborts.
[[noreturn]] inline void fail(const char* format, ...) {
  std::va_list args;
  va_start(args, format);
  std::fprintf(stderr, "cuda emulator: ");
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fprintf(stderr, " [block (%u, %u, %u), thread %u]\n", blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

inline size_t page_size() { return size_t(sysconf(_SC_PAGESIZE)); }

// Maps `bytes` (a multiple of the page size) next to an inaccessible guard page: below them for a stack (which
// grows down), else above them.
inline unsigned char* map_guarded(size_t bytes, bool guard_below) {
  void* p = mmap(nullptr, bytes + page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fail("mmap of %zu bytes failed", bytes);
  auto* base = static_cast<unsigned char*>(p);
  mprotect(guard_below ? base : base + bytes, page_size(), PROT_NONE);
  return guard_below ? base + page_size() : base;
}

// ---------------------------------------------------------------------------------------------------------
// Fibers: a context switch that saves only what a function call must preserve.
// ---------------------------------------------------------------------------------------------------------

#if defined(__x86_64__)
// emu_switch_stack(from, to) pushes the callee-saved registers (System V ABI), stores the stack pointer in *from,
// loads `to` and pops the registers saved there; `ret` resumes that context. Unlike swapcontext it makes no
// system call (no signal mask), which makes it about 50 times faster.
extern "C" __attribute__((visibility("hidden"))) void emu_switch_stack(void** from, void* to);
asm(R"(
    .text
    .globl emu_switch_stack
    .hidden emu_switch_stack
    .type emu_switch_stack, @function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_stack, .-emu_switch_stack
)");

struct Context {
  void* sp = nullptr;  // the saved stack pointer; the callee-saved registers lie just above it
};
inline void switch_context(Context& from, Context& to) { emu_switch_stack(&from.sp, to.sp); }

// Prepares `c` so that switching to it calls entry() (which must never return) on the stack [base, base + size).
inline void make_context(Context& c, unsigned char* base, size_t size, void (*entry)()) {
  auto** top = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t(15));
  *--top = nullptr;                         // entry's return address: the stack is aligned as after a call
  *--top = reinterpret_cast<void*>(entry);  // where `ret` goes
  for (int r = 0; r < 6; ++r) *--top = nullptr;  // rbp, rbx, r12 to r15
  c.sp = top;
}
#else
// Other architectures: the portable (slower) ucontext switch.
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, unsigned char* base, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// ---------------------------------------------------------------------------------------------------------
// Blocks: threads, the scheduler and barriers.
// ---------------------------------------------------------------------------------------------------------

// The two schedules. kInOrder: threads start in threadIdx order, the threads a barrier wakes run in the order
// they arrived, and cp.async copies land when waited for. kReversed: threads start in reverse order, woken
// threads run in reverse arrival order, and copies land when issued.
enum class Schedule { kInOrder = 0, kReversed = 1 };
inline Schedule schedule = Schedule::kInOrder;

constexpr size_t kStackBytes = 256 << 10;  // per thread, above a guard page: an overflow crashes

// The names of the collectives (compared by address: lanes at the same collective pass the same pointer).
inline constexpr const char* kSyncthreads = "__syncthreads";
inline constexpr const char* kShfl = "__shfl_sync";
inline constexpr const char* kLdmatrix = "ldmatrix";
inline constexpr const char* kLdmatrixTrans = "ldmatrix.trans";
inline constexpr const char* kMma = "mma.sync";

struct Thread {
  Context context;
  bool done = false;
  unsigned collectives = 0;  // warp collectives entered: picks the exchange slot (below)
};

struct Barrier {
  int size = 0;                // threads that must arrive
  const char* what = nullptr;  // the collective of the threads waiting now
  std::vector<int> waiting;    // in arrival order
};

inline std::vector<unsigned char*> stacks;  // grows to the largest block seen; reused
inline std::vector<Thread> threads;         // of the running block
inline Context scheduler;
inline std::deque<int> ready;
inline int current = 0;
inline Barrier block_barrier;
inline std::vector<Barrier> warp_barriers;
inline std::function<void()> kernel_call;  // the launched kernel with its arguments

inline void thread_main() {
  kernel_call();
  threads[current].done = true;
  switch_context(threads[current].context, scheduler);  // never resumed
  __builtin_unreachable();
}

// Blocks the calling thread until b.size threads arrived at `what`. The last to arrive wakes the others (they
// run after it blocks) and returns true at once, so it can complete the collective before anyone runs on.
inline bool arrive_and_wait(Barrier& b, const char* what) {
  if (b.waiting.empty()) {
    b.what = what;
  } else if (b.what != what) {
    fail("the lanes of warp %u diverged: lane %u reached %s while lanes wait at %s", threadIdx.x / 32,
         threadIdx.x % 32, what, b.what);
  }
  if (int(b.waiting.size()) + 1 == b.size) {
    if (schedule == Schedule::kInOrder) {
      ready.insert(ready.end(), b.waiting.begin(), b.waiting.end());
    } else {
      ready.insert(ready.end(), b.waiting.rbegin(), b.waiting.rend());
    }
    b.waiting.clear();
    return true;
  }
  b.waiting.push_back(current);
  switch_context(threads[current].context, scheduler);
  return false;
}

inline std::string deadlock_report() {
  std::string s = "deadlock: no thread can run;";
  if (!block_barrier.waiting.empty()) {
    s += " " + std::to_string(block_barrier.waiting.size()) + " of " + std::to_string(block_barrier.size) +
         " threads wait at __syncthreads;";
  }
  for (size_t w = 0; w < warp_barriers.size(); ++w) {
    if (!warp_barriers[w].waiting.empty()) {
      s += " warp " + std::to_string(w) + " has " + std::to_string(warp_barriers[w].waiting.size()) +
           " lanes at " + warp_barriers[w].what + ";";
    }
  }
  int done = 0;
  for (const Thread& t : threads) done += t.done;
  return s + " " + std::to_string(done) + " threads exited";
}

// ---------------------------------------------------------------------------------------------------------
// Shared memory.
// ---------------------------------------------------------------------------------------------------------

inline unsigned char* shared_base = nullptr;  // the running block's dynamic shared memory
inline size_t shared_bytes = 0;

// Places `bytes` of shared memory, 16-byte aligned, right below a guard page, and poisons it.
inline void map_shared_memory(size_t bytes) {
  static unsigned char* region = nullptr;
  static size_t capacity = 0;
  if (bytes > capacity) {
    if (region != nullptr) munmap(region, capacity + page_size());
    capacity = (bytes + page_size() - 1) / page_size() * page_size();
    region = map_guarded(capacity, false);
  }
  shared_bytes = bytes;
  shared_base = region + capacity - (bytes + 15) / 16 * 16;
  std::memset(shared_base, 0xFF, bytes);
}

inline unsigned char* shared_memory() { return shared_base; }

// Fails unless [p, p + bytes) lies in the block's shared memory and p is `align`-byte aligned.
inline void check_shared(const void* p, size_t bytes, size_t align, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < shared_base || c + bytes > shared_base + shared_bytes) {
    fail("%s: address %p is outside the block's %zu bytes of shared memory", what, p, shared_bytes);
  }
  if (reinterpret_cast<uintptr_t>(p) % align != 0) fail("%s: address %p is not %zu-byte aligned", what, p, align);
}

// The shared-window address of p (cvta.to.shared): its offset in the block's shared memory.
inline uint32_t shared_offset(const void* p) {
  check_shared(p, 1, 1, "cvta.to.shared");
  return uint32_t(static_cast<const unsigned char*>(p) - shared_base);
}

// ---------------------------------------------------------------------------------------------------------
// Warp collectives.
// ---------------------------------------------------------------------------------------------------------

// Where the lanes of a warp publish their operands. Each warp has two, used by alternate collectives, so one
// barrier per collective suffices: a lane reuses a slot two collectives later, after every lane has passed the
// barrier of the collective in between, that is after every lane has read this one.
struct Exchange {
  uint32_t word[32][6];     // per lane: shuffle value, or mma operands a0..a3, b0, b1
  const void* address[32];  // per lane: ldmatrix row address
  uint32_t loaded[32][4];   // per lane: ldmatrix result, gathered by the last lane to arrive
  double product[16][8];    // mma: A B, computed by the last lane to arrive
};
inline std::vector<Exchange> exchanges;

inline int lane() { return int(threadIdx.x % 32); }

inline Exchange& next_exchange() {
  return exchanges[2 * (threadIdx.x / 32) + (threads[current].collectives++ & 1)];
}

inline bool warp_wait(const char* what) { return arrive_and_wait(warp_barriers[threadIdx.x / 32], what); }

template <typename V>
inline V shfl(unsigned mask, V value, int src_lane, int width) {
  static_assert(sizeof(V) == 4, "the emulator shuffles 32-bit values");
  if (mask != 0xffffffffu || width != 32) {
    fail("only full-warp shuffles are emulated (mask %#x, width %d)", mask, width);
  }
  Exchange& x = next_exchange();
  std::memcpy(&x.word[lane()][0], &value, 4);
  warp_wait(kShfl);
  V result;
  std::memcpy(&result, &x.word[src_lane & 31][0], 4);
  return result;
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): four
// 8x8 matrices of 16-bit elements; lane i gives the address of row i % 8 of matrix i / 8 (16 bytes, 16-byte
// aligned). Register m of lane l receives, of matrix m, the two elements of row l / 4 at columns 2 (l % 4) and
// 2 (l % 4) + 1 (low half first); with .trans, of the transposed matrix: column l / 4 of rows 2 (l % 4), + 1.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  check_shared(row, 16, 16, trans ? kLdmatrixTrans : kLdmatrix);
  Exchange& x = next_exchange();
  x.address[lane()] = row;
  if (warp_wait(trans ? kLdmatrixTrans : kLdmatrix)) {  // the warp reads shared memory at once
    for (int l = 0; l < 32; ++l) {
      for (int m = 0; m < 4; ++m) {
        uint16_t e[2];
        for (int k = 0; k < 2; ++k) {
          const int row_lane = trans ? 8 * m + 2 * (l % 4) + k : 8 * m + l / 4;
          const int column = trans ? l / 4 : 2 * (l % 4) + k;
          e[k] = static_cast<const uint16_t*>(x.address[row_lane])[column];
        }
        x.loaded[l][m] = uint32_t(e[0]) | uint32_t(e[1]) << 16;
      }
    }
  }
  for (int m = 0; m < 4; ++m) r[m] = x.loaded[lane()][m];
}

template <typename T>
inline float half_to_float(uint32_t word, int high) {
  const uint16_t bits = uint16_t(word >> (16 * high));
  T h;
  std::memcpy(&h, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(h);
  } else {
    return __bfloat162float(h);
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: c (16x8) += A (16x16) B (16x8). Fragment
// layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, q = lane % 4, halves low first:
//   A register r: row g + 8 (r % 2), columns 2q + 8 (r / 2) and + 1
//   B register r (b0, b1): rows 2q + 8r and + 1, column g
//   C element i: row g + 8 (i / 2), column 2q + i % 2
template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Exchange& x = next_exchange();
  const int l = lane();
  std::memcpy(&x.word[l][0], a, 16);
  x.word[l][4] = b0;
  x.word[l][5] = b1;
  if (warp_wait(kMma)) {
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
      const int g = L / 4, q = L % 4;
      for (int r = 0; r < 4; ++r) {
        for (int e = 0; e < 2; ++e) A[g + 8 * (r % 2)][2 * q + 8 * (r / 2) + e] = half_to_float<T>(x.word[L][r], e);
      }
      for (int r = 0; r < 2; ++r) {
        for (int e = 0; e < 2; ++e) B[2 * q + 8 * r + e][g] = half_to_float<T>(x.word[L][4 + r], e);
      }
    }
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        double s = 0.0;  // the products are exact in double
        for (int k = 0; k < 16; ++k) s += double(A[i][k]) * double(B[k][j]);
        x.product[i][j] = s;
      }
    }
  }
  for (int i = 0; i < 4; ++i) c[i] = float(double(c[i]) + x.product[l / 4 + 8 * (i / 2)][2 * (l % 4) + i % 2]);
}

// ex2.approx.ftz.f32: 2^x, subnormal results flushed to zero (its approximation error is not emulated).
inline float ex2_approx_ftz(float x) {
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

// ---------------------------------------------------------------------------------------------------------
// cp.async: per thread, the copies issued since its last commit and its committed groups, oldest first.
// ---------------------------------------------------------------------------------------------------------

struct Copy {
  void* dst;
  const void* src;
  int size;       // bytes written to shared memory
  int src_bytes;  // bytes read from src; the rest of `size` is zero-filled
};
inline std::vector<std::vector<Copy>> uncommitted;
inline std::vector<std::deque<std::vector<Copy>>> committed;

inline void land(const Copy& c) {
  std::memcpy(c.dst, c.src, size_t(c.src_bytes));
  std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, size_t(c.size - c.src_bytes));
}

// cp.async.{ca,cg}.shared.global [dst], [src], size, src_bytes.
inline void cp_async(void* dst, const void* src, int size, int src_bytes) {
  check_shared(dst, size_t(size), size_t(size), "cp.async destination");
  if (src_bytes < 0 || src_bytes > size) fail("cp.async: src-size %d is not in [0, %d]", src_bytes, size);
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % size != 0) {
    fail("cp.async: global address %p is not %d-byte aligned", src, size);
  }
  Copy copy{dst, src, size, src_bytes};
  if (schedule == Schedule::kReversed) {
    land(copy);
    copy = Copy{dst, src, 0, 0};  // landed; its group still counts it
  }
  uncommitted[threadIdx.x].push_back(copy);
}

inline void cp_async_commit() {
  committed[threadIdx.x].push_back(std::move(uncommitted[threadIdx.x]));
  uncommitted[threadIdx.x].clear();
}

// cp.async.wait_group n: lands all but the newest n committed groups.
inline void cp_async_wait(int n) {
  auto& groups = committed[threadIdx.x];
  while (int(groups.size()) > n) {
    for (const Copy& c : groups.front()) land(c);
    groups.pop_front();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launches and the emulated runtime.
// ---------------------------------------------------------------------------------------------------------

inline int smem_limit = 227 << 10;                   // the device's cudaDevAttrMaxSharedMemoryPerBlockOptin
inline int sm_count = 132;                           // its cudaDevAttrMultiProcessorCount
inline std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
inline cudaError_t last_error = cudaSuccess;

// Names the thread that crashed (an out-of-bounds access, or a stack overflow: the handler runs on its own stack).
inline void on_crash(int signal_number) {
  std::fprintf(stderr, "cuda emulator: signal %d (%s) in block (%u, %u, %u), thread %u\n", signal_number,
               strsignal(signal_number), blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
  signal(signal_number, SIG_DFL);
  raise(signal_number);
}

inline void run_block(int n) {
  while (int(stacks.size()) < n) stacks.push_back(map_guarded(kStackBytes, true));
  threads.assign(size_t(n), Thread{});
  block_barrier = Barrier{n, nullptr, {}};
  warp_barriers.assign(size_t(n / 32), Barrier{32, nullptr, {}});
  exchanges.resize(size_t(2 * (n / 32)));
  uncommitted.assign(size_t(n), {});
  committed.assign(size_t(n), {});
  for (int t = 0; t < n; ++t) {
    make_context(threads[t].context, stacks[t], kStackBytes, thread_main);
    ready.push_back(schedule == Schedule::kInOrder ? t : n - 1 - t);
  }
  while (!ready.empty()) {
    current = ready.front();
    ready.pop_front();
    threadIdx = uint3{unsigned(current), 0, 0};
    switch_context(scheduler, threads[current].context);
  }
  // No thread can run: all exited, or some wait for a barrier nobody else will reach.
  for (int t = 0; t < n; ++t) {
    if (!threads[t].done) fail("%s", deadlock_report().c_str());
  }
  for (int t = 0; t < n; ++t) {
    threadIdx = uint3{unsigned(t), 0, 0};
    if (!uncommitted[t].empty() || !committed[t].empty()) fail("the thread exited with cp.async copies in flight");
  }
}

// The launch config of kernel<<<grid, block, shared_bytes, stream>>>.
struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  cudaStream_t stream = nullptr;
};

// kernel<<<config>>>(args...): runs every block to completion, or records the launch error as a GPU would.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, const Args&... args) {
  const dim3 g = config.grid, b = config.block;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535 || b.x == 0 ||
      b.x * b.y * b.z > 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const auto allowed = max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
  const size_t opted_in = allowed == max_dynamic_smem.end() ? 0 : size_t(allowed->second);
  const size_t bytes = config.shared_bytes;
  if (bytes > size_t(smem_limit) || (bytes > (48 << 10) && bytes > opted_in)) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  if (b.y != 1 || b.z != 1 || b.x % 32 != 0) {
    fail("the emulator runs 1-D blocks of whole warps, not %u x %u x %u", b.x, b.y, b.z);
  }

  kernel_call = [=] { kernel(args...); };
  gridDim = g;
  blockDim = b;
  // on_crash reports crashes while the blocks run, on a stack of its own (the thread's may have overflowed).
  constexpr int kCrashes[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
  struct sigaction crash = {}, previous[4] = {};
  crash.sa_handler = on_crash;
  crash.sa_flags = SA_ONSTACK;
  static std::vector<unsigned char> signal_stack(1 << 16);
  const stack_t alternate = {signal_stack.data(), 0, signal_stack.size()};
  sigaltstack(&alternate, nullptr);
  for (int i = 0; i < 4; ++i) sigaction(kCrashes[i], &crash, &previous[i]);
  for (unsigned z = 0; z < g.z; ++z) {
    for (unsigned y = 0; y < g.y; ++y) {
      for (unsigned x = 0; x < g.x; ++x) {
        blockIdx = uint3{x, y, z};
        map_shared_memory(bytes);
        run_block(int(b.x));
      }
    }
  }
  for (int i = 0; i < 4; ++i) sigaction(kCrashes[i], &previous[i], nullptr);
}

}  // namespace emu

// CUDA's device functions, on the emulator.
inline void __syncthreads() { emu::arrive_and_wait(emu::block_barrier, emu::kSyncthreads); }

template <typename V>
inline V __shfl_sync(unsigned mask, V value, int src_lane, int width = 32) {
  return emu::shfl(mask, value, src_lane, width);
}

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = 32) {
  return emu::shfl(mask, value, emu::lane() ^ lane_mask, width);
}

// Bit casts, the cache-hinted loads and stores (the hints mean nothing here), read-only loads and float atomics, as
// csrc/cuda/norm_kernel.cu and positional_kernel.cu use them; cuda_runtime.h declares these for nvcc only.
inline float __uint_as_float(unsigned int bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline unsigned int __float_as_uint(float f) {
  unsigned int bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

template <typename V>
inline V __ldcs(const V* p) {
  return *p;
}

template <typename V>
inline void __stcs(V* p, V value) {
  *p = value;
}

inline float __int_as_float(int bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline int __float_as_int(float f) {
  int bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

namespace emu {
// Read-only loads (__ldg) of each size in bytes since the last reset, so that a test can tell a kernel's vector
// path (8- and 16-byte loads) from its element path; csrc/cuda/positional_kernel.cu's shim reports them.
inline uint64_t ldg_loads[17] = {};
}  // namespace emu

// __ldg (ld.global.nc): checked for the alignment of its type, as a GPU faults on a misaligned vector load, and
// counted in emu::ldg_loads.
template <typename V>
inline V __ldg(const V* p) {
  static_assert(sizeof(V) <= 16, "__ldg loads at most 16 bytes");
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0) {
    emu::fail("__ldg: address %p is not %zu-byte aligned", static_cast<const void*>(p), alignof(V));
  }
  ++emu::ldg_loads[sizeof(V)];
  return *p;
}

// atomicAdd on float32: a thread runs until it reaches a barrier, so a read-modify-write is atomic. Several adds
// to one address land in the emulator's order (blocks in order, their threads by the schedule), one of the orders
// a GPU may take.
inline float atomicAdd(float* p, float value) {
  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) emu::fail("atomicAdd: address %p is not 4-byte aligned", p);
  const float old = *p;
  *p = old + value;
  return old;
}

// The CUDA runtime, for one emulated device.
extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    *value = emu::smem_limit;
  } else if (attr == cudaDevAttrMultiProcessorCount) {
    *value = emu::sm_count;
  } else {
    emu::fail("cudaDeviceGetAttribute(%d) is not emulated", int(attr));
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    emu::fail("cudaFuncSetAttribute(%d) is not emulated", int(attr));
  }
  if (value < 0 || value > emu::smem_limit) return cudaErrorInvalidValue;
  emu::max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t error = emu::last_error;
  emu::last_error = cudaSuccess;
  return error;
}
}

// The typed overload, which cuda_runtime.h declares for nvcc only.
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
