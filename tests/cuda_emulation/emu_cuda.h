// Host emulation of the CUDA features our kernels use, so that the kernels'
// logic (tiling, bounds, pipelines, fragment layouts, epilogues) is tested
// on machines without a GPU: one fiber per CUDA thread, a barrier for
// __syncthreads and __syncwarp, blocks one after another (all at once
// for a cooperative launch, so that a grid-wide barrier can meet), atomics, warp shuffles and the sm_80 warp-level
// instructions (mma.sync m16n8k16, ldmatrix; shim/common/ptx_sm80.cuh)
// through per-warp exchange slots with the PTX ISA's register layouts, WMMA
// fragments as whole per-thread matrices (the API's semantics, not the
// hardware's register layout), cp.async as memcpy, dynamic shared memory
// filled with 0xFF bytes (NaN in every float type) so that reading what was
// never written shows. The WMMA, ldmatrix and cp.async calls check their
// alignment rules, and a launch checks its configuration against the
// hardware limits (the error comes back from cudaGetLastError, as on a GPU).
// Each CUDA thread is a fiber on the one OS thread, which runs until it meets
// a barrier (or __nanosleep) and then lets the next one run: an OS thread per
// CUDA thread spent 85 % of the time creating threads and waiting on futexes.
// Every exchange between threads goes through a barrier or atomics, and the
// fibers tell ThreadSanitizer (tests/test_cuda_emulation.py, mode "races")
// that they are threads which switching does not order, so it sees exactly
// the ordering the kernel's own barriers give, and reports a shared-memory
// access that none orders. Not covered: the tensor cores' rounding, bank
// conflicts, speed, and orderings only a GPU's memory model adds (fences,
// the visibility of global writes across blocks).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <atomic>
#include <cassert>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>
#include <sys/mman.h>

#if !defined(__x86_64__)
#error "the emulation's fibers switch stacks in x86-64 assembly (bk_switch_stack)"
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define BK_TSAN(call) call
#define BK_NOT_SANITIZED __attribute__((no_sanitize_thread))
#else
#define BK_TSAN(call)
#define BK_NOT_SANITIZED
#endif

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__

// The running CUDA thread's, set by the scheduler at each switch (kernels only read them).
inline dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;

// The running fiber lets the next one run (defined with the scheduler, below).
inline void bk_fiber_yield();
// Arrivals at barriers so far: a scheduler round in which nothing arrives
// and no thread ends made no progress (see bk_run_fibers).
inline std::atomic<uint64_t> g_barrier_arrivals{0};

// Whoever arrives last opens the barrier; the others poll it between turns.
// The count's acq_rel and the generation's release/acquire make everything
// each thread did before the barrier happen before what any does after it,
// which is what ThreadSanitizer then knows, and no more.
class EmulatedBarrier {
 public:
  explicit EmulatedBarrier(int threads) : expected_(threads) {}
  void arrive_and_wait() {
    const unsigned generation = generation_.load(std::memory_order_relaxed);
    g_barrier_arrivals.fetch_add(1, std::memory_order_relaxed);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == expected_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    while (generation_.load(std::memory_order_acquire) == generation) bk_fiber_yield();
  }

 private:
  const int expected_;
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> generation_{0};
};

// Per warp: slots through which warp-collective operations (shuffles,
// ldmatrix, mma) exchange registers and addresses.
struct WarpExchange {
  uint64_t words[32][8];
  const void* address[32];
};

// What the threads of one block share: their barriers, the warps' exchange
// slots, the dynamic shared memory (filled with 0xFF bytes), the flag of
// __syncthreads_or. Each thread reaches its block's through g_block.
struct EmulatedBlock {
  explicit EmulatedBlock(int threads, size_t dynamic_smem) : barrier(threads), smem_size(dynamic_smem) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warp_barriers.push_back(std::make_unique<EmulatedBarrier>(32));
    warp_exchange.assign((threads + 31) / 32, WarpExchange{});
    smem_storage.assign(dynamic_smem + 128, 0xFF);
    smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_storage.data()) + 127) / 128 * 128);
  }
  EmulatedBarrier barrier;
  std::vector<std::unique_ptr<EmulatedBarrier>> warp_barriers;
  std::vector<WarpExchange> warp_exchange;
  std::vector<unsigned char> smem_storage;
  unsigned char* smem;
  size_t smem_size;
  std::atomic<int> syncthreads_or{0};
};
// The running thread's block, and its dynamic shared memory (for the PTX shim); set with threadIdx.
inline EmulatedBlock* g_block = nullptr;
inline unsigned char* g_dynamic_smem = nullptr;
inline size_t g_dynamic_smem_size = 0;
inline WarpExchange& warp_exchange() { return g_block->warp_exchange[threadIdx.x / 32]; }
inline bool in_dynamic_smem(const void* p, size_t n) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= g_dynamic_smem && c + n <= g_dynamic_smem + g_dynamic_smem_size;
}

inline void __syncthreads() { g_block->barrier.arrive_and_wait(); }
// Nonzero when pred is nonzero on any thread of the block: post, meet, read,
// meet, and one thread clears the flag before anyone can post again.
inline int __syncthreads_or(int pred) {
  if (pred) g_block->syncthreads_or.store(1);
  __syncthreads();
  const int any = g_block->syncthreads_or.load();
  __syncthreads();
  if (threadIdx.x == 0) g_block->syncthreads_or.store(0);
  __syncthreads();
  return any;
}
inline void __syncwarp(unsigned = 0xffffffffu) { g_block->warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).exchange(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { bk_fiber_yield(); }  // a spinning thread lets the others run
// ld.global.cg (L2, not L1): a plain load here, where every "cache" is coherent.
template <typename T>
T __ldcg(const T* p) {
  std::atomic_thread_fence(std::memory_order_acquire);
  return *p;
}

inline void require(bool ok, const char* what) {
  if (!ok) { std::fprintf(stderr, "EMULATION CHECK FAILED: %s\n", what); std::abort(); }
}

// Warp shuffles over the full warp (the kernels never use partial masks).
template <typename T, typename SourceLane>
T bk_shuffle(unsigned mask, T v, SourceLane source_of) {
  static_assert(sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  require(mask == 0xffffffffu, "shuffle over the full warp");
  WarpExchange& x = warp_exchange();
  const int lane = threadIdx.x % 32;
  std::memcpy(&x.words[lane][0], &v, sizeof(T));
  __syncwarp();
  const int src = source_of(lane);
  T out = v;  // a source lane outside the warp keeps the caller's own value, as on the GPU
  if (src >= 0 && src < 32) std::memcpy(&out, &x.words[src][0], sizeof(T));
  __syncwarp();
  return out;
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  require(width == 32, "shuffle width 32");
  return bk_shuffle(mask, v, [&](int lane) { return lane ^ lane_mask; });
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  require(width == 32, "shuffle width 32");
  return bk_shuffle(mask, v, [&](int) { return src_lane % 32; });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  require(width == 32, "shuffle width 32");
  return bk_shuffle(mask, v, [&](int lane) { return lane + static_cast<int>(delta); });
}

// cp.async as the hardware may run it: the source is read when the copy is
// issued, but shared memory is written only when a __pipeline_wait_prior
// lets the copy's group complete. So a kernel that reads a stage before
// waiting for it reads what was there before (the 0xFF fill, or an older
// stage), and fails its checks. Each thread has its own groups, as on the GPU.
struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
};

// One CUDA thread: where its stack was left, its own state, and its copies in flight.
struct EmulatedFiber {
  void* sp;
  unsigned char* stack;
  std::function<void()> body;
  std::atomic<bool> done{false};
  dim3 thread_idx, block_idx;
  EmulatedBlock* block;
  std::vector<PendingCopy> open_copies;                // not yet committed
  std::deque<std::vector<PendingCopy>> copy_groups;    // committed, oldest first
  BK_TSAN(void* tsan_fiber;)
};
inline EmulatedFiber* g_running_fiber = nullptr;

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t n) {
  require(n == 16, "cp.async size");
  require(reinterpret_cast<uintptr_t>(dst) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0,
          "cp.async 16-byte alignment");
  PendingCopy copy{dst, {}};
  std::memcpy(copy.bytes, src, n);
  g_running_fiber->open_copies.push_back(copy);
}
inline void __pipeline_commit() {
  EmulatedFiber& f = *g_running_fiber;
  f.copy_groups.push_back(std::move(f.open_copies));
  f.open_copies.clear();
}
// Completes every committed group but the newest `newer` ones.
inline void __pipeline_wait_prior(size_t newer) {
  auto& groups = g_running_fiber->copy_groups;
  while (groups.size() > newer) {
    for (const PendingCopy& c : groups.front()) std::memcpy(c.dst, c.bytes, 16);
    groups.pop_front();
  }
}
// At the end of a thread no copy may be left in flight: it could land in
// shared memory that the block's successor already owns.
inline void bk_check_no_copies_in_flight() {
  bool pending = !g_running_fiber->open_copies.empty();
  for (const auto& group : g_running_fiber->copy_groups) pending = pending || !group.empty();
  require(!pending, "cp.async copies still in flight when the thread ended");
}

namespace nvcuda { namespace wmma {
struct row_major {}; struct col_major {};
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];
};

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
void check_load(const T* p, unsigned ldm) {
  require(reinterpret_cast<uintptr_t>(p) % 32 == 0, "wmma pointer 256-bit alignment");
  require((ldm * sizeof(T)) % 16 == 0, "wmma ldm multiple of 16 bytes");
}

// Element (r, c) of the fragment is p[r * ldm + c] (row-major) or p[c * ldm + r].
template <typename F, typename S>
void load_fragment(F& f, const S* p, unsigned ldm, bool col_major) {
  check_load(p, ldm);
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = col_major ? p[c * ldm + r] : p[r * ldm + c];
}
template <typename Use, int M, int N, int K, typename T, typename S>
void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const S* p, unsigned ldm) {
  load_fragment(f, p, ldm, false);
}
template <typename Use, int M, int N, int K, typename T, typename S>
void load_matrix_sync(fragment<Use, M, N, K, T, col_major>& f, const S* p, unsigned ldm) {
  load_fragment(f, p, ldm, true);
}
template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  for (auto& e : f.x) e = v;
}
template <int M, int N, int K, typename TA, typename TB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, row_major>& a,
              const fragment<matrix_b, M, N, K, TB, col_major>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += to_f(a.x[i * K + k]) * to_f(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof out);
}
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  require(layout == mem_row_major, "row-major store");
  check_load(p, ldm);
  if (threadIdx.x % 32 != 0) return;  // one lane writes; the kernel syncs the warp after
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) p[r * ldm + c] = f.x[r * N + c];
}
inline float __float_to_tf32(float v) {  // round to a 10-bit mantissa
  uint32_t u; std::memcpy(&u, &v, 4); u = (u + 0x1000u) & 0xFFFFE000u; std::memcpy(&v, &u, 4); return v;
}
}}  // namespace nvcuda::wmma

// What cudaGetLastError() returns (and clears): set by a bad launch.
inline cudaError_t g_last_error = cudaSuccess;
inline cudaError_t bk_emulated_get_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
#define cudaGetLastError() bk_emulated_get_last_error()

// Dynamic shared memory: 48 KB per block unless the kernel opts in with
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize), up to 99 KB, the least
// that an sm_80+ GPU allows (sm_86/sm_89; the A100 gives 163 KB, the H200 227).
constexpr int kEmulatedMaxOptInSmem = 99 * 1024;
inline std::map<const void*, int> g_max_dynamic_smem;
template <typename Kernel>
cudaError_t bk_emulated_func_set_attribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  require(attribute == cudaFuncAttributeMaxDynamicSharedMemorySize, "the emulated function attribute");
  if (value < 0 || value > kEmulatedMaxOptInSmem) return cudaErrorInvalidValue;
  g_max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
#define cudaFuncSetAttribute bk_emulated_func_set_attribute

// The launch limits of every GPU since sm_30 (and of the H200): at most 1024
// threads a block, grid x < 2^31, grid y and z <= 65535, no empty grid or
// block, dynamic shared memory within the kernel's limit (above).
inline bool bk_valid_launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const auto limit = g_max_dynamic_smem.find(kernel);
  const size_t smem_limit = limit == g_max_dynamic_smem.end() ? 48 * 1024 : limit->second;
  return threads >= 1 && threads <= 1024 && block.z <= 64 && grid.x >= 1 && grid.x <= 0x7fffffffu &&
         grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535 && dynamic_smem <= smem_limit;
}

// What cudaFuncSetAttribute keys a kernel's limits by: its function pointer
// (a lambda launched by a test has none, and keeps the default limits).
template <typename Kernel>
const void* bk_kernel_key(const Kernel& kernel) {
  if constexpr (std::is_pointer_v<Kernel>) return reinterpret_cast<const void*>(kernel);
  return nullptr;
}

// Saves the callee-saved registers on this stack and its pointer in *from,
// then resumes the stack at `to` (the System V x86-64 ABI: the caller keeps
// every other register; the kernels leave MXCSR and the x87 control word
// alone). glibc's swapcontext also saves the signal mask, a system call on
// every switch: 80 % of the time it took.
__attribute__((naked, noinline)) inline void bk_switch_stack(void** from, void* to) {
  asm volatile(
      "pushq %rbp\n pushq %rbx\n pushq %r12\n pushq %r13\n pushq %r14\n pushq %r15\n"
      "movq %rsp, (%rdi)\n movq %rsi, %rsp\n"
      "popq %r15\n popq %r14\n popq %r13\n popq %r12\n popq %rbx\n popq %rbp\n ret\n");
}

inline void* g_scheduler_sp;
BK_TSAN(inline void* g_scheduler_tsan_fiber;)
// Switching orders nothing for ThreadSanitizer (no_sync): only the kernel's
// barriers and atomics do. Not sanitized: the switch's own bookkeeping is no
// access of the kernel's.
BK_NOT_SANITIZED inline void bk_fiber_yield() {
  BK_TSAN(__tsan_switch_to_fiber(g_scheduler_tsan_fiber, __tsan_switch_to_fiber_no_sync));
  bk_switch_stack(&g_running_fiber->sp, g_scheduler_sp);
}

// Stacks of 1 MiB (reserved, touched as used) above a guard page, kept for the next launch.
constexpr size_t kFiberStack = 1 << 20, kGuardPage = 4096;
inline std::vector<unsigned char*> g_free_stacks;
inline unsigned char* bk_take_stack() {
  if (!g_free_stacks.empty()) {
    unsigned char* s = g_free_stacks.back();
    g_free_stacks.pop_back();
    return s;
  }
  void* p = mmap(nullptr, kFiberStack + kGuardPage, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  require(p != MAP_FAILED, "a fiber's stack");
  mprotect(p, kGuardPage, PROT_NONE);  // an overflow faults instead of corrupting a neighbour
  return static_cast<unsigned char*>(p) + kGuardPage;
}

// What ThreadSanitizer is told orders a launch: the launching thread's work
// before every fiber's start (as creating a thread would), and every fiber's
// end before the launch returns (as joining it would).
inline char g_launch_start, g_launch_end;

// A fiber's first frame; it never returns (its last switch is never resumed).
inline void bk_fiber_entry() {
  BK_TSAN(__tsan_acquire(&g_launch_start));
  g_running_fiber->body();
  g_running_fiber->done.store(true, std::memory_order_relaxed);
  BK_TSAN(__tsan_release(&g_launch_end));
  bk_fiber_yield();
}

// A new fiber's stack as bk_switch_stack leaves one: six saved registers,
// then the address it returns to (bk_fiber_entry), which then sees the stack
// aligned as after a call (16-byte aligned but for the return address).
inline void* bk_new_fiber_stack(unsigned char* stack) {
  auto* top = reinterpret_cast<uintptr_t*>(stack + kFiberStack);  // 16-byte aligned
  top[-1] = 0;  // bk_fiber_entry's return address: never used
  top[-2] = reinterpret_cast<uintptr_t>(&bk_fiber_entry);
  for (int r = 3; r <= 8; ++r) top[-r] = 0;
  return top - 8;
}

// Sets the running thread's globals and switches to its fiber until it
// yields. Not sanitized, like bk_fiber_yield (the kernels only read these).
BK_NOT_SANITIZED inline void bk_resume(EmulatedFiber& f) {
  threadIdx = f.thread_idx;
  blockIdx = f.block_idx;
  g_block = f.block;
  g_dynamic_smem = f.block->smem;
  g_dynamic_smem_size = f.block->smem_size;
  g_running_fiber = &f;
  BK_TSAN(__tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync));
  bk_switch_stack(&g_scheduler_sp, f.sp);
  g_running_fiber = nullptr;
}

// Runs the fibers in turn, each until it yields or ends, until all have ended.
inline void bk_run_fibers(std::vector<std::unique_ptr<EmulatedFiber>>& fibers) {
  BK_TSAN(g_scheduler_tsan_fiber = __tsan_get_current_fiber());
  for (auto& f : fibers) {
    f->stack = bk_take_stack();
    f->sp = bk_new_fiber_stack(f->stack);
    BK_TSAN(f->tsan_fiber = __tsan_create_fiber(0));
  }
  BK_TSAN(__tsan_release(&g_launch_start));
  // Rounds in a row in which no thread arrived at a barrier or ended: every
  // one waits (at a barrier, or spinning with __nanosleep) for something no
  // other will do. A spin that ends does so within a round or two, so many
  // such rounds are a deadlock, reported instead of hanging the test.
  constexpr int kDeadlockRounds = 10000;
  int idle_rounds = 0;
  for (size_t live = fibers.size(); live > 0;) {
    const uint64_t arrivals = g_barrier_arrivals.load(std::memory_order_relaxed);
    const size_t live_before = live;
    for (auto& f : fibers) {
      if (f->done.load(std::memory_order_relaxed)) continue;
      bk_resume(*f);
      if (f->done.load(std::memory_order_relaxed)) {
        BK_TSAN(__tsan_destroy_fiber(f->tsan_fiber));
        g_free_stacks.push_back(f->stack);
        f->stack = nullptr;
        --live;
      }
    }
    const bool progress = live < live_before || g_barrier_arrivals.load(std::memory_order_relaxed) != arrivals;
    idle_rounds = progress ? 0 : idle_rounds + 1;
    require(idle_rounds < kDeadlockRounds,
            "deadlock: every thread has waited kDeadlockRounds turns at a barrier or __nanosleep and none arrived "
            "(a __syncthreads that some threads of the block skip?)");
  }
  BK_TSAN(__tsan_acquire(&g_launch_end));
}

// Runs the threads of the given blocks, each block's on its own EmulatedBlock.
template <typename Kernel, typename... Args>
void bk_run_blocks(const std::vector<dim3>& blocks, size_t dynamic_smem, Kernel kernel, Args... args) {
  const int n = blockDim.x;
  std::vector<std::unique_ptr<EmulatedBlock>> state;
  for (size_t i = 0; i < blocks.size(); ++i) state.push_back(std::make_unique<EmulatedBlock>(n, dynamic_smem));
  std::vector<std::unique_ptr<EmulatedFiber>> fibers;
  for (size_t i = 0; i < blocks.size(); ++i)
    for (int t = 0; t < n; ++t) {
      auto f = std::make_unique<EmulatedFiber>();
      f->thread_idx = dim3(t, 0, 0);
      f->block_idx = blocks[i];
      f->block = state[i].get();
      f->body = [&] {
        kernel(args...);
        bk_check_no_copies_in_flight();
      };
      fibers.push_back(std::move(f));
    }
  bk_run_fibers(fibers);
}

template <typename Kernel, typename... Args>
void bk_emulate_launch(Kernel kernel, dim3 grid, dim3 block, size_t dynamic_smem, Args... args) {
  if (!bk_valid_launch(bk_kernel_key(kernel), grid, block, dynamic_smem)) {
    g_last_error = cudaErrorInvalidConfiguration;  // nothing runs, as on a GPU
    return;
  }
  require(block.y == 1 && block.z == 1 && grid.z == 1, "1-d blocks, 2-d grids (all the emulation runs)");
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) bk_run_blocks({dim3(bx, by, 0)}, dynamic_smem, kernel, args...);
}

// cudaLaunchKernelEx: an ordinary launch, or with cudaLaunchAttributeCooperative
// every block of the grid at once (all their threads live together), which
// is what a grid-wide barrier needs. A static __shared__ array is one object
// here, shared by blocks that run at once: cooperative kernels must keep
// their shared data in dynamic shared memory (which is per block). A cooperative grid is capped at
// kEmulatedCooperativeBlocks, as a GPU caps it at what fits resident.
constexpr unsigned kEmulatedCooperativeBlocks = 16;
template <typename Kernel, typename... Args>
cudaError_t bk_emulated_launch_kernel_ex(const cudaLaunchConfig_t* config, Kernel kernel, Args&&... args) {
  bool cooperative = false;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    require(config->attrs[i].id == cudaLaunchAttributeCooperative, "the emulated launch attribute");
    cooperative = config->attrs[i].val.cooperative != 0;
  }
  const dim3 grid = config->gridDim, block = config->blockDim;
  if (!cooperative) {
    bk_emulate_launch(kernel, grid, block, config->dynamicSmemBytes, args...);
    return bk_emulated_get_last_error();
  }
  if (!bk_valid_launch(bk_kernel_key(kernel), grid, block, config->dynamicSmemBytes)) return cudaErrorInvalidConfiguration;
  require(block.y == 1 && block.z == 1 && grid.y == 1 && grid.z == 1, "1-d cooperative grids");
  if (grid.x > kEmulatedCooperativeBlocks) return g_last_error = cudaErrorCooperativeLaunchTooLarge;  // recorded, as on a GPU
  gridDim = grid;
  blockDim = block;
  std::vector<dim3> blocks;
  for (unsigned bx = 0; bx < grid.x; ++bx) blocks.push_back(dim3(bx, 0, 0));
  bk_run_blocks(blocks, config->dynamicSmemBytes, kernel, args...);
  return cudaSuccess;
}
#define cudaLaunchKernelEx bk_emulated_launch_kernel_ex

// The emulation runs any grid up to kEmulatedCooperativeBlocks at once.
template <typename Kernel>
cudaError_t bk_emulated_occupancy(int* blocks, Kernel, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor bk_emulated_occupancy
