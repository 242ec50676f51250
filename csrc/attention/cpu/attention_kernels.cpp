// The attention family's CPU block loops on at::vec::Vectorized, compiled
// once per CPU capability (common/capability.h). Flash-style: a block of
// query rows walks the key blocks its window allows, with an online softmax;
// the L x S scores never exist beyond one block. Backward recomputes each
// block's probabilities from the saved log-sum-exp.
//
// Everything is computed in C = float (double for double inputs): the op
// hands over K and V already converted (and transposed where a product needs
// it), each block of queries is converted once into scratch, and the
// products are one small routine, gemm_acc (common/vec_gemm.h), vectorized
// over the output columns.
#include "attention/cpu/attention_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/counter_rng.h"
#include "common/vec_gemm.h"
#include "common/vec_math.h"

namespace bigkernels {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBlockQ = kAttentionBlockRows, kBlockK = kAttentionKeyBlock;

// Key block j0 / kBlockK of a head's transposed, blocked K or V (see
// AttentionCpuParams): rows of kBlockK contiguous keys, `dim` of them.
template <typename C>
const C* key_block(const void* blocked, int64_t head, int64_t S, int64_t dim, int64_t j0) {
  const int64_t blocks = (S + kBlockK - 1) / kBlockK;
  return static_cast<const C*>(blocked) + (head * blocks + j0 / kBlockK) * dim * kBlockK;
}

// x[0:n] = exp(x[0:n] - shift) (0 where x is -inf); returns their sum.
template <typename C>
C exp_shifted(C* x, int64_t n, C shift) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  V sum(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V e = MathOps<V>::exp(V::loadu(x + j) - V(shift));
    e.store(x + j);
    sum = sum + e;
  }
  C total = at::vec::vec_reduce_all<C>([](V a, V b) { return a + b; }, sum);
  for (; j < n; ++j) total += x[j] = std::exp(x[j] - shift);
  return total;
}

// max(x[0:n]), -inf for n = 0.
template <typename C>
C row_max(const C* x, int64_t n) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  V best(-std::numeric_limits<C>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) best = at::vec::maximum(best, V::loadu(x + j));
  C total = at::vec::vec_reduce_all<C>([](V a, V b) { return at::vec::maximum(a, b); }, best);
  for (; j < n; ++j) total = std::max(total, x[j]);
  return total;
}

// The part of the query block [i0, i1) x key range that causality, the window
// and the mask can touch.
struct Band {
  const AttentionCpuParams& p;
  int64_t b, h;
  bool allowed(int64_t i, int64_t j) const {
    const int64_t pos = i + p.diagonal_offset;
    return (p.window_left < 0 || j >= pos - p.window_left) && (p.window_right < 0 || j <= pos + p.window_right);
  }
  // The keys any row of [i0, i1) may see, [lo, hi), with lo rounded down to
  // a block boundary (the layout of k_t): the keys before the true lo in
  // that first block are masked by the window (such a block is never whole).
  std::pair<int64_t, int64_t> key_range(int64_t i0, int64_t i1) const {
    int64_t lo = 0, hi = p.S;
    if (p.window_left >= 0) lo = std::max<int64_t>(0, i0 + p.diagonal_offset - p.window_left);
    if (p.window_right >= 0) hi = std::min<int64_t>(p.S, i1 - 1 + p.diagonal_offset + p.window_right + 1);
    if (lo >= hi) return {0, 0};
    return {lo / kBlockK * kBlockK, hi};
  }
  // Whether every (i, j) of the block is allowed by the window (no per-element work).
  bool whole(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return allowed(i1 - 1, j0) && allowed(i0, j1 - 1);
  }
  // Whether a bool mask rules out every pair of the block: then it is skipped.
  bool masked_out(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (p.mask == nullptr || !p.mask_is_bool) return false;
    const int64_t* ms = p.mask_strides;
    for (int64_t i = i0; i < i1; ++i) {
      const bool* row = static_cast<const bool*>(p.mask) + b * ms[0] + h * ms[1] + i * ms[2];
      for (int64_t j = j0; j < j1; ++j)
        if (row[j * ms[3]]) return false;
      if (ms[2] == 0) break;  // a mask broadcast over the queries: every row is this one
    }
    return true;
  }
  // Scores row i over keys [j0, j0 + n): masked entries become -inf, a float mask is added.
  template <typename T, typename C>
  void apply(C* s, int64_t i, int64_t j0, int64_t n, bool whole_block) const {
    const int64_t* ms = p.mask_strides;
    const int64_t row = b * ms[0] + h * ms[1] + i * ms[2];
    constexpr C kNegInf = -std::numeric_limits<C>::infinity();
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t j = j0 + jj;
      bool ok = whole_block || allowed(i, j);
      if (p.mask != nullptr) {
        if (p.mask_is_bool) {
          ok = ok && static_cast<const bool*>(p.mask)[row + j * ms[3]];
        } else {
          s[jj] += static_cast<C>(static_cast<const T*>(p.mask)[row + j * ms[3]]);
        }
      }
      if (!ok) s[jj] = kNegInf;
    }
  }
};

// Multiplies row i's probabilities over keys [j0, j0 + n) by the dropout
// keep-mask scaled by 1 / (1 - p): kept ones grow, dropped ones become 0.
template <typename C>
void apply_dropout(const AttentionCpuParams& p, C* x, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n) {
  const uint64_t row = static_cast<uint64_t>(((b * p.Hq + h) * p.L + i) * p.S + j0);
  const float drop = static_cast<float>(p.dropout_p);
  const C keep_scale = static_cast<C>(1.0 / (1.0 - p.dropout_p));
  for (int64_t jj = 0; jj < n; ++jj) {
    x[jj] *= counter_uniform(p.dropout_seed, row + jj) >= drop ? keep_scale : C(0);
  }
}

// dst[r][e] = C(src[r * stride + e]) * factor, r < rows, e < cols (dst row-major, ld cols).
template <typename T, typename C>
void load_rows(C* dst, const T* src, int64_t rows, int64_t cols, int64_t stride, C factor = C(1)) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t e = 0; e < cols; ++e) dst[r * cols + e] = static_cast<C>(src[r * stride + e]) * factor;
}
template <typename T, typename C>
void forward_block(const AttentionCpuParams& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  constexpr C kNegInf = -std::numeric_limits<C>::infinity();
  const int64_t hk = h / (p.Hq / p.Hkv), E = p.E, Ev = p.Ev, bq = i1 - i0;
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  const C* vc = static_cast<const C*>(p.v_c) + (b * p.Hkv + hk) * p.S * Ev;  // [S, Ev]
  std::vector<C> qf(bq * E), s(bq * kBlockK), acc(bq * Ev, C(0));
  std::vector<C> m(bq, kNegInf), l(bq, C(0));
  load_rows(qf.data(), q + i0 * p.q_strides[2], bq, E, p.q_strides[2], static_cast<C>(p.scale));
  const Band band{p, b, h};
  const auto [jlo, jhi] = band.key_range(i0, i1);
  for (int64_t j0 = jlo; j0 < jhi; j0 += kBlockK) {
    const int64_t jn = std::min(kBlockK, jhi - j0);
    if (band.masked_out(i0, i1, j0, j0 + jn)) continue;  // contributes nothing
    const bool whole = band.whole(i0, i1, j0, j0 + jn);
    gemm_acc(bq, jn, E, qf.data(), E, 1, key_block<C>(p.k_t, b * p.Hkv + hk, p.S, E, j0), kBlockK, s.data(),
             kBlockK, false);
    for (int64_t r = 0; r < bq; ++r) {
      C* sr = s.data() + r * kBlockK;
      if (!whole || p.mask != nullptr) band.apply<T>(sr, i0 + r, j0, jn, whole);
      const C m_new = std::max(m[r], row_max(sr, jn));
      if (m_new == kNegInf) {  // nothing to attend to so far
        std::fill(sr, sr + jn, C(0));
        continue;
      }
      const C alpha = std::exp(m[r] - m_new);  // 0 when m[r] is -inf
      l[r] = l[r] * alpha + exp_shifted(sr, jn, m_new);  // the normaliser counts every key
      m[r] = m_new;
      if (alpha != C(1)) {
        for (int64_t e = 0; e < Ev; ++e) acc[r * Ev + e] *= alpha;
      }
      if (p.dropout_p > 0) apply_dropout(p, sr, b, h, i0 + r, j0, jn);  // the values only the kept ones
    }
    gemm_acc(bq, Ev, jn, s.data(), kBlockK, 1, vc + j0 * Ev, Ev, acc.data(), Ev, true);
  }
  T* out = static_cast<T*>(p.out) + ((b * p.Hq + h) * p.L + i0) * Ev;
  C* lse = static_cast<C*>(p.lse) + (b * p.Hq + h) * p.L + i0;
  for (int64_t r = 0; r < bq; ++r) {
    const C inv = l[r] > C(0) ? C(1) / l[r] : C(0);  // a row that attends to nothing gives 0
    for (int64_t e = 0; e < Ev; ++e) out[r * Ev + e] = static_cast<T>(acc[r * Ev + e] * inv);
    lse[r] = l[r] > C(0) ? m[r] + std::log(l[r]) : kNegInf;
  }
}

template <typename T, typename C>
void backward_head(const AttentionCpuParams& p, int64_t b, int64_t hk) {
  const int64_t group = p.Hq / p.Hkv, E = p.E, Ev = p.Ev, S = p.S;
  const int64_t head = b * p.Hkv + hk;
  const C* kc = static_cast<const C*>(p.k_c) + head * S * E;   // [S, E]
  std::vector<C> dk(S * E, C(0)), dv(S * Ev, C(0));
  std::vector<C> qf(kBlockQ * E), dof(kBlockQ * Ev), d(kBlockQ), lse(kBlockQ), dq(kBlockQ * E);
  std::vector<C> s(kBlockQ * kBlockK), dp(kBlockQ * kBlockK);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
    const int64_t row0 = (b * p.Hq + h) * p.L;  // first row of this head in out/grad_out/lse/grad_q
    const Band band{p, b, h};
    for (int64_t i0 = 0; i0 < p.L; i0 += kBlockQ) {
      const int64_t i1 = std::min(p.L, i0 + kBlockQ), bq = i1 - i0;
      load_rows(qf.data(), q + i0 * p.q_strides[2], bq, E, p.q_strides[2], static_cast<C>(p.scale));
      load_rows(dof.data(), static_cast<const T*>(p.grad_out) + (row0 + i0) * Ev, bq, Ev, Ev);
      const T* out = static_cast<const T*>(p.out) + (row0 + i0) * Ev;
      for (int64_t r = 0; r < bq; ++r) {
        C sum = 0;  // D = rowsum(dO * O)
        for (int64_t e = 0; e < Ev; ++e) sum += dof[r * Ev + e] * static_cast<C>(out[r * Ev + e]);
        d[r] = sum;
        lse[r] = static_cast<const C*>(p.lse)[row0 + i0 + r];
      }
      std::fill(dq.begin(), dq.begin() + bq * E, C(0));
      const auto [jlo, jhi] = band.key_range(i0, i1);
      for (int64_t j0 = jlo; j0 < jhi; j0 += kBlockK) {
        const int64_t jn = std::min(kBlockK, jhi - j0);
        if (band.masked_out(i0, i1, j0, j0 + jn)) continue;  // no gradient flows through it
        const bool whole = band.whole(i0, i1, j0, j0 + jn);
        // P = exp(scores - lse), recomputed
        gemm_acc(bq, jn, E, qf.data(), E, 1, key_block<C>(p.k_t, head, S, E, j0), kBlockK, s.data(), kBlockK,
                 false);
        for (int64_t r = 0; r < bq; ++r) {
          C* sr = s.data() + r * kBlockK;
          if (!whole || p.mask != nullptr) band.apply<T>(sr, i0 + r, j0, jn, whole);
          if (std::isinf(lse[r])) {  // attends to nothing: no gradient
            std::fill(sr, sr + jn, C(0));
          } else {
            exp_shifted(sr, jn, lse[r]);
          }
        }
        // With the dropout mask M (scaled by 1 / (1 - p); all ones without dropout):
        // dP = dO V^T;  dS = P * (dP * M - D);  dV += (P * M)^T dO;  dK += dS^T (Q scale);  dQ += dS K
        gemm_acc(bq, jn, Ev, dof.data(), Ev, 1, key_block<C>(p.v_t, head, S, Ev, j0), kBlockK, dp.data(), kBlockK,
                 false);
        if (p.dropout_p > 0) {
          for (int64_t r = 0; r < bq; ++r) {
            apply_dropout(p, dp.data() + r * kBlockK, b, h, i0 + r, j0, jn);  // dP * M
          }
        }
        for (int64_t r = 0; r < bq; ++r)
          for (int64_t jj = 0; jj < jn; ++jj) {
            C& x = dp[r * kBlockK + jj];
            x = s[r * kBlockK + jj] * (x - d[r]);
          }
        if (p.grad_mask != nullptr) {  // a float mask adds to the scores: its gradient is dS
          C* gm = static_cast<C*>(p.grad_mask) + (row0 + i0) * S + j0;
          for (int64_t r = 0; r < bq; ++r) {
            std::copy(dp.data() + r * kBlockK, dp.data() + r * kBlockK + jn, gm + r * S);
          }
        }
        if (p.dropout_p > 0) {
          for (int64_t r = 0; r < bq; ++r) apply_dropout(p, s.data() + r * kBlockK, b, h, i0 + r, j0, jn);  // P * M
        }
        gemm_acc(jn, Ev, bq, s.data(), 1, kBlockK, dof.data(), Ev, dv.data() + j0 * Ev, Ev, true);
        gemm_acc(jn, E, bq, dp.data(), 1, kBlockK, qf.data(), E, dk.data() + j0 * E, E, true);
        gemm_acc(bq, E, jn, dp.data(), kBlockK, 1, kc + j0 * E, E, dq.data(), E, true);
      }
      T* gq = static_cast<T*>(p.grad_q) + (row0 + i0) * E;
      for (int64_t x = 0; x < bq * E; ++x) gq[x] = static_cast<T>(dq[x] * static_cast<C>(p.scale));
    }
  }
  T* gk = static_cast<T*>(p.grad_k) + (b * p.Hkv + hk) * S * E;
  T* gv = static_cast<T*>(p.grad_v) + (b * p.Hkv + hk) * S * Ev;
  for (int64_t x = 0; x < S * E; ++x) gk[x] = static_cast<T>(dk[x]);
  for (int64_t x = 0; x < S * Ev; ++x) gv[x] = static_cast<T>(dv[x]);
}

void forward_block_any(const AttentionCpuParams& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  dispatch_storage_type(p.dtype, [&](auto t) {
    using T = decltype(t);
    forward_block<T, typename VecIO<T>::C>(p, b, h, i0, i1);
  });
}

void backward_head_any(const AttentionCpuParams& p, int64_t b, int64_t hk) {
  dispatch_storage_type(p.dtype, [&](auto t) {
    using T = decltype(t);
    backward_head<T, typename VecIO<T>::C>(p, b, hk);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY

extern const AttentionCpuKernels BK_CAPABILITY_NAME(attention_cpu_kernels) = {
    &CPU_CAPABILITY::forward_block_any,
    &CPU_CAPABILITY::backward_head_any,
};

}  // namespace bigkernels
