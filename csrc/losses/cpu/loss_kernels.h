// The row passes of the loss family on the CPU (cross-entropy, distillation),
// compiled once per CPU capability (loss_kernels.cpp; capability.h) and called
// through this table.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/capability.h"
#include "losses/loss_rows.h"

namespace bigkernels {

// Rows [r0, r1) of the chunk.
struct LossCpuKernels {
  void (*cross_entropy_rows)(c10::ScalarType dtype, const CrossEntropyRows& a, int64_t r0, int64_t r1);
  void (*distillation_rows)(c10::ScalarType dtype, const DistillationRows& a, int64_t r0, int64_t r1);
};

BK_DECLARE_CAPABILITY_TABLE(LossCpuKernels, loss_cpu_kernels)

}  // namespace bigkernels
