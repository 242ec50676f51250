// The cross-entropy row passes on at::vec::Vectorized, compiled once per CPU
// capability (setup.py; capability.h): everything here lives in a
// capability-named namespace, and only the table at the end is seen outside.
//
// A row of logits (V = 32k-128k: 64-512 KB) stays in L2 across its passes:
// the max, the sum of exponentials (and of the logits, for label smoothing),
// then the gradient over the logits, written in place.
#include "losses/cpu/cross_entropy_kernels.h"

#include <cmath>

#include "common/vec_math.h"

namespace bigkernels {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
using Chunk = typename VecIO<T>::Chunk;

// Folds f over the row's chunks into two vector accumulators, then combines
// their lanes (and the tail's, one by one) with `combine`. f(chunk, acc)
// returns the new accumulator; the tail chunk's lanes past the row's end are
// never folded in.
template <typename T, typename F, typename Combine>
typename VecIO<T>::C row_fold(const T* z, int64_t n, typename VecIO<T>::C init, F f, Combine combine) {
  using IO = VecIO<T>;
  using C = typename IO::C;
  typename IO::V acc0(init), acc1(init);
  int64_t j = 0;
  for (; j + IO::kWidth <= n; j += IO::kWidth) {
    const Chunk<T> v = IO::load(z + j, IO::kWidth);
    acc0 = f(v[0], acc0);
    acc1 = f(v[1], acc1);
  }
  C lanes[IO::kWidth];
  acc0.store(lanes);
  acc1.store(lanes + IO::kPart);
  C total = init;
  for (C x : lanes) total = combine(total, x);
  if (j < n) {
    const Chunk<T> v = IO::load(z + j, n - j);
    C tail[IO::kWidth];
    f(v[0], typename IO::V(init)).store(tail);
    f(v[1], typename IO::V(init)).store(tail + IO::kPart);
    for (int64_t i = 0; i < n - j; ++i) total = combine(total, tail[i]);
  }
  return total;
}

// Applies f to every chunk of the row in place.
template <typename T, typename F>
BK_VEC_INLINE void row_map(T* z, int64_t n, F f) {
  using IO = VecIO<T>;
  for (int64_t j = 0; j < n; j += IO::kWidth) {
    const int64_t m = std::min<int64_t>(IO::kWidth, n - j);
    IO::store(z + j, map_parts(f, IO::load(z + j, m)), m);
  }
}

template <typename T>
void rows(const CrossEntropyRows& a, int64_t r0, int64_t r1) {
  using IO = VecIO<T>;
  using C = typename IO::C;
  using V = typename IO::V;
  using M = MathOps<V>;
  const int64_t n = a.V;
  const bool capped = a.softcap > 0;
  const C cap = static_cast<C>(a.softcap), inv_cap = capped ? static_cast<C>(1 / a.softcap) : C(0);
  const C smoothing = static_cast<C>(a.label_smoothing), z_loss = static_cast<C>(a.z_loss);
  C* lse_rows = static_cast<C*>(a.lse);
  C* loss_rows = static_cast<C*>(a.loss);
  const C* scales = static_cast<const C*>(a.row_scale);
  // The logits stay as the product left them; the softcap is applied as they
  // are read. Its derivative 1 - tanh(x)^2 = 4e / (1 + e)^2, e = exp(-2|x|),
  // comes from the raw logit: from the capped one, 1 - (z / cap)^2 cancels
  // where tanh saturates (errors 3x torch's at logits of 1e3).
  const auto cap_v = [&](const V& v) { return capped ? V(cap) * M::tanh(v * V(inv_cap)) : v; };
  const auto cap_derivative_v = [&](const V& v) {
    const V e = M::exp(V(-2) * (v * V(inv_cap)).abs());
    const V d = V(1) + e;
    return V(4) * e / (d * d);
  };
  const auto plus = [](C u, C v) { return u + v; };
  const auto max = [](C u, C v) { return u > v || std::isnan(u) ? u : v; };  // NaN wins, as in torch
  for (int64_t r = r0; r < r1; ++r) {
    T* z = static_cast<T*>(a.logits) + r * a.ld;
    C lse;
    C z_sum = 0;  // for label smoothing
    if (a.lse_given) {
      lse = lse_rows[r];
    } else {
      // tanh is increasing: the largest capped logit is the cap of the largest.
      C z_max = row_fold(z, n, -std::numeric_limits<C>::infinity(),
                         [](const V& v, const V& acc) { return at::vec::maximum(v, acc); }, max);
      if (capped) z_max = cap * std::tanh(z_max * inv_cap);
      const C sum = row_fold(z, n, C(0), [&](const V& v, const V& acc) { return acc + M::exp(cap_v(v) - V(z_max)); },
                             plus);
      if (smoothing > 0) z_sum = row_fold(z, n, C(0), [&](const V& v, const V& acc) { return acc + cap_v(v); }, plus);
      lse = z_max + std::log(sum);
      lse_rows[r] = lse;
    }
    const int64_t t = a.target[r];
    const C raw_t = static_cast<C>(z[t]);
    const C z_t = capped ? cap * std::tanh(raw_t * inv_cap) : raw_t;
    if (loss_rows) {
      loss_rows[r] = lse - (1 - smoothing) * z_t - smoothing * z_sum / static_cast<C>(n) + z_loss * lse * lse;
    }
    if (!a.grad) continue;
    // d loss / d z_j = softmax_j (1 + 2 z_loss lse) - smoothing / V - (1 - smoothing) [j = t],
    // times the softcap's derivative.
    const C scale = scales ? scales[r] : static_cast<C>(a.scale);
    const C p_factor = scale * (1 + 2 * z_loss * lse), offset = scale * smoothing / static_cast<C>(n);
    if (capped) {
      row_map(z, n, [&](const V& v) {
        return (M::exp(cap_v(v) - V(lse)) * V(p_factor) - V(offset)) * cap_derivative_v(v);
      });
    } else {
      row_map(z, n, [&](const V& v) { return M::exp(v - V(lse)) * V(p_factor) - V(offset); });
    }
    C g_t = std::exp(z_t - lse) * p_factor - offset - scale * (1 - smoothing);
    if (capped) {
      const C e = std::exp(-2 * std::abs(raw_t * inv_cap));
      g_t *= 4 * e / ((1 + e) * (1 + e));
    }
    z[t] = static_cast<T>(g_t);
  }
}

void rows_any(c10::ScalarType dtype, const CrossEntropyRows& a, int64_t r0, int64_t r1) {
  dispatch_storage_type(dtype, [&](auto t) { rows<decltype(t)>(a, r0, r1); });
}

}  // namespace
}  // namespace CPU_CAPABILITY

extern const CrossEntropyCpuKernels BK_CAPABILITY_NAME(cross_entropy_cpu_kernels) = {
    &CPU_CAPABILITY::rows_any,
};

}  // namespace bigkernels
