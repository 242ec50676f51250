// The loss family's row passes on CUDA: the CPU rows' contract and formulas
// (cpu/loss_kernels.cpp says why each is written as it is: the max kept
// apart from the log-sum, the softcap's derivative from the raw logit, log M
// clamped below by its larger term). One block of 256 threads per row,
// grid-striding over the chunk's rows; each thread strides over the row's V
// elements, and the row's max and sums are reduced by warp shuffles, then
// across warps through shared memory in a fixed order (the same bits every
// run). The gradient is written over the logits in place; the target's
// element is fixed after a barrier, by thread 0.
//
// A first CUDA path, simple and guarded: the products are cuBLAS's (through
// ATen, in chunks.cpp) and a row is read from global memory (L2) in each
// pass. Never run on a GPU yet.
#include <cmath>
#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "losses/cuda/launchers.h"
#include "losses/cuda/loss_math.cuh"

namespace bigkernels {
namespace cuda {
namespace {

constexpr int kThreads = kLossRowThreads;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridBlocks = 65535;

// Each of v[0..K) reduced over the block (op: sum, or nan_max when kMax);
// every thread gets the same result.
template <bool kMax, int K, typename C>
__device__ __forceinline__ void block_reduce(C (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      const C other = __shfl_xor_sync(0xffffffffu, v[k], o);
      v[k] = kMax ? nan_max(v[k], other) : v[k] + other;
    }
  __shared__ C warp_values[kWarps][K];
  if (threadIdx.x % 32 == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) warp_values[threadIdx.x / 32][k] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = warp_values[0][k];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v[k] = kMax ? nan_max(v[k], warp_values[w][k]) : v[k] + warp_values[w][k];
  }
  __syncthreads();  // all have read warp_values before the next call writes it
}

template <typename C>
__device__ __forceinline__ C row_max(C v) {
  C a[1] = {v};
  block_reduce<true>(a);
  return a[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_rows_kernel(CrossEntropyRows a, int64_t rows) {
  using C = acc_t<T>;
  const int64_t n = a.V;
  const Softcap<C> cap_of(a.softcap);
  const bool capped = cap_of.on;
  const C smoothing = static_cast<C>(a.label_smoothing), z_loss = static_cast<C>(a.z_loss);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* z = static_cast<T*>(a.logits) + r * a.ld;
    C lse, z_shift = 0, log_sum = 0, z_sum = 0;
    if (a.lse_given) {
      lse = static_cast<const C*>(a.lse)[r];
      z_shift = lse;
    } else {
      C m = -INFINITY;
      for (int64_t j = threadIdx.x; j < n; j += kThreads) m = nan_max(m, to_acc(z[j]));
      m = row_max(m);
      m = cap_of(m);  // tanh is increasing
      C sums[2] = {0, 0};  // sum exp(cap(z) - m), and sum cap(z) for label smoothing
      for (int64_t j = threadIdx.x; j < n; j += kThreads) {
        const C c = cap_of(to_acc(z[j]));
        sums[0] += acc_exp(c - m);
        sums[1] += c;
      }
      block_reduce<false>(sums);
      z_shift = m;
      log_sum = acc_log(sums[0]);
      lse = m + log_sum;
      z_sum = sums[1];
      if (threadIdx.x == 0) static_cast<C*>(a.lse)[r] = lse;
    }
    const int64_t t = a.target[r];
    const C raw_t = to_acc(z[t]);
    const C z_t = cap_of(raw_t);
    if (a.loss != nullptr && threadIdx.x == 0) {
      static_cast<C*>(a.loss)[r] = (1 - smoothing) * ((z_shift - z_t) + log_sum) +
                                   smoothing * (lse - z_sum / static_cast<C>(n)) + z_loss * lse * lse;
    }
    if (a.grad) {
      const C scale = a.row_scale ? static_cast<const C*>(a.row_scale)[r] : static_cast<C>(a.scale);
      const C p_factor = scale * (1 + 2 * z_loss * lse), offset = scale * smoothing / static_cast<C>(n);
      __syncthreads();  // every thread has read z[t] before it is overwritten
      for (int64_t j = threadIdx.x; j < n; j += kThreads) {
        const C v = to_acc(z[j]);
        C g = acc_exp(cap_of(v) - z_shift - log_sum) * p_factor - offset;
        if (capped) g *= cap_of.derivative(v);
        z[j] = from_acc<T>(g);
      }
      __syncthreads();  // the row's pass is done before thread 0 fixes the target's element
      if (threadIdx.x == 0) {
        C g_t = acc_exp(z_t - z_shift - log_sum) * p_factor - offset - scale * (1 - smoothing);
        if (capped) g_t *= cap_of.derivative(raw_t);
        z[t] = from_acc<T>(g_t);
      }
    }
    __syncthreads();  // the row is finished (thread 0's writes) before the block moves on
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) distillation_rows_kernel(DistillationRows a, int64_t rows) {
  using C = acc_t<T>;
  const int64_t n = a.V;
  const C inv_t = static_cast<C>(1 / a.temperature), temperature = static_cast<C>(a.temperature);
  const C beta = static_cast<C>(a.beta), hard_weight = static_cast<C>(a.hard_weight);
  const bool forward_kl = a.beta == 0, reverse_kl = a.beta == 1, hard = a.target != nullptr;
  const C log_beta = acc_log(beta), log_1m_beta = acc_log1p(-beta);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* s = static_cast<T*>(a.student) + r * a.ld;
    const C* t = static_cast<const C*>(a.teacher) + r * a.ld;
    C maxes[2] = {-INFINITY, -INFINITY};
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      maxes[0] = nan_max(maxes[0], to_acc(s[j]));
      maxes[1] = nan_max(maxes[1], t[j]);
    }
    block_reduce<true>(maxes);
    const C s_max = maxes[0], t_max = maxes[1];
    C sums[3] = {0, 0, 0};  // of exp((s - max) / T), exp((t - max) / T), exp(s - max) (the hard term at T != 1)
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const C sv = to_acc(s[j]);
      sums[0] += acc_exp((sv - s_max) * inv_t);
      sums[1] += acc_exp((t[j] - t_max) * inv_t);
      sums[2] += hard ? acc_exp(sv - s_max) : C(0);
    }
    block_reduce<false>(sums);
    const C log_sum_q = acc_log(sums[0]), log_sum_p = acc_log(sums[1]);
    const C log_sum_s = a.temperature == 1 ? log_sum_q : acc_log(sums[2]);
    const auto log_q = [&](C v) { return (v - s_max) * inv_t - log_sum_q; };
    const auto log_p = [&](C v) { return (v - t_max) * inv_t - log_sum_p; };
    const auto log_m = [&](C lp, C lq, C p, C q) {
      const C larger = fmax(lp + log_beta, lq + log_1m_beta);
      const C m = acc_log(beta * p + (1 - beta) * q);
      return m > larger ? m : larger;
    };
    C terms[2] = {0, 0};
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const C lq = log_q(to_acc(s[j])), lp = log_p(t[j]);
      if (forward_kl) {
        terms[0] += acc_exp(lp) * (lp - lq);
      } else if (reverse_kl) {
        terms[0] += acc_exp(lq) * (lq - lp);
      } else {
        const C p = acc_exp(lp), q = acc_exp(lq), lm = log_m(lp, lq, p, q);
        terms[0] += p * (lp - lm);
        terms[1] += q * (lq - lm);
      }
    }
    block_reduce<false>(terms);
    C soft, q_dot_g = 0;
    if (forward_kl) {
      soft = terms[0];
    } else if (reverse_kl) {
      soft = q_dot_g = terms[0];
    } else {
      q_dot_g = (1 - beta) * terms[1];
      soft = beta * terms[0] + q_dot_g;
    }
    const int64_t target = hard ? a.target[r] : 0;
    const C hard_loss = hard ? (s_max - to_acc(s[target])) + log_sum_s : C(0);
    if (threadIdx.x == 0) static_cast<C*>(a.loss)[r] = temperature * temperature * soft + hard_weight * hard_loss;
    if (a.grad) {
      const C scale = a.row_scale ? static_cast<const C*>(a.row_scale)[r] : static_cast<C>(a.scale);
      const C soft_factor = scale * temperature, hard_factor = hard ? scale * hard_weight : C(0);
      __syncthreads();  // every thread has read s[target] before it is overwritten
      // d soft / d u, u = s / T, from the student's and the teacher's logit
      const auto write = [&](int64_t j, C sv, C d) {
        C g = d * soft_factor;
        if (hard_factor != 0) g += acc_exp(sv - s_max - log_sum_s) * hard_factor;
        s[j] = from_acc<T>(g);
      };
      // One loop per divergence: with the choice inside, the double kernel
      // kept more values live than registers and spilled on sm_90a.
      if (forward_kl) {
        for (int64_t j = threadIdx.x; j < n; j += kThreads) {
          const C sv = to_acc(s[j]);
          write(j, sv, acc_exp(log_q(sv)) - acc_exp(log_p(t[j])));
        }
      } else if (reverse_kl) {
        for (int64_t j = threadIdx.x; j < n; j += kThreads) {
          const C sv = to_acc(s[j]), lq = log_q(sv);
          write(j, sv, acc_exp(lq) * (lq - log_p(t[j]) - q_dot_g));
        }
      } else {
        for (int64_t j = threadIdx.x; j < n; j += kThreads) {
          const C sv = to_acc(s[j]), lq = log_q(sv), lp = log_p(t[j]), q = acc_exp(lq);
          write(j, sv, q * ((1 - beta) * (lq - log_m(lp, lq, acc_exp(lp), q)) - q_dot_g));
        }
      }
      __syncthreads();  // the pass is done before thread 0 fixes the target's element
      if (threadIdx.x == 0 && hard_factor != 0) s[target] = from_acc<T>(to_acc(s[target]) - hard_factor);
    }
    __syncthreads();  // the row is finished before the block moves on
  }
}

unsigned grid_blocks(int64_t rows, int64_t max_blocks) {
  const int64_t cap = max_blocks > 0 ? max_blocks : kMaxGridBlocks;
  return static_cast<unsigned>(rows < cap ? rows : cap);
}

template <template <typename> class Launch, typename... Args>
cudaError_t by_dtype(LossDType dtype, Args&&... args) {
  switch (dtype) {
    case LossDType::kFloat16: return Launch<__half>::run(args...);
    case LossDType::kBFloat16: return Launch<__nv_bfloat16>::run(args...);
    case LossDType::kFloat32: return Launch<float>::run(args...);
    case LossDType::kFloat64: return Launch<double>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct LaunchCrossEntropy {
  static cudaError_t run(const CrossEntropyRows& a, int64_t rows, int64_t max_blocks, cudaStream_t stream) {
    const unsigned grid = grid_blocks(rows, max_blocks);
    cross_entropy_rows_kernel<T><<<grid, kThreads, 0, stream>>>(a, rows);
    return cudaGetLastError();
  }
};

template <typename T>
struct LaunchDistillation {
  static cudaError_t run(const DistillationRows& a, int64_t rows, int64_t max_blocks, cudaStream_t stream) {
    const unsigned grid = grid_blocks(rows, max_blocks);
    distillation_rows_kernel<T><<<grid, kThreads, 0, stream>>>(a, rows);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t launch_cross_entropy_rows(const CrossEntropyRows& a, int64_t rows, LossDType dtype, int64_t max_blocks,
                                      cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return by_dtype<LaunchCrossEntropy>(dtype, a, rows, max_blocks, stream);
}

cudaError_t launch_distillation_rows(const DistillationRows& a, int64_t rows, LossDType dtype, int64_t max_blocks,
                                     cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return by_dtype<LaunchDistillation>(dtype, a, rows, max_blocks, stream);
}

}  // namespace cuda
}  // namespace bigkernels
