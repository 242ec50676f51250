// Autograd for rnn_layer_forward, in C++ (see common/autograd.h for why).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>

#include "common/autograd.h"

namespace bigkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Tensor8 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor>;

using RnnForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const at::Tensor&, const OptTensor&, c10::string_view, bool, bool);
using RnnBackwardSig = Tensor8(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                               const OptTensor&, const OptTensor&, const at::Tensor&, const OptTensor&,
                               const at::Tensor&, const at::Tensor&, c10::string_view, bool, std::array<bool, 3>);
using RnnBackwardReferenceSig = Tensor8(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                        const OptTensor&, const OptTensor&, const at::Tensor&, const OptTensor&,
                                        c10::string_view, bool, std::array<bool, 8>);

// The differentiable tensors, in the op's argument order (batch_sizes, an
// integer tensor, is not one of them).
enum Arg { kInput, kWeightIh, kWeightHh, kBiasIh, kBiasHh, kWeightHr, kHx, kCx, kArgs };

struct RnnLayerFunction : public torch::autograd::Function<RnnLayerFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& batch_sizes,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                               const OptTensor& b_hh, const OptTensor& w_hr, const at::Tensor& hx,
                               const OptTensor& cx, c10::string_view mode, bool reverse, bool train) {
    static const auto op = find_op<RnnForwardSig>("bigkernels::rnn_layer_forward");
    at::Tensor output, hy, cy, workspace;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, hy, cy, workspace) =
          op.call(input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, mode, reverse, train);
    }
    // Undefined incoming gradients stay undefined (the backward makes zeros
    // only for the three it passes on, never for the workspace).
    ctx->set_materialize_grads(false);
    const bool lstm = mode == "lstm";  // only an LSTM has a cell state
    ctx->mark_non_differentiable(lstm ? variable_list{workspace} : variable_list{cy, workspace});
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["reverse"] = reverse;
    auto or_undefined = [](const OptTensor& t) { return t.value_or(at::Tensor()); };
    ctx->save_for_backward({input, or_undefined(batch_sizes), w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh),
                            or_undefined(w_hr), hx, or_undefined(cx), output, workspace});
    return {output, hy, cy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &input = s[0], &w_ih = s[2], &w_hh = s[3], &hx = s[7], &output = s[9];
    const OptTensor batch_sizes = optional_tensor(s[1]), b_ih = optional_tensor(s[4]), b_hh = optional_tensor(s[5]),
                    w_hr = optional_tensor(s[6]), cx = optional_tensor(s[8]);
    // Edges in argument order: input, batch_sizes (when given), the weights, hx, cx.
    const std::array<bool, 9> by_argument = needs_grad_by_argument<9>(
        ctx, {true, batch_sizes.has_value(), true, true, b_ih.has_value(), b_hh.has_value(), w_hr.has_value(),
              true, cx.has_value()});
    std::array<bool, kArgs> needs{};
    for (int a = 0; a < kArgs; ++a) needs[a] = by_argument[a == kInput ? 0 : a + 1];

    variable_list result(12);  // one per argument of forward
    if (!std::any_of(needs.begin(), needs.end(), [](bool b) { return b; })) return result;
    auto or_zeros = [](const at::Tensor& grad, const at::Tensor& like) {
      return grad.defined() ? grad : at::zeros_like(like);
    };
    const at::Tensor grad_output = or_zeros(grads[0], output), grad_hy = or_zeros(grads[1], hx);
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    const at::Tensor grad_cy = mode == "lstm" ? or_zeros(grads[2], *cx) : at::empty({0}, hx.options());
    const bool reverse = ctx->saved_data["reverse"].toBool();
    Tensor8 g;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a backward that is differentiable
      static const auto op = find_op<RnnBackwardReferenceSig>("bigkernels::rnn_layer_backward_reference");
      g = op.call(grad_output, grad_hy, grad_cy, input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, mode,
                  reverse, needs);
    } else {
      static const auto op = find_op<RnnBackwardSig>("bigkernels::rnn_layer_backward");
      const bool any_weight = needs[kWeightIh] || needs[kWeightHh] || needs[kBiasIh] || needs[kBiasHh] ||
                              needs[kWeightHr];
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // not boxed through autograd's fallback
      g = op.call(grad_output, grad_hy, grad_cy, input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, output,
                  s[10], mode, reverse, {needs[kInput], any_weight, needs[kHx] || needs[kCx]});
    }
    const at::Tensor grad[kArgs] = {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g),
                                    std::get<4>(g), std::get<5>(g), std::get<6>(g), std::get<7>(g)};
    for (int a = 0; a < kArgs; ++a) {
      if (needs[a]) result[a == kInput ? 0 : a + 1] = grad[a];  // forward's argument 1 is batch_sizes
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_forward_autograd(
    const at::Tensor& input, const OptTensor& batch_sizes, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const at::Tensor& hx, const OptTensor& cx,
    c10::string_view mode, bool reverse, bool train) {
  const variable_list out =
      RnnLayerFunction::apply(input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, mode, reverse, train);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace bigkernels

TORCH_LIBRARY_IMPL(bigkernels, Autograd, m) {
  m.impl("rnn_layer_forward", &bigkernels::rnn_layer_forward_autograd);
}
