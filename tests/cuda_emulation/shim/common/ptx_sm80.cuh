// Emulation of csrc/common/ptx_sm80.cuh (see emu_cuda.h): the same functions,
// moving the same elements between the same lanes as the PTX ISA documents
// for ldmatrix.m8n8 and mma.m16n8k16 (the layouts are spelled out in the
// real header). Each is warp-collective: every lane posts its operands to
// the warp's exchange slots, the warp meets at a barrier, each lane computes
// its own results from all the slots, and the warp meets again before the
// slots are reused.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu_cuda.h"

namespace bigkernels {
namespace cuda {

inline unsigned char* dynamic_smem() { return g_dynamic_smem; }

namespace emulated {
inline uint16_t half_word(uint32_t reg, int which) { return static_cast<uint16_t>(reg >> (16 * which)); }

// Element `which` (0 = low half) of register `reg` of `lane` in the exchange slots.
template <typename T>
float element(const WarpExchange& x, int lane, int reg, int which) {
  const uint16_t bits = half_word(static_cast<uint32_t>(x.words[lane][reg]), which);
  T v;
  std::memcpy(&v, &bits, 2);
  return static_cast<float>(v);
}
}  // namespace emulated

template <int N, bool Trans>
void ldmatrix(uint32_t (&r)[N], const void* row_address) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  WarpExchange& x = warp_exchange();
  const int lane = threadIdx.x % 32;
  if (lane < 8 * N) {  // only lanes 0 .. 8N-1 supply row addresses
    require(reinterpret_cast<uintptr_t>(row_address) % 16 == 0, "ldmatrix row address 16-byte aligned");
    require(in_dynamic_smem(row_address, 16), "ldmatrix reads shared memory");
  }
  x.address[lane] = row_address;
  __syncwarp();
  for (int m = 0; m < N; ++m) {
    uint16_t lo, hi;
    if (!Trans) {  // row lane/4, elements 2(lane%4), 2(lane%4)+1
      const uint16_t* row = static_cast<const uint16_t*>(x.address[8 * m + lane / 4]);
      lo = row[2 * (lane % 4)], hi = row[2 * (lane % 4) + 1];
    } else {  // column lane/4 of rows 2(lane%4), 2(lane%4)+1
      lo = static_cast<const uint16_t*>(x.address[8 * m + 2 * (lane % 4)])[lane / 4];
      hi = static_cast<const uint16_t*>(x.address[8 * m + 2 * (lane % 4) + 1])[lane / 4];
    }
    r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  __syncwarp();
}

template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_m16n8k16: 16-bit inputs");
  WarpExchange& x = warp_exchange();
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) x.words[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) x.words[lane][4 + i] = b[i];
  __syncwarp();
  // A[row][k] lives in lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2;
  // B[k][col] in lane 4 col + (k % 8) / 2, register 4 + (k >= 8), half k % 2.
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float sum = c[i];
    for (int k = 0; k < 16; ++k) {
      const float av = emulated::element<T>(x, 4 * (row % 8) + (k % 8) / 2, (row >= 8) + 2 * (k >= 8), k % 2);
      const float bv = emulated::element<T>(x, 4 * col + (k % 8) / 2, 4 + (k >= 8), k % 2);
      sum += av * bv;
    }
    c[i] = sum;
  }
  __syncwarp();
}

}  // namespace cuda
}  // namespace bigkernels
