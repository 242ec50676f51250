// The bf16 instantiation of the mma.sync forward (one per file: parallel builds).
#include "dense/cuda/dense_forward_mma.cuh"

namespace bigkernels {
namespace cuda {
template cudaError_t launch_dense_forward_mma<__nv_bfloat16>(const DenseForwardParams& p, cudaStream_t stream);
}  // namespace cuda
}  // namespace bigkernels
