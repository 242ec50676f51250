// The norm family's ops (schemas) and argument checks: LayerNorm and RMSNorm
// over the last dimension, with an optional residual added first (returning
// the sum too, as flash-attention's and apex's fused norms do).
#include "norm/norm.h"

#include <torch/library.h>

namespace bigkernels {

void check_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   "bigkernels norm: input must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(input.dim() >= 1, "bigkernels norm: input must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(eps >= 0, "bigkernels norm: eps must be >= 0, got ", eps);
  const int64_t N = input.size(-1);
  if (residual.has_value()) {
    TORCH_CHECK_TYPE(residual->scalar_type() == dtype, "bigkernels norm: residual dtype ",
                     residual->scalar_type(), " does not match input dtype ", dtype);
    TORCH_CHECK_VALUE(residual->device() == input.device(), "bigkernels norm: residual is on ",
                      residual->device(), " but input is on ", input.device());
    TORCH_CHECK_VALUE(residual->sizes() == input.sizes(), "bigkernels norm: residual has shape ",
                      residual->sizes(), " but input has shape ", input.sizes());
  }
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!t->has_value()) continue;
    const at::Tensor& p = **t;
    TORCH_CHECK_TYPE(p.scalar_type() == dtype, "bigkernels norm: ", name, " dtype ", p.scalar_type(),
                     " does not match input dtype ", dtype);
    TORCH_CHECK_VALUE(p.device() == input.device(), "bigkernels norm: ", name, " is on ", p.device(),
                      " but input is on ", input.device());
    TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == N, "bigkernels norm: ", name, " must have shape [", N,
                      "] (input's last dimension), got ", p.sizes());
  }
}

void check_norm_backward_args(const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_sum,
                              const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                              const at::Tensor& rstd, bool rms) {
  check_norm_args(x, grad_sum, weight, std::nullopt, 0.0);
  TORCH_CHECK_VALUE(grad_output.sizes() == x.sizes(), "bigkernels norm_backward: grad_output has shape ",
                    grad_output.sizes(), " but x has shape ", x.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == x.device(), "bigkernels norm_backward: grad_output is on ",
                    grad_output.device(), " but x is on ", x.device());
  const int64_t N = x.size(-1), M = N ? x.numel() / N : 0;
  TORCH_CHECK_VALUE(rstd.numel() == M && rstd.scalar_type() == stats_dtype(x) && rstd.device() == x.device() &&
                        (rms ? mean.numel() == 0
                             : mean.numel() == M && mean.scalar_type() == rstd.scalar_type() &&
                                   mean.device() == x.device()),
                    "bigkernels norm_backward: mean and rstd must be the forward's (", M, " rows on ", x.device(),
                    ")");
}

}  // namespace bigkernels

TORCH_LIBRARY_FRAGMENT(bigkernels, m) {
  // output = norm(x) * weight + bias over the last dimension, x = input, or
  // input + residual (rounded to the dtype) returned as `sum` (else empty;
  // empty too with keep_sum false, when nothing will read it: no backward).
  // mean (LayerNorm; empty for RMSNorm) and rstd = 1 / sqrt(var + eps) are
  // per row, in float32 (float64 for double): backward reads them.
  m.def("norm_forward(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms, "
        "bool keep_sum=True) -> (Tensor output, Tensor sum, Tensor mean, Tensor rstd)");
  // The gradients from the normalised x (the sum when there was a residual),
  // grad_sum (the sum's own gradient, if any) added to grad_input; those not
  // in output_mask (input, weight, bias) come back empty.
  m.def("norm_backward(Tensor grad_output, Tensor? grad_sum, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool rms, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}
