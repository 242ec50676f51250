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
  // The product for a few rows of x (decoding): z[m, n] = x[m] . w[n]
  // (+ bias[n]) for the M <= kDecodeMaxRows rows of x and the rows n in
  // [n0, n1) of w. x is float ([M, ldx], zero from column K to a multiple of
  // kDecodeKPad); w ([*, ldw], unit column stride) and bias (null, or indexed
  // like w's rows) in dtype, which is float, bfloat16 or half; z's rows (dtype)
  // are ldz apart. Each row of w is read once for all rows of x.
  void (*decode_rows)(c10::ScalarType dtype, const float* x, int64_t ldx, int64_t M, int64_t K, const void* w,
                      int64_t ldw, const void* bias, void* z, int64_t ldz, int64_t n0, int64_t n1);
};

// The rows of x for which the forward's product runs on decode_rows instead
// of BLAS, by dtype (bigkernels/ops/dense.py keeps the same table). From 2 to
// 8 rows BLAS read a float weight at a third to half the bandwidth a plain
// read gets; bf16 at any row count. decode_rows reaches it. At one row BLAS's
// float GEMV reaches it too, and beyond 4 rows converting a bf16/half weight
// makes decode_rows compute-bound and no faster than BLAS (docs/PERFORMANCE.md).
constexpr int64_t kDecodeMaxRows = 8;
inline int64_t decode_min_rows(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Float ? 2 : 1;
}
inline int64_t decode_max_rows(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Float                                        ? kDecodeMaxRows
         : dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half ? 4
                                                                                : 0;
}
// x's rows are zero-padded to a multiple of this many floats (a register
// chunk on every capability).
constexpr int64_t kDecodeKPad = 64;

BK_DECLARE_CAPABILITY_TABLE(DenseCpuKernels, dense_cpu_kernels)

}  // namespace bigkernels
