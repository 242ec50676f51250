// A small GEMM on at::vec::Vectorized for the CPU kernels compiled once per
// capability (common/capability.h): the attention blocks' products and the
// RNN's recurrent step. Included only by files compiled per capability.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace bigkernels {
namespace CPU_CAPABILITY {

// Rows [i, i + R) of c by 4 vectors of columns at n0, over all of k: the
// register tile, so that each vector of b loaded feeds R FMAs.
template <int R, typename C>
inline void gemm_tile(int64_t i, int64_t n0, int64_t kdim, const C* a, int64_t a_row, int64_t a_col, const C* b,
                      int64_t ldb, C* c, int64_t ldc, bool accumulate) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  V x[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) x[r][v] = accumulate ? V::loadu(c + (i + r) * ldc + n0 + v * W) : V(0);
  const C* ai = a + i * a_row;
  for (int64_t kk = 0; kk < kdim; ++kk) {
    const C* bk = b + kk * ldb + n0;
    V s[R];  // R broadcasts + one vector of b + the accumulators fit the registers
    for (int r = 0; r < R; ++r) s[r] = V(ai[r * a_row + kk * a_col]);
    for (int v = 0; v < 4; ++v) {
      const V bv = V::loadu(bk + v * W);
      for (int r = 0; r < R; ++r) x[r][v] = at::vec::fmadd(s[r], bv, x[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) x[r][v].store(c + (i + r) * ldc + n0 + v * W);
}

// c[i][0:n] (+)= sum_k A(i, k) * b[k][0:n], with A(i, k) = a[i * a_row + k * a_col]
// (so A may be a transposed view), b and c row-major with leading dims ldb, ldc.
// Register-blocked: kRows rows of c by 4 vectors of columns at a time, 4
// rows with 32 vector registers (AVX-512), 3 with 16 (AVX2: 12 accumulators,
// 3 broadcasts and one vector of b). The last m % kRows rows take the same
// tile with fewer rows: a row at a time would be bound by the FMA latency
// (4 accumulators), which cost AVX2 a sixth of a 16-row step.
template <typename C>
inline void gemm_acc(int64_t m, int64_t n, int64_t kdim, const C* a, int64_t a_row, int64_t a_col, const C* b,
                     int64_t ldb, C* c, int64_t ldc, bool accumulate) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  constexpr int kRows = sizeof(V) >= 64 ? 4 : 3;
  for (int64_t n0 = 0; n0 < n; n0 += 4 * W) {
    const int64_t nn = std::min<int64_t>(4 * W, n - n0);
    if (nn == 4 * W) {
      int64_t i = 0;
      for (; i + kRows <= m; i += kRows) gemm_tile<kRows>(i, n0, kdim, a, a_row, a_col, b, ldb, c, ldc, accumulate);
      switch (m - i) {
        case 3: gemm_tile<3>(i, n0, kdim, a, a_row, a_col, b, ldb, c, ldc, accumulate); break;
        case 2: gemm_tile<2>(i, n0, kdim, a, a_row, a_col, b, ldb, c, ldc, accumulate); break;
        case 1: gemm_tile<1>(i, n0, kdim, a, a_row, a_col, b, ldb, c, ldc, accumulate); break;
        default: break;
      }
      continue;
    }
    const auto count = [&](int v) { return static_cast<int>(std::min<int64_t>(W, nn - v * W)); };
    for (int64_t i = 0; i < m; ++i) {  // a partial column chunk, a row at a time
      C* ci = c + i * ldc + n0;
      V x[4];
      for (int v = 0; v * W < nn; ++v) x[v] = accumulate ? V::loadu(ci + v * W, count(v)) : V(0);
      for (int64_t kk = 0; kk < kdim; ++kk) {
        const V s0(a[i * a_row + kk * a_col]);
        const C* bk = b + kk * ldb + n0;
        for (int v = 0; v * W < nn; ++v) x[v] = at::vec::fmadd(s0, V::loadu(bk + v * W, count(v)), x[v]);
      }
      for (int v = 0; v * W < nn; ++v) x[v].store(ci + v * W, count(v));
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace bigkernels
