// The loss family on the CPU: chunks.cpp's loop with oneDNN's product (the
// dense family's cpu_linear_product) and the row passes of loss_kernels.cpp,
// rows split over threads (each row is one task's alone: the same bits
// whatever the thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dense/cpu/cpu_product.h"
#include "losses/chunks.h"
#include "losses/cpu/loss_kernels.h"

namespace bigkernels {
namespace {

void cross_entropy_rows_cpu(at::ScalarType dtype, const CrossEntropyRows& a, int64_t rows) {
  const LossCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(loss_cpu_kernels);
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) { kernels.cross_entropy_rows(dtype, a, r0, r1); });
}

void distillation_rows_cpu(at::ScalarType dtype, const DistillationRows& a, int64_t rows) {
  const LossCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(loss_cpu_kernels);
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) { kernels.distillation_rows(dtype, a, r0, r1); });
}

// No blocked kernels: on the CPU chunks of rows win (chunks.cpp says why).
const LossDevice kCpuLossDevice{&cpu_linear_product, &cross_entropy_rows_cpu, &distillation_rows_cpu, nullptr,
                                nullptr};

}  // namespace
}  // namespace bigkernels

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  bigkernels::register_loss_ops<&bigkernels::kCpuLossDevice>(m);
}
