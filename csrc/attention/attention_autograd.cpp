// Autograd for attention_forward, in C++ (see common/autograd.h for why).
#include <torch/library.h>

#include "common/autograd.h"

namespace bigkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using AttentionForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, int64_t,
    int64_t, int64_t, double, int64_t, double, const std::optional<at::Tensor>&);
using AttentionBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t, double, int64_t, bool, double,
    const std::optional<at::Tensor>&);
using AttentionBackwardReferenceSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    double, int64_t, int64_t, int64_t, std::array<bool, 4>, double, const std::optional<at::Tensor>&);

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& attn_mask, double scale,
                               int64_t window_left, int64_t window_right, int64_t diagonal_offset, double dropout_p,
                               int64_t dropout_seed, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
    static const auto op = find_op<AttentionForwardSig>("bigkernels::attention_forward");
    at::Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, lse) = op.call(query, key, value, attn_mask, scale, window_left, window_right,
                                   diagonal_offset, dropout_p, dropout_seed, softcap, alibi_slopes);
    }
    ctx->set_materialize_grads(false);  // lse never gets a gradient: don't fill zeros for it
    ctx->mark_non_differentiable({lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["diagonal_offset"] = diagonal_offset;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["dropout_seed"] = dropout_seed;
    ctx->saved_data["softcap"] = softcap;
    ctx->save_for_backward({query, key, value, attn_mask.value_or(at::Tensor()), out, lse,
                            alibi_slopes.value_or(at::Tensor())});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_output = grads[0];
    variable_list result(12);  // query, key, value, attn_mask, six numbers, softcap, alibi_slopes (none)
    if (!grad_output.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &query = saved[0], &key = saved[1], &value = saved[2];
    const std::optional<at::Tensor> attn_mask = optional_tensor(saved[3]);
    // A float mask that requires grad gets one; a bool mask cannot.
    const std::array<bool, 4> needs = needs_grad_by_argument<4>(ctx, {true, true, true, attn_mask.has_value()});
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t left = ctx->saved_data["window_left"].toInt();
    const int64_t right = ctx->saved_data["window_right"].toInt();
    const int64_t offset = ctx->saved_data["diagonal_offset"].toInt();
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    const double softcap = ctx->saved_data["softcap"].toDouble();
    const std::optional<at::Tensor> alibi_slopes = optional_tensor(saved[6]);
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> g;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a backward that is differentiable
      TORCH_CHECK_NOT_IMPLEMENTED(dropout_p == 0, "bigkernels.scaled_dot_product_attention: double backward "
                                  "(create_graph=True) with dropout_p > 0 is not supported");
      static const auto op =
          find_op<AttentionBackwardReferenceSig>("bigkernels::attention_backward_reference");
      g = op.call(grad_output, query, key, value, attn_mask, scale, left, right, offset, needs, softcap,
                  alibi_slopes);
    } else {
      static const auto op = find_op<AttentionBackwardSig>("bigkernels::attention_backward");
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // not boxed through autograd's fallback
      g = op.call(grad_output, query, key, value, attn_mask, saved[4], saved[5], scale, left, right, offset,
                  dropout_p, ctx->saved_data["dropout_seed"].toInt(), needs[3], softcap, alibi_slopes);
    }
    if (needs[0]) result[0] = std::get<0>(g);
    if (needs[1]) result[1] = std::get<1>(g);
    if (needs[2]) result[2] = std::get<2>(g);
    if (needs[3]) result[3] = std::get<3>(g);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> attention_forward_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double scale, int64_t window_left, int64_t window_right,
    int64_t diagonal_offset, double dropout_p, int64_t dropout_seed, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  const variable_list out = AttentionFunction::apply(query, key, value, attn_mask, scale, window_left, window_right,
                                                     diagonal_offset, dropout_p, dropout_seed, softcap, alibi_slopes);
  return {out[0], out[1]};
}

using VarlenForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
    double, int64_t, int64_t, double, int64_t, double, const std::optional<at::Tensor>&);
using VarlenBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t, int64_t, const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, double, int64_t, double,
    const std::optional<at::Tensor>&);

struct VarlenAttentionFunction : public torch::autograd::Function<VarlenAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                               int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
                               int64_t window_right, double dropout_p, int64_t dropout_seed, double softcap,
                               const std::optional<at::Tensor>& alibi_slopes) {
    static const auto op = find_op<VarlenForwardSig>("bigkernels::varlen_attention_forward");
    at::Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, lse) = op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                   window_left, window_right, dropout_p, dropout_seed, softcap, alibi_slopes);
    }
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({lse});
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["dropout_seed"] = dropout_seed;
    ctx->saved_data["softcap"] = softcap;
    ctx->save_for_backward({query, key, value, cu_seqlens_q, cu_seqlens_k, out, lse,
                            alibi_slopes.value_or(at::Tensor())});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(14);  // query, key, value; the rest take none
    if (!grads[0].defined()) return result;
    TORCH_CHECK_NOT_IMPLEMENTED(!at::GradMode::is_enabled(), "bigkernels.varlen_attention: double backward "
                                "(create_graph=True) is not supported");
    const variable_list saved = ctx->get_saved_variables();
    static const auto op = find_op<VarlenBackwardSig>("bigkernels::varlen_attention_backward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_q, grad_k, grad_v] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["max_seqlen_q"].toInt(),
                ctx->saved_data["max_seqlen_k"].toInt(), saved[5], saved[6], ctx->saved_data["scale"].toDouble(),
                ctx->saved_data["window_left"].toInt(), ctx->saved_data["window_right"].toInt(),
                ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["dropout_seed"].toInt(),
                ctx->saved_data["softcap"].toDouble(), optional_tensor(saved[7]));
    const std::array<bool, 3> needs = needs_grad_by_argument<3>(ctx, {true, true, true});
    if (needs[0]) result[0] = grad_q;
    if (needs[1]) result[1] = grad_k;
    if (needs[2]) result[2] = grad_v;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
    int64_t window_right, double dropout_p, int64_t dropout_seed, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  const variable_list out =
      VarlenAttentionFunction::apply(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                     window_left, window_right, dropout_p, dropout_seed, softcap, alibi_slopes);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace bigkernels

TORCH_LIBRARY_IMPL(bigkernels, Autograd, m) {
  m.impl("attention_forward", &bigkernels::attention_forward_autograd);
  m.impl("varlen_attention_forward", &bigkernels::varlen_attention_forward_autograd);
}
