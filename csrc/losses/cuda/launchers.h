// Raw-pointer entry points of the loss family's CUDA row passes
// (loss_kernels.cu). The .cu file sees only this header and CUDA's own, which
// keeps nvcc's compile times short and lets tests/cuda_emulation/losses/ call
// the launchers directly; tensors, products and checks live in
// losses_cuda.cpp and ../chunks.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "losses/loss_rows.h"

namespace bigkernels {
namespace cuda {

enum class LossDType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// The passes over `rows` rows of a chunk, with the CPU rows' contract
// (losses/loss_rows.h, cpu/loss_kernels.cpp): a block of kLossRowThreads per
// row, grid-striding over rows; max_blocks caps the grid (0: the launcher's
// choice; the tests set a small cap to run the stride).
constexpr int kLossRowThreads = 256;
cudaError_t launch_cross_entropy_rows(const CrossEntropyRows& a, int64_t rows, LossDType dtype, int64_t max_blocks,
                                      cudaStream_t stream);
cudaError_t launch_distillation_rows(const DistillationRows& a, int64_t rows, LossDType dtype, int64_t max_blocks,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace bigkernels
