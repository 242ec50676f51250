// What the shared activation formulas (common/activations.h) and the CPU
// row loops need from at::vec::Vectorized, for the CPU capability this file
// is compiled for (see common/capability.h). Included only by files compiled
// once per capability.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <type_traits>

#include "common/activations.h"

// Forced inline (BK_HD does the same for the shared formulas): the row loops
// instantiate every activation in one function, and past GCC's inlining
// budget it would call these per chunk, passing vectors through memory (the
// relu pass ran 1.5x slower when exp grew by a few instructions).
#define BK_VEC_INLINE inline __attribute__((always_inline))

namespace bigkernels {

// Shared by every Vectorized type: selections by comparison (blendv(a, b,
// mask) = mask ? b : a; comparisons are false for NaN, so NaN passes through).
template <typename C>
struct VecSelectOps {
  using V = at::vec::Vectorized<C>;
  static BK_VEC_INLINE V abs(const V& x) { return x.abs(); }
  static BK_VEC_INLINE V if_negative(const V& c, const V& a, const V& b) { return V::blendv(b, a, c < V(0)); }
  // ATen's clamp_min/clamp_max keep NaN on every capability (max_ps(lo, x)
  // returns x when x is NaN): one instruction each.
  static BK_VEC_INLINE V at_least(const V& x, const V& lo) { return at::vec::clamp_min(x, lo); }
  static BK_VEC_INLINE V clamp(const V& x, const V& lo, const V& hi) { return at::vec::clamp_min(at::vec::clamp_max(x, hi), lo); }
  static BK_VEC_INLINE V relu(const V& x) { return at::vec::clamp_min(x, V(0)); }
  static BK_VEC_INLINE V step(const V& x) { return V::blendv(V(1), V(0), x <= V(0)); }  // relu's derivative
};

// double: ATen's vectorized exp/erf/tanh (Sleef on AVX2 and AVX-512).
template <>
struct MathOps<at::vec::Vectorized<double>> : VecSelectOps<double> {
  static BK_VEC_INLINE V exp(const V& x) { return x.exp(); }
  static BK_VEC_INLINE V erf(const V& x) { return x.erf(); }
  static BK_VEC_INLINE V tanh(const V& x) { return x.tanh(); }
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// 2^(n-1) for the lanes of t = n + 1.5 * 2^23 (n in its low mantissa bits):
// n << 23 plus the exponent bias less one. n = -126 gives +0 (a zero
// exponent field, no mantissa); n = 128 gives 2^127.
BK_VEC_INLINE at::vec::Vectorized<float> half_pow2_from_shifted(const at::vec::Vectorized<float>& t) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(_mm512_castps_si512(t), 23),
                                              _mm512_set1_epi32(126 << 23)));
#else
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23),
                                              _mm256_set1_epi32(126 << 23)));
#endif
}
#endif

// float: inline polynomials, no function call: they run 1.5-2x faster than
// the Sleef calls on AVX2 (docs/PERFORMANCE.md); oneDNN's JIT GELU, which
// eager F.gelu runs, is the bar.
template <>
struct MathOps<at::vec::Vectorized<float>> : VecSelectOps<float> {
  // e^x = 2^n e^r, n = round(x log2 e) by the shifter, r = x - n ln 2 in two
  // steps (Cephes' expf), e^r = 1 + r (1 + r p(r)) by Horner to the end,
  // Cephes' degree-5 p. At most 0.9 ulp, mean error -0.01 ulp; ATen's exp_u20
  // (used before) had up to 5.3 ulp, and a mean of -0.24 ulp on [-1, 1] and
  // -1.7 on [0, 88]. Computed as 2^(n-1) * 2e^r so that n reaches 128: +inf and
  // x > 88.73 give inf; -inf and results below 1.7e-38 give 0 (no
  // denormals); exp(0) = 1 exactly; NaN stays NaN (the clamp keeps it).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  static BK_VEC_INLINE V exp(const V& x) {
    const V xc = clamp(x, V(-87.5f), V(89.0f));  // n in [-126, 128]
    const V shifter(12582912.0f);                // 1.5 * 2^23: adding it rounds to an integer
    const V t = at::vec::fmadd(xc, V(1.44269504088896341f), shifter);
    const V n = t - shifter;
    V r = at::vec::fnmadd(n, V(0.693359375f), xc);  // ln 2 = 0.693359375 - 2.12194440e-4
    r = at::vec::fnmadd(n, V(-2.12194440e-4f), r);
    // Everything doubled (exactly): 2p, then 2 + r 2p, then 2e^r.
    V p = at::vec::fmadd(V(2 * 1.9875691500e-4f), r, V(2 * 1.3981999507e-3f));
    p = at::vec::fmadd(p, r, V(2 * 8.3334519073e-3f));
    p = at::vec::fmadd(p, r, V(2 * 4.1665795894e-2f));
    p = at::vec::fmadd(p, r, V(2 * 1.6666665459e-1f));
    p = at::vec::fmadd(p, r, V(2 * 5.0000001201e-1f));
    const V h = at::vec::fmadd(p, r, V(2));
    return at::vec::fmadd(h, r, V(2)) * half_pow2_from_shifted(t);
  }
#else
  // ATen's: std::exp lane by lane, or Sleef's u10 (aarch64); no FMA here.
  static BK_VEC_INLINE V exp(const V& x) { return x.exp(); }
#endif
  // Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), as ATen's own erf.
  static BK_VEC_INLINE V erf(const V& x) {
    const V a = x.abs();
    const V t = (at::vec::fmadd(V(0.3275911f), a, V(1))).reciprocal();
    V p = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
    p = at::vec::fmadd(p, t, V(1.421413741f));
    p = at::vec::fmadd(p, t, V(-0.284496736f));
    p = at::vec::fmadd(p, t, V(0.254829592f));
    const V r = V(1) - p * t * exp(V(0) - a * a);
    return r ^ (x & V(-0.0f));  // x's sign bit onto r >= 0
  }
  // Cephes' odd polynomial for |x| < 0.625 (where the exp form would cancel),
  // 1 - 2 / (exp(2|x|) + 1) with x's sign elsewhere.
  static BK_VEC_INLINE V tanh(const V& x) {
    const V a = x.abs(), x2 = x * x;
    V p = at::vec::fmadd(V(-5.70498872745e-3f), x2, V(2.06390887954e-2f));
    p = at::vec::fmadd(p, x2, V(-5.37397155531e-2f));
    p = at::vec::fmadd(p, x2, V(1.33314422036e-1f));
    p = at::vec::fmadd(p, x2, V(-3.33332819422e-1f));
    const V small = at::vec::fmadd(p * x2, x, x);
    const V large = V(1) - V(2) / (exp(a + a) + V(1));
    return V::blendv(if_negative(x, V(0) - large, large), small, a < V(0.625f));
  }
};

// Everything that is not keyed on a Vectorized type goes in a namespace per
// capability, so that the builds for different capabilities never define the
// same symbol (the linker would keep just one of them).
namespace CPU_CAPABILITY {

// Asks for the `bytes` bytes from p, a cache line at a time (for_write: lines
// about to be written). Spread such requests over a loop: a burst of more
// than the core's ~16 line-fill buffers stalls (docs/PERFORMANCE.md).
template <bool for_write = false>
BK_VEC_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, for_write ? 1 : 0);
}

// The same into the L2 cache (prefetcht1), for streams the loop reaches a
// few thousand cycles later: the L1's line-fill buffers, which prefetcht0
// waits on, then cap a core at ~16 lines in flight. Decoding a 32k-key
// cache: 17.7 -> 21.5 GB/s (docs/PERFORMANCE.md).
BK_VEC_INLINE void prefetch_bytes_to_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 2);
}

// A float vector's lanes as two double vectors (low half, high half), where
// the instructions are at hand; elsewhere callers go lane by lane.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool widens_in_registers = true;
BK_VEC_INLINE std::array<at::vec::Vectorized<double>, 2> widen(const at::vec::Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  return {_mm512_cvtps_pd(_mm512_castps512_ps256(x)),
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)))};
#else
  const __m256 x = v;
  return {_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))};
#endif
}
#else
constexpr bool widens_in_registers = false;
inline std::array<at::vec::Vectorized<double>, 2> widen(const at::vec::Vectorized<float>&) { return {}; }
#endif

// out[0:4] = scale times the lane sums of x[0], ..., x[3]. For float on
// AVX2/AVX-512 the four reductions run as one transposing tree (pairs
// interleaved, then 128-bit lanes folded): 13 instructions instead of four
// separate reductions' ~36, which were half of a bf16 decoding step's score
// loop (docs/PERFORMANCE.md). The lanes are summed in another order than
// vec_reduce_all's.
template <typename C>
BK_VEC_INLINE void store_four_sums(const at::vec::Vectorized<C>* x, C* out, C scale = C(1)) {
  using V = at::vec::Vectorized<C>;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<C, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 a = x[0], b = x[1], c = x[2], d = x[3];
    // per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3], likewise c and d,
    // then [a, b, c, d]: each lane's four partial sums
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 lanes = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                       _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(lanes),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1)));
#else
    const __m256 a = x[0], b = x[1], c = x[2], d = x[3];
    const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    const __m256 half = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
#endif
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    _mm_storeu_ps(out, _mm_mul_ps(sums, _mm_set1_ps(scale)));
    return;
  }
#endif
  for (int j = 0; j < 4; ++j) out[j] = at::vec::vec_reduce_all<C>([](V u, V w) { return u + w; }, x[j]) * scale;
}

#if defined(CPU_CAPABILITY_AVX512)
// AVX512-BF16 (vdpbf16ps): acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1] for 16
// pairs of bf16 lanes, the products exact in float (denormal inputs count
// as zero, as the instruction defines). As inline assembly, so that the
// capability's compiler flags (ATen's, without the extension) stay as they
// are; run only where has_avx512_bf16().
BK_VEC_INLINE __m512 dot_bf16_pairs(__m512 acc, __m512i a, __m512i b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

inline bool has_avx512_bf16() {
  static const bool has = [] {
    __builtin_cpu_init();  // (a no-op once libgcc's constructor has run it)
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
}
#else
constexpr bool has_avx512_bf16() { return false; }  // (only the AVX-512 kernels use it)
#endif

// Storage type T as vectors of its compute type C (float; double for
// double): a chunk is two vectors of C, kWidth elements. bf16 and half are
// converted in registers, inside the loops; two independent vectors per
// chunk give the long exp/erf dependency chains something to overlap with.
template <typename T>
struct VecIO {
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<T>;
  using C = std::conditional_t<kReduced, float, T>;
  using V = at::vec::Vectorized<C>;
  static constexpr int64_t kPart = V::size();
  static constexpr int64_t kWidth = 2 * kPart;
  using Chunk = std::array<V, 2>;

  // Loads n <= kWidth elements (lanes past n are unspecified: never stored).
  static BK_VEC_INLINE Chunk load(const T* p, int64_t n) {
    if constexpr (kReduced) {
      static_assert(at::vec::Vectorized<T>::size() == kWidth);
      const auto v = n == kWidth ? at::vec::Vectorized<T>::loadu(p) : at::vec::Vectorized<T>::loadu(p, n);
      auto [lo, hi] = at::vec::convert_to_float<T>(v);
      return {lo, hi};
    } else if (n == kWidth) {
      return {V::loadu(p), V::loadu(p + kPart)};
    } else {
      return {V::loadu(p, std::min(n, kPart)), n > kPart ? V::loadu(p + kPart, n - kPart) : V(0)};
    }
  }
  static BK_VEC_INLINE void store(T* p, const Chunk& c, int64_t n) {
    if constexpr (kReduced) {
      const auto v = at::vec::convert_from_float<T>(c[0], c[1]);
      if (n == kWidth) {
        v.store(p);
      } else {
        v.store(p, static_cast<int>(n));
      }
    } else if (n == kWidth) {
      c[0].store(p);
      c[1].store(p + kPart);
    } else {
      c[0].store(p, static_cast<int>(std::min(n, kPart)));
      if (n > kPart) c[1].store(p + kPart, static_cast<int>(n - kPart));
    }
  }
  // acc[0, n) += c, acc in the compute type (the norms' partial sums).
  static BK_VEC_INLINE void accumulate(C* acc, const Chunk& c, int64_t n) {
    if (n == kWidth) {
      (V::loadu(acc) + c[0]).store(acc);
      (V::loadu(acc + kPart) + c[1]).store(acc + kPart);
      return;
    }
    for (int64_t part = 0; part < 2 && n > part * kPart; ++part) {
      const int m = static_cast<int>(std::min(kPart, n - part * kPart));
      C* a = acc + part * kPart;
      (V::loadu(a, m) + c[part]).store(a, m);
    }
  }
  // acc[0, n) += c in double (dense's bias-gradient partial sums): summed in
  // float, a block's rounding errors would add up to more than torch's sum of
  // the same values (issue 16 §4); in double only each value's own rounding is left.
  static BK_VEC_INLINE void accumulate_double(double* acc, const Chunk& c, int64_t n) {
    using D = at::vec::Vectorized<double>;
    if constexpr (std::is_same_v<C, double>) {
      for (int64_t part = 0; part < 2 && n > part * kPart; ++part) {
        const int m = static_cast<int>(std::min(kPart, n - part * kPart));
        double* a = acc + part * kPart;
        (D::loadu(a, m) + c[part]).store(a, m);
      }
    } else if (n == kWidth && widens_in_registers) {
      for (int part = 0; part < 2; ++part) {
        const auto [lo, hi] = widen(c[part]);
        double* a = acc + part * kPart;
        (D::loadu(a) + lo).store(a);
        (D::loadu(a + D::size()) + hi).store(a + D::size());
      }
    } else {
      std::array<float, kWidth> lanes;
      c[0].store(lanes.data());
      c[1].store(lanes.data() + kPart);
      for (int64_t i = 0; i < n; ++i) acc[i] += lanes[i];
    }
  }
};

// One vector of C from n <= its width elements of T (lanes past n are zero),
// bf16/fp16 widened to float in registers: what the small products need to
// read K and V in place instead of converting blocks into scratch first.
template <typename C, typename T>
BK_VEC_INLINE at::vec::Vectorized<C> load_as(const T* p, int64_t n = at::vec::Vectorized<C>::size()) {
  using V = at::vec::Vectorized<C>;
  if constexpr (std::is_same_v<T, C>) {
    return n == V::size() ? V::loadu(p) : V::loadu(p, static_cast<int>(n));
  } else {
    static_assert(std::is_same_v<C, float> && at::vec::is_reduced_floating_point_v<T>);
    if (n == V::size()) {
      V x;
      at::vec::load_to_float<T>(p, x);
      return x;
    }
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, static_cast<int>(n))));
  }
}

// Calls f(T{}) with the storage type T of dtype, once per call, outside the
// loops; VecIO<T>::C is then its compute type.
template <typename F>
void dispatch_storage_type(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: return f(float{});
    case c10::ScalarType::Double: return f(double{});
    case c10::ScalarType::BFloat16: return f(c10::BFloat16{});
    case c10::ScalarType::Half: return f(c10::Half{});
    default: TORCH_CHECK_TYPE(false, "bigkernels: no CPU kernel for dtype ", dtype);
  }
}

// {f(a[0]), f(a[1])}, or {f(a[0], b[0]), f(a[1], b[1])}.
template <typename Chunk, typename F>
BK_VEC_INLINE Chunk map_parts(F&& f, const Chunk& a) {
  return {f(a[0]), f(a[1])};
}
template <typename Chunk, typename F>
BK_VEC_INLINE Chunk map_parts(F&& f, const Chunk& a, const Chunk& b) {
  return {f(a[0], b[0]), f(a[1], b[1])};
}

}  // namespace CPU_CAPABILITY
}  // namespace bigkernels
