// Autograd for linear_cross_entropy, in C++ (see common/autograd.h for why).
//
// With reduction 'mean' or 'sum' and a gradient wanted, the forward computes
// the gradients in the same pass as the loss (linear_cross_entropy_forward),
// as Liger's fused loss does: the logits are made once, and the backward only
// scales them by the loss's gradient. With 'none' the rows' weights are known
// only in the backward, which computes each chunk's logits again
// (linear_cross_entropy_backward, from the forward's lse).
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include "common/autograd.h"
#include "losses/losses.h"

namespace bigkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, int64_t, double, double, double,
                                                   c10::string_view, int64_t);
using LossForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, double,
    double, c10::string_view, int64_t, std::array<bool, 3>);
using LossBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, int64_t, double, double, double, int64_t, std::array<bool, 3>);

struct LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const at::Tensor& target, const std::optional<at::Tensor>& bias, int64_t ignore_index,
                               double label_smoothing, double softcap, double z_loss, c10::string_view reduction,
                               int64_t chunk_rows, std::array<bool, 3> wants) {
    const bool precompute = (wants[0] || wants[1] || wants[2]) && parse_reduction(reduction) != Reduction::kNone;
    ctx->set_materialize_grads(false);
    ctx->saved_data["precomputed"] = precompute;
    at::Tensor loss, lse;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (precompute) {
      static const auto op = find_op<LossForwardSig>("bigkernels::linear_cross_entropy_forward");
      at::Tensor gi, gw, gb;
      std::tie(loss, lse, gi, gw, gb) = op.call(input, weight, target, bias, ignore_index, label_smoothing, softcap,
                                                z_loss, reduction, chunk_rows, wants);
      ctx->save_for_backward({gi, gw, gb});
      ctx->saved_data["wants"] = c10::List<bool>({wants[0], wants[1], wants[2]});
    } else {
      static const auto op = find_op<LossSig>("bigkernels::linear_cross_entropy");
      std::tie(loss, lse) = op.call(input, weight, target, bias, ignore_index, label_smoothing, softcap, z_loss,
                                    reduction, chunk_rows);
      ctx->save_for_backward({input, weight, target, bias.value_or(at::Tensor()), lse});
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["label_smoothing"] = label_smoothing;
      ctx->saved_data["softcap"] = softcap;
      ctx->saved_data["z_loss"] = z_loss;
      ctx->saved_data["chunk_rows"] = chunk_rows;
    }
    ctx->mark_non_differentiable({lse});  // documented: the lse comes without a gradient
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    variable_list result(11);  // input, weight, target, bias, and the 7 non-tensor arguments
    if (!grad_loss.defined()) return result;
    TORCH_CHECK(!at::GradMode::is_enabled(), "bigkernels.linear_cross_entropy: the gradient is not itself "
                "differentiable (create_graph=True is not supported)");
    const variable_list saved = ctx->get_saved_variables();
    if (ctx->saved_data["precomputed"].toBool()) {
      // On the CPU a gradient of exactly 1 (loss.backward()) returns them as
      // they are (a pass over the weight's gradient saved). Not when traced
      // (fake tensors: the value is unknown) nor on a GPU (a sync).
      const bool traced = grad_loss.key_set().has_any(
          c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
      const bool one = !traced && grad_loss.device().is_cpu() && grad_loss.numel() == 1 &&
                       grad_loss.item<double>() == 1.0;
      const c10::List<bool> wants = ctx->saved_data["wants"].toBoolList();
      const size_t slot[3] = {0, 1, 3};
      for (size_t i = 0; i < 3; ++i) {
        if (wants[i]) result[slot[i]] = one ? saved[i] : at::mul(saved[i], grad_loss);
      }
      return result;
    }
    const std::optional<at::Tensor> bias = optional_tensor(saved[3]);
    const std::array<bool, 4> by_argument = needs_grad_by_argument<4>(ctx, {true, true, true, bias.has_value()});
    const std::array<bool, 3> needs = {by_argument[0], by_argument[1], by_argument[3]};  // target has none
    static const auto op = find_op<LossBackwardSig>("bigkernels::linear_cross_entropy_backward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gi, gw, gb] = op.call(grad_loss, saved[0], saved[1], saved[2], bias, saved[4],
                                ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["label_smoothing"].toDouble(),
                                ctx->saved_data["softcap"].toDouble(), ctx->saved_data["z_loss"].toDouble(),
                                ctx->saved_data["chunk_rows"].toInt(), needs);
    if (needs[0]) result[0] = gi;
    if (needs[1]) result[1] = gw;
    if (needs[2]) result[3] = gb;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_autograd(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target, const std::optional<at::Tensor>& bias,
    int64_t ignore_index, double label_smoothing, double softcap, double z_loss, c10::string_view reduction,
    int64_t chunk_rows) {
  // Decided here: inside forward, autograd has turned grad mode off.
  const bool on = at::GradMode::is_enabled();
  const std::array<bool, 3> wants = {on && input.requires_grad(), on && weight.requires_grad(),
                                     on && bias.has_value() && bias->requires_grad()};
  const variable_list out = LinearCrossEntropyFunction::apply(input, weight, target, bias, ignore_index,
                                                              label_smoothing, softcap, z_loss, reduction,
                                                              chunk_rows, wants);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace bigkernels

TORCH_LIBRARY_IMPL(bigkernels, Autograd, m) {
  m.impl("linear_cross_entropy", &bigkernels::linear_cross_entropy_autograd);
}
