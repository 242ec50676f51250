// The RNN family's CPU gate loops, compiled once per CPU capability
// (rnn_kernels.cpp; common/capability.h) and called through this table.
// They run in the accumulator type (float, or double for double inputs) on
// a block of rows and hidden units of one step; every row pointer below is
// that step's row 0.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/capability.h"
#include "rnn/rnn.h"

namespace bigkernels {

struct RnnCpuKernels {
  // Hidden units per task of a step (a multiple of the vector width): the
  // recurrent product of a block of units and rows stays in cache until its
  // gates are applied.
  int64_t unit_block;
  // Whether `gemm` is vectorized for this capability (AVX2, AVX512). The
  // DEFAULT build's Vectorized is a plain array: there ATen's GEMM runs the
  // products, and these loops only the gates.
  bool own_gemm;
  // c[0:m][0:n] (+)= A b in the accumulator type: A(i, k) = a[i * a_row +
  // k * a_col], b row-major [k][n] with leading dim ldb, c with ldc.
  void (*gemm)(c10::ScalarType acc, int64_t m, int64_t n, int64_t k, const void* a, int64_t a_row, int64_t a_col,
               const void* b, int64_t ldb, void* c, int64_t ldc, bool accumulate);
  // Rows [r0, r1), units [u0, u1) of one step. xproj: W_ih x, [.., G*H];
  // bias_x: the biases added to it (b_ih, plus b_hh except GRU's), [G*H] or
  // null; hproj: W_hh h_prev, [.., G*H]; bias_hh: GRU's b_hh or null. h_prev:
  // [.., H] (read by GRU); h_out: [.., H], the new h (the LSTM's before its
  // projection). c: LSTM's cell state [.., H], updated in place. ws: the
  // workspace rows [.., rnn_workspace_width] or null.
  void (*forward_rows)(c10::ScalarType acc, RnnMode mode, int64_t r0, int64_t r1, int64_t u0, int64_t u1, int64_t H,
                       const void* xproj, const void* bias_x, const void* hproj, const void* bias_hh,
                       const void* h_prev, void* h_out, void* c, void* ws);
  // dh: the gradient of the new h [.., H] from the later steps, plus
  // grad_out (the step's output gradient [.., H]) where that is not null;
  // GRU overwrites dh with its direct part (dh + grad_out) * z. ws: the
  // forward's workspace rows; h_prev (GRU) and c_prev (LSTM) [.., H]; dc:
  // LSTM's cell gradient, dc_t in, dc_{t-1} out. Writes the gates' gradients:
  // dgates_x (through W_ih and b_ih) and, for GRU only, dgates_h (through W_hh
  // and b_hh; the others use dgates_x for both).
  void (*backward_rows)(c10::ScalarType acc, RnnMode mode, int64_t r0, int64_t r1, int64_t u0, int64_t u1, int64_t H,
                        void* dh, const void* grad_out, const void* ws, const void* h_prev, const void* c_prev,
                        void* dc, void* dgates_x, void* dgates_h);
};

BK_DECLARE_CAPABILITY_TABLE(RnnCpuKernels, rnn_cpu_kernels)

}  // namespace bigkernels
