// The decoding kernel (attention_decode.cuh) for every dtype and head-dim bucket.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/cuda/attention_decode.cuh"

namespace bigkernels {
namespace cuda {
#define BK_DECODE(T)                                                                     \
  template cudaError_t launch_attention_decode<T, 64>(const AttentionParams&, cudaStream_t);  \
  template cudaError_t launch_attention_decode<T, 128>(const AttentionParams&, cudaStream_t); \
  template cudaError_t launch_attention_decode<T, 256>(const AttentionParams&, cudaStream_t);
BK_DECODE(__half)
BK_DECODE(__nv_bfloat16)
BK_DECODE(float)
BK_DECODE(double)
#undef BK_DECODE
}  // namespace cuda
}  // namespace bigkernels
