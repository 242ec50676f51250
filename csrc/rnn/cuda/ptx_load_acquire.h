// ld.acquire.gpu: the grid barrier's poll (rnn_persistent.cu). A load with
// acquire semantics at device scope, so that what the block that released the
// barrier wrote before its release is visible after the poll sees it, without
// the read-modify-write an atomicAdd(p, 0) poll costs at the L2 on every spin.
//
// The host emulation replaces this header with
// tests/cuda_emulation/shim/rnn/cuda/ptx_load_acquire.h (std::atomic_ref, which
// ThreadSanitizer understands), as the shim replaces common/ptx_sm80.cuh. It
// is a .h on purpose: tests/test_cuda_emulation.py copies a family's .cu and
// .cuh files next to the sources it compiles, where they would shadow the shim.
#pragma once

namespace bigkernels {
namespace cuda {

__device__ __forceinline__ unsigned load_acquire_gpu(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

}  // namespace cuda
}  // namespace bigkernels
