// The cross-entropy row passes of the loss family on the CPU, compiled once
// per CPU capability (cross_entropy_kernels.cpp; capability.h) and called
// through this table.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/capability.h"

namespace bigkernels {

// A chunk of rows of logits, V wide and `ld` apart, in dtype; the kernels
// turn them into the gradient of the loss with respect to the logits in
// place. The float vectors are in the compute type: float, or double for
// double. No row is ignored here (the caller leaves those rows out).
struct CrossEntropyRows {
  void* logits;
  int64_t V, ld;
  const int64_t* target;  // each in [0, V)
  double label_smoothing, softcap, z_loss;  // softcap 0: none
  void* lse;   // per row: written, or read when lse_given
  void* loss;  // per row, written (null: not wanted)
  bool lse_given;  // the backward's case: lse from the forward, no loss
  bool grad;       // write the gradient over the logits
  const void* row_scale;  // per row: the gradient's factor (null: `scale` for every row)
  double scale;
};

struct CrossEntropyCpuKernels {
  void (*rows)(c10::ScalarType dtype, const CrossEntropyRows& a, int64_t r0, int64_t r1);
};

BK_DECLARE_CAPABILITY_TABLE(CrossEntropyCpuKernels, cross_entropy_cpu_kernels)

}  // namespace bigkernels
