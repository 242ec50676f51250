// linear + cross-entropy (and linear + distillation), a chunk of rows at a time,
// on any device (chunks.h: its product and row passes come with it): the chunk's
// logits z = x W^T + b (the device's product), the row passes (lse, loss,
// and the gradient over z in place; cpu/loss_kernels.cpp, cuda/loss_kernels.cu), then dX = G W and dW += G^T x (two more products). Three products in
// all, as eager's forward and backward, and never more than one chunk's
// logits: rows_per_chunk x V elements.
//
// Why chunks of rows with the whole vocabulary, not blocks of the vocabulary
// (Cut Cross-Entropy's way): a vocabulary block's softmax needs the row's lse
// first, so its gradient needs the logits a second time, a fourth product.
// On the CPU the products are 80-95 % of the time (docs/PERFORMANCE.md), so
// that alone would cost 8-20 % against eager. (On a GPU the trade differs;
// the CUDA path here is the same loop on cuBLAS's products by default.)
// Method 'blocked' hands the rows that count to the device's blocked kernels
// instead (Cut Cross-Entropy's tiles; CUDA only).
//
// Ignored rows are left out before the products (they cost nothing). The
// gradients of a mean or sum are computed in the forward, in the same pass
// (the backward scales them by the loss's gradient): the logits are made once.
// Distillation runs the same loop with the teacher's logits made beside the
// student's (no gradient: a fourth product, the teacher's, in the forward only),
// or with method 'blocked' the device's blocked kernels, as cross-entropy.
#include "losses/chunks.h"

#include <c10/core/DeviceGuard.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "losses/losses.h"

namespace bigkernels {
namespace {

// Logits held at once when chunk_rows is 0: 8M elements (32 MB in float32),
// at least kMinChunkRows rows. With fewer rows each chunk's dW += G^T x, which
// reads and writes all of dW, does too little work per byte: 64 rows ran 35 %
// slower than 256 at V 32k (docs/PERFORMANCE.md).
constexpr int64_t kChunkElements = int64_t(1) << 23;
constexpr int64_t kMinChunkRows = 256;

int64_t rows_per_chunk(int64_t V, int64_t chunk_rows) {
  return chunk_rows > 0 ? chunk_rows : std::max(kMinChunkRows, kChunkElements / V);
}

// The rows whose target is not ignore_index; the others must be in [0, V).
std::vector<int64_t> rows_that_count(const at::Tensor& target, int64_t V, int64_t ignore_index) {
  const at::Tensor t = target.to(at::kCPU).contiguous();  // on a GPU: a copy to the host, and a sync
  const int64_t* p = t.const_data_ptr<int64_t>();
  std::vector<int64_t> rows;
  rows.reserve(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (p[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < V, "bigkernels linear_cross_entropy: target[", i, "] = ", p[i],
                      " is out of range: must be in [0, ", V, ") (weight's rows) or ignore_index (", ignore_index,
                      ")");
    rows.push_back(i);
  }
  return rows;
}

// rows as an index tensor on device.
at::Tensor row_index(const std::vector<int64_t>& rows, const at::Device& device) {
  std::vector<int64_t> copy = rows;
  return at::from_blob(copy.data(), {static_cast<int64_t>(rows.size())}, at::kLong).clone().to(device);
}

// t's rows that count (`rows`, or all of them when it has every row), contiguous.
at::Tensor keep_rows(const at::Tensor& t, const std::vector<int64_t>& rows) {
  const int64_t Nv = static_cast<int64_t>(rows.size());
  if (Nv == t.size(0)) return t.contiguous();
  return t.index_select(0, row_index(rows, t.device())).contiguous();
}

// t [rows that count, ...] placed back among all N rows, zeros elsewhere.
at::Tensor scatter_rows(const at::Tensor& t, const std::vector<int64_t>& rows, int64_t N) {
  if (static_cast<int64_t>(rows.size()) == N) return t;
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[0] = N;
  at::Tensor full = at::zeros(sizes, t.options());
  if (rows.empty()) return full;
  return full.index_copy_(0, row_index(rows, t.device()), t);
}

// The gradients of input, weight and bias (those in mask) summed over the
// chunks, from each chunk's gradient over its logits, G: dX = G W by rows,
// dW += G^T x, db += the column sums of G (in the compute type).
struct Gradients {
  std::array<bool, 3> mask;
  at::Tensor input, weight, bias;

  // Unallocated: the blocked kernels' results are put in by the caller.
  explicit Gradients(std::array<bool, 3> wanted) : mask(wanted) {}
  Gradients(std::array<bool, 3> wanted, int64_t rows, const at::Tensor& x, const at::Tensor& w)
      : mask(wanted) {
    const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    if (mask[0]) input = at::empty({rows, x.size(1)}, x.options());
    if (mask[1]) weight = at::zeros(w.sizes(), x.options());
    if (mask[2]) bias = at::zeros({w.size(0)}, x.options().dtype(compute));
  }
  bool any() const { return mask[0] || mask[1] || mask[2]; }

  void add_chunk(const at::Tensor& g, const at::Tensor& xc, const at::Tensor& w, int64_t c0) {
    if (mask[0]) {
      at::Tensor dx = input.narrow(0, c0, g.size(0));
      at::mm_out(dx, g, w);
    }
    if (mask[1]) weight.addmm_(g.t(), xc);
    if (mask[2]) bias.add_(at::sum(g, {0}, false, bias.scalar_type()));
  }

  // (grad_input over all N rows, grad_weight, grad_bias in the dtype), empty where not wanted.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const std::vector<int64_t>& rows, int64_t N,
                                                        const at::TensorOptions& opts) const {
    const auto empty = [&] { return at::empty({0}, opts); };
    return {mask[0] ? scatter_rows(input, rows, N) : empty(), mask[1] ? weight : empty(),
            mask[2] ? bias.to(opts.dtype()) : empty()};
  }
};

// The loss from the rows' losses: 'none' placed among all N rows, else their
// sum (in double; on the CPU in row order, the same whatever the thread
// count; on a GPU by ATen's sum, the same every run) times scale.
at::Tensor reduce_loss(const at::Tensor& loss_rows, const std::vector<int64_t>& rows, int64_t N, Reduction r,
                       double scale) {
  if (r == Reduction::kNone) return scatter_rows(loss_rows, rows, N);
  if (!loss_rows.is_cpu()) return loss_rows.to(at::kDouble).sum().mul(scale).to(loss_rows.scalar_type());
  const at::Tensor l = loss_rows.to(at::kDouble);
  const double* p = l.const_data_ptr<double>();
  double total = 0;
  for (int64_t i = 0; i < l.numel(); ++i) total += p[i];
  return at::scalar_tensor(total * scale, loss_rows.options());
}

struct ChunkResults {
  at::Tensor loss_rows, lse;  // [rows that count], compute type
  Gradients grads;
};

// The chunk loop over the rows that count (`rows`, or all when it has every
// row), or with options.blocked the device's blocked kernels over them.
// lse_given (backward): the forward's lse of those rows, and no loss.
// The gradient's factor per row: row_scale's, or `scale`.
ChunkResults run_chunks(const LossDevice& device, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
                        const std::optional<at::Tensor>& bias, const CrossEntropyOptions& options, int64_t chunk_rows,
                        std::array<bool, 3> grad_mask, const std::vector<int64_t>& rows, const at::Tensor& lse_given,
                        const at::Tensor& row_scale, double scale) {
  const int64_t V = weight.size(0), Nv = static_cast<int64_t>(rows.size());
  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = input.options();
  // Only the rows that count go through the products.
  const auto keep = [&](const at::Tensor& t) { return keep_rows(t, rows); };
  const at::Tensor x = keep(input), t = keep(target);
  const bool backward = lse_given.defined();
  const at::Tensor lse_kept = backward ? keep(lse_given.to(compute)) : at::Tensor();
  const at::Tensor scales = row_scale.defined() ? keep(row_scale.to(compute)) : at::Tensor();
  // Checked before the empty case's return: the answer does not hang on the targets.
  TORCH_CHECK_NOT_IMPLEMENTED(!options.blocked || device.cross_entropy_blocked != nullptr,
                              "bigkernels linear_cross_entropy: method='blocked' runs on CUDA only; on ",
                              input.device().type(), " use method='chunked'");
  if (options.blocked && Nv > 0) {
    // The kernels make their own gradients (from their accumulators): none
    // are allocated here, which would hold a second dW.
    BlockedResults b = device.cross_entropy_blocked(x, weight.contiguous(), bias, t, options, grad_mask, lse_kept,
                                                    scales, scale);
    ChunkResults out{backward ? at::Tensor() : b.loss_rows, backward ? lse_kept : b.lse, Gradients(grad_mask)};
    if (grad_mask[0]) out.grads.input = b.grad_input;
    if (grad_mask[1]) out.grads.weight = b.grad_weight;
    if (grad_mask[2]) out.grads.bias = b.grad_bias;
    TORCH_INTERNAL_ASSERT((backward || (out.loss_rows.defined() && out.lse.defined())) &&
                              (!grad_mask[0] || out.grads.input.defined()) &&
                              (!grad_mask[1] || out.grads.weight.defined()) &&
                              (!grad_mask[2] || out.grads.bias.defined()),
                          "bigkernels linear_cross_entropy: the blocked kernels left out a result asked for");
    return out;
  }
  ChunkResults out{backward ? at::Tensor() : at::empty({Nv}, opts.dtype(compute)),
                   backward ? lse_kept : at::empty({Nv}, opts.dtype(compute)),
                   Gradients(grad_mask, Nv, input, weight)};
  const bool grad = out.grads.any();
  if (Nv == 0) return out;

  const int64_t Nc = std::min(Nv, rows_per_chunk(V, chunk_rows));
  const int64_t stat_bytes = out.lse.element_size();
  for (int64_t c0 = 0; c0 < Nv; c0 += Nc) {
    const int64_t n = std::min(Nc, Nv - c0);
    const at::Tensor xc = x.narrow(0, c0, n);
    // A fresh tensor per chunk: the CPU's fastest product, oneDNN's (1.3-2.3x
    // BLAS's into a reused buffer here; mm_out was slower than mm, too), has no out=.
    at::Tensor z = device.product(xc, weight, bias);
    const CrossEntropyRows chunk{
        z.mutable_data_ptr(), V, V, t.const_data_ptr<int64_t>() + c0,
        options.label_smoothing, options.softcap, options.z_loss,
        static_cast<char*>(out.lse.mutable_data_ptr()) + c0 * stat_bytes,
        backward ? nullptr : static_cast<char*>(out.loss_rows.mutable_data_ptr()) + c0 * stat_bytes,
        backward, grad,
        scales.defined() ? static_cast<const char*>(scales.const_data_ptr()) + c0 * stat_bytes : nullptr, scale};
    device.cross_entropy_rows(dtype, chunk, n);
    if (grad) out.grads.add_chunk(z, xc, weight, c0);  // z now holds G, the gradient over the chunk's logits
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward(
    const LossDevice& device, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target, const std::optional<at::Tensor>& bias,
    int64_t ignore_index, double label_smoothing, double softcap, double z_loss, c10::string_view reduction,
    int64_t chunk_rows, c10::string_view method, bool skip_small_gradients, std::array<bool, 3> grad_mask) {
  const c10::DeviceGuard guard(input.device());  // the products', and kernels', device
  const CrossEntropyOptions options{ignore_index, label_smoothing, softcap, z_loss, parse_method(method),
                                    skip_small_gradients};
  check_linear_cross_entropy_args(input, weight, target, bias, options, chunk_rows);
  const Reduction r = parse_reduction(reduction);
  const bool grad = grad_mask[0] || grad_mask[1] || grad_mask[2];
  TORCH_CHECK_VALUE(!grad || r != Reduction::kNone, "bigkernels linear_cross_entropy_forward: gradients in the "
                    "forward need reduction 'mean' or 'sum'; with 'none' the backward computes them");
  grad_mask[2] = grad_mask[2] && bias.has_value();
  const int64_t N = input.size(0);
  const std::vector<int64_t> rows = rows_that_count(target, weight.size(0), ignore_index);
  const int64_t Nv = static_cast<int64_t>(rows.size());
  // The mean divides by the rows that count; with none, the loss is 0 and so
  // are its gradients (torch's F.cross_entropy gives NaN there).
  const double scale = r == Reduction::kMean ? (Nv ? 1.0 / static_cast<double>(Nv) : 0.0) : 1.0;
  ChunkResults c = run_chunks(device, input, weight, target, bias, options, chunk_rows, grad_mask, rows, at::Tensor(),
                              at::Tensor(), scale);
  auto [grad_input, grad_weight, grad_bias] = c.grads.finish(rows, N, input.options());
  return {reduce_loss(c.loss_rows, rows, N, r, scale), scatter_rows(c.lse, rows, N), grad_input, grad_weight,
          grad_bias};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy(
    const LossDevice& device, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target, const std::optional<at::Tensor>& bias,
    int64_t ignore_index, double label_smoothing, double softcap, double z_loss, c10::string_view reduction,
    int64_t chunk_rows, c10::string_view method, bool skip_small_gradients) {
  auto [loss, lse, gi, gw, gb] = linear_cross_entropy_forward(
      device, input, weight, target, bias, ignore_index, label_smoothing, softcap, z_loss, reduction, chunk_rows,
      method, skip_small_gradients, {false, false, false});
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const LossDevice& device, const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
    double softcap, double z_loss, int64_t chunk_rows, c10::string_view method, bool skip_small_gradients,
    std::array<bool, 3> grad_mask) {
  const c10::DeviceGuard guard(input.device());  // the products', and kernels', device
  const CrossEntropyOptions options{ignore_index, label_smoothing, softcap, z_loss, parse_method(method),
                                    skip_small_gradients};
  check_linear_cross_entropy_args(input, weight, target, bias, options, chunk_rows);
  const int64_t N = input.size(0);
  TORCH_CHECK_VALUE(grad_loss.numel() == N && grad_loss.device() == input.device(),
                    "bigkernels linear_cross_entropy_backward: grad_loss must have ", N, " elements (one per row) on ",
                    input.device(), ", got shape ", grad_loss.sizes());
  TORCH_CHECK_VALUE(lse.numel() == N && lse.device() == input.device(),
                    "bigkernels linear_cross_entropy_backward: lse must be the forward's (", N, " rows)");
  grad_mask[2] = grad_mask[2] && bias.has_value();
  const std::vector<int64_t> rows = rows_that_count(target, weight.size(0), ignore_index);
  ChunkResults c = run_chunks(device, input, weight, target, bias, options, chunk_rows, grad_mask, rows,
                              lse.reshape({N}),
                              grad_loss.reshape({N}), 1.0);
  return c.grads.finish(rows, N, input.options());
}

// Distillation, the same chunk loop over two products per chunk: the
// student's logits (whose gradient the row passes write in place) and the
// teacher's (in the compute type). Returns each counted row's loss and the
// gradients in grad_mask; grad_loss (per row) or `scale` weighs the rows.
// Method 'blocked' hands the rows that count to the device's blocked
// kernels instead (both logits a tile at a time; CUDA only).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_distillation_loss_forward(
    const LossDevice& device, const at::Tensor& student_input, const at::Tensor& student_weight, const at::Tensor& teacher_input,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_bias, double temperature,
    double beta, double hard_weight, int64_t ignore_index, c10::string_view reduction, int64_t chunk_rows,
    c10::string_view method, const std::optional<at::Tensor>& grad_loss, std::array<bool, 3> grad_mask) {
  const c10::DeviceGuard guard(student_input.device());  // the products', and kernels', device
  const DistillationOptions options{temperature, beta, hard_weight, ignore_index, parse_method(method)};
  check_linear_distillation_args(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                                 teacher_bias, options, chunk_rows);
  const Reduction r = parse_reduction(reduction);
  grad_mask[2] = grad_mask[2] && student_bias.has_value();
  const bool grad = grad_mask[0] || grad_mask[1] || grad_mask[2];
  TORCH_CHECK_VALUE(!grad || (r != Reduction::kNone) != grad_loss.has_value(),
                    "bigkernels linear_distillation_loss_forward: gradients need reduction 'mean' or 'sum', or "
                    "'none' with grad_loss");
  const int64_t N = student_input.size(0), V = student_weight.size(0);
  std::vector<int64_t> rows;
  if (target.has_value()) {
    rows = rows_that_count(*target, V, ignore_index);
  } else {
    rows.resize(N);
    for (int64_t i = 0; i < N; ++i) rows[i] = i;
  }
  const int64_t Nv = static_cast<int64_t>(rows.size());
  const at::ScalarType dtype = student_input.scalar_type();
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = student_input.options();
  const double scale = r == Reduction::kMean ? (Nv ? 1.0 / static_cast<double>(Nv) : 0.0) : 1.0;
  const at::Tensor xs = keep_rows(student_input, rows), xt = keep_rows(teacher_input, rows);
  // The target matters to the kernel only for the hard term.
  const bool hard = hard_weight > 0;
  const at::Tensor t = hard ? keep_rows(*target, rows) : at::Tensor();
  const at::Tensor scales = grad_loss.has_value() ? keep_rows(grad_loss->reshape({N}).to(compute), rows) : at::Tensor();
  // Checked before the empty case's: the answer does not hang on the targets.
  TORCH_CHECK_NOT_IMPLEMENTED(!options.blocked || device.distillation_blocked != nullptr,
                              "bigkernels linear_distillation_loss: method='blocked' runs on CUDA only; on ",
                              student_input.device().type(), " use method='chunked'");
  at::Tensor loss_rows;
  Gradients grads(grad_mask);
  if (options.blocked && Nv > 0) {
    // The kernels make their own gradients (from their accumulators): none
    // are allocated here, which would hold a second dW.
    BlockedDistillationResults b = device.distillation_blocked(
        xs, student_weight.contiguous(), student_bias, xt, teacher_weight.contiguous(), teacher_bias, t, options,
        grad_mask, scales, scale);
    loss_rows = b.loss_rows;
    if (grad_mask[0]) grads.input = b.grad_input;
    if (grad_mask[1]) grads.weight = b.grad_weight;
    if (grad_mask[2]) grads.bias = b.grad_bias;
    TORCH_INTERNAL_ASSERT(loss_rows.defined() && (!grad_mask[0] || grads.input.defined()) &&
                              (!grad_mask[1] || grads.weight.defined()) && (!grad_mask[2] || grads.bias.defined()),
                          "bigkernels linear_distillation_loss: the blocked kernels left out a result asked for");
  } else {
    loss_rows = at::empty({Nv}, opts.dtype(compute));
    grads = Gradients(grad_mask, Nv, student_input, student_weight);
    const int64_t Nc = std::min(Nv, rows_per_chunk(V, chunk_rows));
    const int64_t stat_bytes = loss_rows.element_size();
    for (int64_t c0 = 0; c0 < Nv; c0 += Nc) {
      const int64_t n = std::min(Nc, Nv - c0);
      const at::Tensor xc = xs.narrow(0, c0, n);
      at::Tensor z = device.product(xc, student_weight, student_bias);
      const at::Tensor zt = device.product(xt.narrow(0, c0, n), teacher_weight, teacher_bias).to(compute);
      const DistillationRows chunk{
          z.mutable_data_ptr(), zt.const_data_ptr(), V, V, hard ? t.const_data_ptr<int64_t>() + c0 : nullptr,
          temperature, beta, hard_weight, static_cast<char*>(loss_rows.mutable_data_ptr()) + c0 * stat_bytes, grad,
          scales.defined() ? static_cast<const char*>(scales.const_data_ptr()) + c0 * stat_bytes : nullptr, scale};
      device.distillation_rows(dtype, chunk, n);
      if (grad) grads.add_chunk(z, xc, student_weight, c0);
    }
  }
  auto [grad_input, grad_weight, grad_bias] = grads.finish(rows, N, opts);
  return {reduce_loss(loss_rows, rows, N, r, scale), grad_input, grad_weight, grad_bias};
}

at::Tensor linear_distillation_loss(const LossDevice& device, const at::Tensor& student_input, const at::Tensor& student_weight,
                                        const at::Tensor& teacher_input, const at::Tensor& teacher_weight,
                                        const std::optional<at::Tensor>& target,
                                        const std::optional<at::Tensor>& student_bias,
                                        const std::optional<at::Tensor>& teacher_bias, double temperature,
                                        double beta, double hard_weight, int64_t ignore_index,
                                        c10::string_view reduction, int64_t chunk_rows, c10::string_view method) {
  return std::get<0>(linear_distillation_loss_forward(
      device, student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias, temperature,
      beta, hard_weight, ignore_index, reduction, chunk_rows, method, std::nullopt, {false, false, false}));
}

}  // namespace bigkernels
