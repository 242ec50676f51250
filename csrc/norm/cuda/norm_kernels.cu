// CUDA LayerNorm / RMSNorm with the residual add fused, and their backward.
// The same contract as the CPU rows (csrc/norm/cpu/norm_kernels.cpp):
// statistics in float (double for float64) over two passes (the mean, then
// the squares about it: exact where E[x^2] - mean^2 would cancel), the sum
// rounded to the dtype before it is normalised, as the unfused add does.
// One refinement over the CPU rows: the second pass also sums the deviations,
// which corrects the mean's own rounding (see the forward kernel).
//
// Forward and the input gradient: one row per warp (N <= 1024, four rows a
// block) or per block of 256 threads (wider rows), grid-striding over rows.
// Thread t of a row owns the same elements in every pass (chunks of 16 bytes
// where N and the pointers' alignment allow, else single elements), so a
// thread re-reads only what it wrote itself (the sum) and no pass needs a
// barrier; the passes after the first re-read the row from L1/L2 (8 KB for a
// 4096-wide bf16 row). Row sums: a butterfly of warp shuffles (every lane
// gets the same bits, so the whole row agrees on mean and rstd), then across
// warps through shared memory in a fixed order. The weight and bias
// gradients: a second kernel sums columns over fixed chunks of rows into one
// partial row per grid row, which the caller adds up (no atomics).
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "common/cuda_dtype.cuh"
#include "norm/cuda/launchers.h"

namespace bigkernels {
namespace cuda {
namespace {

constexpr int kWarpRowMaxN = 1024;   // up to this width a warp owns a row (at most 32 elements a lane)
constexpr int kWarpRowsPerBlock = 4;  // rows a block of the warp-per-row kernels
constexpr int kBlockRowThreads = 256;  // threads of a row of the block-per-row kernels
constexpr int64_t kMaxGridBlocks = 65535;  // grid cap (also grid.y's limit); the kernels grid-stride past it

__device__ __forceinline__ float acc_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double acc_sqrt(double v) { return sqrt(v); }

// Sums each of v[0..K) over the kThreadsPerRow threads of a row; every one of
// them gets the same totals. Block-wide rows need every thread of the block.
template <int kThreadsPerRow, int K, typename Acc>
__device__ __forceinline__ void row_sums(Acc (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  if constexpr (kThreadsPerRow > 32) {
    constexpr int kWarps = kThreadsPerRow / 32;
    __shared__ Acc warp_sums[kWarps][K];
    if (threadIdx.x % 32 == 0)
#pragma unroll
      for (int k = 0; k < K; ++k) warp_sums[threadIdx.x / 32][k] = v[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v[k] += warp_sums[w][k];
    }
    __syncthreads();  // all have read warp_sums before the next call writes it
  }
}

// kVec consecutive elements, loaded or stored as one access (16 bytes when
// kVec = 16 / sizeof(T): the launcher checks N and the pointers' alignment).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <int kVec, typename T>
__device__ __forceinline__ void load(const T* p, int64_t j, acc_t<T> (&out)[kVec]) {
  const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(p + j);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_acc(pack.v[i]);
}

template <int kVec, typename T>
__device__ __forceinline__ void store(T* p, int64_t j, const acc_t<T> (&in)[kVec]) {
  Pack<T, kVec> pack;
#pragma unroll
  for (int i = 0; i < kVec; ++i) pack.v[i] = from_acc<T>(in[i]);
  *reinterpret_cast<Pack<T, kVec>*>(p + j) = pack;
}

// The row kernels ask for 1024 resident threads per SM (kResidentRowThreads over
// their block size), a cap of 64 registers: enough loads in flight for a
// bandwidth-bound pass, and room enough that ptxas spills nothing (left to
// itself it chose 40 registers and spilled 8 bytes in two instantiations).
constexpr int kResidentRowThreads = 1024;

// Thread t of a row owns the chunks of kVec elements that start at
// j = t * kVec, (t + kThreadsPerRow) * kVec, ...: the loops below are over j.
#define BK_FOR_CHUNKS(j) for (int64_t j = int64_t(t) * kVec; j < N; j += int64_t(kThreadsPerRow) * kVec)

template <typename T, int kThreadsPerRow, int kRowsPerBlock, int kVec>
__global__ void __launch_bounds__(kThreadsPerRow* kRowsPerBlock, kResidentRowThreads / (kThreadsPerRow * kRowsPerBlock))
    norm_forward_kernel(NormForwardParams p) {
  using Acc = acc_t<T>;
  const int64_t N = p.N;
  const int t = threadIdx.x % kThreadsPerRow;
  const bool rms = p.mean == nullptr;
  const T* w = static_cast<const T*>(p.weight);
  const T* b = static_cast<const T*>(p.bias);
  // Rows are uniform across a row's threads (a warp, or the whole block), so
  // the shuffles and barriers in row_sums are reached by all of them.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow; row < p.M;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* x = static_cast<const T*>(p.input) + row * N;
    const T* r = p.residual != nullptr ? static_cast<const T*>(p.residual) + row * N : nullptr;
    T* s = r != nullptr ? static_cast<T*>(p.sum) + row * N : nullptr;
    // First pass: the sum (rounded to T, as the unfused add rounds it) and
    // its total, for the mean.
    Acc total[1] = {0};
    BK_FOR_CHUNKS(j) {
      Acc v[kVec];
      load<kVec>(x, j, v);
      if (r != nullptr) {
        Acc rv[kVec];
        load<kVec>(r, j, rv);
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[i] = to_acc(from_acc<T>(v[i] + rv[i]));
        store<kVec>(s, j, v);
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) total[0] += v[i];
    }
    if (r != nullptr) x = s;  // the rounded sum is what is normalised; this thread wrote every element it reads
    Acc mean = 0;
    if (!rms) {
      row_sums<kThreadsPerRow>(total);
      mean = total[0] / static_cast<Acc>(N);
    }
    // Second pass, about the mean: the squares, and (LayerNorm) the deviations,
    // whose mean is the first pass's rounding error in the mean (the corrected
    // two-pass algorithm of Chan, Golub and LeVeque): with it the mean is as
    // exact as float holds it, even where rows sit far from zero.
    Acc dev[2] = {0, 0};  // sums of (x - mean), of (x - mean)^2
    BK_FOR_CHUNKS(j) {
      Acc v[kVec];
      load<kVec>(x, j, v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const Acc d = v[i] - mean;
        dev[0] += d;
        dev[1] += d * d;
      }
    }
    row_sums<kThreadsPerRow>(dev);
    const Acc shift = rms ? Acc(0) : dev[0] / static_cast<Acc>(N);
    mean += shift;
    const Acc var = dev[1] / static_cast<Acc>(N) - shift * shift;  // E[(x - mean')^2], mean' = mean + shift
    const Acc rstd = Acc(1) / acc_sqrt((var > Acc(0) ? var : Acc(0)) + static_cast<Acc>(p.eps));
    if (t == 0) {
      if (!rms) static_cast<Acc*>(p.mean)[row] = mean;
      static_cast<Acc*>(p.rstd)[row] = rstd;
    }
    T* out = static_cast<T*>(p.out) + row * N;
    BK_FOR_CHUNKS(j) {
      Acc y[kVec], wv[kVec], bv[kVec];
      load<kVec>(x, j, y);
      if (w != nullptr) load<kVec>(w, j, wv);
      if (b != nullptr) load<kVec>(b, j, bv);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        y[i] = (y[i] - mean) * rstd;
        if (w != nullptr) y[i] *= wv[i];
        if (b != nullptr) y[i] += bv[i];
      }
      store<kVec>(out, j, y);
    }
  }
}

// grad_input per row: with g = grad_out * weight and x_hat = (x - mean) * rstd,
// dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) (RMSNorm: no mean(g)),
// plus grad_sum.
// One chunk's grad_out times the weight (g) and x_hat, from x and the row's statistics.
template <int kVec, typename T, typename Acc>
__device__ __forceinline__ void weighted_grad_and_xhat(const T* dy, const T* x, const T* w, int64_t j, Acc mean,
                                                       Acc rstd, Acc (&g)[kVec], Acc (&xh)[kVec]) {
  load<kVec>(dy, j, g);
  load<kVec>(x, j, xh);
  Acc wv[kVec];
  if (w != nullptr) load<kVec>(w, j, wv);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    if (w != nullptr) g[i] *= wv[i];
    xh[i] = (xh[i] - mean) * rstd;
  }
}

template <typename T, int kThreadsPerRow, int kRowsPerBlock, int kVec>
__global__ void __launch_bounds__(kThreadsPerRow* kRowsPerBlock, kResidentRowThreads / (kThreadsPerRow * kRowsPerBlock))
    norm_backward_input_kernel(NormBackwardParams p) {
  using Acc = acc_t<T>;
  const int64_t N = p.N;
  const int t = threadIdx.x % kThreadsPerRow;
  const bool rms = p.mean == nullptr;
  const T* w = static_cast<const T*>(p.weight);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow; row < p.M;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* x = static_cast<const T*>(p.x) + row * N;
    const T* dy = static_cast<const T*>(p.grad_out) + row * N;
    const Acc mean = rms ? Acc(0) : static_cast<const Acc*>(p.mean)[row];
    const Acc rstd = static_cast<const Acc*>(p.rstd)[row];
    Acc sums[2] = {0, 0};  // of g * x_hat, of g
    BK_FOR_CHUNKS(j) {
      Acc g[kVec], xh[kVec];
      weighted_grad_and_xhat<kVec>(dy, x, w, j, mean, rstd, g, xh);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        sums[0] += g[i] * xh[i];
        sums[1] += g[i];
      }
    }
    row_sums<kThreadsPerRow>(sums);
    const Acc c1 = sums[0] / static_cast<Acc>(N), c2 = rms ? Acc(0) : sums[1] / static_cast<Acc>(N);
    T* dx = static_cast<T*>(p.grad_input) + row * N;
    const T* dsum = p.grad_sum != nullptr ? static_cast<const T*>(p.grad_sum) + row * N : nullptr;
    BK_FOR_CHUNKS(j) {
      Acc g[kVec], xh[kVec], d[kVec], ds[kVec];
      weighted_grad_and_xhat<kVec>(dy, x, w, j, mean, rstd, g, xh);
      if (dsum != nullptr) load<kVec>(dsum, j, ds);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        d[i] = rstd * (g[i] - c2 - xh[i] * c1);
        if (dsum != nullptr) d[i] += ds[i];
      }
      store<kVec>(dx, j, d);
    }
  }
}

#undef BK_FOR_CHUNKS

// Weight and bias gradients: block = 32 columns x 8 row-lanes; grid row y
// sums chunks of kChunkRows rows y, y + gridDim.y, ... (a fixed set for a
// given M), then the 8 row-lanes meet in shared memory and one partial sum
// per column goes to row blockIdx.y of the partials.
constexpr int kCols = 32, kRowLanes = 8, kChunkRows = 64;

template <typename T>
__global__ void __launch_bounds__(kCols* kRowLanes) norm_backward_params_kernel(NormBackwardParams p) {
  using Acc = acc_t<T>;
  const int tx = threadIdx.x % kCols, ty = threadIdx.x / kCols;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  const bool rms = p.mean == nullptr, want_w = p.weight_partials != nullptr;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  Acc dw = 0, db = 0;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kChunkRows; col < p.N && row0 < p.M;
       row0 += static_cast<int64_t>(gridDim.y) * kChunkRows) {
    const int64_t row_end = row0 + kChunkRows < p.M ? row0 + kChunkRows : p.M;
    for (int64_t row = row0 + ty; row < row_end; row += kRowLanes) {
      const Acc g = to_acc(dy[row * p.N + col]);
      if (want_w) {
        const Acc mean = rms ? Acc(0) : static_cast<const Acc*>(p.mean)[row];
        dw += g * ((to_acc(x[row * p.N + col]) - mean) * static_cast<const Acc*>(p.rstd)[row]);
      }
      db += g;
    }
  }
  __shared__ Acc partial[2][kRowLanes][kCols];
  partial[0][ty][tx] = dw;
  partial[1][ty][tx] = db;
  __syncthreads();
  if (ty == 0 && col < p.N) {
    Acc tw = 0, tb = 0;
#pragma unroll
    for (int r = 0; r < kRowLanes; ++r) {
      tw += partial[0][r][tx];
      tb += partial[1][r][tx];
    }
    if (want_w) static_cast<Acc*>(p.weight_partials)[blockIdx.y * p.N + col] = tw;
    if (p.bias_partials != nullptr) static_cast<Acc*>(p.bias_partials)[blockIdx.y * p.N + col] = tb;
  }
}

int64_t grid_cap(int64_t max_blocks) { return max_blocks > 0 && max_blocks < kMaxGridBlocks ? max_blocks : kMaxGridBlocks; }

int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T, int kThreadsPerRow, int kRowsPerBlock, int kVec>
cudaError_t launch_rows(const NormForwardParams& p, cudaStream_t stream) {
  const int64_t grid = min64((p.M + kRowsPerBlock - 1) / kRowsPerBlock, grid_cap(p.max_blocks));
  norm_forward_kernel<T, kThreadsPerRow, kRowsPerBlock, kVec><<<dim3(grid), kThreadsPerRow * kRowsPerBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kThreadsPerRow, int kRowsPerBlock, int kVec>
cudaError_t launch_rows(const NormBackwardParams& p, cudaStream_t stream) {
  const int64_t grid = min64((p.M + kRowsPerBlock - 1) / kRowsPerBlock, grid_cap(p.max_blocks));
  norm_backward_input_kernel<T, kThreadsPerRow, kRowsPerBlock, kVec><<<dim3(grid), kThreadsPerRow * kRowsPerBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

// The row layout (warp or block per row) and the access width (16 bytes or
// one element), from N and vector_width.
template <typename T, typename Params>
cudaError_t launch_rows_for(const Params& p, int vector_width, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool wide = vector_width > 1;
  if (p.N <= kWarpRowMaxN)
    return wide ? launch_rows<T, 32, kWarpRowsPerBlock, kVec>(p, stream)
                : launch_rows<T, 32, kWarpRowsPerBlock, 1>(p, stream);
  return wide ? launch_rows<T, kBlockRowThreads, 1, kVec>(p, stream) : launch_rows<T, kBlockRowThreads, 1, 1>(p, stream);
}

template <typename T>
cudaError_t forward(const NormForwardParams& p, cudaStream_t stream) {
  return launch_rows_for<T>(p, norm_forward_vector_width(p), stream);
}

template <typename T>
cudaError_t backward(const NormBackwardParams& p, cudaStream_t stream) {
  if (p.grad_input != nullptr) {
    const cudaError_t e = launch_rows_for<T>(p, norm_backward_vector_width(p), stream);
    if (e != cudaSuccess) return e;
  }
  if (p.weight_partials == nullptr && p.bias_partials == nullptr) return cudaSuccess;
  const dim3 grid((p.N + kCols - 1) / kCols, norm_backward_partial_rows(p.M, p.max_blocks));
  norm_backward_params_kernel<T><<<grid, kCols * kRowLanes, 0, stream>>>(p);
  return cudaGetLastError();
}

int element_size(NormDType d) {
  return d == NormDType::kFloat64 ? 8 : d == NormDType::kFloat32 ? 4 : 2;
}

// 16-byte accesses need every row to start on a 16-byte boundary: N a
// multiple of the elements in 16 bytes, and every pointer aligned (null ones
// are not read).
int vector_width(NormDType dtype, int64_t N, std::initializer_list<const void*> pointers) {
  const int vec = 16 / element_size(dtype);
  if (N % vec != 0) return 1;
  for (const void* ptr : pointers)
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return 1;
  return vec;
}

template <typename Params, typename F>
cudaError_t dispatch(const Params& p, F f) {
  switch (p.dtype) {
    case NormDType::kFloat16: return f(__half{});
    case NormDType::kBFloat16: return f(__nv_bfloat16{});
    case NormDType::kFloat32: return f(float{});
    case NormDType::kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int norm_forward_vector_width(const NormForwardParams& p) {
  return vector_width(p.dtype, p.N, {p.input, p.residual, p.weight, p.bias, p.out, p.sum});
}

int norm_backward_vector_width(const NormBackwardParams& p) {
  return vector_width(p.dtype, p.N, {p.grad_out, p.grad_sum, p.x, p.weight, p.grad_input});
}

int64_t norm_backward_partial_rows(int64_t M, int64_t max_blocks) {
  return min64((M + kChunkRows - 1) / kChunkRows, grid_cap(max_blocks));
}

cudaError_t launch_norm_forward(const NormForwardParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return dispatch(p, [&](auto t) { return forward<decltype(t)>(p, stream); });
}

cudaError_t launch_norm_backward(const NormBackwardParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return dispatch(p, [&](auto t) { return backward<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace bigkernels
