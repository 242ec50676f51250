// Host emulation of the CUDA features our kernels use, so that the kernels'
// logic (tiling, bounds, pipelines, epilogues) is tested on machines without
// a GPU: one std::thread per CUDA thread, std::barrier for __syncthreads and
// __syncwarp, WMMA fragments as whole per-thread matrices (the API's
// semantics, not the hardware's register layout), cp.async as memcpy. The
// WMMA and cp.async calls check the API's alignment rules, and a launch
// checks its configuration against the hardware limits (the error comes back
// from cudaGetLastError, as on a GPU). Not covered:
// hardware timing (races that only show on a GPU), real fragment layouts,
// the tensor cores' rounding, speed.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <atomic>
#include <barrier>
#include <cassert>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

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

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;
inline std::unique_ptr<std::barrier<>> g_block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;

inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { g_warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

inline void require(bool ok, const char* what) {
  if (!ok) { std::fprintf(stderr, "EMULATION CHECK FAILED: %s\n", what); std::abort(); }
}

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t n) {
  require(n == 16, "cp.async size");
  require(reinterpret_cast<uintptr_t>(dst) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0,
          "cp.async 16-byte alignment");
  std::memcpy(dst, src, n);
}
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}

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

// The launch limits of every GPU since sm_30 (and of the H200): at most 1024
// threads a block, grid x < 2^31, grid y and z <= 65535, no empty grid or
// block, at most 48 KB of dynamic shared memory without opting in (the
// kernels here use none: the LAUNCH rewrite passes it through).
inline bool bk_valid_launch(dim3 grid, dim3 block, size_t dynamic_smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return threads >= 1 && threads <= 1024 && block.z <= 64 && grid.x >= 1 && grid.x <= 0x7fffffffu &&
         grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535 && dynamic_smem <= 48 * 1024;
}

template <typename Kernel, typename... Args>
void bk_emulate_launch(Kernel kernel, dim3 grid, dim3 block, size_t dynamic_smem, Args... args) {
  if (!bk_valid_launch(grid, block, dynamic_smem)) {
    g_last_error = cudaErrorInvalidConfiguration;  // nothing runs, as on a GPU
    return;
  }
  require(block.y == 1 && block.z == 1 && grid.z == 1, "1-d blocks, 2-d grids (all the emulation runs)");
  gridDim = grid;
  blockDim = block;
  const int n = block.x;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      g_block_barrier = std::make_unique<std::barrier<>>(n);
      g_warp_barriers.clear();
      for (int w = 0; w < (n + 31) / 32; ++w) g_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
      std::vector<std::thread> threads;
      for (int t = 0; t < n; ++t)
        threads.emplace_back([&, t] {
          threadIdx = dim3(t, 0, 0);
          blockIdx = dim3(bx, by, 0);
          kernel(args...);
        });
      for (auto& th : threads) th.join();
    }
}
