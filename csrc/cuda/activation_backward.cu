// CUDA backward of the activation, fused with the bias-gradient reduction:
// one pass reads grad_output and the saved tensor, writes the gradient of the
// pre-activation and sums its columns. The GEMMs for the input and weight
// gradients follow in dense_cuda.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace bigkernels {
namespace cuda {
namespace {

__device__ __forceinline__ float load_acc(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_acc(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ float load_acc(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load_acc(const double* p, int64_t i) { return p[i]; }

__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(double* p, int64_t i, double v) { p[i] = v; }

// Block: 32 columns x 8 row-lanes; each block walks kRowsPerBlock rows, then
// the 8 row-lanes' column sums meet in shared memory and one atomic per
// column goes to grad_bias.
constexpr int kCols = 32, kRowLanes = 8, kRowsPerBlock = 64;

template <typename T, typename Acc>
__global__ void __launch_bounds__(kCols* kRowLanes) activation_backward_kernel(ActivationBackwardParams p) {
  const T* g = static_cast<const T*>(p.grad_out);
  const T* s = static_cast<const T*>(p.saved);
  T* dz = static_cast<T*>(p.grad_preact);
  const int tx = threadIdx.x % kCols, ty = threadIdx.x / kCols;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + tx;  // output column
  const bool gated = is_gated(p.act);
  const int64_t saved_width = p.saved_is_output ? p.Nout : p.Nz;
  Acc sum1 = 0, sum2 = 0;  // column sums of dz (sum2: the gate half)

  // Row blocks stride by the grid height, which is capped at 65535.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock; col < p.Nout && row0 < p.M;
       row0 += static_cast<int64_t>(gridDim.y) * kRowsPerBlock) {
    const int64_t row_end = row0 + kRowsPerBlock < p.M ? row0 + kRowsPerBlock : p.M;
    for (int64_t row = row0 + ty; row < row_end; row += kRowLanes) {
      const Acc go = load_acc(g, row * p.Nout + col);
      const Acc sv = load_acc(s, row * saved_width + col);
      if (p.saved_is_output) {
        const Acc d = go * dispatch_output_activation(p.act, [&](auto tag) {
          return act_grad_from_output<decltype(tag)::value>(sv);
        });
        store(dz, row * p.Nz + col, d);
        sum1 += d;
      } else if (gated) {
        const Acc z2 = load_acc(s, row * saved_width + p.Nout + col);
        Acc a, da;
        dispatch_activation(inner_activation(p.act), [&](auto tag) {
          a = act_forward<decltype(tag)::value>(sv);
          da = act_grad_from_input<decltype(tag)::value>(sv);
        });
        const Acc d1 = go * z2 * da, d2 = go * a;
        store(dz, row * p.Nz + col, d1);
        store(dz, row * p.Nz + p.Nout + col, d2);
        sum1 += d1;
        sum2 += d2;
      } else {
        const Acc d = go * dispatch_activation(p.act, [&](auto tag) {
          return act_grad_from_input<decltype(tag)::value>(sv);
        });
        store(dz, row * p.Nz + col, d);
        sum1 += d;
      }
    }
  }
  if (p.grad_bias == nullptr) return;  // uniform across the block

  __shared__ Acc partial[2][kRowLanes][kCols];
  partial[0][ty][tx] = sum1;
  partial[1][ty][tx] = sum2;
  __syncthreads();
  if (ty == 0 && col < p.Nout) {
    Acc t1 = 0, t2 = 0;
#pragma unroll
    for (int r = 0; r < kRowLanes; ++r) {
      t1 += partial[0][r][tx];
      t2 += partial[1][r][tx];
    }
    Acc* db = static_cast<Acc*>(p.grad_bias);
    atomicAdd(db + col, t1);
    if (gated) atomicAdd(db + p.Nout + col, t2);
  }
}

template <typename T, typename Acc>
cudaError_t launch(const ActivationBackwardParams& p, cudaStream_t stream) {
  const int64_t row_blocks = (p.M + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 grid((p.Nout + kCols - 1) / kCols, row_blocks < 65535 ? row_blocks : 65535);
  activation_backward_kernel<T, Acc><<<grid, kCols * kRowLanes, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_activation_backward(const ActivationBackwardParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.Nout == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat16: return launch<__half, float>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16, float>(p, stream);
    case DType::kFloat32: return launch<float, float>(p, stream);
    case DType::kFloat64: return launch<double, double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bigkernels
