// Raw-pointer entry points of the CUDA kernels. The .cu files see only this
// header and CUDA's own, which keeps nvcc's compile times short; tensors,
// streams and checks live in dense_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/activations.h"

namespace bigkernels {
namespace cuda {

enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// out[M, Nout] = act(x[M, K] @ w[Nz, K]^T + bias[Nz]); preact[M, Nz] gets the
// pre-activation when not null. All pointers are contiguous row-major.
struct DenseForwardParams {
  const void* x;
  const void* w;
  const void* w_up;  // gated only, may be null: rows Nout.. of the weight, [Nout, K], when not in w
  const void* bias;  // may be null
  void* out;
  void* preact;  // may be null
  int64_t M, K, Nz, Nout;
  Activation act;
  DType dtype;
  bool allow_tf32;  // float32 only: tensor cores with TF32 inputs
  bool use_sm90;    // fp16/bf16 on an sm_90 GPU, opted in: try the CUTLASS path first
};

cudaError_t launch_dense_forward(const DenseForwardParams& p, cudaStream_t stream);

// Whether launch_dense_forward runs the tensor-core kernel for p (fp16, bf16,
// and fp32 with TF32), which needs sm_80; the FMA kernel runs on any GPU.
inline bool dense_forward_uses_tensor_cores(const DenseForwardParams& p) {
  return p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16 ||
         (p.dtype == DType::kFloat32 && p.allow_tf32);
}

// grad_preact[M, Nz] = grad_out[M, Nout] * act'(saved) (saved is the output,
// width Nout, or the pre-activation, width Nz). When bias_partials is not
// null, row r of it (float, or double for float64; r < the count that
// activation_backward_partial_rows(M) gives) gets the column sums of one
// fixed set of rows of grad_preact; the caller sums the partial rows. No
// atomics: the bias gradient is deterministic.
struct ActivationBackwardParams {
  const void* grad_out;
  const void* saved;
  void* grad_preact;
  void* bias_partials;  // may be null
  int64_t M, Nz, Nout;
  Activation act;
  bool saved_is_output;
  DType dtype;
};

int64_t activation_backward_partial_rows(int64_t M);
cudaError_t launch_activation_backward(const ActivationBackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bigkernels
