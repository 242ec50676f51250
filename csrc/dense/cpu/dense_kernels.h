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
  // z[m, n] = x[m] . w[n] (+ bias[n]) for the M <= kSkinnyMaxRows rows of x
  // ([M, K], contiguous) and the rows n in [n0, n1) of w ([*, K], contiguous;
  // bias null or indexed like w's rows); z's rows are ldz apart. Each row of
  // w is read once for all of x's rows.
  void (*skinny_rows)(c10::ScalarType dtype, const void* x, int64_t M, int64_t K, const void* w,
                      const void* bias, void* z, int64_t ldz, int64_t n0, int64_t n1);
};

// Rows of x up to which the forward's product runs on skinny_rows instead of
// BLAS (decoding: one token per sequence).
constexpr int64_t kSkinnyMaxRows = 8;

BK_DECLARE_CAPABILITY_TABLE(DenseCpuKernels, dense_cpu_kernels)

}  // namespace bigkernels
