// Host-side pieces of the dense op shared by the CPU and CUDA
// implementations: activation names, argument checks, output shapes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/activations.h"

namespace bigkernels {

Activation parse_activation(c10::string_view name);

// Sizes of one dense call: input is viewed as [M, K], weight is [Nz, K] and
// the output is [M, Nout] (Nout = Nz / 2 for the gated activations). With an
// up_weight (gated only), weight and up_weight are [Nout, K] each and act as
// the two halves of one [Nz, K] weight, read in place.
struct DenseShape {
  int64_t M, K, Nz, Nout;
};

// Checks every argument of dense (dtype, device, shapes) and returns the
// sizes. The error messages name the argument and show the bad value.
DenseShape check_dense_args(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, Activation act,
                            const std::optional<at::Tensor>& up_weight = std::nullopt);

// x[M, K] @ [weight; up_weight]^T + bias as one [M, Nz] matrix, by one BLAS
// call per weight into its half of the columns (no concatenated weight).
at::Tensor gated_preactivation(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& up_weight,
                               const std::optional<at::Tensor>& bias);

// input.shape[:-1] + [last]
std::vector<int64_t> leading_shape_with(const at::Tensor& input, int64_t last);

// t viewed as [rows, cols], contiguous: t itself when it is that already
// (the common 2-d case; a reshape is a dispatcher call, ~0.5 us per call).
at::Tensor as_matrix(const at::Tensor& t, int64_t rows, int64_t cols);

// A [M, width] result given input's leading dims: itself when input is 2-d.
at::Tensor with_leading_dims_of(const at::Tensor& input, const at::Tensor& rows);

// The backward that is the same on every device: recompute or take the saved
// pre-activation, turn grad_output into grad of the pre-activation with the
// device's fused kernel (activation gradient and bias reduction in one pass),
// then two GEMMs for the input and weight gradients.
using ActivationBackwardFn = void (*)(const at::Tensor& grad_out,  // [M, Nout]
                                      const at::Tensor& saved,     // [M, Nz]
                                      Activation act, bool saved_is_output,
                                      at::Tensor& grad_preact,  // [M, Nz], written
                                      at::Tensor* grad_bias);   // [Nz] or null

// With an up_weight, grad_weight is that of [weight; up_weight], [Nz, K]:
// the autograd hands its two halves to the two weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward_common(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& saved,
    c10::string_view activation, bool saved_is_output, std::array<bool, 3> output_mask,
    const std::optional<at::Tensor>& up_weight, ActivationBackwardFn activation_backward);

// The dense_backward op of a device, given its activation-backward kernel.
template <ActivationBackwardFn activation_backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& saved, c10::string_view activation,
    bool saved_is_output, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& up_weight) {
  return dense_backward_common(grad_output, input, weight, bias, saved, activation,
                               saved_is_output, output_mask, up_weight, activation_backward);
}

}  // namespace bigkernels
