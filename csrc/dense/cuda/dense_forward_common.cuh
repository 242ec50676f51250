// What the dense forward kernels share (dense_forward.cu: WMMA for TF32 and
// the FMA kernel; dense_forward_mma.cuh: mma.sync for fp16 and bf16): the
// epilogue's per-element pieces, the column map of gated activations, the
// order of the tiles, and the 16-byte copies into shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>

#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "dense/cuda/launchers.h"

namespace bigkernels {
namespace cuda {

template <typename Acc>
__device__ __forceinline__ Acc activate(Activation a, Acc z) {
  return dispatch_activation(a, [&](auto tag) { return act_forward<decltype(tag)::value>(z); });
}

// ---- epilogue: one output element, straight from the accumulator ----

template <typename T, typename Acc>
__device__ __forceinline__ Acc add_bias(const DenseForwardParams& p, Acc z, int64_t col) {
  return p.bias ? z + to_acc(static_cast<const T*>(p.bias)[col]) : z;
}

template <typename T, typename Acc>
__device__ __forceinline__ void store_plain(const DenseForwardParams& p, int64_t row, int64_t col,
                                            Acc z) {
  z = add_bias<T>(p, z, col);
  if (p.preact) static_cast<T*>(p.preact)[row * p.Nz + col] = from_acc<T>(z);
  static_cast<T*>(p.out)[row * p.Nout + col] = from_acc<T>(activate(p.act, z));
}

template <typename T, typename Acc>
__device__ __forceinline__ void store_gated(const DenseForwardParams& p, int64_t row, int64_t col,
                                            Acc z1, Acc z2) {
  z1 = add_bias<T>(p, z1, col);
  z2 = add_bias<T>(p, z2, p.Nout + col);
  if (p.preact) {
    static_cast<T*>(p.preact)[row * p.Nz + col] = from_acc<T>(z1);
    static_cast<T*>(p.preact)[row * p.Nz + p.Nout + col] = from_acc<T>(z2);
  }
  static_cast<T*>(p.out)[row * p.Nout + col] =
      from_acc<T>(activate(inner_activation(p.act), z1) * z2);
}

// Which weight row feeds column c of a block's tile. Plain: the block's
// columns in order. Gated: groups of `group` columns alternate between the
// first half and the matching columns of the second half, so that one warp
// holds both z1 and z2 of each output.
struct ColumnMap {
  bool gated;
  int64_t first_col;  // first output column of this block
  int group;          // gated only: columns per half-group

  __device__ __forceinline__ int64_t output_col(int c) const {
    return gated ? first_col + (c / (2 * group)) * group + c % group : first_col + c;
  }
  __device__ __forceinline__ bool second_half(int c) const { return gated && (c / group) % 2; }
  // -1 when outside the weight.
  __device__ __forceinline__ int64_t weight_row(int c, const DenseForwardParams& p) const {
    const int64_t col = output_col(c);
    if (col >= p.Nout) return -1;
    return second_half(c) ? p.Nout + col : col;
  }
};

// Row r of the [Nz, K] weight (null when r < 0): w's own, or up_weight's
// for the second half when the two halves are separate tensors.
template <typename T>
__device__ __forceinline__ const T* weight_row_ptr(const DenseForwardParams& p, int64_t r) {
  if (r < 0) return nullptr;
  if (p.w_up != nullptr && r >= p.Nout) return static_cast<const T*>(p.w_up) + (r - p.Nout) * p.K;
  return static_cast<const T*>(p.w) + r * p.K;
}

// Which (row tile, column tile) this block computes. Blocks run roughly in
// launch order; walking the tiles in groups of kGroupRows row tiles, column
// by column, keeps a group's rows of x and the columns of w in flight in L2
// (row-major order would stream all of x once per column of tiles).
struct TileCoords {
  int64_t row_tile, col_tile;
};
__device__ __forceinline__ TileCoords grouped_tile(int64_t row_tiles, int64_t col_tiles) {
  constexpr int64_t kGroupRows = 8;
  const int64_t id = blockIdx.x;
  const int64_t per_group = kGroupRows * col_tiles;
  const int64_t first_row = id / per_group * kGroupRows;
  const int64_t rows_here = row_tiles - first_row < kGroupRows ? row_tiles - first_row : kGroupRows;
  const int64_t in_group = id % per_group;
  return {first_row + in_group % rows_here, in_group / rows_here};
}

// Launch grid for grouped_tile: one dimension, every tile once. (The
// 2^31 - 1 limit needs an output of over 10^13 elements; checked anyway.)
inline dim3 tile_grid(int64_t row_tiles, int64_t col_tiles) {
  const int64_t tiles = row_tiles * col_tiles;
  return dim3(tiles <= 0x7fffffff ? static_cast<unsigned>(tiles) : 0u);  // 0 blocks: a launch error
}

// Copies 16 bytes of row `src` (null: outside the matrix) starting at k into
// shared memory, zero-filling past K. The fast path needs K % kVec == 0 and
// 16-byte aligned rows, which the host checks (vec_ok).
template <typename T>
__device__ __forceinline__ void load_chunk(T* dst, const T* src, int64_t k, int64_t K, bool vec_ok) {
  constexpr int kVec = 16 / sizeof(T);
  if (src != nullptr && vec_ok && k < K) {
    __pipeline_memcpy_async(dst, src + k, 16);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      dst[e] = (src != nullptr && k + e < K) ? src[k + e] : from_acc<T>(0.0f);
    }
  }
}

// One k-slice of a block's kRows rows of x and of the weight into shared
// memory, 16 bytes per copy: each thread copies the same chunks of the same
// rows at every k-step, so their sources are resolved once.
template <typename T, int kRows, int kBK, int kThreads>
struct TileLoader {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kChunksPerRow = kBK / kVec;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kPasses = kRows / kRowsPerPass;
  static_assert(kBK % kVec == 0 && kRows % kRowsPerPass == 0, "whole chunks and passes");
  const T* a_src[kPasses];  // x's rows (null: below the matrix)
  const T* b_src[kPasses];  // the weight's rows (null: outside it)
  int chunk_k;

  __device__ __forceinline__ TileLoader(const DenseForwardParams& p, int64_t m0, const ColumnMap& cols) {
    const int tid = threadIdx.x;
    chunk_k = (tid % kChunksPerRow) * kVec;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int r = row(i);
      a_src[i] = m0 + r < p.M ? static_cast<const T*>(p.x) + (m0 + r) * p.K : nullptr;
      b_src[i] = weight_row_ptr<T>(p, cols.weight_row(r, p));
    }
  }
  __device__ __forceinline__ static int row(int pass) { return threadIdx.x / kChunksPerRow + pass * kRowsPerPass; }

  // x's slice [k0, k0 + kBK) into as, the weight's into bs, rows `pitch` elements apart.
  __device__ __forceinline__ void load(T* as, T* bs, int pitch, int64_t k0, int64_t K, bool vec_ok) const {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      load_chunk(as + row(i) * pitch + chunk_k, a_src[i], k0 + chunk_k, K, vec_ok);
      load_chunk(bs + row(i) * pitch + chunk_k, b_src[i], k0 + chunk_k, K, vec_ok);
    }
  }
};

__host__ __device__ inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The fp16 and bf16 forward (dense_forward_mma.cuh), one instantiation per .cu file.
template <typename T>
cudaError_t launch_dense_forward_mma(const DenseForwardParams& p, cudaStream_t stream);

// The sm_90a forward on CUTLASS (sm90/), built with BIGKERNELS_SM90=1: cudaErrorNotSupported for
// what it does not cover (gated activations, unaligned or int-overflowing sizes, fp32/fp64, the
// pre-activation of relu/sigmoid/tanh/none), which the caller then runs on the mma.sync kernel.
cudaError_t launch_dense_forward_sm90(const DenseForwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bigkernels
