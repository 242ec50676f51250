// Host-side pieces of the norm ops shared by their implementations.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace bigkernels {

// Checks every argument of norm_forward (dtype, device, shapes, eps); the
// error messages name the argument and show the bad value.
void check_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps);

// norm_backward's checks: those of norm_forward for x, grad_sum and weight,
// grad_output shaped as x, and mean and rstd the forward's for x's rows.
void check_norm_backward_args(const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_sum,
                              const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                              const at::Tensor& rstd, bool rms);

// The statistics' dtype: float32, float64 for float64 inputs.
inline at::ScalarType stats_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional(t->contiguous()) : std::nullopt;
}

inline const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

// t in x's dtype, contiguous (an incoming gradient may be neither).
inline at::Tensor like_x(const at::Tensor& t, const at::Tensor& x) {
  return (t.scalar_type() == x.scalar_type() ? t : t.to(x.scalar_type())).contiguous();
}

}  // namespace bigkernels
