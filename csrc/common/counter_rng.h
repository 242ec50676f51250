// A counter-based random number generator for dropout: the uniform number of
// element `counter` under `seed` is a pure function of the two, so backward
// regenerates forward's dropout mask without storing it, any thread can
// produce any element, and the same seed gives the same mask on any thread
// count. The mixing is splitmix64's finaliser (Steele, Lea & Flood 2014),
// applied to the counter and then to the seed combined with it; 24 bits of
// the result give a float in [0, 1). Torch-free, for CPU and CUDA alike.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BK_RNG_HD __host__ __device__ __forceinline__
#else
#define BK_RNG_HD inline
#endif

namespace bigkernels {

BK_RNG_HD uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, 1), 24 random bits.
BK_RNG_HD float counter_uniform(uint64_t seed, uint64_t counter) {
  return static_cast<float>(mix64(seed ^ mix64(counter)) >> 40) * (1.0f / 16777216.0f);
}

}  // namespace bigkernels
