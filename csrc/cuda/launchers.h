// Raw-pointer entry points of the CUDA kernels. The .cu files see only this
// header and CUDA's own, which keeps nvcc's compile times short; tensors,
// streams and checks live in dense_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../include/activations.h"

namespace bigkernels {
namespace cuda {

enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// out[M, Nout] = act(x[M, K] @ w[Nz, K]^T + bias[Nz]); preact[M, Nz] gets the
// pre-activation when not null. All pointers are contiguous row-major.
struct DenseForwardParams {
  const void* x;
  const void* w;
  const void* bias;  // may be null
  void* out;
  void* preact;  // may be null
  int64_t M, K, Nz, Nout;
  Activation act;
  DType dtype;
  bool allow_tf32;  // float32 only: tensor cores with TF32 inputs
};

cudaError_t launch_dense_forward(const DenseForwardParams& p, cudaStream_t stream);

// grad_preact[M, Nz] = grad_out[M, Nout] * act'(saved) (saved is the output,
// width Nout, or the pre-activation, width Nz); grad_bias[Nz] (float, or
// double for float64; zeroed by the caller) accumulates its column sums.
struct ActivationBackwardParams {
  const void* grad_out;
  const void* saved;
  void* grad_preact;
  void* grad_bias;  // may be null
  int64_t M, Nz, Nout;
  Activation act;
  bool saved_is_output;
  DType dtype;
};

cudaError_t launch_activation_backward(const ActivationBackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bigkernels
