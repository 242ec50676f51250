// Emulation of csrc/rnn/cuda/ptx_load_acquire.h (see emu_cuda.h): the same
// acquire load through std::atomic_ref, so that ThreadSanitizer sees the
// ordering the grid barrier's poll gives, and no more.
#pragma once

#include <atomic>

#include "emu_cuda.h"

namespace bigkernels {
namespace cuda {

inline unsigned load_acquire_gpu(const unsigned* p) {
  return std::atomic_ref<unsigned>(*const_cast<unsigned*>(p)).load(std::memory_order_acquire);
}

}  // namespace cuda
}  // namespace bigkernels
