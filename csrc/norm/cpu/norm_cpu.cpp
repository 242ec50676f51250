// CPU LayerNorm / RMSNorm with the residual add fused: one pass over each
// row for the sum and its statistics while the row is in L1, rows split over
// threads. Backward: the input gradient per row, the weight and bias
// gradients summed per fixed block of rows (deterministic whatever the
// thread count), then across blocks. Row loops: norm_kernels.cpp, per capability.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "common/parallel_rows.h"

#include "norm/cpu/norm_kernels.h"
#include "norm/norm.h"

namespace bigkernels {
namespace {

constexpr int64_t kBlockRows = 64;  // rows per partial sum of the weight and bias gradients

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms, bool keep_sum) {
  check_norm_args(input, residual, weight, bias, eps);
  TORCH_CHECK_VALUE(!rms || !bias.has_value(), "bigkernels.rms_norm: takes no bias");
  const int64_t N = input.size(-1), M = N ? input.numel() / N : 0;
  const at::Tensor x = input.contiguous();
  const std::optional<at::Tensor> r = contiguous(residual), w = contiguous(weight), b = contiguous(bias);
  at::Tensor out = at::empty_like(x);
  const bool write_sum = r.has_value() && keep_sum;
  at::Tensor sum = write_sum ? at::empty_like(x) : at::empty({0}, x.options());
  const auto stats = x.options().dtype(stats_dtype(x));
  at::Tensor mean = at::empty({rms ? 0 : M}, stats), rstd = at::empty({M}, stats);
  // A sum not kept goes through the output's row: the kernel reads each
  // element of it before writing the output's (a write of the whole sum saved).
  void* sum_rows = !r.has_value() ? nullptr : write_sum ? sum.mutable_data_ptr() : out.mutable_data_ptr();
  const NormForwardRows rows{x.const_data_ptr(), data_or_null(r), data_or_null(w), data_or_null(b),
                             out.mutable_data_ptr(), sum_rows,
                             rms ? nullptr : mean.mutable_data_ptr(), rstd.mutable_data_ptr(), N, eps};
  const NormCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(norm_cpu_kernels);
  at::parallel_for(0, M, grain_rows(N), [&](int64_t r0, int64_t r1) {
    kernels.forward_rows(x.scalar_type(), rows, r0, r1);
  });
  return {out, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_cpu(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_sum, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, bool rms,
    std::array<bool, 3> output_mask) {
  check_norm_backward_args(grad_output, grad_sum, x, weight, mean, rstd, rms);
  const int64_t N = x.size(-1), M = N ? x.numel() / N : 0;
  const at::Tensor g = like_x(grad_output, x), xc = x.contiguous();
  const std::optional<at::Tensor> gs = grad_sum.has_value() ? std::optional(like_x(*grad_sum, x)) : std::nullopt;
  const std::optional<at::Tensor> w = contiguous(weight);
  at::Tensor grad_input = at::empty_like(xc);
  const bool want_w = output_mask[1] && w.has_value(), want_b = output_mask[2];
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  const auto stats = x.options().dtype(stats_dtype(x));
  at::Tensor partial_w = at::zeros({want_w ? blocks : 0, N}, stats);
  at::Tensor partial_b = at::zeros({want_b ? blocks : 0, N}, stats);
  const NormBackwardRows rows{g.const_data_ptr(), data_or_null(gs), xc.const_data_ptr(), data_or_null(w),
                              rms ? nullptr : mean.const_data_ptr(), rstd.const_data_ptr(),
                              grad_input.mutable_data_ptr(), N};
  const NormCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(norm_cpu_kernels);
  const int64_t row_bytes = N * partial_w.element_size();
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain_rows(N) / kBlockRows), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      void* dw = want_w ? static_cast<char*>(partial_w.mutable_data_ptr()) + blk * row_bytes : nullptr;
      void* db = want_b ? static_cast<char*>(partial_b.mutable_data_ptr()) + blk * row_bytes : nullptr;
      kernels.backward_rows(x.scalar_type(), rows, dw, db, blk * kBlockRows, std::min(M, (blk + 1) * kBlockRows));
    }
  });
  const auto none = [&] { return at::empty({0}, x.options()); };
  return {output_mask[0] ? grad_input : none(), want_w ? partial_w.sum(0).to(x.scalar_type()) : none(),
          want_b ? partial_b.sum(0).to(x.scalar_type()) : none()};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("norm_forward", &norm_forward_cpu);
  m.impl("norm_backward", &norm_backward_cpu);
}

}  // namespace bigkernels
