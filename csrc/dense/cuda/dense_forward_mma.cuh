// fp16 / bf16 dense + activation forward on mma.sync.m16n8k16 with ldmatrix
// (common/ptx_sm80.cuh), sm_80 and newer. nvcc's WMMA bf16 loads did not use
// ldmatrix (the SASS showed plain shared loads), so the fragments are ours.
//
// A 128 x 128 block tile, k-steps of 32, 8 warps as 2 (rows) x 4 (columns),
// each warp 64 x 32 = 4 x 4 tiles of 16 x 8. Three stages of cp.async keep two
// k-tiles in flight while one is multiplied. Shared rows are 40 elements (80
// bytes) apart, so the 8 rows an ldmatrix reads fall in 8 different 16-byte
// bank groups: no conflicts, no swizzle.
//
// The activation is a template parameter, chosen once per call (the launcher's
// switch), so the epilogue holds only its own code, with no switch per element.
//
// Epilogue: bias and activation on the accumulators in registers (a gated
// activation's z1 and z2 are in the same thread: tile columns alternate in
// groups of 16 between the weight's halves, so a warp's 32 columns are 16 z1
// and their 16 z2, mma tiles n and n + 2), staged through shared memory as
// 16-bit values, then stored 16 bytes per thread where alignment allows.
#pragma once

#include "common/ptx_sm80.cuh"
#include "dense/cuda/dense_forward_common.cuh"

namespace bigkernels {
namespace cuda {
namespace mma_forward {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 3;
constexpr int kWarpsM = 2, kWarpsN = 4, kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // 64 x 32 per warp
constexpr int kMT = kWM / 16, kNT = kWN / 8;             // 4 x 4 mma tiles per warp
constexpr int kPitch = kBK + 8;                          // 80 bytes: conflict-free ldmatrix
constexpr int kStageElems = (kBM + kBN) * kPitch;
constexpr int kOutPitch = kBN + 8;  // epilogue staging row (elements; 16-byte aligned rows)
constexpr int kSmemBytes = kStages * kStageElems * 2 > kBM * kOutPitch * 2 ? kStages * kStageElems * 2
                                                                            : kBM * kOutPitch * 2;
constexpr int kGroup = 16;  // gated: tile columns per half-group (ColumnMap)

// Rows [m0, m0 + kBM) x `width` columns of the staging tile, from its column
// `scol`, to dst's columns [col0, col0 + width) clipped to col_limit; dst is
// row-major with `ld` elements a row. 16 bytes per thread where `vec` (dst,
// ld and col0 all 16-byte aligned) and the chunk is whole.
template <typename T>
__device__ __forceinline__ void store_staged(T* dst, int64_t ld, int64_t m0, int64_t M, int64_t col0,
                                             int64_t col_limit, const T* staged, int scol, int width, bool vec) {
  const int chunks = width / 8;
  for (int c = threadIdx.x; c < kBM * chunks; c += kThreads) {
    const int r = c / chunks, j = (c % chunks) * 8;
    const int64_t row = m0 + r, col = col0 + j;
    if (row >= M || col >= col_limit) continue;
    const T* src = staged + r * kOutPitch + scol + j;
    T* out = dst + row * ld + col;
    if (vec && col + 8 <= col_limit) {
      *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && col + e < col_limit; ++e) out[e] = src[e];
    }
  }
}

template <typename T, Activation A>
__global__ void __launch_bounds__(kThreads, 2) dense_forward_mma_kernel(DenseForwardParams p, bool vec_ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  T* smem = reinterpret_cast<T*>(dynamic_smem());
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  constexpr bool gated = is_gated(A);
  constexpr int block_cols = gated ? kBN / 2 : kBN;  // output columns per block
  const TileCoords tile = grouped_tile((p.M + kBM - 1) / kBM, (p.Nout + block_cols - 1) / block_cols);
  const int64_t m0 = tile.row_tile * kBM;
  const ColumnMap cols{gated, tile.col_tile * block_cols, kGroup};
  const TileLoader<T, kBM, kBK, kThreads> loader(p, m0, cols);
  auto load_stage = [&](int stage, int64_t k0) {
    T* as = smem + stage * kStageElems;
    loader.load(as, as + kBM * kPitch, kPitch, k0, p.K, vec_ok);
  };

  // ldmatrix.x4 row addresses (ptx_sm80.cuh): for A, matrices (rows 0-7 |
  // 8-15) x (k 0-7 | 8-15) give a[0..3] of a 16 x 16 tile; for B, (n 0-7, k
  // 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) give b[0..1] of
  // two 8-column tiles.
  const int a_row = lane % 8 + 8 * ((lane / 8) % 2), a_k = 8 * (lane / 16);
  const int b_row = lane % 8 + 8 * (lane / 16), b_k = 8 * ((lane / 8) % 2);

  float acc[kMT][kNT][4] = {};
  const int64_t k_tiles = (p.K + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s * kBK);
    __pipeline_commit();  // possibly empty: keeps the group count regular
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    __pipeline_wait_prior(kStages - 2);  // k-tile kt has landed (this thread's copies)
    __syncthreads();  // everyone's copies too, and every warp is done with k-tile kt - 1
    const int64_t next = kt + kStages - 1;  // into the stage k-tile kt - 1 used
    if (next < k_tiles) load_stage(next % kStages, next * kBK);
    __pipeline_commit();
    const T* as = smem + (kt % kStages) * kStageElems + (warp_m * kWM) * kPitch;
    const T* bs = smem + (kt % kStages) * kStageElems + (kBM + warp_n * kWN) * kPitch;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t a[kMT][4], b[kNT][2];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) ldmatrix<4, false>(a[mt], as + (mt * 16 + a_row) * kPitch + kk + a_k);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t r[4];
        ldmatrix<4, false>(r, bs + (np * 16 + b_row) * kPitch + kk + b_k);
        b[2 * np][0] = r[0], b[2 * np][1] = r[1], b[2 * np + 1][0] = r[2], b[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mma_m16n8k16<T>(acc[mt][nt], a[mt], b[nt]);
    }
  }
  __pipeline_wait_prior(0);  // only empty groups are left; none may outlive the block
  __syncthreads();           // every warp is done with the stages: the epilogue reuses them

  // The bias: one per tile column this thread holds (-1 rows of the weight: outside it).
  const int g = lane / 4, t = lane % 4;
  float bias[kNT][2];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t wr = cols.weight_row(warp_n * kWN + nt * 8 + 2 * t + e, p);
      bias[nt][e] = p.bias != nullptr && wr >= 0 ? to_acc(static_cast<const T*>(p.bias)[wr]) : 0.f;
    }
  T* staged = smem;  // [kBM][kOutPitch]
  const int64_t first_col = tile.col_tile * block_cols;
  auto stage_pair = [&](int row, int col, float v0, float v1) {
    staged[row * kOutPitch + col] = from_acc<T>(v0);
    staged[row * kOutPitch + col + 1] = from_acc<T>(v1);
  };

  if (p.preact != nullptr) {
    // Staged columns: the tile's own (plain), or z1 in 0..63 and z2 in 64..127 (gated).
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp_m * kWM + mt * 16 + g + 8 * h;
          const int c = warp_n * kWN + nt * 8 + 2 * t;
          const int col = gated ? (cols.second_half(c) ? kBN / 2 : 0) + static_cast<int>(cols.output_col(c) - first_col)
                                : c;
          stage_pair(row, col, acc[mt][nt][2 * h] + bias[nt][0], acc[mt][nt][2 * h + 1] + bias[nt][1]);
        }
    __syncthreads();
    T* preact = static_cast<T*>(p.preact);
    const bool vec = p.Nz % 8 == 0 && aligned16(p.preact);
    if constexpr (!gated) {
      store_staged(preact, p.Nz, m0, p.M, first_col, p.Nz, staged, 0, kBN, vec);
    } else {
      store_staged(preact, p.Nz, m0, p.M, first_col, p.Nout, staged, 0, kBN / 2, vec);
      store_staged(preact, p.Nz, m0, p.M, p.Nout + first_col, p.Nz, staged, kBN / 2, kBN / 2,
                   vec && p.Nout % 8 == 0);
    }
    __syncthreads();  // the staging tile is reused below
  }

#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_m * kWM + mt * 16 + g + 8 * h;
      if constexpr (!gated) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          stage_pair(row, warp_n * kWN + nt * 8 + 2 * t, act_forward<A>(acc[mt][nt][2 * h] + bias[nt][0]),
                     act_forward<A>(acc[mt][nt][2 * h + 1] + bias[nt][1]));
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < kNT / 2; ++nt) {  // tiles nt (z1) and nt + 2 (z2)
          float v[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float z1 = acc[mt][nt][2 * h + e] + bias[nt][e];
            const float z2 = acc[mt][nt + kNT / 2][2 * h + e] + bias[nt + kNT / 2][e];
            v[e] = act_forward<inner_activation(A)>(z1) * z2;
          }
          stage_pair(row, warp_n * (kWN / 2) + nt * 8 + 2 * t, v[0], v[1]);
        }
      }
    }
  __syncthreads();
  const bool vec = p.Nout % 8 == 0 && aligned16(p.out);
  store_staged(static_cast<T*>(p.out), p.Nout, m0, p.M, first_col, p.Nout, staged, 0, block_cols, vec);
#endif
}

template <typename T, Activation A>
cudaError_t launch(const DenseForwardParams& p, cudaStream_t stream) {
  const int64_t block_cols = is_gated(A) ? kBN / 2 : kBN;
  const dim3 grid = tile_grid((p.M + kBM - 1) / kBM, (p.Nout + block_cols - 1) / block_cols);
  // The 16-byte copies need K % 8 == 0 and 16-byte aligned rows (the epilogue checks its own).
  const bool vec_ok = p.K % 8 == 0 && aligned16(p.x) && aligned16(p.w) &&
                      (p.w_up == nullptr || aligned16(p.w_up));
  const cudaError_t e = cudaFuncSetAttribute(dense_forward_mma_kernel<T, A>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (e != cudaSuccess) return e;
  dense_forward_mma_kernel<T, A><<<grid, kThreads, kSmemBytes, stream>>>(p, vec_ok);
  return cudaGetLastError();
}
}  // namespace mma_forward

template <typename T>
cudaError_t launch_dense_forward_mma(const DenseForwardParams& p, cudaStream_t stream) {
  switch (p.act) {
#define BK_LAUNCH(name, value) \
  case Activation::value:      \
    return mma_forward::launch<T, Activation::value>(p, stream);
    BK_FOR_EACH_ACTIVATION(BK_LAUNCH)
#undef BK_LAUNCH
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bigkernels
