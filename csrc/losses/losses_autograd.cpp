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

#include <string>

#include "common/autograd.h"
#include "losses/losses.h"

namespace bigkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, int64_t, double, double, double,
                                                   c10::string_view, int64_t, c10::string_view, bool);
using LossForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, double,
    double, c10::string_view, int64_t, c10::string_view, bool, std::array<bool, 3>);
using LossBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, int64_t, double, double, double, int64_t, c10::string_view, bool, std::array<bool, 3>);

// The gradients the forward computed for a loss gradient of 1, for the
// loss's actual gradient, into result's slots. A gradient of exactly 1
// (loss.backward(), on the CPU) takes them as they are. Any other (a scaled
// or averaged loss) scales them in place, not into copies (a copy of the
// weight's gradient doubled the loss's peak memory); a second backward
// through the same graph would then see them scaled, so it raises instead.
void take_saved_gradients(AutogradContext* ctx, const at::Tensor& grad_loss, const size_t (&slot)[3],
                          variable_list& result) {
  TORCH_CHECK(ctx->saved_data.count("scaled") == 0, "bigkernels: a second backward through a fused loss whose "
              "gradient was not 1 (retain_graph=True) is not supported: its gradients were scaled in place");
  // 1 is known without a sync on the CPU only, and not at all when traced (fake tensors).
  const bool traced =
      grad_loss.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
  const bool one =
      !traced && grad_loss.device().is_cpu() && grad_loss.numel() == 1 && grad_loss.item<double>() == 1.0;
  if (!one) ctx->saved_data["scaled"] = true;
  const variable_list saved = ctx->get_saved_variables();
  const c10::List<bool> wants = ctx->saved_data["wants"].toBoolList();
  for (size_t i = 0; i < 3; ++i) {
    if (!wants[i]) continue;
    at::Tensor g = saved[i];
    if (!one) g.mul_(grad_loss);
    result[slot[i]] = g;
  }
}

struct LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const at::Tensor& target, const std::optional<at::Tensor>& bias, int64_t ignore_index,
                               double label_smoothing, double softcap, double z_loss, c10::string_view reduction,
                               int64_t chunk_rows, c10::string_view method, bool skip_small_gradients,
                               std::array<bool, 3> wants) {
    const bool precompute = (wants[0] || wants[1] || wants[2]) && parse_reduction(reduction) != Reduction::kNone;
    ctx->set_materialize_grads(false);
    ctx->saved_data["precomputed"] = precompute;
    at::Tensor loss, lse;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (precompute) {
      static const auto op = find_op<LossForwardSig>("bigkernels::linear_cross_entropy_forward");
      at::Tensor gi, gw, gb;
      std::tie(loss, lse, gi, gw, gb) = op.call(input, weight, target, bias, ignore_index, label_smoothing, softcap,
                                                z_loss, reduction, chunk_rows, method, skip_small_gradients, wants);
      ctx->save_for_backward({gi, gw, gb});
      ctx->saved_data["wants"] = c10::List<bool>({wants[0], wants[1], wants[2]});
    } else {
      static const auto op = find_op<LossSig>("bigkernels::linear_cross_entropy");
      std::tie(loss, lse) = op.call(input, weight, target, bias, ignore_index, label_smoothing, softcap, z_loss,
                                    reduction, chunk_rows, method, skip_small_gradients);
      ctx->save_for_backward({input, weight, target, bias.value_or(at::Tensor()), lse});
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["label_smoothing"] = label_smoothing;
      ctx->saved_data["softcap"] = softcap;
      ctx->saved_data["z_loss"] = z_loss;
      ctx->saved_data["chunk_rows"] = chunk_rows;
      ctx->saved_data["method"] = std::string(method);
      ctx->saved_data["skip_small_gradients"] = skip_small_gradients;
    }
    ctx->mark_non_differentiable({lse});  // documented: the lse comes without a gradient
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    variable_list result(13);  // input, weight, target, bias, and the 9 non-tensor arguments
    if (!grad_loss.defined()) return result;
    TORCH_CHECK(!at::GradMode::is_enabled(), "bigkernels.linear_cross_entropy: the gradient is not itself "
                "differentiable (create_graph=True is not supported)");
    if (ctx->saved_data["precomputed"].toBool()) {
      take_saved_gradients(ctx, grad_loss, {0, 1, 3}, result);  // input, weight, bias
      return result;
    }
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> bias = optional_tensor(saved[3]);
    const std::array<bool, 4> by_argument = needs_grad_by_argument<4>(ctx, {true, true, true, bias.has_value()});
    const std::array<bool, 3> needs = {by_argument[0], by_argument[1], by_argument[3]};  // target has none
    static const auto op = find_op<LossBackwardSig>("bigkernels::linear_cross_entropy_backward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gi, gw, gb] = op.call(grad_loss, saved[0], saved[1], saved[2], bias, saved[4],
                                ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["label_smoothing"].toDouble(),
                                ctx->saved_data["softcap"].toDouble(), ctx->saved_data["z_loss"].toDouble(),
                                ctx->saved_data["chunk_rows"].toInt(), ctx->saved_data["method"].toStringRef(),
                                ctx->saved_data["skip_small_gradients"].toBool(), needs);
    if (needs[0]) result[0] = gi;
    if (needs[1]) result[1] = gw;
    if (needs[2]) result[3] = gb;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_autograd(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target, const std::optional<at::Tensor>& bias,
    int64_t ignore_index, double label_smoothing, double softcap, double z_loss, c10::string_view reduction,
    int64_t chunk_rows, c10::string_view method, bool skip_small_gradients) {
  // Decided here: inside forward, autograd has turned grad mode off.
  const bool on = at::GradMode::is_enabled();
  const std::array<bool, 3> wants = {on && input.requires_grad(), on && weight.requires_grad(),
                                     on && bias.has_value() && bias->requires_grad()};
  const variable_list out = LinearCrossEntropyFunction::apply(input, weight, target, bias, ignore_index,
                                                              label_smoothing, softcap, z_loss, reduction,
                                                              chunk_rows, method, skip_small_gradients, wants);
  return {out[0], out[1]};
}

using DistillSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, double, double, double, int64_t, c10::string_view,
                              int64_t, c10::string_view);
using DistillForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double, double, int64_t,
    c10::string_view, int64_t, c10::string_view, const std::optional<at::Tensor>&, std::array<bool, 3>);

// Distillation: the same scheme. Gradients reach the student's input, weight
// and bias only; the teacher is read, never differentiated.
struct LinearDistillationFunction : public torch::autograd::Function<LinearDistillationFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student_input, const at::Tensor& student_weight,
                               const at::Tensor& teacher_input, const at::Tensor& teacher_weight,
                               const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& student_bias,
                               const std::optional<at::Tensor>& teacher_bias, double temperature, double beta,
                               double hard_weight, int64_t ignore_index, c10::string_view reduction,
                               int64_t chunk_rows, c10::string_view method, std::array<bool, 3> wants) {
    const bool precompute = (wants[0] || wants[1] || wants[2]) && parse_reduction(reduction) != Reduction::kNone;
    ctx->set_materialize_grads(false);
    ctx->saved_data["precomputed"] = precompute;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (precompute) {
      static const auto op = find_op<DistillForwardSig>("bigkernels::linear_distillation_loss_forward");
      auto [loss, gi, gw, gb] = op.call(student_input, student_weight, teacher_input, teacher_weight, target,
                                        student_bias, teacher_bias, temperature, beta, hard_weight, ignore_index,
                                        reduction, chunk_rows, method, std::nullopt, wants);
      ctx->save_for_backward({gi, gw, gb});
      ctx->saved_data["wants"] = c10::List<bool>({wants[0], wants[1], wants[2]});
      return {loss};
    }
    static const auto op = find_op<DistillSig>("bigkernels::linear_distillation_loss");
    at::Tensor loss = op.call(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                              teacher_bias, temperature, beta, hard_weight, ignore_index, reduction, chunk_rows,
                              method);
    ctx->save_for_backward({student_input, student_weight, teacher_input, teacher_weight,
                            target.value_or(at::Tensor()), student_bias.value_or(at::Tensor()),
                            teacher_bias.value_or(at::Tensor())});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["hard_weight"] = hard_weight;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["chunk_rows"] = chunk_rows;
    ctx->saved_data["method"] = std::string(method);
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    variable_list result(15);  // the 7 tensors, then the 8 other arguments
    if (!grad_loss.defined()) return result;
    TORCH_CHECK(!at::GradMode::is_enabled(), "bigkernels.linear_distillation_loss: the gradient is not itself "
                "differentiable (create_graph=True is not supported)");
    const size_t slot[3] = {0, 1, 5};  // student_input, student_weight, student_bias
    if (ctx->saved_data["precomputed"].toBool()) {
      take_saved_gradients(ctx, grad_loss, slot, result);
      return result;
    }
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> target = optional_tensor(saved[4]), student_bias = optional_tensor(saved[5]),
                                    teacher_bias = optional_tensor(saved[6]);
    const std::array<bool, 7> by_argument = needs_grad_by_argument<7>(
        ctx, {true, true, true, true, target.has_value(), student_bias.has_value(), teacher_bias.has_value()});
    const std::array<bool, 3> needs = {by_argument[0], by_argument[1], by_argument[5]};
    static const auto op = find_op<DistillForwardSig>("bigkernels::linear_distillation_loss_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, gi, gw, gb] = op.call(
        saved[0], saved[1], saved[2], saved[3], target, student_bias, teacher_bias,
        ctx->saved_data["temperature"].toDouble(), ctx->saved_data["beta"].toDouble(),
        ctx->saved_data["hard_weight"].toDouble(), ctx->saved_data["ignore_index"].toInt(), "none",
        ctx->saved_data["chunk_rows"].toInt(), ctx->saved_data["method"].toStringRef(), grad_loss, needs);
    const at::Tensor* got[3] = {&gi, &gw, &gb};
    for (size_t i = 0; i < 3; ++i) {
      if (needs[i]) result[slot[i]] = *got[i];
    }
    return result;
  }
};

at::Tensor linear_distillation_loss_autograd(const at::Tensor& student_input, const at::Tensor& student_weight,
                                             const at::Tensor& teacher_input, const at::Tensor& teacher_weight,
                                             const std::optional<at::Tensor>& target,
                                             const std::optional<at::Tensor>& student_bias,
                                             const std::optional<at::Tensor>& teacher_bias, double temperature,
                                             double beta, double hard_weight, int64_t ignore_index,
                                             c10::string_view reduction, int64_t chunk_rows,
                                             c10::string_view method) {
  const bool on = at::GradMode::is_enabled();
  const std::array<bool, 3> wants = {on && student_input.requires_grad(), on && student_weight.requires_grad(),
                                     on && student_bias.has_value() && student_bias->requires_grad()};
  return LinearDistillationFunction::apply(student_input, student_weight, teacher_input, teacher_weight, target,
                                           student_bias, teacher_bias, temperature, beta, hard_weight, ignore_index,
                                           reduction, chunk_rows, method, wants)[0];
}

}  // namespace
}  // namespace bigkernels

TORCH_LIBRARY_IMPL(bigkernels, Autograd, m) {
  m.impl("linear_cross_entropy", &bigkernels::linear_cross_entropy_autograd);
  m.impl("linear_distillation_loss", &bigkernels::linear_distillation_loss_autograd);
}
