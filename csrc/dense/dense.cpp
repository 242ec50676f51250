// The dense family's ops (schemas), argument checks and the backward that is
// the same on every device.
#include "dense/dense.h"

#include <c10/core/DeviceGuard.h>
#include <c10/util/accumulate.h>

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

namespace bigkernels {

Activation parse_activation(c10::string_view name) {
#define BK_MATCH(python_name, value) \
  if (name == #python_name) return Activation::value;
  BK_FOR_EACH_ACTIVATION(BK_MATCH)
#undef BK_MATCH
#define BK_LIST(python_name, value) " " #python_name
  TORCH_CHECK_VALUE(false, "bigkernels.dense: unknown activation '", std::string(name),
                    "'; expected one of:" BK_FOR_EACH_ACTIVATION(BK_LIST));
#undef BK_LIST
}

DenseShape check_dense_args(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, Activation act,
                            const std::optional<at::Tensor>& up_weight) {
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   "bigkernels.dense: input must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(),
                   "bigkernels.dense: weight dtype ", weight.scalar_type(),
                   " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == input.device(), "bigkernels.dense: weight is on ",
                    weight.device(), " but input is on ", input.device());
  TORCH_CHECK_VALUE(input.dim() >= 1, "bigkernels.dense: input must have at least 1 "
                    "dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(weight.dim() == 2, "bigkernels.dense: weight must be 2-d "
                    "[out_features, in_features], got shape ", weight.sizes());
  const int64_t K = input.size(-1);
  TORCH_CHECK_VALUE(weight.size(1) == K, "bigkernels.dense: weight has ", weight.size(1),
                    " input features but input's last dimension is ", K);
  int64_t Nz = weight.size(0);
  if (up_weight.has_value()) {
    TORCH_CHECK_VALUE(is_gated(act), "bigkernels.dense: up_weight is only for the gated "
                      "activations (swiglu, geglu)");
    TORCH_CHECK_TYPE(up_weight->scalar_type() == input.scalar_type(), "bigkernels.dense: up_weight "
                     "dtype ", up_weight->scalar_type(), " does not match input dtype ", input.scalar_type());
    TORCH_CHECK_VALUE(up_weight->device() == input.device(), "bigkernels.dense: up_weight is on ",
                      up_weight->device(), " but input is on ", input.device());
    TORCH_CHECK_VALUE(up_weight->sizes() == weight.sizes(), "bigkernels.dense: up_weight must have "
                      "weight's shape ", weight.sizes(), ", got ", up_weight->sizes());
    Nz *= 2;
  }
  TORCH_CHECK_VALUE(!is_gated(act) || Nz % 2 == 0, "bigkernels.dense: a gated "
                    "activation needs an even number of weight rows, got ", Nz);
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), "bigkernels.dense: bias "
                     "dtype ", bias->scalar_type(), " does not match input dtype ",
                     input.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == input.device(), "bigkernels.dense: bias is on ",
                      bias->device(), " but input is on ", input.device());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == Nz, "bigkernels.dense: bias "
                      "must have shape [", Nz, "], got ", bias->sizes());
  }
  const int64_t M = c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
  return {M, K, Nz, is_gated(act) ? Nz / 2 : Nz};
}

at::Tensor gated_preactivation(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& up_weight,
                               const std::optional<at::Tensor>& bias) {
  const int64_t n = weight.size(0);
  at::Tensor z = at::empty({x.size(0), 2 * n}, x.options());
  // BLAS writes each half in place: a row stride of 2n is a leading dimension.
  for (int half = 0; half < 2; ++half) {
    at::Tensor zh = z.narrow(1, half * n, n);
    const at::Tensor& w = half == 0 ? weight : up_weight;
    if (bias.has_value()) {
      at::addmm_out(zh, bias->narrow(0, half * n, n), x, w.t());
    } else {
      at::mm_out(zh, x, w.t());
    }
  }
  return z;
}

std::vector<int64_t> leading_shape_with(const at::Tensor& input, int64_t last) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = last;
  return shape;
}

at::Tensor as_matrix(const at::Tensor& t, int64_t rows, int64_t cols) {
  if (t.dim() == 2 && t.size(0) == rows && t.size(1) == cols) return t.contiguous();
  return t.reshape({rows, cols}).contiguous();
}

at::Tensor with_leading_dims_of(const at::Tensor& input, const at::Tensor& rows) {
  return input.dim() == 2 ? rows : rows.view(leading_shape_with(input, rows.size(1)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward_common(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& saved,
    c10::string_view activation, bool saved_is_output, std::array<bool, 3> output_mask,
    const std::optional<at::Tensor>& up_weight, ActivationBackwardFn activation_backward) {
  const Activation act = parse_activation(activation);
  const DenseShape s = check_dense_args(input, weight, bias, act, up_weight);
  const c10::DeviceGuard guard(input.device());
  const bool grad_output_fits = grad_output.dim() == input.dim() &&
                                grad_output.sizes().slice(0, input.dim() - 1) ==
                                    input.sizes().slice(0, input.dim() - 1) &&
                                grad_output.size(-1) == s.Nout;
  TORCH_CHECK_VALUE(grad_output_fits, "bigkernels.dense_backward: grad_output has shape ",
                    grad_output.sizes(), " but the output has shape ",
                    at::IntArrayRef(leading_shape_with(input, s.Nout)));
  TORCH_CHECK_VALUE(!saved_is_output || derivative_from_output(act), "bigkernels.dense_backward: "
                    "activation '", std::string(activation), "' needs the pre-activation, not the output");

  const at::Tensor x = as_matrix(input, s.M, s.K);
  // BLAS reads the weights in either layout: no copies.
  const at::Tensor& w = weight;
  const at::Tensor up = up_weight.value_or(at::Tensor());
  at::Tensor g = as_matrix(grad_output, s.M, s.Nout);
  if (g.scalar_type() != x.scalar_type()) g = g.to(x.scalar_type());

  at::Tensor grad_preact;
  at::Tensor grad_bias_acc;  // summed in float32 at least (float64 on the CPU, and for double inputs)
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool need_bias = output_mask[2] && bias.has_value();
  if (act == Activation::kNone) {
    grad_preact = g;  // the identity: nothing to fuse
  } else {
    at::Tensor z;  // what the activation derivative is computed from
    const int64_t saved_width = saved_is_output ? s.Nout : s.Nz;
    // An empty `saved` where a non-empty one was due asks for a recompute; an
    // empty one that is due (M or the width is 0) is simply empty.
    if (saved.numel() > 0 || s.M * saved_width == 0) {
      TORCH_CHECK_VALUE(saved.numel() == s.M * saved_width, "bigkernels.dense_backward: saved "
                        "has ", saved.numel(), " elements, expected ", s.M * saved_width);
      z = as_matrix(saved, s.M, saved_width);
    } else {
      // recompute: the caller chose not to keep the pre-activation
      TORCH_CHECK_VALUE(!saved_is_output, "bigkernels.dense_backward: the saved output is empty "
                        "but the output has ", s.M * s.Nout, " elements");
      z = up.defined() ? gated_preactivation(x, w, up, bias)
          : bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
    }
    grad_preact = at::empty({s.M, s.Nz}, x.options());
    if (need_bias) grad_bias_acc = at::empty({s.Nz}, x.options().dtype(acc_dtype));
    activation_backward(g, z, act, saved_is_output, grad_preact,
                        need_bias ? &grad_bias_acc : nullptr);
  }

  // Gradients not asked for come back empty (each its own tensor: outputs must not alias).
  auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_input = none();
  if (output_mask[0] && up.defined()) {  // the two halves of grad_preact through their own weights
    grad_input = at::mm(grad_preact.narrow(1, 0, s.Nout), w);
    grad_input.addmm_(grad_preact.narrow(1, s.Nout, s.Nout), up);
    grad_input = grad_input.view(input.sizes());
  } else if (output_mask[0]) {
    grad_input = at::mm(grad_preact, w).view(input.sizes());
  }
  at::Tensor grad_weight = output_mask[1] ? at::mm(grad_preact.t(), x) : none();
  // ATen's own sum (which accumulates half and bf16 in float anyway): asking
  // it for a float result from bf16 input takes a path 8x slower on the CPU.
  if (need_bias && act == Activation::kNone) grad_bias_acc = g.sum(at::IntArrayRef{0});
  at::Tensor grad_bias = need_bias ? grad_bias_acc.to(x.scalar_type()) : none();
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace bigkernels

TORCH_LIBRARY_FRAGMENT(bigkernels, m) {
  // act(input @ weight.T + bias). `preactivation` is input @ weight.T + bias
  // when save_preactivation is true (backward needs it for some activations),
  // else an empty tensor.
  m.def(
      "dense_forward(Tensor input, Tensor weight, Tensor? bias, str activation, "
      "bool save_preactivation, Tensor? up_weight=None) -> (Tensor output, Tensor preactivation)");
  // Gradients of dense_forward. `saved` is the output when saved_is_output,
  // else the pre-activation, or empty to recompute it. Gradients not asked
  // for in output_mask come back as empty tensors. With an up_weight,
  // grad_weight is that of [weight; up_weight].
  m.def(
      "dense_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, "
      "Tensor saved, str activation, bool saved_is_output, bool[3] output_mask, "
      "Tensor? up_weight=None) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The same gradients through reference.py's differentiable PyTorch ops, for
  // double backward (create_graph=True); implemented in bigkernels/ops/dense.py.
  m.def(
      "dense_backward_reference(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, "
      "str activation, bool[3] output_mask, Tensor? up_weight=None) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}
