// Raw-pointer entry points of the norm family's CUDA kernels (norm_kernels.cu).
// The .cu file sees only this header and CUDA's own, which keeps nvcc's
// compile times short and lets tests/cuda_emulation/norm/ call the launchers
// directly; tensors, streams and checks live in norm_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace bigkernels {
namespace cuda {

enum class NormDType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Rows are N wide and contiguous, M of them. "stats" (mean, rstd) and the
// partial column sums are in the compute type: float, or double for float64.
// Same contract as the CPU rows (csrc/norm/cpu/norm_kernels.h).
struct NormForwardParams {
  const void* input;
  const void* residual;  // null: none
  const void* weight;    // null: none (all ones)
  const void* bias;      // null: none (zeros; RMSNorm has none)
  void* out;
  void* sum;   // input + residual, rounded to the dtype; null when there is no residual
  void* mean;  // null for RMSNorm
  void* rstd;
  int64_t M, N;
  double eps;
  NormDType dtype;
  int64_t max_blocks;  // 0: the launcher's grid; tests set a small cap to run the grid-stride loop
};

cudaError_t launch_norm_forward(const NormForwardParams& p, cudaStream_t stream);

// The elements each access of the row kernels moves: 16 bytes' worth when N
// and every pointer allow rows to start 16-byte aligned, else 1.
int norm_forward_vector_width(const NormForwardParams& p);

// grad_input = d(norm)/dx applied to grad_out, plus grad_sum when not null.
struct NormBackwardParams {
  const void* grad_out;
  const void* grad_sum;  // null: none; else added to grad_input
  const void* x;         // what was normalised (the sum when there was a residual)
  const void* weight;    // null: none
  const void* mean;      // null for RMSNorm
  const void* rstd;
  void* grad_input;      // null: not wanted (the kernel is skipped)
  // When not null, row r (< norm_backward_partial_rows(M, max_blocks)) of
  // [rows, N] gets the column sums over one fixed set of rows of
  // grad_out * x_hat (weight) and of grad_out (bias); the caller adds the
  // partial rows up. No atomics: the same bits every run.
  void* weight_partials;
  void* bias_partials;
  int64_t M, N;
  NormDType dtype;
  int64_t max_blocks;  // as in NormForwardParams (for both kernels)
};

int64_t norm_backward_partial_rows(int64_t M, int64_t max_blocks);
int norm_backward_vector_width(const NormBackwardParams& p);
cudaError_t launch_norm_backward(const NormBackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bigkernels
