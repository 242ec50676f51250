// CUDA backward of the activation, fused with the bias-gradient reduction:
// one pass reads grad_output and the saved tensor, writes the gradient of the
// pre-activation and sums its columns, one partial row per grid row, which
// the caller adds up (deterministic: no atomics). The GEMMs for the input and
// weight gradients follow in dense_cuda.cpp.
#include "common/cuda_dtype.cuh"
#include "dense/cuda/launchers.h"

namespace bigkernels {
namespace cuda {
namespace {

// Block: 32 columns x 8 row-lanes; each block walks kRowsPerBlock rows at a
// time, striding by the grid height (capped at kMaxGridRows), then the 8
// row-lanes' column sums meet in shared memory and one partial sum per column
// goes to bias_partials[blockIdx.y].
constexpr int kCols = 32, kRowLanes = 8, kRowsPerBlock = 64;
constexpr int64_t kMaxGridRows = 65535;

template <typename T>
__global__ void __launch_bounds__(kCols* kRowLanes) activation_backward_kernel(ActivationBackwardParams p) {
  using Acc = acc_t<T>;
  const T* g = static_cast<const T*>(p.grad_out);
  const T* s = static_cast<const T*>(p.saved);
  T* dz = static_cast<T*>(p.grad_preact);
  const int tx = threadIdx.x % kCols, ty = threadIdx.x / kCols;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + tx;  // output column
  const bool gated = is_gated(p.act);
  const int64_t saved_width = p.saved_is_output ? p.Nout : p.Nz;
  Acc sum1 = 0, sum2 = 0;  // column sums of dz (sum2: the gate half)

  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock; col < p.Nout && row0 < p.M;
       row0 += static_cast<int64_t>(gridDim.y) * kRowsPerBlock) {
    const int64_t row_end = row0 + kRowsPerBlock < p.M ? row0 + kRowsPerBlock : p.M;
    for (int64_t row = row0 + ty; row < row_end; row += kRowLanes) {
      const Acc go = to_acc(g[row * p.Nout + col]);
      const Acc sv = to_acc(s[row * saved_width + col]);
      if (p.saved_is_output) {
        const Acc d = go * dispatch_output_activation(p.act, [&](auto tag) {
          return act_grad_from_output<decltype(tag)::value>(sv);
        });
        dz[row * p.Nz + col] = from_acc<T>(d);
        sum1 += d;
      } else if (gated) {
        const Acc z2 = to_acc(s[row * saved_width + p.Nout + col]);
        Acc a, da;
        dispatch_activation(p.act, [&](auto tag) {
          a = act_forward<decltype(tag)::value>(sv);
          da = act_grad_from_input<decltype(tag)::value>(sv);
        });
        const Acc d1 = go * z2 * da, d2 = go * a;
        dz[row * p.Nz + col] = from_acc<T>(d1);
        dz[row * p.Nz + p.Nout + col] = from_acc<T>(d2);
        sum1 += d1;
        sum2 += d2;
      } else {
        const Acc d = go * dispatch_activation(p.act, [&](auto tag) {
          return act_grad_from_input<decltype(tag)::value>(sv);
        });
        dz[row * p.Nz + col] = from_acc<T>(d);
        sum1 += d;
      }
    }
  }
  if (p.bias_partials == nullptr) return;  // uniform across the block

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
    Acc* out = static_cast<Acc*>(p.bias_partials) + blockIdx.y * p.Nz;
    out[col] = t1;
    if (gated) out[p.Nout + col] = t2;
  }
}

template <typename T>
cudaError_t launch(const ActivationBackwardParams& p, cudaStream_t stream) {
  const dim3 grid((p.Nout + kCols - 1) / kCols, activation_backward_partial_rows(p.M));
  activation_backward_kernel<T><<<grid, kCols * kRowLanes, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int64_t activation_backward_partial_rows(int64_t M) {
  const int64_t row_blocks = (M + kRowsPerBlock - 1) / kRowsPerBlock;
  return row_blocks < kMaxGridRows ? row_blocks : kMaxGridRows;
}

cudaError_t launch_activation_backward(const ActivationBackwardParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.Nout == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat16: return launch<__half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return launch<float>(p, stream);
    case DType::kFloat64: return launch<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bigkernels
