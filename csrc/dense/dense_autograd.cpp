// Autograd for dense_forward, in C++ (see common/autograd.h for why).
#include <torch/library.h>

#include "common/autograd.h"
#include "dense/dense.h"

namespace bigkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using DenseForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, bool,
    const std::optional<at::Tensor>&);
using DenseBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, c10::string_view, bool, std::array<bool, 3>, const std::optional<at::Tensor>&);
using DenseBackwardReferenceSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    c10::string_view, std::array<bool, 3>, const std::optional<at::Tensor>&);

struct DenseFunction : public torch::autograd::Function<DenseFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, c10::string_view activation,
                               bool save_preactivation, const std::optional<at::Tensor>& up_weight) {
    static const auto op = find_op<DenseForwardSig>("bigkernels::dense_forward");
    at::Tensor out, preact;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, preact) = op.call(input, weight, bias, activation, save_preactivation, up_weight);
    }
    // What the activation's derivative is computed from ("none" needs nothing).
    const Activation act = parse_activation(activation);
    const bool saved_is_output = act != Activation::kNone && derivative_from_output(act);
    ctx->set_materialize_grads(false);  // preact never gets a gradient: don't fill zeros for it
    ctx->mark_non_differentiable({preact});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["saved_is_output"] = saved_is_output;
    // preact is empty when it was not kept: the backward then recomputes it.
    ctx->save_for_backward({input, weight, bias.value_or(at::Tensor()), saved_is_output ? out : preact,
                            up_weight.value_or(at::Tensor())});
    return {out, preact};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_output = grads[0];
    variable_list result(6);  // input, weight, bias, activation, save_preactivation, up_weight
    if (!grad_output.defined()) return result;  // no gradient flows in
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1];
    const std::optional<at::Tensor> bias = optional_tensor(saved[2]);
    const std::optional<at::Tensor> up_weight = optional_tensor(saved[4]);
    const std::array<bool, 4> needs =
        needs_grad_by_argument<4>(ctx, {true, true, bias.has_value(), up_weight.has_value()});
    // The ops compute the gradient of [weight; up_weight] when either wants one.
    const std::array<bool, 3> mask = {needs[0], needs[1] || needs[3], needs[2]};
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    std::tuple<at::Tensor, at::Tensor, at::Tensor> g;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a backward that is differentiable
      static const auto op = find_op<DenseBackwardReferenceSig>("bigkernels::dense_backward_reference");
      g = op.call(grad_output, input, weight, bias, activation, mask, up_weight);
    } else {
      static const auto op = find_op<DenseBackwardSig>("bigkernels::dense_backward");
      // Straight to the device kernel: through autograd's not-implemented
      // fallback the call is boxed, which cost a few microseconds here.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      g = op.call(grad_output, input, weight, bias, saved[3], activation,
                  ctx->saved_data["saved_is_output"].toBool(), mask, up_weight);
    }
    if (needs[0]) result[0] = std::get<0>(g);
    if (needs[2]) result[2] = std::get<2>(g);
    const at::Tensor& grad_weight = std::get<1>(g);
    if (!up_weight.has_value()) {
      if (needs[1]) result[1] = grad_weight;
    } else {  // the halves of [weight; up_weight]'s gradient, as views
      const int64_t rows = weight.size(0);
      if (needs[1]) result[1] = grad_weight.narrow(0, 0, rows);
      if (needs[3]) result[5] = grad_weight.narrow(0, rows, rows);
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> dense_forward_autograd(const at::Tensor& input, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          c10::string_view activation, bool save_preactivation,
                                                          const std::optional<at::Tensor>& up_weight) {
  const variable_list out = DenseFunction::apply(input, weight, bias, activation, save_preactivation, up_weight);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace bigkernels

TORCH_LIBRARY_IMPL(bigkernels, Autograd, m) {
  m.impl("dense_forward", &bigkernels::dense_forward_autograd);
}
