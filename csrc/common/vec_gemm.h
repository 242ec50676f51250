// A small GEMM on at::vec::Vectorized for the CPU kernels compiled once per
// capability (common/capability.h): the attention blocks' products and the
// RNN's recurrent step. Included only by files compiled per capability.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/vec_math.h"

namespace bigkernels {
namespace CPU_CAPABILITY {

// Rows [i, i + R) of c by NV vectors of columns at n0, over all of k: the
// register tile, so that each vector of b loaded feeds R FMAs.
template <int R, int NV, typename C, typename TB>
inline void gemm_tile(int64_t i, int64_t n0, int64_t kdim, const C* a, int64_t a_row, int64_t a_col, const TB* b,
                      int64_t ldb, C* c, int64_t ldc, bool accumulate) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  V x[R][NV];  // from zero, added to c at the end (see gemm_acc)
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) x[r][v] = V(0);
  const C* ai = a + i * a_row;
  for (int64_t kk = 0; kk < kdim; ++kk) {
    const TB* bk = b + kk * ldb + n0;
    V s[R];  // R broadcasts + one vector of b + the accumulators fit the registers
    for (int r = 0; r < R; ++r) s[r] = V(ai[r * a_row + kk * a_col]);
    for (int v = 0; v < NV; ++v) {
      const V bv = load_as<C>(bk + v * W);
      for (int r = 0; r < R; ++r) x[r][v] = at::vec::fmadd(s[r], bv, x[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      C* cv = c + (i + r) * ldc + n0 + v * W;
      (accumulate ? V::loadu(cv) + x[r][v] : x[r][v]).store(cv);
    }
}

// Rows [i, m) by NV vectors: tiles of R rows, then the last m % R rows as
// one smaller tile (a row at a time would be bound by the FMA latency).
template <int R, int NV, typename C, typename TB>
inline void gemm_rows(int64_t i, int64_t m, int64_t n0, int64_t kdim, const C* a, int64_t a_row, int64_t a_col,
                      const TB* b, int64_t ldb, C* c, int64_t ldc, bool accumulate) {
  for (; i + R <= m; i += R) gemm_tile<R, NV>(i, n0, kdim, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  if constexpr (R > 1) {
    if (i < m) gemm_rows<R - 1, NV>(i, m, n0, kdim, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  }
}

// Rows per register tile of NV vectors: the accumulators (R x NV), R
// broadcasts and one vector of b within the 32 vector registers of AVX-512
// or the 16 of AVX2, and at least 8 (AVX2: 6) independent FMA chains.
template <typename C, int NV>
constexpr int gemm_tile_rows() {
  constexpr bool wide = sizeof(at::vec::Vectorized<C>) >= 64;
  constexpr int rows[2][4] = {{6, 4, 3, 3}, {8, 8, 6, 4}};
  return rows[wide][NV - 1];
}

// c[i][0:n] (+)= sum_k A(i, k) * b[k][0:n], with A(i, k) = a[i * a_row + k * a_col]
// (so A may be a transposed view), b and c row-major with leading dims ldb, ldc.
// b may be bf16/fp16 with float a and c: widened in registers (load_as).
// With `accumulate`, the k products are summed from zero and then added to c
// once: c often holds a sum over many earlier calls (attention's output over
// key blocks, dK and dV over query blocks and heads), and adding each product
// to it directly rounds every one at c's magnitude, an error that grows with
// the number of calls (dK and dV with GQA: 3-3.7x torch's RMS error; issue 16 §4).
// Register-blocked by column chunks of up to 4 vectors (narrow outputs such
// as head dim 32 get taller tiles of fewer vectors); a chunk that ends
// mid-vector goes a row at a time with masked loads.
template <typename C, typename TB>
inline void gemm_acc(int64_t m, int64_t n, int64_t kdim, const C* a, int64_t a_row, int64_t a_col, const TB* b,
                     int64_t ldb, C* c, int64_t ldc, bool accumulate) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  for (int64_t n0 = 0; n0 < n; n0 += 4 * W) {
    const int64_t nn = std::min<int64_t>(4 * W, n - n0);
    const auto tiles = [&](auto vectors) {
      constexpr int NV = decltype(vectors)::value;
      gemm_rows<gemm_tile_rows<C, NV>(), NV>(0, m, n0, kdim, a, a_row, a_col, b, ldb, c, ldc, accumulate);
    };
    switch (nn % W == 0 ? nn / W : 0) {
      case 4: tiles(std::integral_constant<int, 4>{}); continue;
      case 3: tiles(std::integral_constant<int, 3>{}); continue;
      case 2: tiles(std::integral_constant<int, 2>{}); continue;
      case 1: tiles(std::integral_constant<int, 1>{}); continue;
      default: break;
    }
    const auto count = [&](int v) { return static_cast<int>(std::min<int64_t>(W, nn - v * W)); };
    for (int64_t i = 0; i < m; ++i) {  // a partial column chunk, a row at a time
      C* ci = c + i * ldc + n0;
      V x[4];
      for (int v = 0; v * W < nn; ++v) x[v] = V(0);
      for (int64_t kk = 0; kk < kdim; ++kk) {
        const V s0(a[i * a_row + kk * a_col]);
        const TB* bk = b + kk * ldb + n0;
        for (int v = 0; v * W < nn; ++v) x[v] = at::vec::fmadd(s0, load_as<C>(bk + v * W, count(v)), x[v]);
      }
      for (int v = 0; v * W < nn; ++v) {
        (accumulate ? V::loadu(ci + v * W, count(v)) + x[v] : x[v]).store(ci + v * W, count(v));
      }
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace bigkernels
