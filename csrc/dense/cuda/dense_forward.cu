// CUDA dense + activation forward: a tiled GEMM whose epilogue adds the bias,
// applies the activation and stores the output (and, when asked, the
// pre-activation) straight from the accumulators: no second pass over the
// output.
//
// This file: fp32 with TF32 allowed on tensor cores through WMMA (two-stage
// cp.async pipeline), fp32 without TF32 and fp64 on a plain FMA kernel, and
// the dispatch. fp16 and bf16 run the mma.sync + ldmatrix kernel of
// dense_forward_mma.cuh.
//
// Gated activations (swiglu, geglu): the block computes matching columns of
// both halves of the weight, so act(z1) * z2 is formed in the epilogue too.
#include <cuda_pipeline.h>
#include <mma.h>

#include "dense/cuda/dense_forward_common.cuh"

namespace bigkernels {
namespace cuda {
namespace {

// ---- tensor-core kernel (WMMA), TF32 ----

// 128x128 block tile, 8 warps as 2 (rows) x 4 (columns), each warp 64x32
// (4x2 fragments of 16x16), k-steps of 16 (64 bytes of a tile row).
struct Tf32Tile {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using Frag = nvcuda::wmma::precision::tf32;
#else
  using Frag = float;  // no TF32 before sm_80: the kernel body is compiled out there
#endif
  static constexpr int kBM = 128, kBN = 128, kBK = 16, kFragK = 8;
  static constexpr int kVec = 16 / sizeof(float);  // elements per 16-byte copy
  static constexpr int kLds = kBK + kVec;          // row pitch, padded against bank conflicts
  static constexpr int kWarpsM = 2, kWarpsN = 4, kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // 64 x 32
  static constexpr int kFM = kWM / 16, kFN = kWN / 16;            // 4 x 2
  static constexpr int kStageElems = (kBM + kBN) * kLds;
  static constexpr int kEpiLd = kWN + 4;  // per-warp fp32 staging row pitch
  static constexpr int kSmemBytes = 2 * kStageElems * sizeof(float);
  static_assert(kWarpsM * kWarpsN * 16 * kEpiLd * 4 <= kSmemBytes, "epilogue staging fits");
};

__global__ void __launch_bounds__(Tf32Tile::kThreads, 2) dense_forward_tf32(DenseForwardParams p, bool vec_ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using T = float;
  using Cfg = Tf32Tile;
  using Frag = Cfg::Frag;
  __shared__ __align__(128) unsigned char smem_raw[Cfg::kSmemBytes];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;
  const bool gated = is_gated(p.act);
  const int block_cols = gated ? Cfg::kBN / 2 : Cfg::kBN;  // output columns per block
  const TileCoords tile = grouped_tile((p.M + Cfg::kBM - 1) / Cfg::kBM, (p.Nout + block_cols - 1) / block_cols);
  const int64_t m0 = tile.row_tile * Cfg::kBM;
  const ColumnMap cols{gated, tile.col_tile * block_cols, 16};
  const TileLoader<T, Cfg::kBM, Cfg::kBK, Cfg::kThreads> loader(p, m0, cols);
  auto load_stage = [&](int stage, int64_t k0) {
    T* as = smem + stage * Cfg::kStageElems;
    loader.load(as, as + Cfg::kBM * Cfg::kLds, Cfg::kLds, k0, p.K, vec_ok);
  };

  wmma::fragment<wmma::accumulator, 16, 16, Cfg::kFragK, float> acc[Cfg::kFM][Cfg::kFN];
#pragma unroll
  for (int i = 0; i < Cfg::kFM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kFN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const int64_t k_tiles = (p.K + Cfg::kBK - 1) / Cfg::kBK;
  load_stage(0, 0);
  __pipeline_commit();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    if (kt + 1 < k_tiles) load_stage((kt + 1) % 2, (kt + 1) * Cfg::kBK);
    __pipeline_commit();      // possibly empty: keeps the group count regular
    __pipeline_wait_prior(1);  // stage kt has landed
    __syncthreads();
    const T* as = smem + (kt % 2) * Cfg::kStageElems;
    const T* bs = as + Cfg::kBM * Cfg::kLds;
    // Not unrolled on purpose: unrolled, the scheduler hoists the second
    // k-step's fragment loads above the first one's mma and wants ~168
    // registers, over the 128 that two blocks per SM allow, so it spilled.
#pragma unroll 1
    for (int kk = 0; kk < Cfg::kBK; kk += Cfg::kFragK) {
      wmma::fragment<wmma::matrix_a, 16, 16, Cfg::kFragK, Frag, wmma::row_major> a[Cfg::kFM];
      wmma::fragment<wmma::matrix_b, 16, 16, Cfg::kFragK, Frag, wmma::col_major> b[Cfg::kFN];
#pragma unroll
      for (int i = 0; i < Cfg::kFM; ++i) {
        wmma::load_matrix_sync(a[i], as + (warp_m * Cfg::kWM + i * 16) * Cfg::kLds + kk, Cfg::kLds);
        for (int t = 0; t < a[i].num_elements; ++t) a[i].x[t] = wmma::__float_to_tf32(a[i].x[t]);
      }
#pragma unroll
      for (int j = 0; j < Cfg::kFN; ++j) {
        // The weight tile is stored [n][k]: that is B (k x n) column-major.
        wmma::load_matrix_sync(b[j], bs + (warp_n * Cfg::kWN + j * 16) * Cfg::kLds + kk, Cfg::kLds);
        for (int t = 0; t < b[j].num_elements; ++t) b[j].x[t] = wmma::__float_to_tf32(b[j].x[t]);
      }
#pragma unroll
      for (int i = 0; i < Cfg::kFM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kFN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the next iteration's copy reuses this stage
  }

  __syncthreads();  // with K == 0 the loop never ran: no warp may still be zero-filling

  // Epilogue: each warp stages one 16 x 32 strip of fp32 accumulators in
  // shared memory (reusing the tiles), then its lanes finish the strip.
  // Unrolled so that acc[i] has a constant index: indexed at run time, the
  // whole acc array lived in local memory (a 256-byte stack frame, written
  // back at every k-tile of the loop above).
  float* strip = reinterpret_cast<float*>(smem_raw) + warp * 16 * Cfg::kEpiLd;
#pragma unroll
  for (int i = 0; i < Cfg::kFM; ++i) {
#pragma unroll
    for (int j = 0; j < Cfg::kFN; ++j) {
      wmma::store_matrix_sync(strip + j * 16, acc[i][j], Cfg::kEpiLd, wmma::mem_row_major);
    }
    __syncwarp();
    const int64_t row0 = m0 + warp_m * Cfg::kWM + i * 16;
    const int c0 = warp_n * Cfg::kWN;  // first tile column of this warp
    if (gated) {
      // strip columns 0..15 are z1, 16..31 the matching z2
      for (int e = lane; e < 16 * 16; e += 32) {
        const int r = e / 16, c = e % 16;
        const int64_t row = row0 + r, col = cols.output_col(c0 + c);
        if (row < p.M && col < p.Nout) {
          store_gated<T, float>(p, row, col, strip[r * Cfg::kEpiLd + c], strip[r * Cfg::kEpiLd + 16 + c]);
        }
      }
    } else {
      for (int e = lane; e < 16 * Cfg::kWN; e += 32) {
        const int r = e / Cfg::kWN, c = e % Cfg::kWN;
        const int64_t row = row0 + r, col = cols.output_col(c0 + c);
        if (row < p.M && col < p.Nout) store_plain<T, float>(p, row, col, strip[r * Cfg::kEpiLd + c]);
      }
    }
    __syncwarp();
  }
#endif
}

// ---- FMA kernel for exact fp32 and fp64 ----

// The classic register-blocked GEMM: a 128x128 block tile, 256 threads each
// computing 8x8 (rows ty*4 + {0..3} and 64 + ty*4 + {0..3}, columns likewise
// with tx), k-steps of 8, the next k-tile fetched into registers while the
// current one is multiplied from shared memory (double-buffered, one barrier
// per step). With the gated map (groups of 64) a thread's columns j and j + 4
// are z1 and z2 of the same output.
struct FmaTile {
  static constexpr int kB = 128, kHalf = kB / 2, kBK = 8, kThreads = 256;
};

template <typename T>
__global__ void __launch_bounds__(FmaTile::kThreads) dense_forward_fma(DenseForwardParams p) {
  constexpr int kB = FmaTile::kB, kHalf = FmaTile::kHalf, kBK = FmaTile::kBK;
  __shared__ T as[2][kBK][kB];  // [buffer][k][tile row]
  __shared__ T bs[2][kBK][kB];  // [buffer][k][tile column]
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const bool gated = is_gated(p.act);
  const int block_cols = gated ? kHalf : kB;  // output columns per block
  const TileCoords tile = grouped_tile((p.M + kB - 1) / kB, (p.Nout + block_cols - 1) / block_cols);
  const int64_t m0 = tile.row_tile * kB;
  const ColumnMap cols{gated, tile.col_tile * block_cols, kHalf};
  const T* x = static_cast<const T*>(p.x);

  // This thread copies 4 consecutive k of tile row/column `copy_row`.
  const int copy_row = tid / 2, copy_k = (tid % 2) * 4;
  const T* a_src = m0 + copy_row < p.M ? x + (m0 + copy_row) * p.K : nullptr;
  const T* b_src = weight_row_ptr<T>(p, cols.weight_row(copy_row, p));
  T a_next[4], b_next[4];
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t k = k0 + copy_k + e;
      a_next[e] = a_src != nullptr && k < p.K ? a_src[k] : T(0);
      b_next[e] = b_src != nullptr && k < p.K ? b_src[k] : T(0);
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      as[buf][copy_k + e][copy_row] = a_next[e];
      bs[buf][copy_k + e][copy_row] = b_next[e];
    }
  };

  T acc[8][8] = {};
  const int64_t k_tiles = (p.K + kBK - 1) / kBK;
  if (k_tiles > 0) {
    fetch(0);
    stash(0);
  }
  __syncthreads();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int buf = kt % 2;
    if (kt + 1 < k_tiles) fetch((kt + 1) * kBK);  // in flight during the math below
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      T a[8], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = as[buf][k][ty * 4 + i];
        a[i + 4] = as[buf][k][kHalf + ty * 4 + i];
        b[i] = bs[buf][k][tx * 4 + i];
        b[i + 4] = bs[buf][k][kHalf + tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    // The other buffer was last read before the previous barrier.
    if (kt + 1 < k_tiles) stash(buf ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t row = m0 + (i < 4 ? ty * 4 + i : kHalf + ty * 4 + i - 4);
    if (row >= p.M) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t col = cols.output_col(j < 4 ? tx * 4 + j : kHalf + tx * 4 + j - 4);
      if (col >= p.Nout) continue;
      if (!gated) {
        store_plain<T, T>(p, row, col, acc[i][j]);
      } else if (j < 4) {
        store_gated<T, T>(p, row, col, acc[i][j], acc[i][j + 4]);
      }
    }
  }
}


cudaError_t launch_tf32(const DenseForwardParams& p, cudaStream_t stream) {
  using Cfg = Tf32Tile;
  const int64_t block_cols = is_gated(p.act) ? Cfg::kBN / 2 : Cfg::kBN;
  const dim3 grid = tile_grid((p.M + Cfg::kBM - 1) / Cfg::kBM, (p.Nout + block_cols - 1) / block_cols);
  const bool vec_ok = p.K % Cfg::kVec == 0 && aligned16(p.x) && aligned16(p.w) &&
                      (p.w_up == nullptr || aligned16(p.w_up));
  dense_forward_tf32<<<grid, Cfg::kThreads, 0, stream>>>(p, vec_ok);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fma(const DenseForwardParams& p, cudaStream_t stream) {
  const int64_t block_cols = is_gated(p.act) ? FmaTile::kHalf : FmaTile::kB;
  const dim3 grid = tile_grid((p.M + FmaTile::kB - 1) / FmaTile::kB, (p.Nout + block_cols - 1) / block_cols);
  dense_forward_fma<T><<<grid, FmaTile::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dense_forward(const DenseForwardParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.Nout == 0) return cudaSuccess;
#ifdef BIGKERNELS_SM90
  if (p.use_sm90) {
    const cudaError_t e = launch_dense_forward_sm90(p, stream);
    if (e != cudaErrorNotSupported) return e;
  }
#endif
  switch (p.dtype) {
    case DType::kFloat16: return launch_dense_forward_mma<__half>(p, stream);
    case DType::kBFloat16: return launch_dense_forward_mma<__nv_bfloat16>(p, stream);
    case DType::kFloat32:
      return dense_forward_uses_tensor_cores(p) ? launch_tf32(p, stream) : launch_fma<float>(p, stream);
    case DType::kFloat64: return launch_fma<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bigkernels
