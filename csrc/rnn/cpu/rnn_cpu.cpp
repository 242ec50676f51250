// CPU RNN layer: the input projection of every step as one parallel GEMM,
// then per step one parallel pass in which each task takes a block of rows
// and hidden units, computes their recurrent product and applies the gates
// while that product is in cache. The GEMMs are our vectorized gemm_acc on
// weights packed once per call into contiguous column panels: a BLAS call per
// step cost more than the small product itself, and on this project's AMD
// host MKL's sgemm was also slower for the big one (docs/PERFORMANCE.md).
// Backward runs the steps in reverse the same way, keeps every step's gate
// gradients, and ends with one GEMM each for the input gradient (ours) and
// the weight gradients (ATen's, see gemm below).
// Everything runs in the accumulator type (float; double for double inputs):
// bfloat16 and half are converted at the edges, so the cell state and the
// recurrent sums are float, and the outputs are rounded once.
#include <ATen/Parallel.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tanh.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/column_panels.h"
#include "rnn/cpu/rnn_kernels.h"
#include "rnn/rnn.h"

namespace bigkernels {
namespace {

at::ScalarType accumulator_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Row r of a contiguous 2-d tensor (null for an undefined or empty one).
char* row(const at::Tensor& t, int64_t r) {
  if (!t.defined() || t.numel() == 0) return nullptr;
  return static_cast<char*>(t.data_ptr()) + r * t.stride(0) * t.element_size();
}

constexpr int64_t kRowBlock = 32;  // rows per task of a step

int64_t blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Calls f(r0, r1, u0, u1) for every block of rows [0, rows) x columns [0,
// cols), in parallel.
template <typename F>
void parallel_blocks(int64_t rows, int64_t cols, int64_t col_block, const F& f) {
  const int64_t col_blocks = blocks(cols, col_block);
  at::parallel_for(0, blocks(rows, kRowBlock) * col_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t / col_blocks * kRowBlock, u0 = t % col_blocks * col_block;
      f(r0, std::min(rows, r0 + kRowBlock), u0, std::min(cols, u0 + col_block));
    }
  });
}

// Depth of one call of kernels.gemm: a long product (the backward's weight
// gradients sum over every row of the sequence) goes in slices whose part of
// the b panel (256 x unit_block) stays in L2 while a task's rows reuse it.
constexpr int64_t kDepthBlock = 256;

// c[rows, cols] (+)= A b in parallel, A(i, k) = a[i * a_row + k * a_col] (so
// A may be a transposed view), b given as column_panels(b, kernels.unit_block,
// acc) (common/column_panels.h); all in the accumulator type.
void parallel_gemm(const RnnCpuKernels& kernels, at::ScalarType acc, int64_t rows, int64_t cols, int64_t k,
                   const char* a, int64_t a_row, int64_t a_col, const at::Tensor& b_panels, char* c, int64_t ldc,
                   bool accumulate) {
  const int64_t e = c10::elementSize(acc), block = kernels.unit_block;
  const char* b = static_cast<const char*>(b_panels.const_data_ptr());
  parallel_blocks(rows, cols, block, [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
    for (int64_t k0 = 0; k0 < k; k0 += kDepthBlock) {
      kernels.gemm(acc, r1 - r0, u1 - u0, std::min(kDepthBlock, k - k0), a + (r0 * a_row + k0 * a_col) * e, a_row,
                   a_col, b + (u0 / block * k + k0) * block * e, block, c + (r0 * ldc + u0) * e, ldc,
                   accumulate || k0 > 0);
    }
  });
}

// The b of a product, b [K, groups * N] (any strides and floating dtype):
// in the accumulator type, contiguous for ATen's GEMM, or as column panels
// (of each group's N columns) where our own runs (kernels.own_gemm).
struct GemmOperand {
  at::Tensor dense, panels;
};
GemmOperand gemm_operand(const RnnCpuKernels& kernels, const at::Tensor& b, at::ScalarType acc, int64_t groups = 1) {
  if (!kernels.own_gemm) return {b.to(acc).contiguous(), at::Tensor()};
  // [K, groups * N] viewed as [groups, K, N]: panels [groups][N / block][K][block]
  return {at::Tensor(), column_panels(b.unflatten(1, {groups, b.size(1) / groups}).transpose(0, 1),
                                      kernels.unit_block, acc)};
}

// c (+)= a b for a [rows, K] (any strides) and a contiguous c [rows, N]: our
// parallel GEMM, or ATen's where ours is not vectorized (the DEFAULT build).
void gemm_rows(const RnnCpuKernels& kernels, at::Tensor c, const at::Tensor& a, const GemmOperand& b,
               bool accumulate) {
  if (!kernels.own_gemm) {
    if (accumulate) {
      c.addmm_(a, b.dense);
    } else {
      at::mm_out(c, a, b.dense);
    }
    return;
  }
  parallel_gemm(kernels, c.scalar_type(), c.size(0), c.size(1), a.size(1), static_cast<const char*>(a.const_data_ptr()),
                a.stride(0), a.stride(1), b.panels, static_cast<char*>(c.mutable_data_ptr()), c.size(1), accumulate);
}

// a b, a [M, K] and b [K, N] in the accumulator type. A transposed a (the
// weight gradients' dgates^T) goes to ATen's GEMM: ours, which broadcasts a
// along its rows, took 3 ms longer than MKL for each of an LSTM's two weight
// gradients, read in place or copied out (docs/PERFORMANCE.md, "RNN, CPU" 10).
at::Tensor gemm(const RnnCpuKernels& kernels, const at::Tensor& a, const at::Tensor& b) {
  if (a.stride(1) != 1) return at::mm(a, b);
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_rows(kernels, c, a, gemm_operand(kernels, b, c.scalar_type()), false);
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& hx, const std::optional<at::Tensor>& cx,
    c10::string_view mode_name, bool reverse, bool train) {
  const RnnShape s = check_rnn_args(input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, mode_name);
  const RnnPlan plan = make_rnn_plan(s, batch_sizes, reverse);
  const at::ScalarType acc = accumulator_type(input);
  const auto in_acc = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const auto new_acc = [&](at::IntArrayRef shape) { return at::empty(shape, input.options().dtype(acc)); };
  const bool lstm = s.mode == RnnMode::kLSTM, proj = w_hr.has_value();
  const int64_t GH = rnn_gates(s.mode) * s.H, W = rnn_workspace_width(s.mode, s.H);

  const RnnCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(rnn_cpu_kernels);
  const int64_t block = kernels.unit_block, G = rnn_gates(s.mode);
  // The input projection of every step; the gate loop adds its biases.
  at::Tensor bias_x, bias_hh;  // bias_hh: GRU's, applied inside the gates
  std::tie(bias_x, bias_hh) = rnn_projection_biases(b_ih, b_hh, s.mode, acc);
  at::Tensor xproj = new_acc({s.N, GH});
  gemm_rows(kernels, xproj, in_acc(input), gemm_operand(kernels, w_ih.t(), acc), false);
  // W_hh^T: for ATen's GEMM, or per gate in panels of `block` units, [G][H / block][Hout][block].
  const GemmOperand w_hh_t = gemm_operand(kernels, w_hh.t(), acc, G);
  const GemmOperand w_hr_t = proj ? gemm_operand(kernels, w_hr->t(), acc) : GemmOperand{};

  // Each step writes its h straight into its output rows, and the next step
  // reads them there: no state buffer to copy back and forth between steps.
  const at::Tensor h0 = in_acc(hx);
  at::Tensor c;
  if (lstm) {
    c = new_acc({s.B, s.H});
    c.copy_(*cx);
  }
  at::Tensor out = new_acc({s.N, s.Hout});
  const at::Tensor h_cell = proj ? new_acc({s.B, s.H}) : at::Tensor();  // the LSTM's h before its projection
  at::Tensor ws = new_acc({train ? s.N : 0, W});
  at::Tensor hproj = new_acc({s.B, GH});

  const int64_t e = out.element_size(), panels = blocks(s.H, block);
  for (int64_t step = 0; step < plan.steps(); ++step) {
    const int64_t t = plan.time(step), bs = plan.batch[t], off = plan.offset[t];
    // Rows [0, from_prev) continue the previous step's output rows; the
    // others (the reverse direction's new sequences) start from h0. Row r's
    // previous h is row r of one of these two, prev_rows or h0.
    const int64_t from_prev = plan.prev_rows(step);
    const at::Tensor prev_rows = from_prev > 0 ? out.narrow(0, plan.offset[plan.time(step - 1)], from_prev) : h0;
    char* h_out = proj ? row(h_cell, 0) : row(out, off);
    if (!kernels.own_gemm) {  // the recurrent product on ATen's GEMM, before the gates
      const int64_t fresh = bs - from_prev;
      if (from_prev > 0) gemm_rows(kernels, hproj.narrow(0, 0, from_prev), prev_rows, w_hh_t, false);
      if (fresh > 0) {
        gemm_rows(kernels, hproj.narrow(0, from_prev, fresh), h0.narrow(0, from_prev, fresh), w_hh_t, false);
      }
    }
    parallel_blocks(bs, s.H, block, [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
      // The block's rows, split where their previous h changes place.
      for (int64_t ra = r0, rb; ra < r1; ra = rb) {
        rb = ra < from_prev ? std::min(r1, from_prev) : r1;
        const char* hp = ra < from_prev ? row(prev_rows, 0) : row(h0, 0);
        for (int64_t g = 0; kernels.own_gemm && g < G; ++g) {  // this block's W_hh h for every gate
          const char* w = row(w_hh_t.panels, 0) + (g * panels + u0 / block) * s.Hout * block * e;
          kernels.gemm(acc, rb - ra, u1 - u0, s.Hout, hp + ra * s.Hout * e, s.Hout, 1, w, block,
                       row(hproj, ra) + (g * s.H + u0) * e, GH, false);
        }
        kernels.forward_rows(acc, s.mode, ra, rb, u0, u1, s.H, row(xproj, off), row(bias_x, 0), row(hproj, 0),
                             row(bias_hh, 0), hp, h_out, row(c, 0), train ? row(ws, off) : nullptr);
      }
    });
    if (proj) gemm_rows(kernels, out.narrow(0, off, bs), h_cell.narrow(0, 0, bs), w_hr_t, false);
  }
  at::Tensor hy = new_acc({s.B, s.Hout});  // h_n: each sequence's last output row
  const std::vector<int64_t> final_rows = rnn_final_rows(plan, s.B);
  for (int64_t b = 0; b < s.B; ++b) std::memcpy(row(hy, b), row(out, final_rows[b]), s.Hout * e);
  const at::ScalarType dtype = input.scalar_type();
  return {out.to(dtype), hy.to(dtype), lstm ? c.to(dtype) : at::empty({0}, input.options()), ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rnn_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                       const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                       const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                       const at::Tensor& hx, const std::optional<at::Tensor>& cx, const at::Tensor& output,
                       const at::Tensor& workspace, c10::string_view mode_name, bool reverse,
                       std::array<bool, 3> output_mask) {
  const RnnShape s = check_rnn_args(input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, mode_name);
  check_rnn_backward_args(s, grad_output, grad_hy, grad_cy, output, workspace);
  const RnnPlan plan = make_rnn_plan(s, batch_sizes, reverse);
  const at::ScalarType acc = accumulator_type(input);
  TORCH_CHECK_TYPE(workspace.scalar_type() == acc, "bigkernels.rnn_backward: workspace must be ", acc);
  const auto in_acc = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const auto new_acc = [&](at::IntArrayRef shape) { return at::empty(shape, input.options().dtype(acc)); };
  const bool lstm = s.mode == RnnMode::kLSTM, gru = s.mode == RnnMode::kGRU, proj = w_hr.has_value();
  const int64_t H = s.H, GH = rnn_gates(s.mode) * H;

  const at::Tensor ws = workspace.contiguous(), out = in_acc(output), go = in_acc(grad_output);
  const at::Tensor hx_acc = in_acc(hx), cx_acc = lstm ? in_acc(*cx) : at::Tensor();
  at::Tensor dh = new_acc({s.B, s.Hout});  // the gradient of the state h, row by row
  dh.copy_(grad_hy);
  at::Tensor dc;
  if (lstm) {
    dc = new_acc({s.B, H});
    dc.copy_(grad_cy);
  }
  // Every row's previous h (for dW_hh, and GRU's gates) and previous c (the
  // LSTM's gates): the previous step's row, or h0/c0 where a sequence starts.
  // Gathered once, in parallel, so that the step loop copies nothing.
  at::Tensor h_prev = new_acc({s.N, s.Hout});
  at::Tensor c_prev = lstm ? new_acc({s.N, H}) : at::Tensor();
  const int64_t hbytes = s.Hout * out.element_size(), cbytes = H * out.element_size();
  const std::vector<int64_t> prev = rnn_previous_rows(plan, s.N);  // an output row, or N + a row of h0/c0
  at::parallel_for(0, s.N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bool fresh = prev[r] >= s.N;
      std::memcpy(row(h_prev, r), fresh ? row(hx_acc, prev[r] - s.N) : row(out, prev[r]), hbytes);
      if (lstm) {  // c sits in the workspace rows, 4H in
        std::memcpy(row(c_prev, r), fresh ? row(cx_acc, prev[r] - s.N) : row(ws, prev[r]) + 4 * cbytes, cbytes);
      }
    }
  });
  at::Tensor dgates_x = new_acc({s.N, GH});
  at::Tensor dgates_h = gru ? new_acc({s.N, GH}) : dgates_x;
  at::Tensor dr = proj ? new_acc({s.N, s.Hout}) : at::Tensor();  // the projection's output gradient
  at::Tensor dh_cell = proj ? new_acc({s.B, H}) : dh;

  const RnnCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(rnn_cpu_kernels);
  const GemmOperand w_hh_b = gemm_operand(kernels, w_hh, acc);
  const GemmOperand w_hr_b = proj ? gemm_operand(kernels, *w_hr, acc) : GemmOperand{};
  for (int64_t step = plan.steps() - 1; step >= 0; --step) {
    const int64_t t = plan.time(step), bs = plan.batch[t], off = plan.offset[t];
    at::Tensor dh_rows = dh.narrow(0, 0, bs);
    if (proj) {  // the projection's output gradient, then the cell's h's
      dh_rows.add_(go.narrow(0, off, bs));
      dr.narrow(0, off, bs).copy_(dh_rows);
      gemm_rows(kernels, dh_cell.narrow(0, 0, bs), dh_rows, w_hr_b, false);
    }
    // Without a projection the gate loop adds the step's output gradient itself.
    const char* grad_out = proj ? nullptr : row(go, off);
    parallel_blocks(bs, H, kernels.unit_block, [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
      kernels.backward_rows(acc, s.mode, r0, r1, u0, u1, H, row(dh_cell, 0), grad_out, row(ws, off),
                            row(h_prev, off), row(c_prev, off), row(dc, 0), row(dgates_x, off),
                            gru ? row(dgates_h, off) : nullptr);
    });
    // The gradient reaching the previous step's h (GRU adds to its direct part dh * z).
    gemm_rows(kernels, dh_rows, dgates_h.narrow(0, off, bs), w_hh_b, gru);
  }

  const at::ScalarType dtype = input.scalar_type();
  const auto none = [&] { return at::empty({0}, input.options()); };
  auto [grad_input, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] =
      rnn_gemm_grads(dgates_x, dgates_h, h_prev, input, w_ih, b_ih.has_value(), s.mode, output_mask,
                     [&](const at::Tensor& a, const at::Tensor& b) { return gemm(kernels, a.to(acc), b.to(acc)); });
  at::Tensor grad_w_hr = none();
  if (output_mask[1] && proj) {
    const at::Tensor h_cell = at::mul(ws.narrow(1, 3 * H, H), at::tanh(ws.narrow(1, 4 * H, H)));  // o * tanh(c)
    grad_w_hr = gemm(kernels, dr.t(), h_cell).to(dtype);
  }
  at::Tensor grad_hx = output_mask[2] ? dh.to(dtype) : none();
  at::Tensor grad_cx = output_mask[2] && lstm ? dc.to(dtype) : none();
  return {grad_input, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr, grad_hx, grad_cx};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("rnn_layer_forward", &rnn_layer_forward_cpu);
  m.impl("rnn_layer_backward", &rnn_layer_backward_cpu);
}

}  // namespace bigkernels
