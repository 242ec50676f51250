// The CUDA attention kernels, FlashAttention-2 style, on mma.sync m16n8k16
// tensor-core tiles (fp16/bf16 in, f32 accumulate) fed by ldmatrix from
// swizzled shared memory, tiles brought in with cp.async. Included once per
// (dtype, head-dim bucket) by attention_<dtype>_hdim<D>.cu.
//
// Every product here has one of two shapes, so two warp-level routines do
// all the matrix work (a warp owns 16 rows of the block's resident tile):
//   scores_tile:     S[16 x kN] = X[16 rows of a resident tile] . Y[kN rows]^T
//                    (contraction over the head dim; both operands row-major
//                    in shared memory, so both load with plain ldmatrix)
//   accumulate_pv:   O[16 x kD] += P[16 x kN] . Z[kN rows x kD]
//                    (P straight from S's accumulator registers, which have
//                    exactly the A-fragment layout once packed to 16 bits;
//                    Z loads with ldmatrix.trans)
// Forward: S = Q K^T, online softmax, O += P V.  Backward, without atomics
// (deterministic): per query tile dQ += dS K (dS from S = Q K^T and
// dP = dO V^T); per key tile dV += P^T dO and dK += dS^T Q (from
// S^T = K Q^T and dP^T = V dO^T), looping over the query heads of the group.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attention/cuda/attention_common.cuh"
#include "common/ptx_sm80.cuh"

namespace bigkernels {
namespace cuda {
namespace attention {

constexpr int kRows = 16 * kWarps;  // rows of a block's resident tile (queries, or keys for dK/dV)
static_assert(kRows == attention_rows_per_block(true, 2, 64), "the host's grid check assumes this");
constexpr float kLog2e = 1.4426950408889634f;

// Tile shapes per head-dim bucket kD: kN rows of the streamed tile (keys in
// the forward and dQ kernels, queries in the dK/dV kernel), chosen so that
// shared memory stays under the 99 KB every sm_80+ GPU offers and the
// accumulators stay in registers.
template <int kD>
struct Tiles {
  static_assert(kD % 64 == 0, "the swizzle needs at least 8 chunks of 16 bytes per row");
  static constexpr int kForwardKeys = kD <= 128 ? 64 : 32;
  static constexpr int kBackwardCols = kD <= 64 ? 64 : 32;
  template <typename T>
  static constexpr size_t forward_smem() {  // Q, and two stages of K and V
    return sizeof(T) * kD * (kRows + 4 * kForwardKeys);
  }
  template <typename T>
  static constexpr size_t backward_smem() {  // two resident tiles, two streamed ones, two float rows
    return sizeof(T) * kD * (2 * kRows + 2 * kBackwardCols) + 2 * sizeof(float) * kBackwardCols;
  }
};

// Element (row, col) of a [rows][kD] tile in shared memory. The 16-byte
// chunks of a row are XOR-swizzled by the row's index mod 8, so that the 8
// row addresses of one ldmatrix (same column, consecutive rows) hit 8
// different bank groups instead of one.
template <int kD>
__device__ __forceinline__ int swizzle(int row, int col) {
  return row * kD + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

// Rows [r0, r0 + rows) of a global [.., n, dim] tensor (row stride `stride`)
// into a swizzled tile: rows >= n and columns >= dim become 0. One 16-byte
// cp.async per chunk (the op guarantees the alignment).
template <typename T, int kD>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t r0, int rows, int64_t n, int64_t dim,
                                          int64_t stride) {
  constexpr int kChunks = kD / 8;
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    T* dst = tile + swizzle<kD>(row, col);
    if (r0 + row < n && col < dim) {
      __pipeline_memcpy_async(dst, src + (r0 + row) * stride + col, 16);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  const T l = from_acc<T>(lo), h = from_acc<T>(hi);
  uint16_t a, b;
  memcpy(&a, &l, 2);
  memcpy(&b, &h, 2);
  return uint32_t(a) | (uint32_t(b) << 16);
}

// s[nt][.] = X[16 rows from x_row0] . Y[kN rows]^T over the first `dim`
// columns (rounded up to 16; the tiles are zero beyond dim). Lane (g, t) ends
// with s[nt][0..1] = S[g][8nt+2t..+1], s[nt][2..3] = S[g+8][8nt+2t..+1].
template <typename T, int kD, int kN>
__device__ __forceinline__ void scores_tile(float (&s)[kN / 8][4], const T* x, int x_row0, const T* y, int dim) {
  const int lane = threadIdx.x % 32;
  for (int nt = 0; nt < kN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    if (kk * 16 >= dim) break;
    uint32_t a[4];  // matrices: rows 0-7 | 8-15 of x, times columns 0-7 | 8-15 of this k-step
    ldmatrix<4, false>(a, x + swizzle<kD>(x_row0 + (lane & 7) + (lane & 8), kk * 16 + (lane >> 4) * 8));
#pragma unroll
    for (int n2 = 0; n2 < kN / 16; ++n2) {
      uint32_t b[4];  // rows 0-7 of y's 16 x cols 0-7 | 8-15, then rows 8-15 likewise
      ldmatrix<4, false>(b, y + swizzle<kD>(n2 * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + (lane & 8)));
      mma_m16n8k16<T>(s[2 * n2], a, {b[0], b[1]});
      mma_m16n8k16<T>(s[2 * n2 + 1], a, {b[2], b[3]});
    }
  }
}

// o[dt][.] += P . Z[kN rows][first `dim` columns], with P in s (the layout
// scores_tile leaves) rounded to T.
template <typename T, int kD, int kN>
__device__ __forceinline__ void accumulate_pv(float (&o)[kD / 8][4], const float (&s)[kN / 8][4], const T* z,
                                              int dim) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < kN / 16; ++ks) {
    const uint32_t a[4] = {pack<T>(s[2 * ks][0], s[2 * ks][1]), pack<T>(s[2 * ks][2], s[2 * ks][3]),
                           pack<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                           pack<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
    for (int d2 = 0; d2 < kD / 16; ++d2) {
      if (d2 * 16 >= dim) break;
      uint32_t b[4];  // transposed: rows 0-7 | 8-15 of this k-step, times columns 0-7 | 8-15
      ldmatrix<4, true>(b, z + swizzle<kD>(ks * 16 + (lane & 7) + (lane & 8), d2 * 16 + (lane >> 4) * 8));
      mma_m16n8k16<T>(o[2 * d2], a, {b[0], b[1]});
      mma_m16n8k16<T>(o[2 * d2 + 1], a, {b[2], b[3]});
    }
  }
}

// Sum (or max) over the 4 lanes that share a row of a fragment.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// Stores rows of a [16 x kD] accumulator (rows g and g+8 of this warp) times
// `factor` into a contiguous [n, dim] tensor at rows r0 + 16 warp + ...
template <typename T, int kD>
__device__ __forceinline__ void store_rows(T* dst, const float (&acc)[kD / 8][4], int64_t r0, int64_t n,
                                           int64_t dim, float factor0, float factor1) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row = r0 + warp * 16 + lane / 4;
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) {
    const int64_t col = dt * 8 + 2 * (lane % 4);
    if (col >= dim) break;  // dim is a multiple of 8: both columns or neither
    if (row < n) {
      dst[row * dim + col] = from_acc<T>(acc[dt][0] * factor0);
      dst[row * dim + col + 1] = from_acc<T>(acc[dt][1] * factor0);
    }
    if (row + 8 < n) {
      dst[(row + 8) * dim + col] = from_acc<T>(acc[dt][2] * factor1);
      dst[(row + 8) * dim + col + 1] = from_acc<T>(acc[dt][3] * factor1);
    }
  }
}

// ---- forward: grid (B * Hq, query tiles) ----

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) forward_kernel(const AttentionParams p) {
#if __CUDA_ARCH__ >= 800
  constexpr int kN = Tiles<kD>::kForwardKeys;
  const int64_t b = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq, hk = h / (p.Hq / p.Hkv);
  const Sequence seq = sequence_of(p, b);
  const int64_t i0 = int64_t(blockIdx.y) * kRows, i1 = clamp(i0 + kRows, 0, seq.L);
  if (i0 >= seq.L) return;  // (a shorter packed sequence: the grid is sized for the longest)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1] + seq.q0 * p.q_strides[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1] + seq.k0 * p.k_strides[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1] + seq.k0 * p.v_strides[2];
  // Q, then K and V of stage 0, then of stage 1 (pointer arithmetic: an
  // array of stage pointers indexed at run time would live in local memory)
  T* sq = reinterpret_cast<T*>(dynamic_smem());
  const auto sk = [&](int stage) { return sq + (kRows + 2 * stage * kN) * kD; };
  const auto sv = [&](int stage) { return sq + (kRows + (2 * stage + 1) * kN) * kD; };

  const Window w{p.window_left, p.window_right, seq.diagonal, seq.L, seq.S};
  int64_t jlo, jhi;
  w.keys_for(i0, i1, jlo, jhi);
  load_tile<T, kD>(sq, q, i0, kRows, seq.L, p.E, p.q_strides[2]);
  if (jlo < jhi) {
    load_tile<T, kD>(sk(0), k, jlo, kN, seq.S, p.E, p.k_strides[2]);
    load_tile<T, kD>(sv(0), v, jlo, kN, seq.S, p.Ev, p.v_strides[2]);
  }
  __pipeline_commit();

  float o[kD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max (log2 units) and partial sums
  const int64_t row[2] = {i0 + warp * 16 + lane / 4, i0 + warp * 16 + lane / 4 + 8};
  int stage = 0;
  for (int64_t j0 = jlo; j0 < jhi; j0 += kN, stage ^= 1) {
    __pipeline_wait_prior(0);
    __syncthreads();  // this tile has landed, and every warp is done with the other stage
    if (j0 + kN < jhi) {  // prefetch the next tile while this one is computed
      load_tile<T, kD>(sk(stage ^ 1), k, j0 + kN, kN, seq.S, p.E, p.k_strides[2]);
      load_tile<T, kD>(sv(stage ^ 1), v, j0 + kN, kN, seq.S, p.Ev, p.v_strides[2]);
    }
    __pipeline_commit();
    if (!tile_has_allowed_pair(p, b, h, i0, kRows, j0, kN)) continue;  // contributes nothing

    float s[kN / 8][4];
    scores_tile<T, kD, kN>(s, sq, warp * 16, sk(stage), p.E);
    const bool whole = w.whole(i0, i0 + kRows, j0, j0 + kN);
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j0 + nt * 8 + 2 * (lane % 4) + (e & 1);
        s[nt][e] = masked_score<T>(p, w, s[nt][e], b, h, row[e / 2], j, whole) * kLog2e;
        row_max[e / 2] = fmaxf(row_max[e / 2], s[nt][e]);
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m[r], quad_max(row_max[r]));
      // While a row has seen only masked keys, m_new is -inf: shift by 0 so
      // that its probabilities come out 0 rather than NaN.
      const float shift = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[r] - shift);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) o[dt][2 * r] *= alpha, o[dt][2 * r + 1] *= alpha;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - shift);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - shift);
        l[r] += s[nt][2 * r] + s[nt][2 * r + 1];  // the normaliser counts every key, dropped or not
      }
    }
    if (p.dropout_p > 0.f) {
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[nt][e] *= dropout_keep(p, seq, h, row[e / 2], j0 + nt * 8 + 2 * (lane % 4) + (e & 1));
    }
    accumulate_pv<T, kD, kN>(o, s, sv(stage), p.Ev);
  }
  __pipeline_wait_prior(0);  // no copy outlives the block, even when there was no key tile

  float inv[2];
  const int64_t head_row0 = seq.query_rows(h);  // this head's first row in out and lse
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;  // a row that attends to nothing gives 0
    if (lane % 4 == 0 && row[r] < seq.L) {
      static_cast<float*>(p.lse)[head_row0 + row[r]] = l[r] > 0.f ? (m[r] + log2f(l[r])) / kLog2e : -INFINITY;
    }
  }
  store_rows<T, kD>(static_cast<T*>(p.out) + head_row0 * p.Ev, o, i0, seq.L, p.Ev, inv[0], inv[1]);
#endif
}

// ---- backward, dQ: grid (B * Hq, query tiles) ----

// kGeneral: built for softcap, ALiBi and packed sequences
// (AttentionParams::softcap, alibi_slopes, cu_seqlens_q). Built once without
// them too: with their code in it, the kernel took 203-207 registers instead
// of 168 (bf16, head dim 64, sm_90a), 2 blocks per SM instead of 3, whether
// a call used them or not.
template <typename T, int kD, bool kGeneral>
__global__ void __launch_bounds__(kThreads) backward_dq_kernel(const AttentionParams p) {
#if __CUDA_ARCH__ >= 800
  constexpr int kN = Tiles<kD>::kBackwardCols;
  const int64_t b = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq, hk = h / (p.Hq / p.Hkv);
  const Sequence seq = sequence_of<kGeneral>(p, b);
  const int64_t i0 = int64_t(blockIdx.y) * kRows, i1 = clamp(i0 + kRows, 0, seq.L);
  if (i0 >= seq.L) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t head_row0 = seq.query_rows(h);  // first row of this head in out, lse, delta, dQ
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1] + seq.q0 * p.q_strides[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1] + seq.k0 * p.k_strides[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1] + seq.k0 * p.v_strides[2];
  const T* dout = static_cast<const T*>(p.grad_out) + head_row0 * p.Ev;
  T* sq = reinterpret_cast<T*>(dynamic_smem());
  T* sdo = sq + kRows * kD;
  T* sk = sdo + kRows * kD;
  T* sv = sk + kN * kD;

  const Window w{p.window_left, p.window_right, seq.diagonal, seq.L, seq.S};
  int64_t jlo, jhi;
  w.keys_for(i0, i1, jlo, jhi);
  load_tile<T, kD>(sq, q, i0, kRows, seq.L, p.E, p.q_strides[2]);
  load_tile<T, kD>(sdo, dout, i0, kRows, seq.L, p.Ev, p.Ev);
  __pipeline_commit();  // a group of its own: the final wait covers it even when no key tile runs
  const int64_t row[2] = {i0 + warp * 16 + lane / 4, i0 + warp * 16 + lane / 4 + 8};
  float lse[2], delta[2];  // lse in log2 units; -inf for a row with nothing to attend (no gradient)
  for (int r = 0; r < 2; ++r) {
    const bool in = row[r] < seq.L;
    lse[r] = in ? static_cast<const float*>(p.lse)[head_row0 + row[r]] * kLog2e : -INFINITY;
    delta[r] = in ? static_cast<const float*>(p.delta)[head_row0 + row[r]] : 0.f;
  }
  float dq[kD / 8][4] = {};
  for (int64_t j0 = jlo; j0 < jhi; j0 += kN) {
    __syncthreads();  // every warp is done with the previous K and V
    load_tile<T, kD>(sk, k, j0, kN, seq.S, p.E, p.k_strides[2]);
    load_tile<T, kD>(sv, v, j0, kN, seq.S, p.Ev, p.v_strides[2]);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    if (!tile_has_allowed_pair(p, b, h, i0, kRows, j0, kN)) continue;  // no gradient flows through it
    float s[kN / 8][4], dp[kN / 8][4];
    scores_tile<T, kD, kN>(s, sq, warp * 16, sk, p.E);
    scores_tile<T, kD, kN>(dp, sdo, warp * 16, sv, p.Ev);
    const bool whole = w.whole(i0, i0 + kRows, j0, j0 + kN);
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const int64_t j = j0 + nt * 8 + 2 * (lane % 4) + (e & 1);
        float cap_slope = 1.f;
        const float x = masked_score<T, kGeneral>(p, w, s[nt][e], b, h, row[r], j, whole, &cap_slope) * kLog2e;
        const float prob = lse[r] == -INFINITY ? 0.f : exp2f(x - lse[r]);
        // dS = P * (dP * M - D), M the dropout keep-mask scaled by 1 / (1 - p)
        const float keep = p.dropout_p > 0.f ? dropout_keep(p, seq, h, row[r], j) : 1.f;
        s[nt][e] = prob * (dp[nt][e] * keep - delta[r]);
        if (p.grad_mask != nullptr && row[r] < p.L && j < p.S) {  // a float mask's gradient is dS
          static_cast<float*>(p.grad_mask)[(head_row0 + row[r]) * p.S + j] = s[nt][e];
        }
        s[nt][e] *= cap_slope;  // through the softcap: the scaled scores' gradient
      }
    accumulate_pv<T, kD, kN>(dq, s, sk, p.E);
  }
  __pipeline_wait_prior(0);  // no copy outlives the block, even when there was no key tile
  store_rows<T, kD>(static_cast<T*>(p.grad_q) + head_row0 * p.E, dq, i0, seq.L, p.E, p.scale, p.scale);
#endif
}

// ---- backward, dK and dV: grid (B * Hkv, key tiles) ----

// What one dK/dV kernel computes. Up to head dim 128 both; at 256 the two
// [16 x 256] accumulators (256 floats a thread) cannot live in 255
// registers, so a dV kernel and a dK kernel run one after the other, each
// recomputing the scores (one extra K Q^T: 5 products instead of 4). One
// kernel branching on the part would be sized for both and spill.
enum class DkDvPart { kBoth, kDv, kDk };

template <typename T, int kD, DkDvPart kPart>
__global__ void __launch_bounds__(kThreads) backward_dkdv_kernel(const AttentionParams p) {
#if __CUDA_ARCH__ >= 800
  constexpr int kN = Tiles<kD>::kBackwardCols;
  constexpr bool kWantDv = kPart != DkDvPart::kDk, kWantDk = kPart != DkDvPart::kDv;
  const int64_t b = blockIdx.x / p.Hkv, hk = blockIdx.x % p.Hkv, group = p.Hq / p.Hkv;
  const Sequence seq = sequence_of(p, b);
  const int64_t j0 = int64_t(blockIdx.y) * kRows, j1 = clamp(j0 + kRows, 0, seq.S);
  if (j0 >= seq.S) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1] + seq.k0 * p.k_strides[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1] + seq.k0 * p.v_strides[2];
  T* sk = reinterpret_cast<T*>(dynamic_smem());
  T* sv = sk + kRows * kD;
  T* sq = sv + kRows * kD;
  T* sdo = sq + kN * kD;
  float* slse = reinterpret_cast<float*>(sdo + kN * kD);
  float* sdelta = slse + kN;

  load_tile<T, kD>(sk, k, j0, kRows, seq.S, p.E, p.k_strides[2]);
  if constexpr (kWantDk) load_tile<T, kD>(sv, v, j0, kRows, seq.S, p.Ev, p.v_strides[2]);  // V only enters dP
  __pipeline_commit();
  const Window w{p.window_left, p.window_right, seq.diagonal, seq.L, seq.S};
  int64_t ilo, ihi;
  w.queries_for(j0, j1, ilo, ihi);
  const int64_t key[2] = {j0 + warp * 16 + lane / 4, j0 + warp * 16 + lane / 4 + 8};
  float dk[kD / 8][4] = {}, dv[kD / 8][4] = {};  // the part's unused one is optimised away
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t head_row0 = seq.query_rows(h);
    const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1] + seq.q0 * p.q_strides[2];
    const T* dout = static_cast<const T*>(p.grad_out) + head_row0 * p.Ev;
    for (int64_t i0 = ilo; i0 < ihi; i0 += kN) {
      __syncthreads();  // every warp is done with the previous queries
      load_tile<T, kD>(sq, q, i0, kN, seq.L, p.E, p.q_strides[2]);
      load_tile<T, kD>(sdo, dout, i0, kN, seq.L, p.Ev, p.Ev);
      __pipeline_commit();
      for (int c = threadIdx.x; c < kN; c += kThreads) {
        const bool in = i0 + c < seq.L;
        slse[c] = in ? static_cast<const float*>(p.lse)[head_row0 + i0 + c] * kLog2e : -INFINITY;
        sdelta[c] = in ? static_cast<const float*>(p.delta)[head_row0 + i0 + c] : 0.f;
      }
      __pipeline_wait_prior(0);
      __syncthreads();
      if (!tile_has_allowed_pair(p, b, h, i0, kN, j0, kRows)) continue;
      // Transposed tiles: rows are this warp's keys, columns the kN queries.
      float st[kN / 8][4], dpt[kN / 8][4];
      scores_tile<T, kD, kN>(st, sk, warp * 16, sq, p.E);
      if constexpr (kWantDk) scores_tile<T, kD, kN>(dpt, sv, warp * 16, sdo, p.Ev);
      const bool whole = w.whole(i0, i0 + kN, j0, j0 + kRows);
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = nt * 8 + 2 * (lane % 4) + (e & 1);
          const int64_t i = i0 + c, j = key[e / 2];
          float cap_slope = 1.f;
          const float x = masked_score<T>(p, w, st[nt][e], b, h, i, j, whole, &cap_slope) * kLog2e;
          const float prob = slse[c] == -INFINITY ? 0.f : exp2f(x - slse[c]);
          const float keep = p.dropout_p > 0.f ? dropout_keep(p, seq, h, i, j) : 1.f;
          st[nt][e] = prob * keep;  // (P * M)^T, for dV
          // dS^T (through the softcap), for dK
          if constexpr (kWantDk) dpt[nt][e] = prob * (dpt[nt][e] * keep - sdelta[c]) * cap_slope;
        }
      if constexpr (kWantDv) accumulate_pv<T, kD, kN>(dv, st, sdo, p.Ev);
      if constexpr (kWantDk) accumulate_pv<T, kD, kN>(dk, dpt, sq, p.E);
    }
  }
  __pipeline_wait_prior(0);  // no copy outlives the block, even when no query reaches these keys
  const int64_t head_key0 = seq.key_rows(hk);
  if constexpr (kWantDk) store_rows<T, kD>(static_cast<T*>(p.grad_k) + head_key0 * p.E, dk, j0, seq.S, p.E, p.scale, p.scale);
  if constexpr (kWantDv) store_rows<T, kD>(static_cast<T*>(p.grad_v) + head_key0 * p.Ev, dv, j0, seq.S, p.Ev, 1.f, 1.f);
#endif
}

}  // namespace attention

template <typename T, int kD>
cudaError_t launch_attention_forward(const AttentionParams& p, cudaStream_t stream) {
  using namespace attention;
  const size_t smem = Tiles<kD>::template forward_smem<T>();
  if (cudaError_t e = allow_smem(forward_kernel<T, kD>, smem); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(p.B * p.Hq), static_cast<unsigned>((p.L + kRows - 1) / kRows));
  forward_kernel<T, kD><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

namespace attention {
// One dK/dV kernel, opted in to its shared memory.
template <typename T, int kD, DkDvPart kPart>
cudaError_t launch_dkdv(const AttentionParams& p, dim3 grid, size_t smem, cudaStream_t stream) {
  if (cudaError_t e = allow_smem(backward_dkdv_kernel<T, kD, kPart>, smem); e != cudaSuccess) return e;
  backward_dkdv_kernel<T, kD, kPart><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}
}  // namespace attention

template <typename T, int kD>
cudaError_t launch_attention_backward(const AttentionParams& p, cudaStream_t stream) {
  using namespace attention;
  const size_t smem = Tiles<kD>::template backward_smem<T>();
  const dim3 dq_grid(static_cast<unsigned>(p.B * p.Hq), static_cast<unsigned>((p.L + kRows - 1) / kRows));
  if (p.softcap > 0.f || p.alibi_slopes != nullptr || p.cu_seqlens_q != nullptr) {
    if (cudaError_t e = allow_smem(backward_dq_kernel<T, kD, true>, smem); e != cudaSuccess) return e;
    backward_dq_kernel<T, kD, true><<<dq_grid, kThreads, smem, stream>>>(p);
  } else {
    if (cudaError_t e = allow_smem(backward_dq_kernel<T, kD, false>, smem); e != cudaSuccess) return e;
    backward_dq_kernel<T, kD, false><<<dq_grid, kThreads, smem, stream>>>(p);
  }
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  const dim3 dkdv_grid(static_cast<unsigned>(p.B * p.Hkv), static_cast<unsigned>((p.S + kRows - 1) / kRows));
  if constexpr (kD <= 128) {
    return launch_dkdv<T, kD, DkDvPart::kBoth>(p, dkdv_grid, smem, stream);
  } else {  // (an else, so that the split kernels exist only where they run)
    if (cudaError_t e = launch_dkdv<T, kD, DkDvPart::kDv>(p, dkdv_grid, smem, stream); e != cudaSuccess) return e;
    return launch_dkdv<T, kD, DkDvPart::kDk>(p, dkdv_grid, smem, stream);
  }
}

}  // namespace cuda
}  // namespace bigkernels
