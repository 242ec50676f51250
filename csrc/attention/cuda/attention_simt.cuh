// The CUDA attention kernels for float and double: plain FMA (SIMT) code on
// any GPU, exact in the input's precision (no TF32), never materialising the
// L x S scores. Simple rather than fast: a block of 128 threads owns
// 128 / kTpr rows (queries; keys for dK/dV), each row kTpr = kD / kE threads
// that own kE of the head dims each (32 for float, 16 for double, so that
// dK/dV's four rows of them fit in registers), interleaved (dim d belongs to
// thread d % kTpr, so a row's threads read consecutive words of a shared row: no bank
// conflicts, and the rows of a warp read the same word: a broadcast). The
// other operand streams through shared memory kN rows at a time. Same
// structure as the tensor-core kernels (attention_kernels.cuh): an online
// softmax per row in the forward; in the backward, dQ per query row and
// dK, dV per key row, no atomics, so deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_common.cuh"
#include "common/ptx_sm80.cuh"  // dynamic_smem

namespace bigkernels {
namespace cuda {
namespace attention {
namespace simt {

template <typename T, int kD>
struct Shape {
  static constexpr int kE = attention_simt_dims_per_thread(sizeof(T));  // head dims a thread owns
  static constexpr int kTpr = kD / kE;              // threads per row
  static constexpr int kRows = kThreads / kTpr;     // rows a block owns
  static_assert(kRows == attention_rows_per_block(false, sizeof(T), kD), "the host's grid check assumes this");
  static constexpr int kN = sizeof(T) == 8 ? 16 : 32;  // rows per streamed tile
  static constexpr size_t smem() { return 2 * sizeof(T) * kN * kD + 2 * sizeof(acc_t<T>) * kN; }
};

// Sum over the kTpr threads of a row (consecutive lanes).
template <int kTpr, typename A>
__device__ __forceinline__ A row_sum(A v) {
  for (int o = 1; o < kTpr; o *= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A thread's share of one row: its kE dims.
template <typename T, int kD>
using RowPart = acc_t<T>[Shape<T, kD>::kE];

// This thread's dims of row r of a [n, dim] tensor (row stride `stride`), 0 outside.
template <typename T, int kD>
__device__ __forceinline__ void load_row(RowPart<T, kD>& x, const T* src, int64_t r, int64_t n, int64_t dim,
                                         int64_t stride) {
  using Sh = Shape<T, kD>;
  const int t = threadIdx.x % Sh::kTpr;
#pragma unroll
  for (int e = 0; e < Sh::kE; ++e) {
    const int64_t d = e * Sh::kTpr + t;
    x[e] = r < n && d < dim ? to_acc(src[r * stride + d]) : acc_t<T>(0);
  }
}

// Rows [r0, r0 + kN) of a [n, dim] tensor into a [kN][kD] shared tile, zeros outside.
template <typename T, int kD, int kN>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t r0, int64_t n, int64_t dim,
                                          int64_t stride) {
  for (int c = threadIdx.x; c < kN * kD; c += kThreads) {
    const int row = c / kD, d = c % kD;
    tile[c] = r0 + row < n && d < dim ? src[(r0 + row) * stride + d] : T(0);
  }
}

// sum over this thread's dims of x[e] * tile_row[e * kTpr + t], then over the row's threads.
template <typename T, int kD>
__device__ __forceinline__ acc_t<T> dot(const RowPart<T, kD>& x, const T* tile_row) {
  using Sh = Shape<T, kD>;
  const int t = threadIdx.x % Sh::kTpr;
  acc_t<T> sum = 0;
#pragma unroll
  for (int e = 0; e < Sh::kE; ++e) sum += x[e] * to_acc(tile_row[e * Sh::kTpr + t]);
  return row_sum<Sh::kTpr>(sum);
}

template <typename T, int kD>
__device__ __forceinline__ void axpy(RowPart<T, kD>& y, acc_t<T> a, const T* tile_row) {
  using Sh = Shape<T, kD>;
  const int t = threadIdx.x % Sh::kTpr;
#pragma unroll
  for (int e = 0; e < Sh::kE; ++e) y[e] += a * to_acc(tile_row[e * Sh::kTpr + t]);
}

template <typename T, int kD>
__device__ __forceinline__ void store_row(T* dst, const RowPart<T, kD>& x, int64_t r, int64_t n, int64_t dim,
                                          acc_t<T> factor) {
  using Sh = Shape<T, kD>;
  const int t = threadIdx.x % Sh::kTpr;
  if (r >= n) return;
#pragma unroll
  for (int e = 0; e < Sh::kE; ++e) {
    const int64_t d = e * Sh::kTpr + t;
    if (d < dim) dst[r * dim + d] = static_cast<T>(x[e] * factor);
  }
}

// ---- forward: grid (B * Hq, row tiles) ----

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) forward_kernel(const AttentionParams p) {
  using A = acc_t<T>;
  using Sh = Shape<T, kD>;
  constexpr int kN = Sh::kN;
  const int64_t b = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq, hk = h / (p.Hq / p.Hkv);
  const Sequence seq = sequence_of(p, b);
  const int64_t i0 = int64_t(blockIdx.y) * Sh::kRows, i = i0 + threadIdx.x / Sh::kTpr;
  if (i0 >= seq.L) return;  // (a shorter packed sequence: the grid is sized for the longest)
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1] + seq.q0 * p.q_strides[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1] + seq.k0 * p.k_strides[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1] + seq.k0 * p.v_strides[2];
  T* sk = reinterpret_cast<T*>(dynamic_smem());
  T* sv = sk + kN * kD;
  const Window w{p.window_left, p.window_right, seq.diagonal, seq.L, seq.S};
  int64_t jlo, jhi;
  w.keys_for(i0, clamp(i0 + Sh::kRows, 0, seq.L), jlo, jhi);

  RowPart<T, kD> qr, o = {};
  load_row<T, kD>(qr, q, i, seq.L, p.E, p.q_strides[2]);
  A m = -INFINITY, l = 0;
  for (int64_t j0 = jlo; j0 < jhi; j0 += kN) {
    __syncthreads();  // every row is done with the previous tile
    load_tile<T, kD, kN>(sk, k, j0, seq.S, p.E, p.k_strides[2]);
    load_tile<T, kD, kN>(sv, v, j0, seq.S, p.Ev, p.v_strides[2]);
    __syncthreads();
    if (!tile_has_allowed_pair(p, b, h, i0, Sh::kRows, j0, kN)) continue;  // contributes nothing
    const bool whole = w.whole(i0, i0 + Sh::kRows, j0, j0 + kN);
    A s[kN], tile_max = -INFINITY;  // unrolled loops: s stays in registers, not on the stack
#pragma unroll
    for (int jj = 0; jj < kN; ++jj) {
      s[jj] = masked_score<T>(p, w, dot<T, kD>(qr, sk + jj * kD), b, h, i, j0 + jj, whole);
      tile_max = s[jj] > tile_max ? s[jj] : tile_max;
    }
    const A m_new = tile_max > m ? tile_max : m;
    const A shift = m_new == -INFINITY ? A(0) : m_new;  // nothing seen yet: probabilities 0, not NaN
    const A alpha = exp_acc(m - shift);
    m = m_new;
    l *= alpha;
#pragma unroll
    for (int e = 0; e < Sh::kE; ++e) o[e] *= alpha;
#pragma unroll
    for (int jj = 0; jj < kN; ++jj) {
      A prob = exp_acc(s[jj] - shift);
      l += prob;  // the normaliser counts every key, dropped or not
      if (p.dropout_p > 0.f) prob *= dropout_keep<A>(p, seq, h, i, j0 + jj);
      axpy<T, kD>(o, prob, sv + jj * kD);
    }
  }
  const int64_t head_row0 = seq.query_rows(h);  // this head's first row in out and lse
  store_row<T, kD>(static_cast<T*>(p.out) + head_row0 * p.Ev, o, i, seq.L, p.Ev,
                   l > 0 ? A(1) / l : A(0));  // a row that attends to nothing gives 0
  if (threadIdx.x % Sh::kTpr == 0 && i < seq.L) {
    static_cast<A*>(p.lse)[head_row0 + i] = l > 0 ? m + log_acc(l) : A(-INFINITY);
  }
}

// ---- backward, dQ: grid (B * Hq, query tiles) ----

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) backward_dq_kernel(const AttentionParams p) {
  using A = acc_t<T>;
  using Sh = Shape<T, kD>;
  constexpr int kN = Sh::kN;
  const int64_t b = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq, hk = h / (p.Hq / p.Hkv);
  const Sequence seq = sequence_of(p, b);
  const int64_t i0 = int64_t(blockIdx.y) * Sh::kRows, i = i0 + threadIdx.x / Sh::kTpr;
  if (i0 >= seq.L) return;
  const int64_t head_row0 = seq.query_rows(h);
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1] + seq.q0 * p.q_strides[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1] + seq.k0 * p.k_strides[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1] + seq.k0 * p.v_strides[2];
  T* sk = reinterpret_cast<T*>(dynamic_smem());
  T* sv = sk + kN * kD;
  const Window w{p.window_left, p.window_right, seq.diagonal, seq.L, seq.S};
  int64_t jlo, jhi;
  w.keys_for(i0, clamp(i0 + Sh::kRows, 0, seq.L), jlo, jhi);

  RowPart<T, kD> qr, dor, dq = {};
  load_row<T, kD>(qr, q, i, seq.L, p.E, p.q_strides[2]);
  load_row<T, kD>(dor, static_cast<const T*>(p.grad_out) + head_row0 * p.Ev, i, seq.L, p.Ev, p.Ev);
  const A lse = i < seq.L ? static_cast<const A*>(p.lse)[head_row0 + i] : A(-INFINITY);
  const A delta = i < seq.L ? static_cast<const A*>(p.delta)[head_row0 + i] : A(0);
  for (int64_t j0 = jlo; j0 < jhi; j0 += kN) {
    __syncthreads();
    load_tile<T, kD, kN>(sk, k, j0, seq.S, p.E, p.k_strides[2]);
    load_tile<T, kD, kN>(sv, v, j0, seq.S, p.Ev, p.v_strides[2]);
    __syncthreads();
    if (!tile_has_allowed_pair(p, b, h, i0, Sh::kRows, j0, kN)) continue;  // no gradient flows through it
    const bool whole = w.whole(i0, i0 + Sh::kRows, j0, j0 + kN);
    for (int jj = 0; jj < kN; ++jj) {
      A cap_slope = A(1);
      const A x = masked_score<T>(p, w, dot<T, kD>(qr, sk + jj * kD), b, h, i, j0 + jj, whole, &cap_slope);
      const A dp = dot<T, kD>(dor, sv + jj * kD);
      const A prob = lse == -INFINITY ? A(0) : exp_acc(x - lse);  // a row that attends to nothing: no gradient
      const A keep = p.dropout_p > 0.f ? dropout_keep<A>(p, seq, h, i, j0 + jj) : A(1);
      const A ds = prob * (dp * keep - delta);  // dS = P * (dP * M - D)
      axpy<T, kD>(dq, ds * cap_slope, sk + jj * kD);  // (through the softcap)
      if (p.grad_mask != nullptr && threadIdx.x % Sh::kTpr == 0 && i < p.L && j0 + jj < p.S) {
        static_cast<A*>(p.grad_mask)[(head_row0 + i) * p.S + j0 + jj] = ds;  // a float mask's gradient is dS
      }
    }
  }
  store_row<T, kD>(static_cast<T*>(p.grad_q) + head_row0 * p.E, dq, i, seq.L, p.E, static_cast<A>(p.scale));
}

// ---- backward, dK and dV: grid (B * Hkv, key tiles) ----

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) backward_dkdv_kernel(const AttentionParams p) {
  using A = acc_t<T>;
  using Sh = Shape<T, kD>;
  constexpr int kN = Sh::kN;
  const int64_t b = blockIdx.x / p.Hkv, hk = blockIdx.x % p.Hkv, group = p.Hq / p.Hkv;
  const Sequence seq = sequence_of(p, b);
  const int64_t j0 = int64_t(blockIdx.y) * Sh::kRows, j = j0 + threadIdx.x / Sh::kTpr;
  if (j0 >= seq.S) return;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1] + seq.k0 * p.k_strides[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1] + seq.k0 * p.v_strides[2];
  T* sq = reinterpret_cast<T*>(dynamic_smem());
  T* sdo = sq + kN * kD;
  A* slse = reinterpret_cast<A*>(sdo + kN * kD);
  A* sdelta = slse + kN;
  const Window w{p.window_left, p.window_right, seq.diagonal, seq.L, seq.S};
  int64_t ilo, ihi;
  w.queries_for(j0, clamp(j0 + Sh::kRows, 0, seq.S), ilo, ihi);

  RowPart<T, kD> kr, vr, dk = {}, dv = {};
  load_row<T, kD>(kr, k, j, seq.S, p.E, p.k_strides[2]);
  load_row<T, kD>(vr, v, j, seq.S, p.Ev, p.v_strides[2]);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t head_row0 = seq.query_rows(h);
    const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1] + seq.q0 * p.q_strides[2];
    const T* dout = static_cast<const T*>(p.grad_out) + head_row0 * p.Ev;
    for (int64_t i0 = ilo; i0 < ihi; i0 += kN) {
      __syncthreads();
      load_tile<T, kD, kN>(sq, q, i0, seq.L, p.E, p.q_strides[2]);
      load_tile<T, kD, kN>(sdo, dout, i0, seq.L, p.Ev, p.Ev);
      for (int c = threadIdx.x; c < kN; c += kThreads) {
        const bool in = i0 + c < seq.L;
        slse[c] = in ? static_cast<const A*>(p.lse)[head_row0 + i0 + c] : A(-INFINITY);
        sdelta[c] = in ? static_cast<const A*>(p.delta)[head_row0 + i0 + c] : A(0);
      }
      __syncthreads();
      if (!tile_has_allowed_pair(p, b, h, i0, kN, j0, Sh::kRows)) continue;
      const bool whole = w.whole(i0, i0 + kN, j0, j0 + Sh::kRows);
      for (int ii = 0; ii < kN; ++ii) {
        const int64_t i = i0 + ii;
        A cap_slope = A(1);
        const A x = masked_score<T>(p, w, dot<T, kD>(kr, sq + ii * kD), b, h, i, j, whole, &cap_slope);
        const A dp = dot<T, kD>(vr, sdo + ii * kD);
        const A prob = slse[ii] == -INFINITY ? A(0) : exp_acc(x - slse[ii]);
        const A keep = p.dropout_p > 0.f ? dropout_keep<A>(p, seq, h, i, j) : A(1);
        axpy<T, kD>(dv, prob * keep, sdo + ii * kD);                                    // dV += (P * M)^T dO
        axpy<T, kD>(dk, prob * (dp * keep - sdelta[ii]) * cap_slope, sq + ii * kD);  // dK += dS^T Q
      }
    }
  }
  const int64_t head_key0 = seq.key_rows(hk);
  store_row<T, kD>(static_cast<T*>(p.grad_k) + head_key0 * p.E, dk, j, seq.S, p.E, static_cast<A>(p.scale));
  store_row<T, kD>(static_cast<T*>(p.grad_v) + head_key0 * p.Ev, dv, j, seq.S, p.Ev, A(1));
}

}  // namespace simt
}  // namespace attention

template <typename T, int kD>
cudaError_t launch_attention_forward_simt(const AttentionParams& p, cudaStream_t stream) {
  using namespace attention;
  using Sh = simt::Shape<T, kD>;
  if (cudaError_t e = allow_smem(simt::forward_kernel<T, kD>, Sh::smem()); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(p.B * p.Hq), static_cast<unsigned>((p.L + Sh::kRows - 1) / Sh::kRows));
  simt::forward_kernel<T, kD><<<grid, kThreads, Sh::smem(), stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t launch_attention_backward_simt(const AttentionParams& p, cudaStream_t stream) {
  using namespace attention;
  using Sh = simt::Shape<T, kD>;
  if (cudaError_t e = allow_smem(simt::backward_dq_kernel<T, kD>, Sh::smem()); e != cudaSuccess) return e;
  if (cudaError_t e = allow_smem(simt::backward_dkdv_kernel<T, kD>, Sh::smem()); e != cudaSuccess) return e;
  const dim3 dq_grid(static_cast<unsigned>(p.B * p.Hq), static_cast<unsigned>((p.L + Sh::kRows - 1) / Sh::kRows));
  simt::backward_dq_kernel<T, kD><<<dq_grid, kThreads, Sh::smem(), stream>>>(p);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  const dim3 dkdv_grid(static_cast<unsigned>(p.B * p.Hkv), static_cast<unsigned>((p.S + Sh::kRows - 1) / Sh::kRows));
  simt::backward_dkdv_kernel<T, kD><<<dkdv_grid, kThreads, Sh::smem(), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bigkernels
