// Host-side pieces of the RNN ops shared by the devices: the modes, the
// argument checks and the step plan of a packed sequence.
//
// One op call runs one layer in one direction over a whole sequence. The
// sequence is packed time-major, as torch's PackedSequence: input is [N, I],
// step t owns batch_sizes[t] consecutive rows, the batch sizes never grow, and
// row b of a step is sequence b. Without batch_sizes every step has B rows
// (N = T * B): a plain [T, B, I] tensor is already that layout.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

#include "rnn/rnn_mode.h"

namespace bigkernels {

// "rnn_tanh", "rnn_relu", "lstm", "gru"
RnnMode parse_rnn_mode(c10::string_view name);

struct RnnShape {
  int64_t N, I, H, Hout, B, T;  // Hout: proj_size when the LSTM projects, else H
  RnnMode mode;
};

// Checks every argument of rnn_layer_forward (dtype, device, shapes, the batch
// sizes) and returns the sizes. The messages name the argument.
RnnShape check_rnn_args(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                        const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                        const at::Tensor& hx, const std::optional<at::Tensor>& cx, c10::string_view mode);

// And the backward's own inputs, shaped like the forward's outputs.
void check_rnn_backward_args(const RnnShape& s, const at::Tensor& grad_output, const at::Tensor& grad_hy,
                             const at::Tensor& grad_cy, const at::Tensor& output, const at::Tensor& workspace);

// Where each step of a direction reads and writes. Steps run in time order,
// or reversed for the reverse direction; step s is time index time(s).
struct RnnPlan {
  std::vector<int64_t> batch;   // rows of each time index
  std::vector<int64_t> offset;  // first packed row of each time index
  bool reverse;
  int64_t steps() const { return static_cast<int64_t>(batch.size()); }
  int64_t time(int64_t s) const { return reverse ? steps() - 1 - s : s; }
  // Rows of step s whose previous state is the output of step s - 1; the
  // others (rows [prev_rows, batch), only in the reverse direction, where
  // sequences start at different steps) start from hx.
  int64_t prev_rows(int64_t s) const {
    return s == 0 ? 0 : std::min(batch[time(s)], batch[time(s - 1)]);
  }
};

RnnPlan make_rnn_plan(const RnnShape& s, const std::optional<at::Tensor>& batch_sizes, bool reverse);

// The biases in the accumulator type acc: the one added to the input
// projection (b_ih, plus b_hh except for GRU, whose b_hn sits inside
// r * (...)) and GRU's b_hh, applied with the gates. Undefined where absent.
std::tuple<at::Tensor, at::Tensor> rnn_projection_biases(const std::optional<at::Tensor>& b_ih,
                                                         const std::optional<at::Tensor>& b_hh, RnnMode mode,
                                                         at::ScalarType acc);

// For every packed row, where its previous h is: a row of the output, or N + b
// for row b of hx (indices into cat(output, hx)).
std::vector<int64_t> rnn_previous_rows(const RnnPlan& plan, int64_t N);
// For every sequence b, its last packed row in the direction's order: where h_n comes from.
std::vector<int64_t> rnn_final_rows(const RnnPlan& plan, int64_t B);

// a b for the gradient GEMMs below, in the device's choice of GEMM and type.
using RnnGemm = std::function<at::Tensor(const at::Tensor& a, const at::Tensor& b)>;

// The backward's gradients that take every row at once, from the gates'
// gradients (dgates_h: GRU's through W_hh; the same tensor otherwise) and
// every row's previous h: grad_input, grad_weight_ih, grad_weight_hh,
// grad_bias_ih, grad_bias_hh in input's dtype (empty where output_mask says
// they are not wanted). The products run in `gemm`: on the CPU in the
// accumulator type; on CUDA in the input's dtype, on tensor cores with float
// accumulation, as cuDNN's weight-gradient GEMMs do.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_gemm_grads(
    const at::Tensor& dgates_x, const at::Tensor& dgates_h, const at::Tensor& h_prev, const at::Tensor& input,
    const at::Tensor& w_ih, bool has_bias, RnnMode mode, std::array<bool, 3> output_mask, const RnnGemm& gemm);

}  // namespace bigkernels
