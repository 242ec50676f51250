// Which calls the sm_90a CUTLASS forward takes (the rest run on the mma.sync
// kernel), and the switch to its instantiations (each in its own .cu file).
#include <climits>

#include "dense/cuda/dense_forward_common.cuh"
#include "dense/cuda/sm90/dense_forward_sm90.cuh"

namespace bigkernels {
namespace cuda {
namespace sm90 {
#define BK_SM90_INSTANCE(T, A, P) extern template struct DenseGemm<T, A, P>;
#include "dense/cuda/sm90/instantiations.inc"
#undef BK_SM90_INSTANCE

template <typename T>
constexpr DType dtype_of() {
  return std::is_same_v<T, cutlass::bfloat16_t> ? DType::kBFloat16 : DType::kFloat16;
}
}  // namespace sm90

cudaError_t launch_dense_forward_sm90(const DenseForwardParams& p, cudaStream_t stream) {
  // TMA needs 16-byte aligned rows and bases; CUTLASS's problem sizes are int.
  const bool aligned = p.K % 8 == 0 && p.Nout % 8 == 0 && aligned16(p.x) && aligned16(p.w) && aligned16(p.out) &&
                       (p.bias == nullptr || aligned16(p.bias)) && (p.preact == nullptr || aligned16(p.preact));
  const bool fits_int = p.M <= INT_MAX && p.Nout <= INT_MAX && p.K <= INT_MAX;
  if (is_gated(p.act) || !aligned || !fits_int || p.K == 0) return cudaErrorNotSupported;
  const bool preact = p.preact != nullptr;
#define BK_SM90_INSTANCE(T, A, P)                                 \
  if (p.dtype == sm90::dtype_of<T>() && p.act == A && preact == P) \
    return sm90::DenseGemm<T, A, P>::run(p, stream);
#include "dense/cuda/sm90/instantiations.inc"
#undef BK_SM90_INSTANCE
  return cudaErrorNotSupported;  // e.g. the pre-activation of relu, which backward never asks for
}

}  // namespace cuda
}  // namespace bigkernels
