// The CPU forward product of a linear layer, for other families that need
// one (the loss family's logits).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace bigkernels {

// x [M, K] @ weight [N, K]^T (+ bias [N]), [M, N] in x's dtype: oneDNN's
// inner product where it builds one and is faster than BLAS (32+ rows,
// float32 or bf16, a contiguous weight: dense_cpu.cpp says why), else BLAS.
at::Tensor cpu_linear_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace bigkernels
