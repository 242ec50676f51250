// The RNN family's ops (schemas), argument checks and step plan.
#include "rnn/rnn.h"

#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <string>

namespace bigkernels {

RnnMode parse_rnn_mode(c10::string_view name) {
  if (name == "rnn_tanh") return RnnMode::kTanh;
  if (name == "rnn_relu") return RnnMode::kReLU;
  if (name == "lstm") return RnnMode::kLSTM;
  if (name == "gru") return RnnMode::kGRU;
  TORCH_CHECK_VALUE(false, "bigkernels.rnn: unknown mode '", std::string(name),
                    "'; expected one of: rnn_tanh rnn_relu lstm gru");
}

namespace {

void check_like(const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), "bigkernels.rnn: ", name, " dtype ",
                   t.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(t.device() == input.device(), "bigkernels.rnn: ", name, " is on ", t.device(),
                    " but input is on ", input.device());
}

void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "bigkernels.rnn: ", name, " must have shape ", expected,
                    ", got ", t.sizes());
}

}  // namespace

RnnShape check_rnn_args(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                        const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                        const at::Tensor& hx, const std::optional<at::Tensor>& cx, c10::string_view mode_name) {
  const RnnMode mode = parse_rnn_mode(mode_name);
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()),
                   "bigkernels.rnn: input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() == 2, "bigkernels.rnn: input must be 2-d [rows, input_size] (packed "
                    "time-major), got shape ", input.sizes());
  check_like("weight_ih", w_ih, input);
  check_like("weight_hh", w_hh, input);
  check_like("hx", hx, input);
  TORCH_CHECK_VALUE(w_hh.dim() == 2 && w_hh.size(0) % rnn_gates(mode) == 0 && w_hh.size(0) > 0,
                    "bigkernels.rnn: weight_hh must be 2-d [", rnn_gates(mode), " * hidden_size, ...], got shape ",
                    w_hh.sizes());
  RnnShape s{};
  s.mode = mode;
  s.N = input.size(0);
  s.I = input.size(1);
  s.H = w_hh.size(0) / rnn_gates(mode);
  s.Hout = w_hr.has_value() ? w_hr->size(0) : s.H;
  const int64_t GH = rnn_gates(mode) * s.H;
  if (w_hr.has_value()) {
    TORCH_CHECK_VALUE(mode == RnnMode::kLSTM, "bigkernels.rnn: weight_hr (proj_size) is for lstm only");
    check_like("weight_hr", *w_hr, input);
    TORCH_CHECK_VALUE(w_hr->dim() == 2 && w_hr->size(0) >= 1 && w_hr->size(0) < s.H,
                      "bigkernels.rnn: weight_hr must be [proj_size, hidden_size] with 0 < proj_size < "
                      "hidden_size = ", s.H, ", got shape ", w_hr->sizes());
    check_shape("weight_hr", *w_hr, {s.Hout, s.H});
  }
  check_shape("weight_ih", w_ih, {GH, s.I});
  check_shape("weight_hh", w_hh, {GH, s.Hout});
  TORCH_CHECK_VALUE(b_ih.has_value() == b_hh.has_value(),
                    "bigkernels.rnn: bias_ih and bias_hh must both be given or both be None");
  if (b_ih.has_value()) {
    check_like("bias_ih", *b_ih, input);
    check_like("bias_hh", *b_hh, input);
    check_shape("bias_ih", *b_ih, {GH});
    check_shape("bias_hh", *b_hh, {GH});
  }
  TORCH_CHECK_VALUE(hx.dim() == 2 && hx.size(0) >= 1, "bigkernels.rnn: hx must be [batch, ", s.Hout,
                    "] with batch >= 1, got shape ", hx.sizes());
  s.B = hx.size(0);
  check_shape("hx", hx, {s.B, s.Hout});
  if (mode == RnnMode::kLSTM) {
    TORCH_CHECK_VALUE(cx.has_value(), "bigkernels.rnn: lstm needs cx");
    check_like("cx", *cx, input);
    check_shape("cx", *cx, {s.B, s.H});
  } else {
    TORCH_CHECK_VALUE(!cx.has_value(), "bigkernels.rnn: cx is for lstm only");
  }
  if (batch_sizes.has_value()) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK_VALUE(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1 && bs.numel() >= 1,
                      "bigkernels.rnn: batch_sizes must be a non-empty 1-d int64 CPU tensor, got ",
                      bs.scalar_type(), " of shape ", bs.sizes(), " on ", bs.device());
    const at::Tensor c = bs.contiguous();
    const int64_t* b = c.const_data_ptr<int64_t>();
    int64_t rows = 0;
    for (int64_t t = 0; t < c.numel(); ++t) {
      TORCH_CHECK_VALUE(b[t] >= 1 && (t == 0 || b[t] <= b[t - 1]),
                        "bigkernels.rnn: batch_sizes must be >= 1 and never grow, got ", at::IntArrayRef(b, c.numel()));
      rows += b[t];
    }
    TORCH_CHECK_VALUE(b[0] == s.B, "bigkernels.rnn: batch_sizes[0] = ", b[0], " but hx has batch ", s.B);
    TORCH_CHECK_VALUE(rows == s.N, "bigkernels.rnn: batch_sizes sum to ", rows, " but input has ", s.N, " rows");
    s.T = c.numel();
  } else {
    TORCH_CHECK_VALUE(s.N >= 1 && s.N % s.B == 0, "bigkernels.rnn: input has ", s.N,
                      " rows, not a positive multiple of the batch ", s.B, " (hx.size(0))");
    s.T = s.N / s.B;
  }
  return s;
}

void check_rnn_backward_args(const RnnShape& s, const at::Tensor& grad_output, const at::Tensor& grad_hy,
                             const at::Tensor& grad_cy, const at::Tensor& output, const at::Tensor& workspace) {
  check_shape("grad_output", grad_output, {s.N, s.Hout});
  check_shape("output", output, {s.N, s.Hout});
  check_shape("grad_hy", grad_hy, {s.B, s.Hout});
  if (s.mode == RnnMode::kLSTM) check_shape("grad_cy", grad_cy, {s.B, s.H});
  check_shape("workspace", workspace, {s.N, rnn_workspace_width(s.mode, s.H)});
  for (const at::Tensor* t : {&grad_output, &grad_hy, &output}) {
    TORCH_CHECK_VALUE(t->device() == workspace.device(), "bigkernels.rnn_backward: tensors on ", t->device(),
                      " and ", workspace.device());
  }
}

RnnPlan make_rnn_plan(const RnnShape& s, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  RnnPlan plan;
  plan.reverse = reverse;
  plan.batch.assign(s.T, s.B);
  if (batch_sizes.has_value()) {
    const at::Tensor c = batch_sizes->contiguous();
    plan.batch.assign(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + s.T);
  }
  plan.offset.resize(s.T);
  int64_t rows = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    plan.offset[t] = rows;
    rows += plan.batch[t];
  }
  return plan;
}

std::tuple<at::Tensor, at::Tensor> rnn_projection_biases(const std::optional<at::Tensor>& b_ih,
                                                         const std::optional<at::Tensor>& b_hh, RnnMode mode,
                                                         at::ScalarType acc) {
  if (!b_ih.has_value()) return {at::Tensor(), at::Tensor()};
  if (mode == RnnMode::kGRU) return {b_ih->to(acc), b_hh->to(acc).contiguous()};
  return {at::add(b_ih->to(acc), b_hh->to(acc)), at::Tensor()};
}

std::vector<int64_t> rnn_previous_rows(const RnnPlan& plan, int64_t N) {
  std::vector<int64_t> rows(N);
  for (int64_t step = 0; step < plan.steps(); ++step) {
    const int64_t t = plan.time(step), from_prev = plan.prev_rows(step);
    const int64_t prev_offset = step > 0 ? plan.offset[plan.time(step - 1)] : 0;
    for (int64_t b = 0; b < plan.batch[t]; ++b) rows[plan.offset[t] + b] = b < from_prev ? prev_offset + b : N + b;
  }
  return rows;
}

std::vector<int64_t> rnn_final_rows(const RnnPlan& plan, int64_t B) {
  std::vector<int64_t> rows(B);
  for (int64_t step = 0; step < plan.steps(); ++step) {
    const int64_t t = plan.time(step);
    for (int64_t b = 0; b < plan.batch[t]; ++b) rows[b] = plan.offset[t] + b;
  }
  return rows;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_gemm_grads(
    const at::Tensor& dgates_x, const at::Tensor& dgates_h, const at::Tensor& h_prev, const at::Tensor& input,
    const at::Tensor& w_ih, bool has_bias, RnnMode mode, std::array<bool, 3> output_mask, const RnnGemm& gemm) {
  const at::ScalarType dtype = input.scalar_type();
  const auto none = [&] { return at::empty({0}, input.options()); };
  const auto mm = [&](const at::Tensor& a, const at::Tensor& b) { return gemm(a, b).to(dtype); };
  at::Tensor grad_input = output_mask[0] ? mm(dgates_x, w_ih) : none();
  at::Tensor grad_w_ih = none(), grad_w_hh = none(), grad_b_ih = none(), grad_b_hh = none();
  if (output_mask[1]) {
    grad_w_ih = mm(dgates_x.t(), input);
    grad_w_hh = mm(dgates_h.t(), h_prev);
    if (has_bias) {
      grad_b_ih = dgates_x.sum(0).to(dtype);
      grad_b_hh = mode == RnnMode::kGRU ? dgates_h.sum(0).to(dtype) : grad_b_ih.clone();
    }
  }
  return {grad_input, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace bigkernels

TORCH_LIBRARY_FRAGMENT(bigkernels, m) {
  // One layer, one direction, the whole (packed) sequence: output [N, Hout],
  // hy [B, Hout], cy [B, H] (lstm; else empty), and the workspace backward
  // needs ([N, rnn_workspace_width] in the accumulator type; empty unless train).
  m.def("rnn_layer_forward(Tensor input, Tensor? batch_sizes, Tensor weight_ih, Tensor weight_hh, "
        "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, Tensor hx, Tensor? cx, str mode, bool reverse, "
        "bool train) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, hx,
  // cx (empty where absent or not asked for). output_mask: input, the
  // weights, the initial states.
  m.def("rnn_layer_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, "
        "Tensor? batch_sizes, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
        "Tensor? weight_hr, Tensor hx, Tensor? cx, Tensor output, Tensor workspace, str mode, bool reverse, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same gradients through reference.py's differentiable PyTorch ops, for
  // double backward (create_graph=True); implemented in bigkernels/ops/rnn.py.
  // output_mask: one per gradient; those not asked for are empty.
  m.def("rnn_layer_backward_reference(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, "
        "Tensor? batch_sizes, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
        "Tensor? weight_hr, Tensor hx, Tensor? cx, str mode, bool reverse, bool[8] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
