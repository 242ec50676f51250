// Hopper (sm_90a) dense + activation forward on CUTLASS: a warp-specialized
// TMA + wgmma mainloop (cooperative, 128 x 256 x 64 tile, 2 x 1 cluster: the
// configuration that reached 709 TFLOP/s with GELU at 8192^3 on the H200 in a
// standalone program, DESIGN.md) and CUTLASS's epilogue visitor tree for
// out = act(x @ w^T + bias), with the pre-activation as an auxiliary store
// where backward needs it.
//
// The GEMM in CUTLASS's terms: A = x (M x K, row-major), B = w^T (K x N,
// column-major: w's rows), D = out (M x N, row-major), bias one per column of
// D. The activation is ours (common/activations.h, so +-inf give the same
// limits as every other path), a template parameter: one instantiation per
// (dtype, activation, pre-activation store) in its own .cu file
// (generate_instantiations.py writes them). Gated activations stay on the
// mma.sync kernel: CUTLASS's epilogue has no pairing of columns.
//
// Built only with BIGKERNELS_SM90=1 and CUTLASS's headers (setup.py), run
// only with BIGKERNELS_SM90=1 at run time on an sm_90 GPU, until a GPU run
// has checked it: it has never run.
#pragma once

// CUTLASS's device-side asserts are function calls, and ptxas serializes the
// wgmma pipeline across any call (warning C7510): off, as in CUTLASS's own
// release builds. (tests/test_sm90_build.py fails if the warning comes back.)
#ifndef NDEBUG
#define NDEBUG
#endif
#include <cassert>

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "common/activations.h"
#include "dense/cuda/launchers.h"

namespace bigkernels {
namespace cuda {
namespace sm90 {

// Our activation A as CUTLASS's epilogue applies one: on a scalar, or on an
// array of them (the epilogue hands it fragments).
template <Activation A>
struct ActivationOf {
  template <class T>
  struct Fn {
    CUTLASS_HOST_DEVICE T operator()(T const& z) const { return act_forward<A>(z); }
  };
  template <class T, int N>
  struct Fn<cutlass::Array<T, N>> {
    CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& z) const {
      cutlass::Array<T, N> y;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < N; ++i) y[i] = act_forward<A>(z[i]);
      return y;
    }
  };
};

template <typename T, Activation A, bool kStorePreact>
struct DenseGemm {
  static_assert(!is_gated(A), "gated activations run on the mma.sync kernel");
  using Element = T;
  using Acc = float;
  using LayoutA = cutlass::layout::RowMajor;     // x
  using LayoutB = cutlass::layout::ColumnMajor;  // w^T
  using LayoutD = cutlass::layout::RowMajor;     // out (and the pre-activation)
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16 bytes
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;

  template <class X>
  using Act = typename ActivationOf<A>::template Fn<X>;
  using Fusion = cute::conditional_t<
      kStorePreact,
      cutlass::epilogue::fusion::LinCombPerColBiasEltActAux<LayoutD, Act, Element, Acc, Element, Element, Element>,
      cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Act, Element, Acc, Element, Element>>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, void, LayoutD, kAlign, Element, LayoutD, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, Acc,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Defined below the class, so not inline: the dispatcher's `extern template`
  // then keeps each kernel in its own .cu file.
  static cudaError_t run(const DenseForwardParams& p, cudaStream_t stream);
};

template <typename T, Activation A, bool kStorePreact>
cudaError_t DenseGemm<T, A, kStorePreact>::run(const DenseForwardParams& p, cudaStream_t stream) {
  using namespace cute;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.Nout), K = static_cast<int>(p.K);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const Element*>(p.x), cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(M, K, 1)),
       static_cast<const Element*>(p.w), cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(N, K, 1))},
      {{},  // the fusion's arguments, below
       nullptr, {},  // no C
       static_cast<Element*>(p.out), cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(M, N, 1))}};
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.f;
  fusion.beta = 0.f;
  fusion.bias_ptr = static_cast<const Element*>(p.bias);  // null: no bias
  if constexpr (kStorePreact) {
    fusion.aux_ptr = static_cast<Element*>(p.preact);
    using StrideAux = typename std::remove_reference_t<decltype(fusion)>::StrideAux;
    fusion.dAux = cutlass::make_cute_packed_stride(StrideAux{}, make_shape(M, N, 1));
  }
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;  // the caller falls back
  // A workspace, if the tile scheduler asks for one, stream-ordered (this
  // lean .cu does not see torch's caching allocator).
  void* workspace = nullptr;
  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  if (workspace_bytes > 0 && cudaMallocAsync(&workspace, workspace_bytes, stream) != cudaSuccess) {
    return cudaErrorMemoryAllocation;
  }
  cudaError_t e = cudaErrorLaunchFailure;
  if (gemm.initialize(args, workspace, stream) == cutlass::Status::kSuccess &&
      gemm.run(stream) == cutlass::Status::kSuccess) {
    e = cudaGetLastError();
  }
  if (workspace != nullptr) cudaFreeAsync(workspace, stream);
  return e;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace bigkernels
