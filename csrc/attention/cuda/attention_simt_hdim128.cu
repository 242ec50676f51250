// The float and double attention kernels (SIMT), head dims up to 128.
#include "attention/cuda/attention_simt.cuh"

namespace bigkernels {
namespace cuda {
template cudaError_t launch_attention_forward_simt<float, 128>(const AttentionParams&, cudaStream_t);
template cudaError_t launch_attention_backward_simt<float, 128>(const AttentionParams&, cudaStream_t);
template cudaError_t launch_attention_forward_simt<double, 128>(const AttentionParams&, cudaStream_t);
template cudaError_t launch_attention_backward_simt<double, 128>(const AttentionParams&, cudaStream_t);
}  // namespace cuda
}  // namespace bigkernels
