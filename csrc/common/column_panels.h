// Packing a GEMM's b operand for the CPU kernels: the RNN's weights.
// (Attention's backward transposes its K and V blocks per task, in cache:
// transpose_key_blocks in attention/cpu/attention_kernels.cpp.)
#pragma once

#include <ATen/core/Tensor.h>

namespace bigkernels {

// b [..., K, N] (any strides, a floating dtype) as panels of `block`
// columns: [..., ceil(N / block), K, block] in `acc` (float or double),
// contiguous, zero past column N. A product then streams one contiguous
// panel instead of rows of b that lie N elements apart (for a wide b, a new
// page every few rows; for N = 1024 floats, rows on one L1 set).
// One parallel pass of our own: converting, padding, permuting and copying
// through ATen cost three copies and a dozen dispatcher calls per operand on
// every call (docs/PERFORMANCE.md, per-call overhead, 5 and 6).
at::Tensor column_panels(const at::Tensor& b, int64_t block, at::ScalarType acc);

}  // namespace bigkernels
