// The norm family's CPU row loops on at::vec::Vectorized. Compiled once per
// CPU capability (setup.py; capability.h): everything here lives in a
// capability-named namespace, and only the table at the end is seen outside.
//
// A row (a few thousand elements at most) stays in L1 across the passes:
// sums first (mean, then the squares about it: two passes are exact where
// E[x^2] - mean^2 cancels), then the output. Whole vectors are summed in
// vector lanes, the tail of a row in scalars.
#include "norm/cpu/norm_kernels.h"

#include <cmath>

#include "common/vec_math.h"

namespace bigkernels {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
using Chunk = typename VecIO<T>::Chunk;

// sum over the row of f(chunk) (f's lanes past the row's end are never summed)
template <typename T, typename Load, typename F>
typename VecIO<T>::C row_sum(int64_t N, Load load, F f) {
  using IO = VecIO<T>;
  using C = typename IO::C;
  typename IO::V acc0(0), acc1(0);
  int64_t j = 0;
  for (; j + IO::kWidth <= N; j += IO::kWidth) {
    const Chunk<T> v = f(load(j, IO::kWidth));
    acc0 += v[0];
    acc1 += v[1];
  }
  C lanes[IO::kPart];
  (acc0 + acc1).store(lanes);
  C total = 0;
  for (C x : lanes) total += x;
  if (j < N) {  // the tail: its own chunk, only its n lanes summed
    const int64_t n = N - j;
    C tail[IO::kWidth];
    const Chunk<T> v = f(load(j, n));
    v[0].store(tail);
    v[1].store(tail + IO::kPart);
    for (int64_t i = 0; i < n; ++i) total += tail[i];
  }
  return total;
}

template <typename T>
void forward_rows(const NormForwardRows& a, int64_t r0, int64_t r1) {
  using IO = VecIO<T>;
  using C = typename IO::C;
  using V = typename IO::V;
  const int64_t N = a.N;
  const bool rms = a.mean == nullptr;
  const auto add = [](const auto& u, const auto& v) { return u + v; };
  const auto ones = [](int64_t) { return Chunk<T>{V(1), V(1)}; };
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.input) + r * N;
    if (a.residual) {  // the sum, rounded to T as the unfused add would, is what is normalised
      const T* res = static_cast<const T*>(a.residual) + r * N;
      T* s = static_cast<T*>(a.sum) + r * N;
      for (int64_t j = 0; j < N; j += IO::kWidth) {
        const int64_t n = std::min(IO::kWidth, N - j);
        IO::store(s + j, map_parts(add, IO::load(x + j, n), IO::load(res + j, n)), n);
      }
      x = s;
    }
    const auto load = [&](int64_t j, int64_t n) { return IO::load(x + j, n); };
    C mean = 0;
    if (!rms) mean = row_sum<T>(N, load, [](const Chunk<T>& v) { return v; }) / static_cast<C>(N);
    const V vmean(mean);
    const C squares = row_sum<T>(N, load, [&](const Chunk<T>& v) {
      return map_parts([&](const V& u) { return (u - vmean) * (u - vmean); }, v);
    });
    const C rstd = C(1) / std::sqrt(squares / static_cast<C>(N) + static_cast<C>(a.eps));
    if (!rms) static_cast<C*>(a.mean)[r] = mean;
    static_cast<C*>(a.rstd)[r] = rstd;
    const V vrstd(rstd);
    T* out = static_cast<T*>(a.out) + r * N;
    const T* w = static_cast<const T*>(a.weight);
    const T* b = static_cast<const T*>(a.bias);
    for (int64_t j = 0; j < N; j += IO::kWidth) {
      const int64_t n = std::min(IO::kWidth, N - j);
      const Chunk<T> wv = w ? IO::load(w + j, n) : ones(j);
      Chunk<T> y = map_parts([&](const V& u, const V& g) { return (u - vmean) * vrstd * g; }, load(j, n), wv);
      if (b) y = map_parts(add, y, IO::load(b + j, n));
      IO::store(out + j, y, n);
    }
  }
}

template <typename T>
void backward_rows(const NormBackwardRows& a, typename VecIO<T>::C* dweight, typename VecIO<T>::C* dbias,
                   int64_t r0, int64_t r1) {
  using IO = VecIO<T>;
  using C = typename IO::C;
  using V = typename IO::V;
  const int64_t N = a.N;
  const bool rms = a.mean == nullptr;
  const T* w = static_cast<const T*>(a.weight);
  const auto mul = [](const V& u, const V& v) { return u * v; };
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * N;
    const T* dy = static_cast<const T*>(a.grad_out) + r * N;
    const V vmean(rms ? C(0) : static_cast<const C*>(a.mean)[r]);
    const V vrstd(static_cast<const C*>(a.rstd)[r]);
    const auto xhat = [&](int64_t j, int64_t n) {
      return map_parts([&](const V& u) { return (u - vmean) * vrstd; }, IO::load(x + j, n));
    };
    const auto g = [&](int64_t j, int64_t n) {  // dy * weight
      const Chunk<T> d = IO::load(dy + j, n);
      return w ? map_parts(mul, d, IO::load(w + j, n)) : d;
    };
    // dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)); RMSNorm has no mean(g) term
    const auto g_xhat = [&](int64_t j, int64_t n) { return map_parts(mul, g(j, n), xhat(j, n)); };
    const auto same = [](const Chunk<T>& v) { return v; };
    const V c1(row_sum<T>(N, g_xhat, same) / static_cast<C>(N));
    const V c2(rms ? C(0) : row_sum<T>(N, g, same) / static_cast<C>(N));
    T* dx = static_cast<T*>(a.grad_input) + r * N;
    const T* dsum = a.grad_sum ? static_cast<const T*>(a.grad_sum) + r * N : nullptr;
    for (int64_t j = 0; j < N; j += IO::kWidth) {
      const int64_t n = std::min(IO::kWidth, N - j);
      const Chunk<T> xh = xhat(j, n);
      Chunk<T> d = map_parts([&](const V& gv, const V& u) { return vrstd * (gv - c2 - u * c1); }, g(j, n), xh);
      if (dsum) d = map_parts([](const V& u, const V& v) { return u + v; }, d, IO::load(dsum + j, n));
      IO::store(dx + j, d, n);
      if (dweight) IO::accumulate(dweight + j, map_parts(mul, IO::load(dy + j, n), xh), n);
      if (dbias) IO::accumulate(dbias + j, IO::load(dy + j, n), n);
    }
  }
}

void forward_rows_any(c10::ScalarType dtype, const NormForwardRows& a, int64_t r0, int64_t r1) {
  dispatch_storage_type(dtype, [&](auto t) { forward_rows<decltype(t)>(a, r0, r1); });
}

void backward_rows_any(c10::ScalarType dtype, const NormBackwardRows& a, void* dweight, void* dbias, int64_t r0,
                       int64_t r1) {
  dispatch_storage_type(dtype, [&](auto t) {
    using C = typename VecIO<decltype(t)>::C;
    backward_rows<decltype(t)>(a, static_cast<C*>(dweight), static_cast<C*>(dbias), r0, r1);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY

extern const NormCpuKernels BK_CAPABILITY_NAME(norm_cpu_kernels) = {
    &CPU_CAPABILITY::forward_rows_any,
    &CPU_CAPABILITY::backward_rows_any,
};

}  // namespace bigkernels
