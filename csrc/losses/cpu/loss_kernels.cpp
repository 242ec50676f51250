// The loss family's row passes on at::vec::Vectorized, compiled once per CPU
// capability (setup.py; capability.h): everything here lives in a
// capability-named namespace, and only the table at the end is seen outside.
//
// A row of logits (V = 32k-128k: 64-512 KB) stays in L2 across its passes:
// the max, the sum of exponentials (and of the logits, for label smoothing),
// then the gradient over the logits, written in place.
#include "losses/cpu/loss_kernels.h"

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
void cross_entropy_rows(const CrossEntropyRows& a, int64_t r0, int64_t r1) {
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
    // softmax = exp(z - z_shift - log_sum): the forward keeps the max apart
    // (z - lse would round away the last digits of logits of order 1e3);
    // the backward of 'none' has only the forward's lse.
    C lse, z_shift = 0, log_sum = 0;
    C z_sum = 0;  // for label smoothing
    if (a.lse_given) {
      lse = lse_rows[r];
      z_shift = lse;
    } else {
      // tanh is increasing: the largest capped logit is the cap of the largest.
      C z_max = row_fold(z, n, -std::numeric_limits<C>::infinity(),
                         [](const V& v, const V& acc) { return at::vec::maximum(v, acc); }, max);
      if (capped) z_max = cap * std::tanh(z_max * inv_cap);
      const C sum = row_fold(z, n, C(0), [&](const V& v, const V& acc) { return acc + M::exp(cap_v(v) - V(z_max)); },
                             plus);
      if (smoothing > 0) z_sum = row_fold(z, n, C(0), [&](const V& v, const V& acc) { return acc + cap_v(v); }, plus);
      z_shift = z_max;
      log_sum = std::log(sum);
      lse = z_max + log_sum;
      lse_rows[r] = lse;
    }
    const int64_t t = a.target[r];
    const C raw_t = static_cast<C>(z[t]);
    const C z_t = capped ? cap * std::tanh(raw_t * inv_cap) : raw_t;
    if (loss_rows) {  // lse - z_t as (max - z_t) + log sum: exact where the logits are large
      loss_rows[r] = (1 - smoothing) * ((z_shift - z_t) + log_sum) +
                     smoothing * (lse - z_sum / static_cast<C>(n)) + z_loss * lse * lse;
    }
    if (!a.grad) continue;
    // d loss / d z_j = softmax_j (1 + 2 z_loss lse) - smoothing / V - (1 - smoothing) [j = t],
    // times the softcap's derivative.
    const C scale = scales ? scales[r] : static_cast<C>(a.scale);
    const C p_factor = scale * (1 + 2 * z_loss * lse), offset = scale * smoothing / static_cast<C>(n);
    if (capped) {
      row_map(z, n, [&](const V& v) {
        return (M::exp(cap_v(v) - V(z_shift) - V(log_sum)) * V(p_factor) - V(offset)) * cap_derivative_v(v);
      });
    } else {
      row_map(z, n, [&](const V& v) { return M::exp(v - V(z_shift) - V(log_sum)) * V(p_factor) - V(offset); });
    }
    C g_t = std::exp(z_t - z_shift - log_sum) * p_factor - offset - scale * (1 - smoothing);
    if (capped) {
      const C e = std::exp(-2 * std::abs(raw_t * inv_cap));
      g_t *= 4 * e / ((1 + e) * (1 + e));
    }
    z[t] = static_cast<T>(g_t);
  }
}

// Sums, over two rows read together (the student's chunk in T, the
// teacher's in its compute type C), the K vectors of terms f(s, t) returns
// (std::array<V, K>); lanes past the rows' end are never summed.
template <size_t K, typename T, typename F>
std::array<typename VecIO<T>::C, K> row_sums2(const T* s, const typename VecIO<T>::C* t, int64_t n, F f) {
  using IO = VecIO<T>;
  using C = typename IO::C;
  using V = typename IO::V;
  std::array<V, K> acc;
  acc.fill(V(0));
  std::array<C, K> total{};
  C lanes[IO::kPart];
  for (int64_t j = 0; j < n; j += IO::kWidth) {
    const int64_t m = std::min<int64_t>(IO::kWidth, n - j);
    const Chunk<T> sv = IO::load(s + j, m);
    for (int part = 0; part < 2; ++part) {
      const int64_t valid = std::min<int64_t>(IO::kPart, m - part * IO::kPart);
      if (valid <= 0) break;
      const V tv = valid == IO::kPart ? V::loadu(t + j + part * IO::kPart)
                                      : V::loadu(t + j + part * IO::kPart, static_cast<int>(valid));
      const std::array<V, K> terms = f(sv[part], tv);
      for (size_t k = 0; k < K; ++k) {
        if (valid == IO::kPart) {
          acc[k] = acc[k] + terms[k];
        } else {  // the tail: only its valid lanes
          terms[k].store(lanes);
          for (int64_t i = 0; i < valid; ++i) total[k] += lanes[i];
        }
      }
    }
  }
  for (size_t k = 0; k < K; ++k) {
    acc[k].store(lanes);
    for (C x : lanes) total[k] += x;
  }
  return total;
}

template <typename T>
void distillation_rows(const DistillationRows& a, int64_t r0, int64_t r1) {
  using IO = VecIO<T>;
  using C = typename IO::C;
  using V = typename IO::V;
  using M = MathOps<V>;
  const int64_t n = a.V;
  const C inv_t = static_cast<C>(1 / a.temperature), temperature = static_cast<C>(a.temperature);
  const C beta = static_cast<C>(a.beta), hard_weight = static_cast<C>(a.hard_weight);
  const bool forward_kl = a.beta == 0, reverse_kl = a.beta == 1;
  // log M = log(beta P + (1 - beta) Q), at least the log of its larger
  // term: where M underflows to 0 (both terms below 1e-38), that is what
  // stands in for log 0, and it keeps Q (log Q - log M) at 0, not NaN. One
  // log per element; the exact log-add-exp form (an exp and a log1p more)
  // made the JSD's passes cost 80 % of the products.
  const C log_beta = std::log(beta), log_1m_beta = std::log1p(-beta);
  const auto log_m = [&](const V& log_p, const V& log_q, const V& p, const V& q) {
    const V larger = at::vec::maximum(log_p + V(log_beta), log_q + V(log_1m_beta));
    return at::vec::maximum((V(beta) * p + V(1 - beta) * q).log(), larger);
  };
  C* loss_rows = static_cast<C*>(a.loss);
  const C* scales = static_cast<const C*>(a.row_scale);
  const auto max = [](C u, C v) { return u > v || std::isnan(u) ? u : v; };
  const auto plus = [](C u, C v) { return u + v; };
  const auto vmax = [](const V& v, const V& acc) { return at::vec::maximum(v, acc); };
  for (int64_t r = r0; r < r1; ++r) {
    T* s = static_cast<T*>(a.student) + r * a.ld;
    const C* t = static_cast<const C*>(a.teacher) + r * a.ld;
    // The log-sum-exps of s / T and t / T (T > 0 keeps the max the max).
    // log Q = (s - max s) / T - log sum exp((s - max s) / T): the max taken
    // off first, as log_softmax does; (s - lse) would lose the last digits of
    // logits of order 1e3 to the rounding of lse.
    const C s_max = row_fold(s, n, -std::numeric_limits<C>::infinity(), vmax, max);
    const C t_max = row_fold(t, n, -std::numeric_limits<C>::infinity(), vmax, max);
    const C log_sum_q = std::log(row_fold(
        s, n, C(0), [&](const V& v, const V& acc) { return acc + M::exp((v - V(s_max)) * V(inv_t)); }, plus));
    const C log_sum_p = std::log(row_fold(
        t, n, C(0), [&](const V& v, const V& acc) { return acc + M::exp((v - V(t_max)) * V(inv_t)); }, plus));
    const auto log_q = [&](const V& v) { return (v - V(s_max)) * V(inv_t) - V(log_sum_q); };
    const auto log_p = [&](const V& v) { return (v - V(t_max)) * V(inv_t) - V(log_sum_p); };
    // The soft loss, and for the reverse KL and the JSD the sum the gradient
    // needs first: sum_k Q_k g_k, g = log Q - log P (reverse KL) or
    // (1 - beta) log(Q / M).
    C soft = 0, q_dot_g = 0;
    if (forward_kl) {
      soft = row_sums2<1>(s, t, n, [&](const V& sv, const V& tv) {
        const V lp = log_p(tv);
        return std::array<V, 1>{M::exp(lp) * (lp - log_q(sv))};
      })[0];
    } else if (reverse_kl) {
      soft = row_sums2<1>(s, t, n, [&](const V& sv, const V& tv) {
        const V lq = log_q(sv);
        return std::array<V, 1>{M::exp(lq) * (lq - log_p(tv))};
      })[0];
      q_dot_g = soft;
    } else {  // soft = beta sum P (log P - log M) + q_dot_g, q_dot_g = (1 - beta) sum Q (log Q - log M)
      const auto sums = row_sums2<2>(s, t, n, [&](const V& sv, const V& tv) {
        const V lp = log_p(tv), lq = log_q(sv), p = M::exp(lp), q = M::exp(lq), lm = log_m(lp, lq, p, q);
        return std::array<V, 2>{p * (lp - lm), q * (lq - lm)};
      });
      q_dot_g = (1 - beta) * sums[1];
      soft = beta * sums[0] + q_dot_g;
    }
    // The hard term: cross-entropy of the student's logits at T = 1.
    C log_sum_s = 0, hard = 0;  // log sum exp(s - max s)
    const int64_t target = a.target ? a.target[r] : -1;
    if (a.target) {
      log_sum_s = a.temperature == 1 ? log_sum_q
                                     : std::log(row_fold(s, n, C(0), [&](const V& v, const V& acc) {
                                         return acc + M::exp(v - V(s_max));
                                       }, plus));
      hard = (s_max - static_cast<C>(s[target])) + log_sum_s;
    }
    loss_rows[r] = temperature * temperature * soft + hard_weight * hard;
    if (!a.grad) continue;
    // d loss / d s = T (d soft / d u) + hard_weight (softmax(s) - onehot), u = s / T:
    // d soft / d u = Q - P (forward KL), Q (g - sum Q g) otherwise.
    const C scale = scales ? scales[r] : static_cast<C>(a.scale);
    const C soft_factor = scale * temperature, hard_factor = a.target ? scale * hard_weight : C(0);
    for (int64_t j = 0; j < n; j += IO::kWidth) {
      const int64_t m = std::min<int64_t>(IO::kWidth, n - j);
      const Chunk<T> sv = IO::load(s + j, m);
      const Chunk<T> tv = {V::loadu(t + j, static_cast<int>(std::min(m, IO::kPart))),
                           m > IO::kPart ? V::loadu(t + j + IO::kPart, static_cast<int>(m - IO::kPart)) : V(0)};
      Chunk<T> g;
      for (int part = 0; part < 2; ++part) {
        const V lq = log_q(sv[part]), lp = log_p(tv[part]), q = M::exp(lq);
        V d;
        if (forward_kl) {
          d = q - M::exp(lp);
        } else if (reverse_kl) {
          d = q * (lq - lp - V(q_dot_g));
        } else {
          d = q * (V(1 - beta) * (lq - log_m(lp, lq, M::exp(lp), q)) - V(q_dot_g));
        }
        g[part] = d * V(soft_factor);
        if (hard_factor != 0) g[part] = g[part] + M::exp(sv[part] - V(s_max) - V(log_sum_s)) * V(hard_factor);
      }
      IO::store(s + j, g, m);
    }
    if (hard_factor != 0) s[target] = static_cast<T>(static_cast<C>(s[target]) - hard_factor);
  }
}

void cross_entropy_rows_any(c10::ScalarType dtype, const CrossEntropyRows& a, int64_t r0, int64_t r1) {
  dispatch_storage_type(dtype, [&](auto t) { cross_entropy_rows<decltype(t)>(a, r0, r1); });
}

void distillation_rows_any(c10::ScalarType dtype, const DistillationRows& a, int64_t r0, int64_t r1) {
  dispatch_storage_type(dtype, [&](auto t) { distillation_rows<decltype(t)>(a, r0, r1); });
}

}  // namespace
}  // namespace CPU_CAPABILITY

extern const LossCpuKernels BK_CAPABILITY_NAME(loss_cpu_kernels) = {
    &CPU_CAPABILITY::cross_entropy_rows_any,
    &CPU_CAPABILITY::distillation_rows_any,
};

}  // namespace bigkernels
