// Host-side pieces of the norm ops shared by their implementations.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace bigkernels {

// Checks every argument of norm_forward (dtype, device, shapes, eps); the
// error messages name the argument and show the bad value.
void check_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps);

}  // namespace bigkernels
