// The dense family's CPU row loops, compiled once per CPU capability
// (dense_kernels.cpp; capability.h) and called through this table.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/activations.h"
#include "common/capability.h"

namespace bigkernels {

struct DenseCpuKernels {
  // Rows [r0, r1): out = act(z), or act(z1) * z2 for a gated activation (z is
  // [rows, nz], out [rows, nout]); out may be z when the activation is not gated.
  // With a bias ([nz], or null), z + bias first, written back into z when
  // keep_preact (z is then the saved pre-activation).
  void (*forward_rows)(c10::ScalarType dtype, Activation act, void* z, const void* bias, bool keep_preact,
                       void* out, int64_t r0, int64_t r1, int64_t nz, int64_t nout);
  // Rows [r0, r1): dz = g * act'(...), from the saved rows (the output, width
  // nout, when saved_is_output, else the pre-activation, width nz). When
  // dbias (double, whatever the dtype) is not null, the column sums of these
  // rows of dz are added to it, in the same loop.
  void (*backward_rows)(c10::ScalarType dtype, Activation act, bool saved_is_output, const void* g,
                        const void* saved, void* dz, double* dbias, int64_t r0, int64_t r1,
                        int64_t nz, int64_t nout);
};

BK_DECLARE_CAPABILITY_TABLE(DenseCpuKernels, dense_cpu_kernels)

}  // namespace bigkernels
