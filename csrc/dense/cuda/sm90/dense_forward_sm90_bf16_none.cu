// Written by generate_instantiations.py: one instantiation per file.
#include "dense/cuda/sm90/dense_forward_sm90.cuh"

namespace bigkernels {
namespace cuda {
namespace sm90 {
template struct DenseGemm<cutlass::bfloat16_t, Activation::kNone, false>;
}  // namespace sm90
}  // namespace cuda
}  // namespace bigkernels
