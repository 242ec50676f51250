// The loss family on CUDA: chunks.cpp's loop with cuBLAS's products
// (through ATen) and the row passes of loss_kernels.cu, or (method
// "blocked") the tiles of blocked_kernels.cu; launched on the current
// stream. The targets are checked on the host (a copy and a sync per call),
// as the rows that count are chosen there.
#include <ATen/TensorOperators.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "losses/chunks.h"
#include "losses/cuda/launchers.h"

namespace bigkernels {
namespace {

cuda::LossDType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::LossDType::kFloat16;
    case at::kBFloat16: return cuda::LossDType::kBFloat16;
    case at::kFloat: return cuda::LossDType::kFloat32;
    case at::kDouble: return cuda::LossDType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "bigkernels losses: unsupported dtype ", t);
  }
}

at::Tensor cuda_product(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  return b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

void cross_entropy_rows_cuda(at::ScalarType dtype, const CrossEntropyRows& a, int64_t rows) {
  C10_CUDA_CHECK(cuda::launch_cross_entropy_rows(a, rows, to_kernel_dtype(dtype), 0,
                                                 c10::cuda::getCurrentCUDAStream()));
}

void distillation_rows_cuda(at::ScalarType dtype, const DistillationRows& a, int64_t rows) {
  C10_CUDA_CHECK(cuda::launch_distillation_rows(a, rows, to_kernel_dtype(dtype), 0,
                                                c10::cuda::getCurrentCUDAStream()));
}

// The probability below which skip_small_gradients drops a tile: the
// dtype's unit roundoff / 16 (2^-12 for bfloat16, Cut Cross-Entropy's).
double skip_threshold(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return 0x1p-15;
    case at::kBFloat16: return 0x1p-12;
    case at::kFloat: return 0x1p-28;
    default: return 0x1p-57;
  }
}

// Vocabulary splits of the statistics pass: enough blocks for two per SM.
int64_t statistics_splits(int64_t N, int64_t V) {
  const int64_t row_tiles = (N + cuda::kBlockedRows - 1) / cuda::kBlockedRows;
  const int64_t vocab_tiles = (V + cuda::kBlockedCols - 1) / cuda::kBlockedCols;
  const int64_t wanted = 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::clamp<int64_t>((wanted + row_tiles - 1) / row_tiles, 1, std::min<int64_t>(vocab_tiles, 65535));
}

// The gradient passes' buffers, which their atomics sum into: zeroed, in the
// compute type; those not in grad_mask undefined (null to the kernels).
struct Accumulators {
  at::Tensor x, w, b;  // [N, D], [V, D], [V]
  Accumulators(std::array<bool, 3> grad_mask, int64_t N, int64_t D, int64_t V, const at::TensorOptions& compute)
      : x(grad_mask[0] ? at::zeros({N, D}, compute) : at::Tensor()),
        w(grad_mask[1] ? at::zeros({V, D}, compute) : at::Tensor()),
        b(grad_mask[2] ? at::zeros({V}, compute) : at::Tensor()) {}
  static void* pointer(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
  // into the results: input's and weight's in the dtype, the bias's in the compute type
  template <typename Results>
  void finish(Results& out, at::ScalarType dtype) const {
    if (x.defined()) out.grad_input = x.to(dtype);
    if (w.defined()) out.grad_weight = w.to(dtype);
    out.grad_bias = b;
  }
};

// log sum_k sums_k exp(factor (maxes_k - top)) over the splits (dimension 0): a row's log-sum from its splits'.
at::Tensor log_sum_over_splits(const at::Tensor& sums, const at::Tensor& maxes, const at::Tensor& top, double factor) {
  return (sums * ((maxes - top) * factor).exp()).sum(0).log();
}

BlockedResults cross_entropy_blocked_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                          const at::Tensor& target, const CrossEntropyOptions& options,
                                          std::array<bool, 3> grad_mask, const at::Tensor& lse_given,
                                          const at::Tensor& row_scale, double scale) {
  const int64_t N = x.size(0), D = x.size(1), V = w.size(0);
  const at::ScalarType dtype = x.scalar_type();
  const auto compute = x.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), t = target.contiguous();
  const at::Tensor bc = b.has_value() ? b->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::BlockedCrossEntropy p{};
  p.x = xc.const_data_ptr(), p.w = wc.const_data_ptr(), p.bias = bc.defined() ? bc.const_data_ptr() : nullptr;
  p.target = t.const_data_ptr<int64_t>(), p.N = N, p.D = D, p.V = V, p.softcap = options.softcap;
  BlockedResults out;
  at::Tensor lse = lse_given;
  if (!lse_given.defined()) {
    p.splits = statistics_splits(N, V);
    const at::Tensor parts = at::empty({3, p.splits, N}, compute), target_logit = at::empty({N}, compute);
    p.part_max = parts[0].data_ptr(), p.part_sum = parts[1].data_ptr(), p.part_logit_sum = parts[2].data_ptr();
    p.target_logit = target_logit.data_ptr();
    C10_CUDA_CHECK(cuda::launch_blocked_statistics(p, to_kernel_dtype(dtype), stream));
    // The splits' statistics combined (the row passes' formulas: the max kept apart from the log-sum).
    const at::Tensor top = parts[0].amax(0);
    const at::Tensor log_sum = log_sum_over_splits(parts[1], parts[0], top, 1.0);
    lse = top + log_sum;
    const double smoothing = options.label_smoothing;
    out.loss_rows = (top - target_logit + log_sum) * (1 - smoothing) +
                    (lse - parts[2].sum(0) / static_cast<double>(V)) * smoothing + lse * lse * options.z_loss;
    out.lse = lse;
  }
  if (!(grad_mask[0] || grad_mask[1] || grad_mask[2])) return out;
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor scales = row_scale.defined() ? row_scale.contiguous() : at::Tensor();
  const Accumulators grads(grad_mask, N, D, V, compute);
  p.lse = lse_c.const_data_ptr(), p.label_smoothing = options.label_smoothing, p.z_loss = options.z_loss;
  p.row_scale = scales.defined() ? scales.const_data_ptr() : nullptr, p.scale = scale;
  p.skip_below = options.skip_small_gradients ? skip_threshold(dtype) : 0.0;
  p.grad_x = Accumulators::pointer(grads.x), p.grad_w = Accumulators::pointer(grads.w);
  p.grad_b = Accumulators::pointer(grads.b);
  C10_CUDA_CHECK(cuda::launch_blocked_gradients(p, to_kernel_dtype(dtype), stream));
  grads.finish(out, dtype);
  return out;
}

BlockedDistillationResults distillation_blocked_cuda(
    const at::Tensor& xs, const at::Tensor& ws, const std::optional<at::Tensor>& bs, const at::Tensor& xt,
    const at::Tensor& wt, const std::optional<at::Tensor>& bt, const at::Tensor& target,
    const DistillationOptions& options, std::array<bool, 3> grad_mask, const at::Tensor& row_scale, double scale) {
  const int64_t N = xs.size(0), V = ws.size(0);
  const at::ScalarType dtype = xs.scalar_type();
  const auto compute = xs.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  const cuda::LossDType kernel_dtype = to_kernel_dtype(dtype);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor xs_c = xs.contiguous(), ws_c = ws.contiguous(), xt_c = xt.contiguous(), wt_c = wt.contiguous();
  const at::Tensor bs_c = bs.has_value() ? bs->contiguous() : at::Tensor();
  const at::Tensor bt_c = bt.has_value() ? bt->contiguous() : at::Tensor();
  const bool hard = target.defined();
  const at::Tensor t = hard ? target.contiguous() : at::Tensor();
  const double T = options.temperature, beta = options.beta;
  cuda::BlockedDistillation p{};
  p.xs = xs_c.const_data_ptr(), p.ws = ws_c.const_data_ptr(), p.bs = bs_c.defined() ? bs_c.const_data_ptr() : nullptr;
  p.xt = xt_c.const_data_ptr(), p.wt = wt_c.const_data_ptr(), p.bt = bt_c.defined() ? bt_c.const_data_ptr() : nullptr;
  p.target = hard ? t.const_data_ptr<int64_t>() : nullptr;
  p.N = N, p.Ds = xs.size(1), p.Dt = xt.size(1), p.V = V;
  p.temperature = T, p.beta = beta, p.hard_weight = options.hard_weight;
  p.splits = statistics_splits(N, V);

  // 1. statistics: each split's maxes and sums, combined per row (row_stats, launchers.h)
  const at::Tensor parts = at::empty({5, p.splits, N}, compute);
  const at::Tensor target_logit = hard ? at::empty({N}, compute) : at::Tensor();
  p.part = parts.data_ptr(), p.target_logit = hard ? target_logit.data_ptr() : nullptr;
  C10_CUDA_CHECK(cuda::launch_blocked_distillation_statistics(p, kernel_dtype, stream));
  const at::Tensor row_stats = at::zeros({6, N}, compute);
  const at::Tensor s_max = parts[0].amax(0), t_max = parts[3].amax(0);
  row_stats[0].copy_(s_max);
  row_stats[1].copy_(log_sum_over_splits(parts[1], parts[0], s_max, 1 / T));
  if (hard) row_stats[2].copy_(log_sum_over_splits(parts[2], parts[0], s_max, 1.0));
  row_stats[3].copy_(t_max);
  row_stats[4].copy_(log_sum_over_splits(parts[4], parts[3], t_max, 1 / T));
  p.row_stats = row_stats.const_data_ptr();

  // 2. the soft loss's sums, then each row's loss (the row passes' formulas)
  const at::Tensor terms = at::empty({2, p.splits, N}, compute);
  p.part = terms.data_ptr();
  C10_CUDA_CHECK(cuda::launch_blocked_distillation_terms(p, kernel_dtype, stream));
  const at::Tensor sums = terms.sum(1);  // [2, N]
  const bool forward_kl = beta == 0, reverse_kl = beta == 1;
  const at::Tensor soft = forward_kl || reverse_kl ? sums[0] : sums[0] * beta + sums[1] * (1 - beta);
  BlockedDistillationResults out;
  out.loss_rows = soft * (T * T);
  if (hard) out.loss_rows = out.loss_rows + ((row_stats[0] - target_logit) + row_stats[2]) * options.hard_weight;
  if (!(grad_mask[0] || grad_mask[1] || grad_mask[2])) return out;

  // 3. gradients, with sum Q g (reverse KL: its sum; the JSD: (1 - beta) its second)
  if (!forward_kl) row_stats[5].copy_(reverse_kl ? sums[0] : sums[1] * (1 - beta));
  const at::Tensor scales = row_scale.defined() ? row_scale.contiguous() : at::Tensor();
  const Accumulators grads(grad_mask, N, p.Ds, V, compute);
  p.row_scale = scales.defined() ? scales.const_data_ptr() : nullptr, p.scale = scale;
  p.grad_x = Accumulators::pointer(grads.x), p.grad_w = Accumulators::pointer(grads.w);
  p.grad_b = Accumulators::pointer(grads.b);
  C10_CUDA_CHECK(cuda::launch_blocked_distillation_gradients(p, kernel_dtype, stream));
  grads.finish(out, dtype);
  return out;
}

const LossDevice kCudaLossDevice{&cuda_product, &cross_entropy_rows_cuda, &distillation_rows_cuda,
                                 &cross_entropy_blocked_cuda, &distillation_blocked_cuda};

}  // namespace
}  // namespace bigkernels

TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  bigkernels::register_loss_ops<&bigkernels::kCudaLossDevice>(m);
}
