// The compute type's math in the loss family's CUDA kernels (the row passes,
// loss_kernels.cu, and the blocked kernels, blocked_kernels.cu): float or
// double overloads of CUDA's functions, the NaN-winning max, and the softcap
// with its derivative (cpu/loss_kernels.cpp says why it is computed from the
// raw logit).
#pragma once

#include <cmath>

namespace bigkernels {
namespace cuda {

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }
__device__ __forceinline__ float acc_log(float v) { return logf(v); }
__device__ __forceinline__ double acc_log(double v) { return log(v); }
__device__ __forceinline__ float acc_log1p(float v) { return log1pf(v); }
__device__ __forceinline__ double acc_log1p(double v) { return log1p(v); }
__device__ __forceinline__ float acc_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double acc_tanh(double v) { return tanh(v); }

// The larger, NaN winning (as torch's max).
template <typename C>
__device__ __forceinline__ C nan_max(C u, C v) {
  return u > v || u != u ? u : v;
}

// z -> cap * tanh(z / cap) when cap > 0, and its derivative
// 1 - tanh^2 = 4e / (1 + e)^2, e = exp(-2 |z| / cap), from the raw logit.
template <typename C>
struct Softcap {
  bool on;
  C cap, inv_cap;
  __device__ __forceinline__ explicit Softcap(double softcap)
      : on(softcap > 0), cap(static_cast<C>(softcap)), inv_cap(softcap > 0 ? static_cast<C>(1 / softcap) : C(0)) {}
  __device__ __forceinline__ C operator()(C z) const { return on ? cap * acc_tanh(z * inv_cap) : z; }
  __device__ __forceinline__ C derivative(C z) const {
    const C e = acc_exp(C(-2) * fabs(z * inv_cap));
    return C(4) * e / ((C(1) + e) * (C(1) + e));
  }
};

}  // namespace cuda
}  // namespace bigkernels
