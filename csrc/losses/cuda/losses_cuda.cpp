// The loss family on CUDA: chunks.cpp's loop with cuBLAS's products
// (through ATen) and the row passes of loss_kernels.cu, launched on the
// current stream. The targets are checked on the host (a copy and a sync per
// call), as the rows that count are chosen there.
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

const LossDevice kCudaLossDevice{&cuda_product, &cross_entropy_rows_cuda, &distillation_rows_cuda};

}  // namespace
}  // namespace bigkernels

TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  bigkernels::register_loss_ops<&bigkernels::kCudaLossDevice>(m);
}
