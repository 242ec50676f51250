// The attention kernels for __half, head dims up to 256 (one instantiation per file).
#include "attention/cuda/attention_kernels.cuh"

namespace bigkernels {
namespace cuda {
template cudaError_t launch_attention_forward<__half, 256>(const AttentionParams&, cudaStream_t);
template cudaError_t launch_attention_backward<__half, 256>(const AttentionParams&, cudaStream_t);
}  // namespace cuda
}  // namespace bigkernels
