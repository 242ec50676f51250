// CUDA implementations of the norm ops: tensors in, the shared checks, raw
// pointer launches on the current stream (kernels in norm_kernels.cu). Same
// contract as the CPU op (csrc/norm/cpu/norm_cpu.cpp): sum only with a
// residual, mean empty for RMSNorm, stats in float (double for float64), the
// weight and bias gradients summed over the kernel's partial rows by ATen
// (deterministic: no atomics).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "norm/cuda/launchers.h"
#include "norm/norm.h"

namespace bigkernels {
namespace {

cuda::NormDType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::NormDType::kFloat16;
    case at::kBFloat16: return cuda::NormDType::kBFloat16;
    case at::kFloat: return cuda::NormDType::kFloat32;
    case at::kDouble: return cuda::NormDType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "bigkernels norm: unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms, bool keep_sum) {
  check_norm_args(input, residual, weight, bias, eps);
  TORCH_CHECK_VALUE(!rms || !bias.has_value(), "bigkernels.rms_norm: takes no bias");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(-1), M = N ? input.numel() / N : 0;
  const at::Tensor x = input.contiguous();
  const std::optional<at::Tensor> r = contiguous(residual), w = contiguous(weight), b = contiguous(bias);
  at::Tensor out = at::empty_like(x);
  at::Tensor sum = r.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  const auto stats = x.options().dtype(stats_dtype(x));
  at::Tensor mean = at::empty({rms ? 0 : M}, stats), rstd = at::empty({M}, stats);
  cuda::NormForwardParams p{};
  p.input = x.const_data_ptr();
  p.residual = data_or_null(r);
  p.weight = data_or_null(w);
  p.bias = data_or_null(b);
  p.out = out.mutable_data_ptr();
  p.sum = r.has_value() ? sum.mutable_data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.mutable_data_ptr();
  p.rstd = rstd.mutable_data_ptr();
  p.M = M, p.N = N, p.eps = eps;
  p.dtype = to_kernel_dtype(x.scalar_type());
  C10_CUDA_CHECK(cuda::launch_norm_forward(p, c10::cuda::getCurrentCUDAStream()));
  // Without keep_sum the kernel still writes the sum (its own buffer; unlike
  // the CPU's, it has not been checked to read each element before the
  // output's write), and the op returns none.
  return {out, keep_sum ? sum : at::empty({0}, x.options()), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_cuda(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_sum, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, bool rms,
    std::array<bool, 3> output_mask) {
  check_norm_backward_args(grad_output, grad_sum, x, weight, mean, rstd, rms);
  const int64_t N = x.size(-1), M = N ? x.numel() / N : 0;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = like_x(grad_output, x), xc = x.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const std::optional<at::Tensor> gs = grad_sum.has_value() ? std::optional(like_x(*grad_sum, x)) : std::nullopt;
  const std::optional<at::Tensor> w = contiguous(weight);
  const bool want_x = output_mask[0], want_w = output_mask[1] && w.has_value(), want_b = output_mask[2];
  const auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_input = want_x ? at::empty_like(xc) : none();
  // Partial column sums, one row per row of the kernel's grid, added up by
  // ATen's (deterministic) sum, as the CPU op adds its row blocks.
  const int64_t rows = cuda::norm_backward_partial_rows(M, 0);
  const auto stats = x.options().dtype(stats_dtype(x));
  at::Tensor partial_w = at::empty({want_w ? rows : 0, N}, stats);
  at::Tensor partial_b = at::empty({want_b ? rows : 0, N}, stats);
  cuda::NormBackwardParams p{};
  p.grad_out = g.const_data_ptr();
  p.grad_sum = data_or_null(gs);
  p.x = xc.const_data_ptr();
  p.weight = data_or_null(w);
  p.mean = rms ? nullptr : mc.const_data_ptr();
  p.rstd = rc.const_data_ptr();
  p.grad_input = want_x ? grad_input.mutable_data_ptr() : nullptr;
  p.weight_partials = want_w ? partial_w.mutable_data_ptr() : nullptr;
  p.bias_partials = want_b ? partial_b.mutable_data_ptr() : nullptr;
  p.M = M, p.N = N;
  p.dtype = to_kernel_dtype(x.scalar_type());
  C10_CUDA_CHECK(cuda::launch_norm_backward(p, c10::cuda::getCurrentCUDAStream()));
  // M == 0: no partial rows, and the sums are zeros, as on the CPU.
  return {grad_input, want_w ? partial_w.sum(0).to(x.scalar_type()) : none(),
          want_b ? partial_b.sum(0).to(x.scalar_type()) : none()};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("norm_forward", &norm_forward_cuda);
  m.impl("norm_backward", &norm_backward_cuda);
}

}  // namespace bigkernels
