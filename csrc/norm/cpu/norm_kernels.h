// The norm family's CPU row loops (LayerNorm and RMSNorm, an optional
// residual added first), compiled once per CPU capability (norm_kernels.cpp;
// capability.h) and called through this table.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/capability.h"

namespace bigkernels {

// Rows are N wide and contiguous. Vectors named "stats" (mean, rstd) and the
// partial column sums are in the compute type: float, or double for double.
struct NormForwardRows {
  const void* input;
  const void* residual;  // null: none
  const void* weight;    // null: none (all ones)
  const void* bias;      // null: none (zeros; RMSNorm has none)
  void* out;
  void* sum;  // input + residual, rounded to the dtype; null when there is no residual
  void* mean;  // null for RMSNorm
  void* rstd;
  int64_t N;
  double eps;
};

struct NormBackwardRows {
  const void* grad_out;
  const void* grad_sum;  // null: none; else added to grad_input
  const void* x;         // what was normalised (the sum when there was a residual)
  const void* weight;    // null: none
  const void* mean;      // null for RMSNorm
  const void* rstd;
  void* grad_input;
  int64_t N;
};

struct NormCpuKernels {
  void (*forward_rows)(c10::ScalarType dtype, const NormForwardRows& a, int64_t r0, int64_t r1);
  // Rows [r0, r1): grad_input, and when not null the column sums of
  // grad_out * x_hat (weight) and of grad_out (bias) added to dweight, dbias.
  void (*backward_rows)(c10::ScalarType dtype, const NormBackwardRows& a, void* dweight, void* dbias,
                        int64_t r0, int64_t r1);
};

BK_DECLARE_CAPABILITY_TABLE(NormCpuKernels, norm_cpu_kernels)

}  // namespace bigkernels
