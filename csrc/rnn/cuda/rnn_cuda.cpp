// CUDA RNN layer: the input projection of every step as one GEMM (cuBLAS, in
// the input's dtype), then the persistent kernels of rnn_persistent.cu (launchers.h),
// and in backward one GEMM each for the input and weight gradients.
// float16, bfloat16 and float32; the recurrence accumulates in float, the
// cell state and the workspace are float. proj_size (weight_hr) and float64
// have no CUDA kernel: bigkernels.ops.rnn runs those on the reference.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string_view>

#include "rnn/cuda/launchers.h"
#include "rnn/rnn.h"

namespace bigkernels {
namespace {

cuda::RnnDType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::RnnDType::kFloat16;
    case at::kBFloat16: return cuda::RnnDType::kBFloat16;
    case at::kFloat: return cuda::RnnDType::kFloat32;
    default: TORCH_CHECK_NOT_IMPLEMENTED(false, "bigkernels.rnn: no CUDA kernel for ", t,
                                         " (float16, bfloat16 and float32 have one)");
  }
}

// A host vector of int64 as a tensor on device.
at::Tensor on_device(const std::vector<int64_t>& v, const at::Device& device) {
  return at::from_blob(const_cast<int64_t*>(v.data()), {int64_t(v.size())}, at::kLong).to(device);
}

// BIGKERNELS_RNN_CUDA_LAUNCH, for tests: unset (or "auto") lets choose_launch
// decide; "per_step" never runs the persistent kernel (the path of large
// hidden sizes); "cooperative", where the layer would run per step, tries a
// cooperative launch of one block per hidden unit instead, which the GPU
// refuses where they cannot all be resident, so that the launcher's fallback
// runs (per step, a block per unit: a grid of hidden_size blocks shows it),
// as under MPS. Read on every call (a getenv, far below a launch), so that a
// test can switch it.
enum class LaunchOverride { kAuto, kPerStep, kCooperative };

LaunchOverride launch_override() {
  const char* value = std::getenv("BIGKERNELS_RNN_CUDA_LAUNCH");
  const std::string_view v = value ? value : "";
  if (v.empty() || v == "auto") return LaunchOverride::kAuto;
  if (v == "per_step") return LaunchOverride::kPerStep;
  TORCH_CHECK(v == "cooperative", "BIGKERNELS_RNN_CUDA_LAUNCH must be auto, per_step or cooperative, not '", v, "'");
  return LaunchOverride::kCooperative;
}

struct LaunchShape {
  int units;
  bool persistent;
  bool stream_w_hh;
};

// The fewest hidden units per block whose grid (one block per SM at least)
// can be resident at once: a persistent launch. Otherwise one launch per
// step, with blocks of units small enough for their slice of W_hh to fit;
// where not even one unit's fits, the fp16/bf16 forward streams the slice
// (its shared memory then does not grow with H). What stays out of reach, for
// an LSTM on an H100 or H200 (227 KB): the fp32 forward and backward above a
// hidden size of about 14.5k, the fp16/bf16 backward above about 29k.
LaunchShape choose_launch(bool backward, RnnMode mode, cuda::RnnDType dtype, int64_t H) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t sms = props->multiProcessorCount;
  const size_t smem_limit = props->sharedMemPerBlockOptin;
  const auto smem = [&](int units, bool stream_w_hh) {
    return backward ? cuda::rnn_backward_smem(mode, dtype, H, units)
                    : cuda::rnn_forward_smem(mode, dtype, H, units, stream_w_hh);
  };
  const LaunchOverride override = launch_override();
  const int units = int((H + sms - 1) / sms);
  if (override != LaunchOverride::kPerStep && props->cooperativeLaunch && smem(units, false) <= smem_limit) {
    int per_sm = 0;
    C10_CUDA_CHECK(cuda::rnn_blocks_per_sm(backward, dtype, smem(units, false), &per_sm));
    if (per_sm >= 1) return {units, true, false};  // ceil(H / units) <= sms blocks
  }
  const auto step_units_that_fit = [&](bool stream_w_hh) {
    int step_units = std::max(1, int(H / (2 * sms)));
    while (step_units > 1 && smem(step_units, stream_w_hh) > smem_limit) step_units /= 2;
    return step_units;
  };
  int step_units = step_units_that_fit(false);
  const bool stream_w_hh = smem(step_units, false) > smem_limit && !backward && dtype != cuda::RnnDType::kFloat32;
  if (stream_w_hh) step_units = step_units_that_fit(true);
  TORCH_CHECK_NOT_IMPLEMENTED(smem(step_units, stream_w_hh) <= smem_limit, "bigkernels.rnn",
                              backward ? "_backward" : "", ": hidden_size ", H, " needs ", smem(step_units, stream_w_hh),
                              " bytes of shared memory per block, more than the ", smem_limit, " this GPU has");
  if (override == LaunchOverride::kCooperative) return {1, true, stream_w_hh};  // fits: smem grows with units
  return {step_units, false, stream_w_hh};
}

cuda::RnnStepPlan device_plan(const RnnShape& s, const RnnPlan& plan, const at::Tensor& batch,
                              const at::Tensor& offset) {
  return {batch.const_data_ptr<int64_t>(), offset.const_data_ptr<int64_t>(), s.T, s.B, s.H, s.N, plan.reverse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& hx, const std::optional<at::Tensor>& cx,
    c10::string_view mode_name, bool reverse, bool train) {
  const RnnShape s = check_rnn_args(input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, mode_name);
  TORCH_CHECK_NOT_IMPLEMENTED(!w_hr.has_value(), "bigkernels.rnn: no CUDA kernel for proj_size yet");
  const cuda::RnnDType dtype = to_kernel_dtype(input.scalar_type());
  const c10::cuda::CUDAGuard guard(input.device());
  const RnnPlan plan = make_rnn_plan(s, batch_sizes, reverse);
  const at::Tensor batch = on_device(plan.batch, input.device()), offset = on_device(plan.offset, input.device());
  const bool lstm = s.mode == RnnMode::kLSTM;
  const auto float_options = input.options().dtype(at::kFloat);

  // The input projection of every step: one GEMM in the input's dtype (tensor
  // cores for half and bfloat16), then float, with the biases.
  at::Tensor bias_x, bias_hh;  // bias_hh: GRU's, applied inside the gates
  std::tie(bias_x, bias_hh) = rnn_projection_biases(b_ih, b_hh, s.mode, at::kFloat);
  at::Tensor xproj = at::mm(input, w_ih.t()).to(at::kFloat);
  if (bias_x.defined()) xproj.add_(bias_x);
  const at::Tensor w = w_hh.contiguous(), h0 = hx.contiguous();
  at::Tensor c;
  if (lstm) {
    c = at::empty({s.B, s.H}, float_options);
    c.copy_(*cx);
  }
  at::Tensor out = at::empty({s.N, s.H}, input.options());
  at::Tensor ws = at::empty({train ? s.N : 0, rnn_workspace_width(s.mode, s.H)}, float_options);
  at::Tensor barrier = at::zeros({2}, input.options().dtype(at::kInt));

  const LaunchShape shape = choose_launch(false, s.mode, dtype, s.H);
  cuda::RnnForwardParams p{};
  p.mode = s.mode;
  p.dtype = dtype;
  p.plan = device_plan(s, plan, batch, offset);
  p.xproj = xproj.const_data_ptr<float>();
  p.w_hh = w.const_data_ptr();
  p.b_hh = bias_hh.defined() ? bias_hh.const_data_ptr<float>() : nullptr;
  p.hx = h0.const_data_ptr();
  p.c = lstm ? c.mutable_data_ptr<float>() : nullptr;
  p.out = out.mutable_data_ptr();
  p.ws = train ? ws.mutable_data_ptr<float>() : nullptr;
  p.barrier = reinterpret_cast<unsigned*>(barrier.mutable_data_ptr<int>());
  p.units = shape.units;
  p.persistent = shape.persistent;
  p.stream_w_hh = shape.stream_w_hh;
  C10_CUDA_CHECK(cuda::launch_rnn_forward(p, at::cuda::getCurrentCUDAStream()));

  const at::Tensor hy = out.index_select(0, on_device(rnn_final_rows(plan, s.B), input.device()));
  return {out, hy, lstm ? c.to(input.scalar_type()) : at::empty({0}, input.options()), ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rnn_layer_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                        const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                        const at::Tensor& hx, const std::optional<at::Tensor>& cx, const at::Tensor& output,
                        const at::Tensor& workspace, c10::string_view mode_name, bool reverse,
                        std::array<bool, 3> output_mask) {
  const RnnShape s = check_rnn_args(input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, mode_name);
  check_rnn_backward_args(s, grad_output, grad_hy, grad_cy, output, workspace);
  TORCH_CHECK_NOT_IMPLEMENTED(!w_hr.has_value(), "bigkernels.rnn: no CUDA kernel for proj_size yet");
  TORCH_CHECK_TYPE(workspace.scalar_type() == at::kFloat, "bigkernels.rnn_backward: workspace must be float32");
  const cuda::RnnDType dtype = to_kernel_dtype(input.scalar_type());
  const c10::cuda::CUDAGuard guard(input.device());
  const RnnPlan plan = make_rnn_plan(s, batch_sizes, reverse);
  const at::Tensor batch = on_device(plan.batch, input.device()), offset = on_device(plan.offset, input.device());
  const bool lstm = s.mode == RnnMode::kLSTM, gru = s.mode == RnnMode::kGRU;
  const auto float_options = input.options().dtype(at::kFloat);
  const int64_t GH = rnn_gates(s.mode) * s.H;

  const at::Tensor w = w_hh.contiguous(), h0 = hx.contiguous(), out = output.contiguous(),
                   ws = workspace.contiguous(), go = grad_output.contiguous();
  const at::Tensor c0 = lstm ? cx->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor dh = at::empty({s.B, s.H}, float_options);
  dh.copy_(grad_hy);
  at::Tensor dc;
  if (lstm) {
    dc = at::empty({s.B, s.H}, float_options);
    dc.copy_(grad_cy);
  }
  at::Tensor dgates_x = at::empty({s.N, GH}, float_options);
  at::Tensor dgates_h = gru ? at::empty({s.N, GH}, float_options) : dgates_x;
  at::Tensor barrier = at::zeros({2}, input.options().dtype(at::kInt));

  const LaunchShape shape = choose_launch(true, s.mode, dtype, s.H);
  cuda::RnnBackwardParams p{};
  p.mode = s.mode;
  p.dtype = dtype;
  p.plan = device_plan(s, plan, batch, offset);
  p.w_hh = w.const_data_ptr();
  p.hx = h0.const_data_ptr();
  p.cx = lstm ? c0.const_data_ptr<float>() : nullptr;
  p.out = out.const_data_ptr();
  p.ws = ws.const_data_ptr<float>();
  p.grad_out = go.const_data_ptr();
  p.dh = dh.mutable_data_ptr<float>();
  p.dc = lstm ? dc.mutable_data_ptr<float>() : nullptr;
  p.dgates_x = dgates_x.mutable_data_ptr<float>();
  p.dgates_h = dgates_h.mutable_data_ptr<float>();
  p.barrier = reinterpret_cast<unsigned*>(barrier.mutable_data_ptr<int>());
  p.units = shape.units;
  p.persistent = shape.persistent;
  C10_CUDA_CHECK(cuda::launch_rnn_backward(p, at::cuda::getCurrentCUDAStream()));

  // Every row's previous h (for dW_hh): an output row, or a row of hx.
  const at::Tensor h_prev = at::cat({out, h0}).index_select(0, on_device(rnn_previous_rows(plan, s.N), input.device()));
  auto [grad_input, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] =
      rnn_gemm_grads(dgates_x, dgates_h, h_prev, input, w_ih, b_ih.has_value(), s.mode, output_mask,
                     [&](const at::Tensor& a, const at::Tensor& b) {
                       return at::mm(a.to(input.scalar_type()), b.to(input.scalar_type()));
                     });
  const auto none = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_hx = output_mask[2] ? dh.to(input.scalar_type()) : none();
  at::Tensor grad_cx = output_mask[2] && lstm ? dc.to(input.scalar_type()) : none();
  return {grad_input, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, none(), grad_hx, grad_cx};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("rnn_layer_forward", &rnn_layer_forward_cuda);
  m.impl("rnn_layer_backward", &rnn_layer_backward_cuda);
}

}  // namespace bigkernels
