// The CUDA decoding kernel: a few query rows (a GQA group's heads times a
// few positions) against a long KV cache, flash-decoding style. Memory-bound:
// each block streams one key head's K and V once for all the rows that share
// it, over one split of the keys; the splits' partial softmaxes are then
// merged by a second kernel. SIMT (no tensor cores: with so few rows a tile
// would be mostly padding), for every dtype.
//
// A block of kThreads threads (kWarps warps; grid (B * Hkv * row groups,
// splits)) takes key head hk of batch b, rows [r0, r0 + rows) of its group (row r: head hk * group + r / L,
// position r % L), keys [j0, j1) of split `split`. Warp w takes the keys
// j0 + w, j0 + w + kWarps, ...: the warps read neighbouring K and V rows
// together. Lane l owns head dims [l * kPerLane, (l + 1) * kPerLane) of
// every row: one 8-byte (bf16/fp16, head dim 128) load per lane reads a
// whole key row, coalesced. Each warp keeps its own online softmax per row;
// the block merges its warps' in shared memory, then writes its split's
// normalised rows and lse (or, with one split, the output itself).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_common.cuh"
#include "common/ptx_sm80.cuh"  // dynamic_smem

namespace bigkernels {
namespace cuda {
namespace attention {
namespace decode {

template <typename T, int kD>
struct Shape {
  static constexpr int kPerLane = kD / 32;
  // rows per block: q and the output sums of every row live in registers
  static constexpr int kRows = attention_decode_rows_per_block(sizeof(T), kD);
  using A = acc_t<T>;
  // shared memory for the warps' merge: each warp's sums, max and total per row
  static constexpr size_t smem() { return sizeof(A) * kWarps * kRows * (kD + 2); }
};

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) decode_kernel(const AttentionParams p) {
  using Sh = Shape<T, kD>;
  using A = typename Sh::A;
  constexpr int kPer = Sh::kPerLane, kRows = Sh::kRows;
  const int64_t group = p.Hq / p.Hkv, group_rows = group * p.L, row_groups = (group_rows + kRows - 1) / kRows;
  const int64_t b = blockIdx.x / row_groups / p.Hkv, hk = blockIdx.x / row_groups % p.Hkv;
  const int64_t r0 = int64_t(blockIdx.x % row_groups) * kRows, split = blockIdx.y;
  const int rows = static_cast<int>(group_rows - r0 < kRows ? group_rows - r0 : kRows);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Sequence seq = sequence_of(p, b);
  const int64_t j_begin = split * p.keys_per_split;
  const int64_t j_end = j_begin + p.keys_per_split < seq.S ? j_begin + p.keys_per_split : seq.S;
  // key j's row of K or V: through the page table when paged
  const auto key_row = [&](const void* base, const int64_t* strides, int64_t j) {
    int64_t block = b, row = j;
    if (p.block_table != nullptr) {
      block = p.block_table[b * p.block_table_stride + j / p.page_size], row = j % p.page_size;
    }
    return static_cast<const T*>(base) + block * strides[0] + hk * strides[1] + row * strides[2];
  };
  const int d0 = lane * kPer;

  // per row: q and the output sums (this lane's dims), the running max and
  // total, its query's key position (i + diagonal) and ALiBi slope
  A q[kRows][kPer], acc[kRows][kPer], m[kRows], l[kRows], slope[kRows];
  int64_t at[kRows];
  const bool shaped = p.softcap > 0.f || p.alibi_slopes != nullptr;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = r0 + (r < rows ? r : 0), h = hk * group + row / p.L, i = row % p.L;
    at[r] = i + seq.diagonal;
    slope[r] = p.alibi_slopes != nullptr ? alibi_slope<A>(p, b, h) : A(0);
    const T* qr = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1] + i * p.q_strides[2];
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      q[r][e] = r < rows && d0 + e < p.E ? to_acc(qr[d0 + e]) : A(0);
      acc[r][e] = A(0);
    }
    m[r] = -INFINITY, l[r] = A(0);
  }
  // kKeys keys per warp and step (keys j, j + kWarps, ...), their K and V
  // rows all requested before any is used: one row in flight per warp left
  // the loop waiting on memory latency (docs/PERFORMANCE.md, stop 31).
  constexpr int kKeys = 2;
  for (int64_t j0 = j_begin + warp; j0 < j_end; j0 += kKeys * kWarps) {
    A kr[kKeys][kPer], vr[kKeys][kPer];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      const int64_t j = j0 + u * kWarps;
      const bool in = j < j_end;
      const T* k_row = key_row(p.k, p.k_strides, in ? j : j0);
      const T* v_row = key_row(p.v, p.v_strides, in ? j : j0);
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        kr[u][e] = in && d0 + e < p.E ? to_acc(k_row[d0 + e]) : A(0);
        vr[u][e] = in && d0 + e < p.Ev ? to_acc(v_row[d0 + e]) : A(0);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      A x[kKeys], top = m[r];
#pragma unroll
      for (int u = 0; u < kKeys; ++u) {
        const int64_t j = j0 + u * kWarps;
        A dot = 0;
#pragma unroll
        for (int e = 0; e < kPer; ++e) dot += q[r][e] * kr[u][e];
        dot = warp_sum(dot) * static_cast<A>(p.scale);
        if (shaped) dot = shaped_score(p, dot, slope[r], at[r] - j);
        const bool allowed = r < rows && j < j_end && (p.window_left < 0 || j >= at[r] - p.window_left) &&
                             (p.window_right < 0 || j <= at[r] + p.window_right);
        x[u] = allowed ? dot : A(-INFINITY);
        top = x[u] > top ? x[u] : top;
      }
      // online softmax over the step's keys: a row that has seen only masked
      // keys shifts by 0 (its exp(-inf) are 0)
      const A shift = top == A(-INFINITY) ? A(0) : top;
      const A alpha = exp_acc(m[r] - shift);
      m[r] = top;
      l[r] *= alpha;
#pragma unroll
      for (int e = 0; e < kPer; ++e) acc[r][e] *= alpha;
#pragma unroll
      for (int u = 0; u < kKeys; ++u) {
        const A prob = exp_acc(x[u] - shift);
        l[r] += prob;
#pragma unroll
        for (int e = 0; e < kPer; ++e) acc[r][e] += prob * vr[u][e];
      }
    }
  }

  // The warps' softmaxes merged: shared [warp][row] = (sums [kD], max, total).
  A* smem = reinterpret_cast<A*>(dynamic_smem());
  const auto slot = [&](int wp, int r) { return smem + (wp * kRows + r) * (kD + 2); };
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int e = 0; e < kPer; ++e) slot(warp, r)[d0 + e] = acc[r][e];
    if (lane == 0) slot(warp, r)[kD] = m[r], slot(warp, r)[kD + 1] = l[r];
  }
  __syncthreads();
  const int64_t row_stride = p.L;  // rows of one head in out, lse and the split buffers: [.., Hq, L, ..]
  for (int c = threadIdx.x; c < rows * kD; c += kThreads) {
    const int r = c / kD, d = c % kD;
    A top = -INFINITY;
    for (int wp = 0; wp < kWarps; ++wp) top = slot(wp, r)[kD] > top ? slot(wp, r)[kD] : top;
    A total = 0, sum = 0;
    if (top != A(-INFINITY)) {
      for (int wp = 0; wp < kWarps; ++wp) {
        const A scale = exp_acc(slot(wp, r)[kD] - top);
        total += slot(wp, r)[kD + 1] * scale;
        sum += slot(wp, r)[d] * scale;
      }
    }
    const int64_t row = r0 + r, h = hk * group + row / p.L, i = row % p.L;
    const int64_t out_row = (b * p.Hq + h) * row_stride + i;  // [B, Hq, L]
    const A value = total > A(0) ? sum / total : A(0);  // a row that attends to nothing gives 0
    const A lse = total > A(0) ? top + log_acc(total) : A(-INFINITY);
    if (p.splits > 1) {
      const int64_t rows_total = p.B * p.Hq * p.L;
      if (d < p.Ev) static_cast<A*>(p.split_out)[(split * rows_total + out_row) * p.Ev + d] = value;
      if (d == 0) static_cast<A*>(p.split_lse)[split * rows_total + out_row] = lse;
    } else {
      if (d < p.Ev) static_cast<T*>(p.out)[out_row * p.Ev + d] = from_acc<T>(value);
      if (d == 0) static_cast<A*>(p.lse)[out_row] = lse;
    }
  }
}

// The splits' rows merged: grid (B * Hq * L), a row per block; weights
// exp(lse_s - lse) with lse = log(sum_s exp(lse_s)).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const AttentionParams p) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x, rows_total = p.B * p.Hq * p.L;
  const A* split_lse = static_cast<const A*>(p.split_lse);
  A top = -INFINITY;
  for (int64_t s = 0; s < p.splits; ++s) {
    const A x = split_lse[s * rows_total + row];
    top = x > top ? x : top;
  }
  A total = 0;
  if (top != A(-INFINITY))
    for (int64_t s = 0; s < p.splits; ++s) total += exp_acc(split_lse[s * rows_total + row] - top);
  for (int64_t d = threadIdx.x; d < p.Ev; d += kThreads) {
    A sum = 0;
    if (top != A(-INFINITY))
      for (int64_t s = 0; s < p.splits; ++s)
        sum += exp_acc(split_lse[s * rows_total + row] - top) *
               static_cast<const A*>(p.split_out)[(s * rows_total + row) * p.Ev + d];
    static_cast<T*>(p.out)[row * p.Ev + d] = from_acc<T>(total > A(0) ? sum / total : A(0));
  }
  if (threadIdx.x == 0) static_cast<A*>(p.lse)[row] = total > A(0) ? top + log_acc(total) : A(-INFINITY);
}

}  // namespace decode
}  // namespace attention

template <typename T, int kD>
cudaError_t launch_attention_decode(const AttentionParams& p, cudaStream_t stream) {
  using namespace attention;
  using Sh = decode::Shape<T, kD>;
  if (cudaError_t e = allow_smem(decode::decode_kernel<T, kD>, Sh::smem()); e != cudaSuccess) return e;
  const int64_t group_rows = p.Hq / p.Hkv * p.L;
  const dim3 grid(static_cast<unsigned>(p.B * p.Hkv * ((group_rows + Sh::kRows - 1) / Sh::kRows)),
                  static_cast<unsigned>(p.splits));
  decode::decode_kernel<T, kD><<<grid, kThreads, Sh::smem(), stream>>>(p);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess || p.splits == 1) return e;
  decode::combine_kernel<T><<<static_cast<unsigned>(p.B * p.Hq * p.L), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bigkernels
