// The dense family's CPU row loops on at::vec::Vectorized. Compiled once per
// CPU capability (setup.py; capability.h): everything here lives in a
// capability-named namespace, and only the table at the end is seen outside.
#include "dense/cpu/dense_kernels.h"

#include "common/vec_math.h"

#include <algorithm>
#include <type_traits>

namespace bigkernels {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
void forward_rows(Activation act, T* z, const T* bias, bool keep_preact, T* out, int64_t r0, int64_t r1,
                  int64_t nz, int64_t nout) {
  using IO = VecIO<T>;
  const bool gated = is_gated(act);
  const auto add = [](const auto& u, const auto& v) { return u + v; };
  const auto mul = [](const auto& u, const auto& v) { return u * v; };
  dispatch_activation(act, [&](auto tag) {
    const auto f = [](const auto& v) { return act_forward<decltype(tag)::value>(v); };
    for (int64_t r = r0; r < r1; ++r) {
      T* zr = z + r * nz;
      T* y = out + r * nout;
      // column c of the pre-activation, plus its bias (kept in z when asked)
      const auto preact = [&](int64_t c, int64_t n) {
        auto v = IO::load(zr + c, n);
        if (bias == nullptr) return v;
        v = map_parts(add, v, IO::load(bias + c, n));
        if (keep_preact) IO::store(zr + c, v, n);
        return v;
      };
      for (int64_t j = 0; j < nout; j += IO::kWidth) {
        const int64_t n = std::min(IO::kWidth, nout - j);
        auto a = map_parts(f, preact(j, n));
        if (gated) a = map_parts(mul, a, preact(nout + j, n));
        IO::store(y + j, a, n);
      }
    }
  });
}

template <typename T>
void backward_rows(Activation act, bool saved_is_output, const T* g, const T* saved, T* dz, double* dbias,
                   int64_t r0, int64_t r1, int64_t nz, int64_t nout) {
  using IO = VecIO<T>;
  using Chunk = typename IO::Chunk;
  const auto mul = [](const auto& u, const auto& v) { return u * v; };
  const auto add = [](const auto& u, const auto& v) { return u + v; };
  const int64_t ns = saved_is_output ? nout : nz;
  // A column chunk goes down kSumRows rows at a time: their dz add up in
  // registers, and only that sum goes into the double bias row (its
  // conversions, per row, cost 10-20 % of the pass; the sum of 4 rounds far
  // less than the float partial row of 64 did).
  constexpr int64_t kSumRows = 4;
  // dz = g * grad(saved), for a derivative taken from the output or the input
  const auto plain = [&](auto grad) {
    for (int64_t r = r0; r < r1; r += kSumRows) {
      const int64_t rows = std::min(kSumRows, r1 - r);
      for (int64_t j = 0; j < nout; j += IO::kWidth) {
        const int64_t n = std::min(IO::kWidth, nout - j);
        Chunk sum;
        for (int64_t k = 0; k < rows; ++k) {
          const int64_t row = r + k;
          const auto v =
              map_parts(mul, IO::load(g + row * nout + j, n), map_parts(grad, IO::load(saved + row * ns + j, n)));
          IO::store(dz + row * nz + j, v, n);
          sum = k == 0 ? v : map_parts(add, sum, v);
        }
        if (dbias) IO::accumulate_double(dbias + j, sum, n);
      }
    }
  };
  if (saved_is_output) {
    dispatch_output_activation(act, [&](auto tag) {
      plain([](const auto& y) { return act_grad_from_output<decltype(tag)::value>(y); });
    });
  } else if (!is_gated(act)) {
    dispatch_activation(act, [&](auto tag) {
      plain([](const auto& z) { return act_grad_from_input<decltype(tag)::value>(z); });
    });
  } else {
    // act(z1) * z2: dz1 = g * z2 * act'(z1), dz2 = g * act(z1)
    dispatch_activation(act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      const auto grad = [](const auto& v) { return act_grad_from_input<A>(v); };
      const auto forward = [](const auto& v) { return act_forward<A>(v); };
      for (int64_t r = r0; r < r1; r += kSumRows) {
        const int64_t rows = std::min(kSumRows, r1 - r);
        for (int64_t j = 0; j < nout; j += IO::kWidth) {
          const int64_t n = std::min(IO::kWidth, nout - j);
          Chunk sum1, sum2;
          for (int64_t k = 0; k < rows; ++k) {
            const int64_t row = r + k;
            const T* sr = saved + row * nz;
            const auto go = IO::load(g + row * nout + j, n), z1 = IO::load(sr + j, n), z2 = IO::load(sr + nout + j, n);
            const auto d1 = map_parts(mul, map_parts(mul, go, z2), map_parts(grad, z1));
            const auto d2 = map_parts(mul, go, map_parts(forward, z1));
            IO::store(dz + row * nz + j, d1, n);
            IO::store(dz + row * nz + nout + j, d2, n);
            sum1 = k == 0 ? d1 : map_parts(add, sum1, d1);
            sum2 = k == 0 ? d2 : map_parts(add, sum2, d2);
          }
          if (dbias) {
            IO::accumulate_double(dbias + j, sum1, n);
            IO::accumulate_double(dbias + nout + j, sum2, n);
          }
        }
      }
    });
  }
}

// The decoding product. A tile is G rows of x by R rows of w: G x R
// accumulators, each a vector summed across at the end, so that every chunk of
// w loaded feeds G FMAs and w streams from memory once. Weight rows per tile
// for G rows of x: the accumulators within half the vector registers (32 on
// AVX-512, 16 otherwise); a chunk of w that does not fit a register is folded
// into the FMAs from L1.
template <typename C, int G>
constexpr int decode_tile_rows() {
  constexpr int budget = sizeof(at::vec::Vectorized<C>) >= 64 ? 16 : 8;
  return std::min(8, std::max(1, budget / G));
}

template <int G, int R, typename T>
BK_VEC_INLINE void decode_tile(const float* x, int64_t ldx, int64_t K, const T* w, int64_t ldw, const T* bias,
                               T* z, int64_t ldz, bool prefetch_next) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t kW = IO::kWidth;
  V acc[G][R];
#pragma GCC unroll 64
  for (int i = 0; i < G * R; ++i) acc[i / R][i % R] = V(0);
  const auto step = [&](const typename IO::Chunk (&wk)[R], int64_t k) {
#pragma GCC unroll 8
    for (int m = 0; m < G; ++m) {
      const V x0 = V::loadu(x + m * ldx + k), x1 = V::loadu(x + m * ldx + k + IO::kPart);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = at::vec::fmadd(x1, wk[r][1], at::vec::fmadd(x0, wk[r][0], acc[m][r]));
    }
  };
  const int64_t k_full = K / kW * kW;
  for (int64_t k = 0; k < k_full; k += kW) {
    typename IO::Chunk wk[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wk[r] = IO::load(w + r * ldw + k, kW);
    // The next tile's rows, a tile ahead: with this many FMAs per byte the
    // hardware prefetcher alone fell behind (10-20 GB/s against 25).
    if (prefetch_next) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) prefetch_bytes(w + (r + R) * ldw + k, kW * static_cast<int64_t>(sizeof(T)));
    }
    step(wk, k);
  }
  if (k_full < K) {  // the last columns, zero-padded (x is zero there too)
    T tail[R][kW];
    typename IO::Chunk wk[R];
    for (int r = 0; r < R; ++r) {
      for (int64_t k = 0; k < kW; ++k) tail[r][k] = k_full + k < K ? w[r * ldw + k_full + k] : T(0);
      wk[r] = IO::load(tail[r], kW);
    }
    step(wk, k_full);
  }
#pragma GCC unroll 8
  for (int m = 0; m < G; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float sum = at::vec::vec_reduce_all<float>([](const V& a, const V& b) { return a + b; }, acc[m][r]);
      if (bias != nullptr) sum += static_cast<float>(bias[r]);
      z[m * ldz + r] = static_cast<T>(sum);
    }
}

// Rows [n, n1) of w against G rows of x: tiles of R rows, the rest in tiles
// of R / 2, R / 4, ... rows. A tile prefetches the next one's rows if they are
// before `end`.
template <int G, int R, typename T>
void decode_rows_of_w(const float* x, int64_t ldx, int64_t K, const T* w, int64_t ldw, const T* bias, T* z,
                      int64_t ldz, int64_t n, int64_t n1, int64_t end) {
  for (; n + R <= n1; n += R)
    decode_tile<G, R>(x, ldx, K, w + n * ldw, ldw, bias ? bias + n : nullptr, z + n, ldz, n + 2 * R <= end);
  if constexpr (R > 1) {
    if (n < n1) decode_rows_of_w<G, R / 2>(x, ldx, K, w, ldw, bias, z, ldz, n, n1, end);
  }
}

template <typename T>
void decode_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const T* w, int64_t ldw, const T* bias, T* z,
                 int64_t ldz, int64_t n0, int64_t n1) {
  // x's rows in groups of at most 4 (the accumulators' budget). With more
  // than one group, w goes in blocks of ~16 KB, each block read from memory
  // by the first group and from L1 by the others.
  const int64_t block = M <= 4 ? n1 - n0 : std::max<int64_t>(8, 16384 / (K * static_cast<int64_t>(sizeof(T))));
  for (int64_t b0 = n0; b0 < n1; b0 += block) {
    const int64_t b1 = std::min(n1, b0 + block);
    for (int64_t m = 0; m < M; m += 4) {
      const float* xm = x + m * ldx;
      T* zm = z + m * ldz;
      const auto run = [&](auto g) {
        constexpr int G = decltype(g)::value;
        decode_rows_of_w<G, decode_tile_rows<float, G>()>(xm, ldx, K, w, ldw, bias, zm, ldz, b0, b1, n1);
      };
      switch (std::min<int64_t>(4, M - m)) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 3: run(std::integral_constant<int, 3>{}); break;
        default: run(std::integral_constant<int, 4>{}); break;
      }
    }
  }
}

void decode_rows_any(c10::ScalarType dtype, const float* x, int64_t ldx, int64_t M, int64_t K, const void* w,
                     int64_t ldw, const void* bias, void* z, int64_t ldz, int64_t n0, int64_t n1) {
  TORCH_INTERNAL_ASSERT(M >= 1 && M <= kDecodeMaxRows && ldx % kDecodeKPad == 0 && ldx >= K);
  dispatch_storage_type(dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, double>) {
      TORCH_INTERNAL_ASSERT(false, "decode_rows: no double kernel (BLAS runs it)");
    } else {
      decode_rows(x, ldx, M, K, static_cast<const T*>(w), ldw, static_cast<const T*>(bias), static_cast<T*>(z),
                  ldz, n0, n1);
    }
  });
}

void forward_rows_any(c10::ScalarType dtype, Activation act, void* z, const void* bias, bool keep_preact,
                      void* out, int64_t r0, int64_t r1, int64_t nz, int64_t nout) {
  dispatch_storage_type(dtype, [&](auto t) {
    using T = decltype(t);
    forward_rows(act, static_cast<T*>(z), static_cast<const T*>(bias), keep_preact, static_cast<T*>(out), r0,
                 r1, nz, nout);
  });
}

void backward_rows_any(c10::ScalarType dtype, Activation act, bool saved_is_output, const void* g,
                       const void* saved, void* dz, double* dbias, int64_t r0, int64_t r1, int64_t nz,
                       int64_t nout) {
  dispatch_storage_type(dtype, [&](auto t) {
    using T = decltype(t);
    backward_rows(act, saved_is_output, static_cast<const T*>(g), static_cast<const T*>(saved),
                  static_cast<T*>(dz), dbias, r0, r1, nz, nout);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY

extern const DenseCpuKernels BK_CAPABILITY_NAME(dense_cpu_kernels) = {
    &CPU_CAPABILITY::forward_rows_any,
    &CPU_CAPABILITY::backward_rows_any,
    &CPU_CAPABILITY::decode_rows_any,
};

}  // namespace bigkernels
