// What the attention kernels share, tensor-core (attention_kernels.cuh) and
// SIMT (attention_simt.cuh) alike: which (query, key) pairs the window
// allows, the masked score of one pair, dropout's keep decision, and the
// opt-in to more shared memory.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/cuda/launchers.h"
#include "common/counter_rng.h"
#include "common/cuda_dtype.cuh"

namespace bigkernels {
namespace cuda {
namespace attention {

constexpr int kThreads = kAttentionThreads, kWarps = kThreads / 32;

__device__ __forceinline__ int64_t clamp(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : x > hi ? hi : x;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// tanh for the softcap: in float as 1 - 2 / (e^2x + 1), one exp2 and one
// division (exact at both ends: e^2x overflows to inf or underflows to 0).
// tanhf's own polynomial-and-branches took the dQ kernel from 168 to 207
// registers (bf16, head dim 64). Near 0 its absolute error is ~1e-7, below
// the rounding of the dot product it caps.
__device__ __forceinline__ float tanh_acc(float x) { return 1.f - 2.f / (exp2f(x * 2.8853900817779268f) + 1.f); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

// One batch's share of a call (AttentionParams): its first query and key
// rows in q and k, its lengths and diagonal, its rows in out, lse, delta,
// grad_out and grad_q (head h's first: query_row0 + h * query_head_stride)
// and in grad_k, grad_v, and its first dropout counter. The [B, ...]
// layouts: rows from 0, lengths L and S; packed sequences: sequence b's.
struct Sequence {
  int64_t q0, k0, L, S, diagonal;
  int64_t query_row0, query_head_stride, key_row0, key_head_stride;
  // element (h, i, j)'s dropout counter: dropout0 + ((dropout_batch * Hq + h) * L + i) * S + j (one
  // formula for both layouts: a base of b * Hq * L * S held in a register cost the dQ kernel 40 of them)
  int64_t dropout_batch;
  uint64_t dropout0;
  __device__ __forceinline__ int64_t query_rows(int64_t h) const { return query_row0 + h * query_head_stride; }
  __device__ __forceinline__ int64_t key_rows(int64_t hk) const { return key_row0 + hk * key_head_stride; }
};

// kPacked false: a kernel built for the [B, ...] layouts alone (see backward_dq_kernel).
template <bool kPacked = true>
__device__ __forceinline__ Sequence sequence_of(const AttentionParams& p, int64_t b) {
  Sequence s;
  if (!kPacked || p.cu_seqlens_q == nullptr) {
    s.q0 = 0, s.k0 = 0, s.L = p.L, s.S = p.S, s.diagonal = p.diagonal_offset;
    if (kPacked && p.seqlens_k != nullptr) s.S = p.seqlens_k[b], s.diagonal = s.S - p.L;
    s.query_row0 = b * p.Hq * p.L, s.query_head_stride = p.L;
    s.key_row0 = b * p.Hkv * p.S, s.key_head_stride = p.S;
    s.dropout_batch = b, s.dropout0 = 0;
  } else {
    s.q0 = p.cu_seqlens_q[b], s.k0 = p.cu_seqlens_k[b];
    s.L = p.cu_seqlens_q[b + 1] - s.q0, s.S = p.cu_seqlens_k[b + 1] - s.k0, s.diagonal = s.S - s.L;
    s.query_row0 = s.q0, s.query_head_stride = p.total_q;
    s.key_row0 = s.k0, s.key_head_stride = p.total_k;
    s.dropout_batch = 0, s.dropout0 = p.dropout_offsets != nullptr ? static_cast<uint64_t>(p.dropout_offsets[b]) : 0;
  }
  return s;
}

// Which (query i, key j) pairs the window allows, and the ranges of one
// index that a tile of the other can reach.
struct Window {
  int64_t left, right, offset, L, S;
  __device__ __forceinline__ bool allows(int64_t i, int64_t j) const {
    const int64_t pos = i + offset;
    return (left < 0 || j >= pos - left) && (right < 0 || j <= pos + right);
  }
  __device__ __forceinline__ void keys_for(int64_t i0, int64_t i1, int64_t& lo, int64_t& hi) const {
    lo = left < 0 ? 0 : clamp(i0 + offset - left, 0, S);
    hi = right < 0 ? S : clamp(i1 + offset + right, lo, S);
  }
  __device__ __forceinline__ void queries_for(int64_t j0, int64_t j1, int64_t& lo, int64_t& hi) const {
    lo = right < 0 ? 0 : clamp(j0 - offset - right, 0, L);
    hi = left < 0 ? L : clamp(j1 - offset + left, lo, L);
  }
  // Whether every pair of the tile is allowed and in range (no per-element work).
  __device__ __forceinline__ bool whole(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return i1 <= L && j1 <= S && allows(i1 - 1, j0) && allows(i0, j1 - 1);
  }
};

// ALiBi's slope for head h of batch b (AttentionParams::alibi_slopes).
template <typename A>
__device__ __forceinline__ A alibi_slope(const AttentionParams& p, int64_t b, int64_t h) {
  return static_cast<const A*>(p.alibi_slopes)[b * p.alibi_batch_stride + h];
}

// A scaled score x capped (AttentionParams::softcap) and given ALiBi's bias
// -slope * |distance| (distance: the query's key position minus the key's;
// slope 0 without ALiBi). cap_slope (when given) gets 1 - tanh^2.
template <typename A>
__device__ __forceinline__ A shaped_score(const AttentionParams& p, A x, A slope, int64_t distance,
                                          A* cap_slope = nullptr) {
  if (p.softcap > 0.f) {
    const A cap = static_cast<A>(p.softcap), t = tanh_acc(x / cap);
    x = cap * t;
    if (cap_slope != nullptr) *cap_slope = A(1) - t * t;
  }
  return x - slope * static_cast<A>(distance < 0 ? -distance : distance);
}

// The scaled score of (i, j) from the dot product `acc`, capped and given
// ALiBi's bias (AttentionParams::softcap, alibi_slopes), plus a float mask,
// or -inf where the window, the bounds or a bool mask exclude it. `whole`:
// the tile is known to be inside the window and the bounds. cap_slope (when
// given) gets the softcap's derivative 1 - tanh^2, for the backward (1
// without a softcap). kShaped false: a kernel built for calls with neither
// option (see backward_dq_kernel).
template <typename T, bool kShaped = true, typename A>
__device__ __forceinline__ A masked_score(const AttentionParams& p, const Window& w, A acc, int64_t b, int64_t h,
                                          int64_t i, int64_t j, bool whole, A* cap_slope = nullptr) {
  A x = acc * static_cast<A>(p.scale);
  if (kShaped && (p.softcap > 0.f || p.alibi_slopes != nullptr)) {
    const A slope = p.alibi_slopes != nullptr ? alibi_slope<A>(p, b, h) : A(0);
    x = shaped_score(p, x, slope, i + w.offset - j, cap_slope);
  }
  if (!whole && (i >= w.L || j >= w.S || !w.allows(i, j))) return -INFINITY;
  if (p.mask != nullptr) {
    const int64_t* ms = p.mask_strides;
    const int64_t at = b * ms[0] + h * ms[1] + i * ms[2] + j * ms[3];
    if (p.mask_is_bool) {
      if (!static_cast<const bool*>(p.mask)[at]) return -INFINITY;
    } else {
      x += to_acc(static_cast<const T*>(p.mask)[at]);
    }
  }
  return x;
}

// 1 / (1 - p) where dropout keeps (h, i, j) of sequence (batch) s, else 0.
template <typename A = float>
__device__ __forceinline__ A dropout_keep(const AttentionParams& p, const Sequence& s, int64_t h, int64_t i,
                                          int64_t j) {
  const uint64_t counter = s.dropout0 + static_cast<uint64_t>(((s.dropout_batch * p.Hq + h) * s.L + i) * s.S + j);
  return counter_uniform(p.dropout_seed, counter) >= p.dropout_p ? A(1) / (A(1) - A(p.dropout_p)) : A(0);
}

// Whether a bool mask allows any pair of queries [i0, i0 + rows) x keys
// [j0, j0 + cols), so that a tile it rules out entirely is skipped. Block-
// wide: every thread of the block must call it (it holds a barrier when
// there is a bool mask; p is the same for all threads).
__device__ __forceinline__ bool tile_has_allowed_pair(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                                                      int rows, int64_t j0, int cols) {
  if (p.mask == nullptr || !p.mask_is_bool) return true;
  const int64_t* ms = p.mask_strides;
  bool any = false;
  for (int c = threadIdx.x; c < rows * cols && !any; c += blockDim.x) {
    const int64_t i = i0 + c / cols, j = j0 + c % cols;
    any = i < p.L && j < p.S && static_cast<const bool*>(p.mask)[b * ms[0] + h * ms[1] + i * ms[2] + j * ms[3]];
  }
  return __syncthreads_or(any) != 0;
}

// Opts in to more than 48 KB of dynamic shared memory where a kernel needs it.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return bytes <= 48 * 1024 ? cudaSuccess
                            : cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(bytes));
}

}  // namespace attention
}  // namespace cuda
}  // namespace bigkernels
