// The float and double attention kernels (SIMT), head dims up to 64.
#include "attention/cuda/attention_simt.cuh"

namespace bigkernels {
namespace cuda {
template cudaError_t launch_attention_forward_simt<float, 64>(const AttentionParams&, cudaStream_t);
template cudaError_t launch_attention_backward_simt<float, 64>(const AttentionParams&, cudaStream_t);
template cudaError_t launch_attention_forward_simt<double, 64>(const AttentionParams&, cudaStream_t);
template cudaError_t launch_attention_backward_simt<double, 64>(const AttentionParams&, cudaStream_t);
}  // namespace cuda
}  // namespace bigkernels
