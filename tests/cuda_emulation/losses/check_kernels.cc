// Runs the loss family's CUDA kernels (csrc/losses/cuda/*.cu) under host
// emulation (emu_cuda.h) and checks them against float64.
// The row passes (loss_kernels.cu): cross-entropy (label smoothing, softcap,
// z-loss; the forward with the gradient and the backward from a given lse
// with per-row scales) and distillation (forward KL, reverse KL, JSD;
// temperatures; with and without the hard term), every dtype, widths below,
// at and past the block's 256 threads (1, 7, 33, 256, 257, 1000, 4099), more
// rows than the grid (a cap of 2 blocks: the kernels grid-stride), and
// logits of order 1e3.
// The blocked kernels (blocked_kernels.cu, linear + cross-entropy a 64 x 128
// tile at a time), every dtype (fp16/bf16: mma.sync; fp32/fp64: SIMT), from
// the dtype-rounded x, w and bias: the statistics pass's per-split partials
// (1, 2, 3 and more splits than tiles; empty splits) combined on the host
// into lse and sum z, and the target's logit; the gradient pass's dX, dW, db
// from the reference's lse (scale or per-row scales, label smoothing, z-loss,
// softcap, each output left out once), and its skipping of tiles below
// skip_below. N 1, 63, 64, 65, 130; V 1, 7, 128, 129, 300, 400; D 8, 24, 40,
// 72, 130 (past the k-steps and slices of D, no multiple of 8), x and w
// misaligned (no 16-byte copies), logits of order 1e3.
// The blocked distillation kernels (the same tiles: each makes the teacher's
// logits, then the student's), every dtype, from the dtype-rounded inputs,
// the student's and teacher's D apart ((Ds, Dt) (40, 72), (130, 24), (8, 8)),
// each bias on or off: the statistics pass's per-split partials (max s, the
// log-sums of s at T and at 1, max t, t's log-sum at T; 1 to 5 splits, 2
// and 3 tiles in one, empty splits) combined on the host into row_stats, and
// the target's logit; the terms pass's per-split sums from the reference's
// row_stats rounded to the compute type (forward KL, JSD, reverse KL;
// temperatures 0.5, 1, 2; with and without the hard term), and each row's
// loss from them as the host makes it; the gradient pass's dX, dW, db with
// sum Q g (scale or per-row scales, each output left out once). N 1, 65,
// 130; V 1, 7, 129, 300; fp16/bf16 misaligned once.
// The bounds follow the kernels' roundings (see check_blocked_statistics,
// check_blocked_gradients, check_blocked_distillation); "worst" lines say
// how close each kind of check came to its bound.
// Outputs start as NaN, so an element never written fails (the buffers the
// blocked gradients sum into start at 0, as the caller zeroes them). --quick
// (the ThreadSanitizer run): fp32's row passes and a few blocked cases (fp32,
// bf16), and one blocked distillation case each (JSD at T 2 with the hard
// term, two tiles in a split). Built and run by tests/test_cuda_emulation.py;
// exits non-zero on any mismatch.
#include "emu_cuda.h"
#include "losses/cuda/launchers.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

using namespace bigkernels;
using namespace bigkernels::cuda;

template <typename T> T from_d(double v);
template <> float from_d(double v) { return (float)v; }
template <> double from_d(double v) { return v; }
template <> __half from_d(double v) { return __float2half_rn((float)v); }
template <> __nv_bfloat16 from_d(double v) { return __float2bfloat16_rn((float)v); }
static double to_d(float v) { return v; }
static double to_d(double v) { return v; }
static double to_d(__half v) { return __half2float(v); }
static double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> LossDType dtype_of();
template <> LossDType dtype_of<float>() { return LossDType::kFloat32; }
template <> LossDType dtype_of<double>() { return LossDType::kFloat64; }
template <> LossDType dtype_of<__half>() { return LossDType::kFloat16; }
template <> LossDType dtype_of<__nv_bfloat16>() { return LossDType::kBFloat16; }

// Relative precision of T's storage (the gradient's rounding), and of the compute type.
template <typename T> double ulp();
template <> double ulp<float>() { return 1.2e-7; }
template <> double ulp<double>() { return 2.3e-16; }
template <> double ulp<__half>() { return 9.8e-4; }
template <> double ulp<__nv_bfloat16>() { return 7.9e-3; }
template <typename T> using acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

static int failures = 0, checks = 0;
static std::map<std::string, double> worst;
// |got - want| <= tol * scale; NaN never passes.
static void expect(const std::string& what, double got, double want, double tol, double scale) {
  ++checks;
  double& w = worst[what.substr(0, what.find(' ', what.find(' ') + 1))];
  w = std::max(w, std::fabs(got - want) / (tol * scale));
  if (!(std::fabs(got - want) <= tol * scale)) {
    if (failures < 20) std::printf("MISMATCH %s: got %.10g want %.10g (tol %.3g x %.3g)\n", what.c_str(), got, want,
                                   tol, scale);
    ++failures;
  }
}

static double logsumexp(const std::vector<double>& v) {
  double m = -INFINITY, s = 0;
  for (double x : v) m = std::max(m, x);
  for (double x : v) s += std::exp(x - m);
  return m + std::log(s);
}

struct CeCase {
  int64_t rows, V;
  double smoothing = 0, softcap = 0, z_loss = 0, spread = 3;
  bool backward = false;  // lse given, per-row scales, no loss
  int64_t max_blocks = 2;
};

template <typename T>
void check_cross_entropy(const char* name, const CeCase& c) {
  using A = acc<T>;
  const int64_t R = c.rows, V = c.V, ld = V + 3;  // rows ld apart: the stride is honoured
  const std::string tag = std::string(name) + " ce R" + std::to_string(R) + " V" + std::to_string(V) +
                          (c.smoothing ? " smooth" : "") + (c.softcap ? " cap" : "") + (c.z_loss ? " z" : "") +
                          (c.backward ? " backward" : "") + " spread" + std::to_string((int)c.spread);
  std::mt19937 gen(R * 31 + V * 7 + c.backward + (int)c.spread);
  std::normal_distribution<double> nd;
  std::vector<T> z(R * ld);
  for (auto& v : z) v = from_d<T>(c.spread * nd(gen));
  std::vector<int64_t> target(R);
  for (auto& t : target) t = std::uniform_int_distribution<int64_t>(0, V - 1)(gen);
  // float64 reference from the stored (rounded) logits
  std::vector<double> ref_lse(R), ref_loss(R), ref_grad(R * V), scales(R);
  for (int64_t r = 0; r < R; ++r) {
    scales[r] = c.backward ? nd(gen) : 0.37;
    std::vector<double> cz(V);
    double mean = 0;
    for (int64_t j = 0; j < V; ++j) {
      const double x = to_d(z[r * ld + j]);
      cz[j] = c.softcap ? c.softcap * std::tanh(x / c.softcap) : x;
      mean += cz[j] / V;
    }
    const double lse = logsumexp(cz);
    ref_lse[r] = lse;
    ref_loss[r] = (1 - c.smoothing) * (lse - cz[target[r]]) + c.smoothing * (lse - mean) + c.z_loss * lse * lse;
    for (int64_t j = 0; j < V; ++j) {
      const double x = to_d(z[r * ld + j]);
      double g = std::exp(cz[j] - lse) * (1 + 2 * c.z_loss * lse) - c.smoothing / V - (j == target[r]) * (1 - c.smoothing);
      if (c.softcap) g *= 1 - std::pow(std::tanh(x / c.softcap), 2);
      ref_grad[r * V + j] = g * scales[r];
    }
  }
  const A nan = std::numeric_limits<A>::quiet_NaN();
  std::vector<A> lse(R, nan), loss(R, nan), row_scale(R);
  for (int64_t r = 0; r < R; ++r) row_scale[r] = (A)scales[r];
  if (c.backward)
    for (int64_t r = 0; r < R; ++r) lse[r] = (A)ref_lse[r];
  CrossEntropyRows a{z.data(), V, ld, target.data(), c.smoothing, c.softcap, c.z_loss, lse.data(),
                     c.backward ? nullptr : loss.data(), c.backward, true,
                     c.backward ? row_scale.data() : nullptr, 0.37};
  require(launch_cross_entropy_rows(a, R, dtype_of<T>(), c.max_blocks, nullptr) == cudaSuccess, "ce launch");
  const double eps_c = std::is_same_v<A, double> ? 1e-13 : 2e-6;  // the compute type's, over a row's sums
  for (int64_t r = 0; r < R; ++r) {
    const double s = std::max(1.0, std::fabs(ref_lse[r]));
    if (!c.backward) {
      expect("lse " + tag, lse[r], ref_lse[r], eps_c * (1 + std::log((double)V)), s);
      expect("loss " + tag, loss[r], ref_loss[r], eps_c * (1 + std::log((double)V)) * (1 + c.z_loss * s * 2), s * (1 + c.z_loss * s));
    }
    const double gscale = std::fabs(scales[r]) * (1 + 2 * c.z_loss * s) + 1e-300;
    for (int64_t j = 0; j < V; ++j)
      expect("grad " + tag, to_d(z[r * ld + j]), ref_grad[r * V + j], 2 * ulp<T>() + 4 * eps_c * s, gscale);
  }
}

struct KdCase {
  int64_t rows, V;
  double temperature = 1, beta = 0, hard_weight = 0, spread = 3;
  bool per_row = false;  // per-row scales (the backward of 'none')
  int64_t max_blocks = 2;
};

template <typename T>
void check_distillation(const char* name, const KdCase& c) {
  using A = acc<T>;
  const int64_t R = c.rows, V = c.V, ld = V + 1;
  const std::string tag = std::string(name) + " kd R" + std::to_string(R) + " V" + std::to_string(V) + " T" +
                          std::to_string(c.temperature).substr(0, 4) + " beta" + std::to_string(c.beta).substr(0, 4) +
                          (c.hard_weight ? " hard" : "") + " spread" + std::to_string((int)c.spread);
  std::mt19937 gen(R * 13 + V * 3 + (int)(c.beta * 10) + (int)c.temperature);
  std::normal_distribution<double> nd;
  std::vector<T> s(R * ld);
  std::vector<A> t(R * ld);
  for (auto& v : s) v = from_d<T>(c.spread * nd(gen));
  for (auto& v : t) v = (A)(1.5 * c.spread * nd(gen));
  std::vector<int64_t> target(R);
  for (auto& x : target) x = std::uniform_int_distribution<int64_t>(0, V - 1)(gen);
  std::vector<double> ref_loss(R), ref_grad(R * V), scales(R);
  const double T_ = c.temperature, b = c.beta;
  for (int64_t r = 0; r < R; ++r) {
    scales[r] = c.per_row ? nd(gen) : 0.61;
    std::vector<double> u(V), w(V), sv(V);
    for (int64_t j = 0; j < V; ++j) {
      sv[j] = to_d(s[r * ld + j]);
      u[j] = sv[j] / T_;
      w[j] = t[r * ld + j] / T_;
    }
    const double lq0 = logsumexp(u), lp0 = logsumexp(w), ls0 = logsumexp(sv);
    std::vector<double> lq(V), lp(V), q(V), p(V), g(V);
    double soft = 0, qg = 0;
    for (int64_t j = 0; j < V; ++j) {
      lq[j] = u[j] - lq0, lp[j] = w[j] - lp0, q[j] = std::exp(lq[j]), p[j] = std::exp(lp[j]);
    }
    for (int64_t j = 0; j < V; ++j) {
      if (b == 0) {
        soft += p[j] * (lp[j] - lq[j]);
      } else if (b == 1) {
        g[j] = lq[j] - lp[j];
        soft += q[j] * g[j];
      } else {
        const double x = std::log(b) + lp[j], y = std::log1p(-b) + lq[j];  // log M, exact where M underflows
        const double lm = std::max(x, y) + std::log1p(std::exp(-std::fabs(x - y)));
        g[j] = (1 - b) * (lq[j] - lm);
        soft += b * p[j] * (lp[j] - lm) + (1 - b) * q[j] * (lq[j] - lm);
      }
    }
    for (int64_t j = 0; j < V; ++j) qg += q[j] * g[j];
    const double hard = ls0 - sv[target[r]];
    ref_loss[r] = T_ * T_ * soft + c.hard_weight * hard;
    for (int64_t j = 0; j < V; ++j) {
      const double d = b == 0 ? q[j] - p[j] : q[j] * (g[j] - qg);
      const double h = c.hard_weight * (std::exp(sv[j] - ls0) - (j == target[r]));
      ref_grad[r * V + j] = scales[r] * (T_ * d + h);
    }
  }
  const A nan = std::numeric_limits<A>::quiet_NaN();
  std::vector<A> loss(R, nan), row_scale(R);
  for (int64_t r = 0; r < R; ++r) row_scale[r] = (A)scales[r];
  DistillationRows a{s.data(), t.data(), V, ld, c.hard_weight ? target.data() : nullptr, c.temperature, c.beta,
                     c.hard_weight, loss.data(), true, c.per_row ? row_scale.data() : nullptr, 0.61};
  require(launch_distillation_rows(a, R, dtype_of<T>(), c.max_blocks, nullptr) == cudaSuccess, "kd launch");
  const double eps_c = std::is_same_v<A, double> ? 1e-12 : 4e-6;
  for (int64_t r = 0; r < R; ++r) {
    const double size = std::max(1.0, c.spread / c.temperature) * (1 + c.temperature * c.temperature);
    expect("loss " + tag, loss[r], ref_loss[r], eps_c * (1 + std::log((double)V)) * 8, size);
    const double gscale = std::fabs(scales[r]) * (c.temperature + c.hard_weight);
    for (int64_t j = 0; j < V; ++j)
      expect("grad " + tag, to_d(s[r * ld + j]), ref_grad[r * V + j], 2 * ulp<T>() + 16 * eps_c * size, gscale);
  }
}

template <typename T>
void check_dtype(const char* name, bool quick) {
  const std::vector<int64_t> widths = quick ? std::vector<int64_t>{7, 257} : std::vector<int64_t>{1, 7, 33, 256, 257, 1000, 4099};
  for (int64_t V : widths) {
    check_cross_entropy<T>(name, CeCase{5, V});
    if (quick) continue;
    check_cross_entropy<T>(name, CeCase{3, V, 0.1});
    check_cross_entropy<T>(name, CeCase{3, V, 0.0, 3.0});
    check_cross_entropy<T>(name, CeCase{3, V, 0.2, 7.0, 0.01});
    check_cross_entropy<T>(name, CeCase{4, V, 0.1, 5.0, 0.001, 3, true});
    for (double beta : {0.0, 0.5, 1.0}) {
      check_distillation<T>(name, KdCase{3, V, 1.0, beta});
      check_distillation<T>(name, KdCase{3, V, 2.0, beta, 0.5, 3, true});
    }
  }
  if (quick) check_distillation<T>(name, KdCase{3, 257, 2.0, 0.3, 0.5});
}

// ---- The blocked kernels (blocked_kernels.cu): linear + cross-entropy a tile at a time ----

template <typename T>
constexpr bool kMmaPath = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;  // else SIMT
// The compute type's unit roundoff (a rounding's relative error).
template <typename T>
double unit_c() { return std::is_same_v<acc<T>, double> ? 0x1p-53 : 0x1p-24; }

// x [N, D], w [V, D], bias [V] in T (x and w one element into their buffers
// when misaligned, which defeats the 16-byte copies; the element before or
// after the data is NaN, so a read past it shows), with the float64
// reference from the rounded values: raw = x.w + b, z = softcap(raw), and
// mag = sum |x_k w_k| + |b|, which the products' rounding error scales with.
template <typename T>
struct BlockedData {
  int64_t N, V, D;
  double softcap = 0;
  std::vector<T> x_store, w_store, b;
  const T* x;
  const T* w;
  std::vector<int64_t> target;
  std::vector<double> raw, z, mag;
  double in(int64_t i, int64_t k) const { return to_d(x[i * D + k]); }
  double wt(int64_t j, int64_t k) const { return to_d(w[j * D + k]); }
};

template <typename T>
void blocked_alloc(BlockedData<T>& d, int64_t N, int64_t V, int64_t D, bool misaligned) {
  d.N = N, d.V = V, d.D = D;
  const T nan = from_d<T>(std::numeric_limits<double>::quiet_NaN());
  d.x_store.assign(N * D + 1, nan);
  d.w_store.assign(V * D + 1, nan);
  d.x = d.x_store.data() + misaligned;
  d.w = d.w_store.data() + misaligned;
  require(reinterpret_cast<uintptr_t>(d.x_store.data()) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(d.w_store.data()) % 16 == 0,
          "the checker's buffers 16-byte aligned");
  d.target.assign(N, 0);
}

template <typename T>
void blocked_reference(BlockedData<T>& d) {
  const int64_t N = d.N, V = d.V, D = d.D;
  d.raw.assign(N * V, 0), d.z.assign(N * V, 0), d.mag.assign(N * V, 0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < V; ++j) {
      double s = d.b.empty() ? 0 : to_d(d.b[j]), m = std::fabs(s);
      for (int64_t k = 0; k < D; ++k) {
        const double p = d.in(i, k) * d.wt(j, k);
        s += p, m += std::fabs(p);
      }
      d.raw[i * V + j] = s, d.mag[i * V + j] = m;
      d.z[i * V + j] = d.softcap > 0 ? d.softcap * std::tanh(s / d.softcap) : s;
    }
}

// A bound on |z - the kernel's z|: the products' accumulation in the
// compute type (fp16/bf16 products are exact in fp32: only the sums round),
// the bias's addition, and the softcap's tanh (its slope is at most 1).
template <typename T>
double z_error(const BlockedData<T>& d, int64_t at) {
  const double u = unit_c<T>();
  return u * (d.D + 4) * d.mag[at] + 8 * u * (std::fabs(d.z[at]) + 1);
}

struct BlockedCase {
  int64_t N, V, D;
  std::vector<int64_t> splits;  // the statistics pass, once per value
  double softcap = 0, spread = 3;  // logits of order spread
  bool bias = true, misaligned = false;
  // the gradient pass
  double scale = 0.375, smoothing = 0, z_loss = 0;
  bool row_scale = false, want_x = true, want_w = true, want_b = true;
};

// The statistics pass with `splits` splits: each split's partials against
// its columns' float64 statistics, an empty split's exact (-inf, 0, 0), and
// the host's combination (lse = M + log sum s exp(m - M), sum z) and the
// target's logit against the row's. The bounds follow the kernel's
// roundings (z_error; the exp-sum's, a relative error of the order of the
// compute type's unit per term summed; exp(z - m)'s argument, rounded at
// the logits' size) with a factor 2 to spare.
template <typename T>
void check_blocked_statistics(const std::string& tag0, const BlockedData<T>& d, int64_t splits) {
  using A = acc<T>;
  const int64_t N = d.N, V = d.V, tiles = (V + kBlockedCols - 1) / kBlockedCols, per = (tiles + splits - 1) / splits;
  const std::string tag = tag0 + " splits" + std::to_string(splits);
  const A nan = std::numeric_limits<A>::quiet_NaN();
  std::vector<A> part_max(splits * N, nan), part_sum(splits * N, nan), part_z(splits * N, nan), target_logit(N, nan);
  BlockedCrossEntropy p{};
  p.x = d.x, p.w = d.w, p.bias = d.b.empty() ? nullptr : d.b.data(), p.target = d.target.data();
  p.N = N, p.D = d.D, p.V = V, p.softcap = d.softcap, p.splits = splits;
  p.part_max = part_max.data(), p.part_sum = part_sum.data(), p.part_logit_sum = part_z.data();
  p.target_logit = target_logit.data();
  require(launch_blocked_statistics(p, dtype_of<T>(), nullptr) == cudaSuccess, "blocked statistics launch");
  const double u = unit_c<T>();
  for (int64_t i = 0; i < N; ++i) {
    double row_zerr = 0, row_abs = 0, row_zmax = 0;
    for (int64_t j = 0; j < V; ++j) {
      row_zerr = std::max(row_zerr, z_error(d, i * V + j));
      row_zmax = std::max(row_zmax, std::fabs(d.z[i * V + j]));
    }
    double M = -INFINITY, S = 0, zsum = 0, ref_zsum = 0, zsum_bound = 0;
    for (int64_t k = 0; k < splits; ++k) {
      const int64_t lo = std::min(V, k * per * kBlockedCols), hi = std::min(V, (k + 1) * per * kBlockedCols);
      const int64_t at = k * N + i;
      const std::string where = tag + " row" + std::to_string(i) + " split" + std::to_string(k);
      if (lo >= hi) {  // no tile: exactly -inf, 0, 0
        expect("blocked_empty " + where, part_max[at] == -INFINITY && part_sum[at] == 0 && part_z[at] == 0 ? 0 : 1, 0,
               0.5, 1);
        continue;
      }
      std::vector<double> cz(d.z.begin() + i * V + lo, d.z.begin() + i * V + hi);
      double zmax = -INFINITY, zerr = 0, sum = 0, abs_sum = 0;
      for (int64_t j = lo; j < hi; ++j) {
        zmax = std::max(zmax, d.z[i * V + j]);
        zerr = std::max(zerr, z_error(d, i * V + j));
        sum += d.z[i * V + j], abs_sum += std::fabs(d.z[i * V + j]);
        zsum_bound += z_error(d, i * V + j);
      }
      const double lse_bound = zerr + u * ((hi - lo) / 4.0 + 16 + 2 * row_zmax);
      const double sum_bound = (hi - lo) * zerr + u * (hi - lo + 8) * abs_sum;
      expect("blocked_partmax " + where, part_max[at], zmax, 2, zerr);
      expect("blocked_partlse " + where, part_max[at] + std::log((double)part_sum[at]), logsumexp(cz), 2, lse_bound);
      expect("blocked_partzsum " + where, part_z[at], sum, 2, sum_bound);
      M = std::max(M, (double)part_max[at]);
      ref_zsum += sum, row_abs += abs_sum;
    }
    for (int64_t k = 0; k < splits; ++k)
      if (part_max[k * N + i] != -INFINITY) S += part_sum[k * N + i] * std::exp(part_max[k * N + i] - M);
    for (int64_t k = 0; k < splits; ++k) zsum += part_z[k * N + i];
    const std::vector<double> cz(d.z.begin() + i * V, d.z.begin() + (i + 1) * V);
    const std::string where = tag + " row" + std::to_string(i);
    expect("blocked_lse " + where, M + std::log(S), logsumexp(cz), 2,
           row_zerr + u * (V / 4.0 + 16 + 2 * row_zmax) + u * row_zmax);
    expect("blocked_zsum " + where, zsum, ref_zsum, 2, zsum_bound + u * (V + 8 + splits) * row_abs);
    const int64_t t = i * V + d.target[i];
    expect("blocked_target " + where, target_logit[i], d.z[t], 2, z_error(d, t));
  }
}

// The gradient pass's products against float64 from the reference's G (dG:
// the bound on the kernel's G's deviation from it, each element): dX = G W
// [N, D], dW = G^T X [V, D] and db = G's column sums [V] (an empty buffer:
// not wanted). The products' sums round once per term, in any order (the
// atomics): (terms + 8) u |G| |.| to spare, and an underflow's per term.
template <typename T>
void check_blocked_products(const std::string& kind, const std::string& tag, const BlockedData<T>& d,
                            const std::vector<double>& G, const std::vector<double>& dG,
                            const std::vector<acc<T>>& gx, const std::vector<acc<T>>& gw,
                            const std::vector<acc<T>>& gb) {
  const int64_t N = d.N, V = d.V, D = d.D;
  const double u = unit_c<T>(), tiny = 2 * std::numeric_limits<acc<T>>::min();
  if (!gx.empty())
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < D; ++k) {
        double want = 0, dev = 0, mag = 0;
        for (int64_t j = 0; j < V; ++j) {
          const double wv = d.wt(j, k);
          want += G[i * V + j] * wv, dev += dG[i * V + j] * std::fabs(wv), mag += std::fabs(G[i * V + j] * wv);
        }
        expect(kind + "_dx " + tag + " at" + std::to_string(i) + "," + std::to_string(k), gx[i * D + k], want, 2,
               dev + u * (V + 8) * mag + V * tiny);
      }
  if (!gw.empty())
    for (int64_t j = 0; j < V; ++j)
      for (int64_t k = 0; k < D; ++k) {
        double want = 0, dev = 0, mag = 0;
        for (int64_t i = 0; i < N; ++i) {
          const double xv = d.in(i, k);
          want += G[i * V + j] * xv, dev += dG[i * V + j] * std::fabs(xv), mag += std::fabs(G[i * V + j] * xv);
        }
        expect(kind + "_dw " + tag + " at" + std::to_string(j) + "," + std::to_string(k), gw[j * D + k], want, 2,
               dev + u * (N + 8) * mag + N * tiny);
      }
  if (!gb.empty())
    for (int64_t j = 0; j < V; ++j) {
      double want = 0, dev = 0, mag = 0;
      for (int64_t i = 0; i < N; ++i) want += G[i * V + j], dev += dG[i * V + j], mag += std::fabs(G[i * V + j]);
      expect(kind + "_db " + tag + " at" + std::to_string(j), gb[j], want, 2, dev + u * (N + 8) * mag + N * tiny);
    }
}

struct BlockedGrad {
  double scale = 0.375, smoothing = 0, z_loss = 0, skip_below = 0;
  bool row_scale = false, want_x = true, want_w = true, want_b = true;
};

// The gradient pass from the reference's lse (in the compute type), against
// float64: G from the reference's logits (zero in the tiles of `skipped`,
// [row blocks x column tiles], when given), then G W, G^T X and G's column
// sums. The bound on each of G's elements follows the kernel's roundings
// (z_error through exp, the factors, and the softcap's slope). For fp16/bf16
// the kernel rounds G to the dtype before the tensor cores' products, so the
// reference does too (G in double, rounded to the dtype, then the products in
// double), which keeps the bound tight: the products of two 16-bit values are
// exact in fp32 and only the sums round, except where the kernel's G and the
// reference's may round to neighbouring values (G's bound straddles a rounding
// boundary), where that step is allowed. Factor 2 to spare.
template <typename T>
void check_blocked_gradients(const std::string& tag0, const BlockedData<T>& d, const BlockedGrad& g,
                             const std::vector<char>& skipped = {}) {
  using A = acc<T>;
  const int64_t N = d.N, V = d.V, D = d.D, col_tiles = (V + kBlockedCols - 1) / kBlockedCols;
  const std::string tag = tag0 + (g.smoothing ? " smooth" : "") + (g.z_loss ? " z" : "") +
                          (g.row_scale ? " row_scale" : "") + (g.skip_below ? " skip" : "") +
                          (g.want_x ? "" : " no_dx") + (g.want_w ? "" : " no_dw") + (g.want_b ? "" : " no_db");
  std::mt19937 gen(N * 5 + V * 11 + D);
  std::normal_distribution<double> nd;
  std::vector<A> lse(N), row_scale(N);
  std::vector<double> scale(N);
  for (int64_t i = 0; i < N; ++i) {
    const std::vector<double> cz(d.z.begin() + i * V, d.z.begin() + (i + 1) * V);
    lse[i] = (A)logsumexp(cz);
    row_scale[i] = (A)nd(gen);
    scale[i] = g.row_scale ? (double)row_scale[i] : (double)(A)g.scale;
  }
  const double u = unit_c<T>(), cap = d.softcap, ls = (double)(A)g.smoothing, zl = (double)(A)g.z_loss;
  const double tiny = 2 * std::numeric_limits<A>::min();  // underflow's absolute error, per rounding
  std::vector<double> G(N * V), dG(N * V);  // the reference's G and the bound on the kernel's deviation from it
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < V; ++j) {
      const int64_t at = i * V + j;
      if (!skipped.empty() && skipped[(i / kBlockedRows) * col_tiles + j / kBlockedCols]) continue;
      const double z = d.z[at], raw = d.raw[at], l = lse[i], sc = scale[i];
      const double rerr = u * (D + 4) * d.mag[at], zerr = z_error(d, at);
      const double prob = std::exp(z - l), pf = sc * (1 + 2 * zl * l), off = sc * ls / V;
      const bool is_target = j == d.target[i];
      const double pre = prob * pf - off - (is_target ? sc * (1 - ls) : 0);
      double err = prob * std::expm1(zerr + u * (std::fabs(z) + std::fabs(l)) + 4 * u) * std::fabs(pf) +
                   8 * u * (prob * std::fabs(sc) * (1 + 2 * std::fabs(zl * l)) + std::fabs(off)) +
                   8 * u * is_target * std::fabs(sc) +
                   tiny * std::fabs(pf);  // exp(z - lse) below the compute type's normal range
      double gv = pre;
      if (cap > 0) {  // 1 - tanh^2 as the kernel computes it, exact in relative terms where it is small
        const double e = std::exp(-2 * std::fabs(raw / cap)), slope = 4 * e / ((1 + e) * (1 + e));
        gv = pre * slope;
        err = err * slope + std::fabs(pre) * slope * (2 * rerr / cap + 8 * u);
      }
      if constexpr (kMmaPath<T>) {
        G[at] = to_d(from_d<T>(gv));
        dG[at] = to_d(from_d<T>(gv + err)) - to_d(from_d<T>(gv - err));  // 0 unless near a rounding boundary
      } else {
        G[at] = gv, dG[at] = err;
      }
    }
  std::vector<A> gx(g.want_x ? N * D : 0, A(0)), gw(g.want_w ? V * D : 0, A(0)), gb(g.want_b ? V : 0, A(0));
  BlockedCrossEntropy p{};
  p.x = d.x, p.w = d.w, p.bias = d.b.empty() ? nullptr : d.b.data(), p.target = d.target.data();
  p.N = N, p.D = D, p.V = V, p.softcap = d.softcap, p.lse = lse.data(), p.label_smoothing = g.smoothing;
  p.z_loss = g.z_loss, p.row_scale = g.row_scale ? row_scale.data() : nullptr, p.scale = g.scale;
  p.skip_below = g.skip_below;
  p.grad_x = g.want_x ? gx.data() : nullptr, p.grad_w = g.want_w ? gw.data() : nullptr;
  p.grad_b = g.want_b ? gb.data() : nullptr;
  require(launch_blocked_gradients(p, dtype_of<T>(), nullptr) == cudaSuccess, "blocked gradients launch");
  check_blocked_products("blocked", tag, d, G, dG, gx, gw, gb);
}

// Random x (order 1), w (order spread / sqrt(D)), bias and targets: logits of order `spread`.
template <typename T>
BlockedData<T> random_blocked(const BlockedCase& c) {
  BlockedData<T> d;
  blocked_alloc(d, c.N, c.V, c.D, c.misaligned);
  std::mt19937 gen(c.N * 131 + c.V * 17 + c.D * 3 + (int)c.spread);
  std::normal_distribution<double> nd;
  T* x = d.x_store.data() + c.misaligned;
  T* w = d.w_store.data() + c.misaligned;
  for (int64_t k = 0; k < c.N * c.D; ++k) x[k] = from_d<T>(nd(gen));
  for (int64_t k = 0; k < c.V * c.D; ++k) w[k] = from_d<T>(nd(gen) * c.spread / std::sqrt((double)c.D));
  if (c.bias)
    for (int64_t j = 0; j < c.V; ++j) d.b.push_back(from_d<T>(0.5 * c.spread * nd(gen)));
  for (auto& t : d.target) t = std::uniform_int_distribution<int64_t>(0, c.V - 1)(gen);
  d.softcap = c.softcap;
  blocked_reference(d);
  return d;
}

template <typename T>
void check_blocked(const char* name, const BlockedCase& c) {
  const BlockedData<T> d = random_blocked<T>(c);
  const std::string tag = std::string(name) + " N" + std::to_string(c.N) + " V" + std::to_string(c.V) + " D" +
                          std::to_string(c.D) + (c.softcap ? " cap" : "") + (c.bias ? " bias" : "") +
                          (c.misaligned ? " misaligned" : "") + " spread" + std::to_string((int)c.spread);
  for (int64_t s : c.splits) check_blocked_statistics(tag, d, s);
  BlockedGrad g;
  g.scale = c.scale, g.smoothing = c.smoothing, g.z_loss = c.z_loss, g.row_scale = c.row_scale;
  g.want_x = c.want_x, g.want_w = c.want_w, g.want_b = c.want_b;
  check_blocked_gradients(tag, d, g);
}

// skip_below = 2^-12 on logits made so that every probability is above 2^-11
// or below 2^-13 (required: the kernel's rounding cannot move one across):
// rows 0-63 peak in column tile 0, 64-127 in tile 1 but row 100 in tile 2,
// 128-129 in tile 2; off their peak a row's probabilities are near 2^-13.5,
// so the skipped tiles would have added a visible amount. Row 129's target
// lies in tile 0, off its peak. Tiles [row block][column tile] skipped:
// (0,1) (0,2) (1,0) (2,1); kept: (0,0) and (1,1), (1,2) for row 100, (2,0)
// for the target, (2,2). Then with label smoothing nothing may be skipped.
template <typename T>
void check_blocked_skip(const char* name) {
  const int64_t N = 130, V = 300, D = 24, col_tiles = 3, row_blocks = 3;
  BlockedData<T> d;
  blocked_alloc(d, N, V, D, false);
  std::mt19937 gen(12345);
  std::normal_distribution<double> nd;
  T* x = d.x_store.data();
  T* w = d.w_store.data();
  auto peak_of = [](int64_t i) -> int64_t { return i == 100 ? 2 : i < 64 ? 0 : i < 128 ? 1 : 2; };
  const double a = 6;  // the peak tile's logits
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = peak_of(i), own = t == 2 ? V - 2 * kBlockedCols : kBlockedCols;
    const double b = a + std::log(std::ldexp(std::sqrt(2.0), -14) * own);  // off the peak: p near 2^-13.5
    for (int64_t k = 0; k < D; ++k) x[i * D + k] = from_d<T>(k < 3 ? (k == t ? a : b) : 0.5 * nd(gen));
    d.target[i] = i == 129 ? 5 : t * kBlockedCols + std::uniform_int_distribution<int64_t>(0, own - 1)(gen);
  }
  for (int64_t j = 0; j < V; ++j)
    for (int64_t k = 0; k < D; ++k) w[j * D + k] = from_d<T>(k < 3 ? (k == j / kBlockedCols) : 0.02 * nd(gen));
  for (int64_t j = 0; j < V; ++j) d.b.push_back(from_d<T>(0.01 * nd(gen)));
  blocked_reference(d);
  const double skip = std::ldexp(1.0, -12);
  std::vector<char> skipped(row_blocks * col_tiles, 1);
  for (int64_t i = 0; i < N; ++i) {
    const std::vector<double> cz(d.z.begin() + i * V, d.z.begin() + (i + 1) * V);
    const double lse = (acc<T>)logsumexp(cz);
    for (int64_t j = 0; j < V; ++j) {
      const double prob = std::exp(d.z[i * V + j] - lse);
      require(prob < skip / 2 || prob > skip * 2, "the skip check's probabilities a factor 2 from the threshold");
      if (prob >= skip || j == d.target[i]) skipped[(i / kBlockedRows) * col_tiles + j / kBlockedCols] = 0;
    }
  }
  const std::vector<char> expected{0, 1, 1, 1, 0, 0, 0, 1, 0};
  require(skipped == expected, "the skip check's data skips the tiles it says");
  const std::string tag = std::string(name) + " N130 V300 D24 peaked";
  BlockedGrad g;
  g.skip_below = skip, g.z_loss = 1.0 / 1024;
  check_blocked_gradients(tag, d, g, skipped);
  g.smoothing = 0.125, g.row_scale = true;
  check_blocked_gradients(tag, d, g);  // with smoothing every tile's G is nonzero: nothing skipped
}

template <typename T>
void check_blocked_dtype(const char* name, bool quick) {
  if (quick) {  // ThreadSanitizer: two tiles in a split (the statistics loop's barrier), all three products;
                // fp16/bf16: the 16-byte copies, then the element-wise ones (misaligned)
    check_blocked<T>(name, BlockedCase{65, 129, 40, {1, 3}, 20.0, 3, true, false, 0.375, 0.1, 0.01, true});
    if (kMmaPath<T>) check_blocked<T>(name, BlockedCase{63, 129, 24, {1}, 0, 3, false, true});
    return;
  }
  // N, V, D at and past the tiles' 64 x 128 and the slices of D (fp16/bf16: k-steps of 32, slices of 64;
  // fp32/fp64: 16 and 16); D 130, no multiple of 8, and a misaligned x and w: the fp16/bf16 element-wise
  // copies. Each of dX, dW, db left out once.
  check_blocked<T>(name, BlockedCase{1, 1, 8, {1, 2}});
  check_blocked<T>(name, BlockedCase{63, 7, 24, {1, 3}, 15.0, 3, false, false, 1.5, 0.1, 0.01, true});
  check_blocked<T>(name, BlockedCase{64, 128, 40, {1, 2}, 0, 3, true, false, 0.375, 0, 0, false, false});
  check_blocked<T>(name, BlockedCase{65, 129, 72, {2, 3}, 20.0, 3, true, true, 0.375, 0.2, 0.001, true, true, false});
  check_blocked<T>(name,
                   BlockedCase{130, 300, 130, {1, 2, 3, 5}, 0, 3, true, false, 0.375, 0, 0.01, false, true, true, false});
  // fp16/bf16: 16-byte copies over as many k-steps as stages; 4 tiles in 3 splits of 2 (the last empty)
  check_blocked<T>(name, BlockedCase{130, 129, 72, {1}, 0, 3, true, false, 0.375, 0, 0, true});
  check_blocked<T>(name, BlockedCase{3, 400, 8, {3}});
  // logits of order 1e3: the max kept apart from the sums; and softcapped
  check_blocked<T>(name, BlockedCase{65, 300, 40, {1, 3}, 0, 300, true, false, 1.0, 0, 0, true});
  check_blocked<T>(name, BlockedCase{63, 129, 24, {2}, 50.0, 300, false, true, 0.375, 0.1, 0.001});
  check_blocked_skip<T>(name);
}

// ---- The blocked distillation kernels (blocked_kernels.cu; launchers.h: BlockedDistillation) ----

struct KdBlockedCase {
  int64_t N, V, Ds, Dt;
  std::vector<int64_t> splits;  // the statistics and terms passes, once per value
  double beta = 0.5, temperature = 1;
  bool hard = false;  // a target, hard_weight 0.5
  bool bias_s = true, bias_t = true, misaligned = false;
  // the gradient pass
  bool row_scale = false, want_x = true, want_w = true, want_b = true;
  double spread = 3;  // the student's logits of order spread, the teacher's 1.5 spread
};

// log sum_k sums_k exp(factor (maxes_k - top)) over a row's splits, top = max_k maxes_k, as the host
// combines the statistics pass's partials (losses_cuda.cpp: log_sum_over_splits); in float64 from the
// kernel's values.
template <typename A>
static void combine_splits(const A* maxes, const A* sums, int64_t splits, int64_t stride, double factor,
                           double& top, double& log_sum) {
  top = -INFINITY;
  for (int64_t k = 0; k < splits; ++k) top = std::max(top, (double)maxes[k * stride]);
  double s = 0;
  for (int64_t k = 0; k < splits; ++k) s += sums[k * stride] * std::exp(((double)maxes[k * stride] - top) * factor);
  log_sum = std::log(s);
}

// The three passes against float64 from the dtype-rounded inputs: s = x_s w_s + b_s, t = x_t w_t + b_t
// (BlockedData, each logit's error bounded by z_error).
//  - statistics, once per `splits`: each split's max of s and t and log-sums (compared as max / T + log
//    sum against the split's float64 log-sum-exp, which the kernel's max cancels out of), an empty
//    split's exact (-inf, 0, 0, -inf, 0), the hard sum exactly 0 without a target; the host's
//    combination into row_stats, and the target's logit;
//  - terms, once per `splits`, from the reference's row_stats rounded to the compute type (as the host
//    passes them; the reference's log Q and log P are from the same rounded values, so the rounding of
//    row_stats cancels): each split's sums, and each row's loss from them as the host makes it
//    (T^2 soft + hard_weight ((s_max - s_target) + log sum_s), with the kernel's combined statistics
//    and target logit);
//  - gradients, from the same row_stats with sum Q g: G's bound per element (the logits' errors
//    through log Q, log P, log M and exp, and the factors' roundings), then the products as the
//    cross-entropy's (check_blocked_products; fp16/bf16: G rounded to the dtype first).
// Each bound is the kernel's roundings, with the same factor 2 to spare.
template <typename T>
void check_blocked_distillation(const char* name, const KdBlockedCase& c) {
  using A = acc<T>;
  const int64_t N = c.N, V = c.V;
  const BlockedData<T> st = random_blocked<T>(BlockedCase{N, V, c.Ds, {}, 0, c.spread, c.bias_s, c.misaligned});
  const BlockedData<T> te = random_blocked<T>(BlockedCase{N, V, c.Dt, {}, 0, 1.5 * c.spread, c.bias_t, c.misaligned});
  const double Tm = c.temperature, beta = c.beta, hw = c.hard ? 0.5 : 0.0, u = unit_c<T>();
  const double tiny = 2 * std::numeric_limits<A>::min();
  const bool fkl = beta == 0, rkl = beta == 1;
  const std::string tag = std::string(name) + " kd N" + std::to_string(N) + " V" + std::to_string(V) + " Ds" +
                          std::to_string(c.Ds) + " Dt" + std::to_string(c.Dt) + " beta" +
                          std::to_string(beta).substr(0, 3) + " T" + std::to_string(Tm).substr(0, 3) +
                          (c.hard ? " hard" : "") + (c.bias_s ? " bias_s" : "") + (c.bias_t ? " bias_t" : "") +
                          (c.misaligned ? " misaligned" : "");
  auto s_of = [&](int64_t i, int64_t j) { return st.raw[i * V + j]; };
  auto t_of = [&](int64_t i, int64_t j) { return te.raw[i * V + j]; };
  auto lse_of = [&](int64_t i, int64_t lo, int64_t hi, double factor, bool teacher) {
    std::vector<double> v;
    for (int64_t j = lo; j < hi; ++j) v.push_back(factor * (teacher ? t_of(i, j) : s_of(i, j)));
    return logsumexp(v);
  };

  // The reference's row_stats [6, N], rounded to A; the row's logits' error bounds and sizes.
  std::vector<A> rs(6 * N, A(0));
  std::vector<double> row_serr(N, 0), row_terr(N, 0), row_sabs(N, 0), row_tabs(N, 0);
  for (int64_t i = 0; i < N; ++i) {
    double smax = -INFINITY, tmax = -INFINITY;
    for (int64_t j = 0; j < V; ++j) {
      smax = std::max(smax, s_of(i, j)), tmax = std::max(tmax, t_of(i, j));
      row_serr[i] = std::max(row_serr[i], z_error(st, i * V + j));
      row_terr[i] = std::max(row_terr[i], z_error(te, i * V + j));
      row_sabs[i] = std::max(row_sabs[i], std::fabs(s_of(i, j)));
      row_tabs[i] = std::max(row_tabs[i], std::fabs(t_of(i, j)));
    }
    double sq = 0, ss = 0, sp = 0;
    for (int64_t j = 0; j < V; ++j) {
      sq += std::exp((s_of(i, j) - smax) / Tm), ss += std::exp(s_of(i, j) - smax);
      sp += std::exp((t_of(i, j) - tmax) / Tm);
    }
    rs[i] = (A)smax, rs[N + i] = (A)std::log(sq), rs[2 * N + i] = c.hard ? (A)std::log(ss) : A(0);
    rs[3 * N + i] = (A)tmax, rs[4 * N + i] = (A)std::log(sp);
  }

  // Per element, from the rounded row_stats: the soft loss's terms (term1: the JSD's second) with
  // their bounds, and d soft / d u with its bound. The kernel's log Q deviates from the reference's
  // by its logit's error / T and the roundings of (s - s_max) / T - log sum_q (eq; log P: ep); Q and P
  // by the exp of that, and exp's own rounding (rq, rp, relative); log M by the larger of them and its
  // own roundings (em). tiny: an exp below the compute type's normal range.
  const double log_b = std::log(beta), log_1mb = std::log1p(-beta);
  std::vector<double> lq(N * V), lp(N * V), Q(N * V), P(N * V), eq(N * V), ep(N * V), lm(N * V), em(N * V);
  std::vector<double> term0(N * V, 0), term1(N * V, 0), err0(N * V, 0), err1(N * V, 0);
  std::vector<double> qg(N, 0);
  for (int64_t i = 0; i < N; ++i) {
    double sum0 = 0, sum1 = 0;
    for (int64_t j = 0; j < V; ++j) {
      const int64_t at = i * V + j;
      const double s = s_of(i, j), t = t_of(i, j), ds = (s - rs[i]) / Tm, dt = (t - rs[3 * N + i]) / Tm;
      lq[at] = ds - rs[N + i], lp[at] = dt - rs[4 * N + i];
      Q[at] = std::exp(lq[at]), P[at] = std::exp(lp[at]);
      eq[at] = z_error(st, at) / Tm + 4 * u * (std::fabs(ds) + std::fabs(lq[at]) + 1);
      ep[at] = z_error(te, at) / Tm + 4 * u * (std::fabs(dt) + std::fabs(lp[at]) + 1);
      const double rq = std::expm1(eq[at]) + 4 * u, rp = std::expm1(ep[at]) + 4 * u;
      const double a = std::fabs(lq[at]) + std::fabs(lp[at]) + 1;
      if (fkl) {
        term0[at] = P[at] * (lp[at] - lq[at]);
        err0[at] = P[at] * (ep[at] + eq[at]) + std::fabs(term0[at]) * rp + tiny * a;
      } else if (rkl) {
        term0[at] = Q[at] * (lq[at] - lp[at]);
        err0[at] = Q[at] * (ep[at] + eq[at]) + std::fabs(term0[at]) * rq + tiny * a;
      } else {
        const double x = log_b + lp[at], y = log_1mb + lq[at];  // log M, exact where M underflows
        lm[at] = std::max(x, y) + std::log1p(std::exp(-std::fabs(x - y)));
        em[at] = std::max(eq[at], ep[at]) + 4 * u * (std::fabs(x) + std::fabs(y) + std::fabs(lm[at]) + 1);
        term0[at] = P[at] * (lp[at] - lm[at]), term1[at] = Q[at] * (lq[at] - lm[at]);
        err0[at] = P[at] * (ep[at] + em[at]) + std::fabs(term0[at]) * rp + tiny * (a + std::fabs(lm[at]));
        err1[at] = Q[at] * (eq[at] + em[at]) + std::fabs(term1[at]) * rq + tiny * (a + std::fabs(lm[at]));
      }
      sum0 += term0[at], sum1 += term1[at];
    }
    qg[i] = fkl ? 0.0 : rkl ? sum0 : (double)(A)(1 - beta) * sum1;  // the host's: (1 - beta) in C
  }

  const A nan = std::numeric_limits<A>::quiet_NaN();
  BlockedDistillation p{};
  p.xs = st.x, p.ws = st.w, p.bs = st.b.empty() ? nullptr : st.b.data();
  p.xt = te.x, p.wt = te.w, p.bt = te.b.empty() ? nullptr : te.b.data();
  p.target = c.hard ? st.target.data() : nullptr;
  p.N = N, p.Ds = c.Ds, p.Dt = c.Dt, p.V = V, p.temperature = Tm, p.beta = beta, p.hard_weight = hw;
  const int64_t tiles = (V + kBlockedCols - 1) / kBlockedCols;
  for (const int64_t splits : c.splits) {
    const int64_t per = (tiles + splits - 1) / splits, stride = splits * N;
    const std::string tags = tag + " splits" + std::to_string(splits);
    // 1. statistics
    std::vector<A> part(5 * stride, nan), target_logit(N, nan);
    p.splits = splits, p.part = part.data(), p.target_logit = c.hard ? target_logit.data() : nullptr;
    p.row_stats = nullptr;
    require(launch_blocked_distillation_statistics(p, dtype_of<T>(), nullptr) == cudaSuccess, "kd statistics launch");
    std::vector<double> host_smax(N), host_ls(N);
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t k = 0; k < splits; ++k) {
        const int64_t lo = std::min(V, k * per * kBlockedCols), hi = std::min(V, (k + 1) * per * kBlockedCols);
        const int64_t at = k * N + i;
        const A sm = part[at], sq = part[stride + at], ss = part[2 * stride + at], tm = part[3 * stride + at],
                sp = part[4 * stride + at];
        const std::string where = tags + " row" + std::to_string(i) + " split" + std::to_string(k);
        if (lo >= hi) {  // no tile: exactly (-inf, 0, 0, -inf, 0)
          expect("kd_empty " + where, sm == -INFINITY && sq == 0 && ss == 0 && tm == -INFINITY && sp == 0 ? 0 : 1, 0,
                 0.5, 1);
          continue;
        }
        double smax = -INFINITY, tmax = -INFINITY, serr = 0, terr = 0;
        for (int64_t j = lo; j < hi; ++j) {
          smax = std::max(smax, s_of(i, j)), tmax = std::max(tmax, t_of(i, j));
          serr = std::max(serr, z_error(st, i * V + j)), terr = std::max(terr, z_error(te, i * V + j));
        }
        const double n = (double)(hi - lo);
        expect("kd_partsmax " + where, sm, smax, 2, serr);
        expect("kd_parttmax " + where, tm, tmax, 2, terr);
        expect("kd_partlq " + where, sm / Tm + std::log((double)sq), lse_of(i, lo, hi, 1 / Tm, false), 2,
               serr / Tm + u * (n / 4 + 16 + 8 * row_sabs[i] / Tm));
        expect("kd_partlp " + where, tm / Tm + std::log((double)sp), lse_of(i, lo, hi, 1 / Tm, true), 2,
               terr / Tm + u * (n / 4 + 16 + 8 * row_tabs[i] / Tm));
        if (c.hard)
          expect("kd_partls " + where, sm + std::log((double)ss), lse_of(i, lo, hi, 1, false), 2,
                 serr + u * (n / 4 + 16 + 8 * row_sabs[i]));
        else
          expect("kd_partls_zero " + where, ss == 0 ? 0 : 1, 0, 0.5, 1);
      }
      // the host's row_stats from the splits (its combination's roundings: u per split)
      const std::string where = tags + " row" + std::to_string(i);
      double smax, lq0, ls0 = 0, tmax, lp0;
      combine_splits(&part[i], &part[stride + i], splits, N, 1 / Tm, smax, lq0);
      if (c.hard) combine_splits(&part[i], &part[2 * stride + i], splits, N, 1.0, smax, ls0);
      combine_splits(&part[3 * stride + i], &part[4 * stride + i], splits, N, 1 / Tm, tmax, lp0);
      host_smax[i] = smax, host_ls[i] = ls0;
      const double vb = u * (V / 4.0 + 16 + splits);
      expect("kd_smax " + where, smax, rs[i], 2, row_serr[i] + u * row_sabs[i]);
      expect("kd_tmax " + where, tmax, rs[3 * N + i], 2, row_terr[i] + u * row_tabs[i]);
      expect("kd_lq " + where, smax / Tm + lq0, lse_of(i, 0, V, 1 / Tm, false), 2,
             row_serr[i] / Tm + vb + 8 * u * row_sabs[i] / Tm);
      expect("kd_lp " + where, tmax / Tm + lp0, lse_of(i, 0, V, 1 / Tm, true), 2,
             row_terr[i] / Tm + vb + 8 * u * row_tabs[i] / Tm);
      if (c.hard) {
        expect("kd_ls " + where, smax + ls0, lse_of(i, 0, V, 1, false), 2, row_serr[i] + vb + 8 * u * row_sabs[i]);
        const int64_t at = i * V + st.target[i];
        expect("kd_target " + where, target_logit[i], st.raw[at], 2, z_error(st, at));
      }
    }
    // 2. terms, from the reference's row_stats (sum Q g: 0, as the host's zeroed row_stats)
    std::vector<A> terms(2 * stride, nan);
    p.part = terms.data(), p.row_stats = rs.data();
    require(launch_blocked_distillation_terms(p, dtype_of<T>(), nullptr) == cudaSuccess, "kd terms launch");
    for (int64_t i = 0; i < N; ++i) {
      double soft = 0, ref_soft = 0, soft_err = 0;
      for (int64_t k = 0; k < splits; ++k) {
        const int64_t lo = std::min(V, k * per * kBlockedCols), hi = std::min(V, (k + 1) * per * kBlockedCols);
        const std::string where = tags + " row" + std::to_string(i) + " split" + std::to_string(k);
        double want0 = 0, want1 = 0, e0 = 0, e1 = 0, abs0 = 0, abs1 = 0;
        for (int64_t j = lo; j < hi; ++j) {
          const int64_t at = i * V + j;
          want0 += term0[at], want1 += term1[at], e0 += err0[at], e1 += err1[at];
          abs0 += std::fabs(term0[at]), abs1 += std::fabs(term1[at]);
        }
        const double n = (double)std::max<int64_t>(0, hi - lo), got0 = terms[k * N + i], got1 = terms[stride + k * N + i];
        const double b0 = e0 + u * (n / 4 + 8) * abs0, b1 = e1 + u * (n / 4 + 8) * abs1;
        // (an empty split's bounds are 0: exactly 0)
        expect("kd_terms " + where, got0, want0, 2, b0);
        if (fkl || rkl)
          expect("kd_terms1_zero " + where, got1 == 0 ? 0 : 1, 0, 0.5, 1);
        else
          expect("kd_terms " + where + " second", got1, want1, 2, b1);
        const double w0 = fkl || rkl ? 1 : beta, w1 = fkl || rkl ? 0 : 1 - beta;
        soft += w0 * got0 + w1 * (fkl || rkl ? 0 : got1);
        ref_soft += w0 * want0 + w1 * want1;
        soft_err += w0 * b0 + w1 * b1;
      }
      // the loss as the host makes it, from the kernel's sums, combined statistics and target logit
      double loss = Tm * Tm * soft, want = Tm * Tm * ref_soft, bound = Tm * Tm * soft_err;
      if (c.hard) {
        loss += hw * ((host_smax[i] - target_logit[i]) + host_ls[i]);
        want += hw * (lse_of(i, 0, V, 1, false) - s_of(i, st.target[i]));
        bound += hw * (2 * row_serr[i] + u * (V / 4.0 + 16 + splits + 8 * row_sabs[i]));
      }
      expect("kd_loss " + tags + " row" + std::to_string(i), loss, want, 2, bound + 8 * u * std::fabs(want) + tiny);
    }
  }

  // 3. gradients, from the reference's row_stats with sum Q g
  for (int64_t i = 0; i < N; ++i) rs[5 * N + i] = (A)qg[i];
  std::mt19937 gen(N * 7 + V * 13 + c.Ds);
  std::normal_distribution<double> nd;
  std::vector<A> row_scale(N);
  for (auto& r : row_scale) r = (A)nd(gen);
  std::vector<double> G(N * V), dG(N * V);
  for (int64_t i = 0; i < N; ++i) {
    const double sc = c.row_scale ? (double)row_scale[i] : (double)(A)0.375, g5 = rs[5 * N + i];
    const double sf = (double)(A)(sc * Tm), hf = (double)(A)(sc * hw);  // the kernel's factors
    for (int64_t j = 0; j < V; ++j) {
      const int64_t at = i * V + j;
      const double rq = std::expm1(eq[at]) + 4 * u, rp = std::expm1(ep[at]) + 4 * u;
      double du, edu;
      if (fkl) {
        du = Q[at] - P[at];
        edu = Q[at] * rq + P[at] * rp + 2 * tiny;
      } else if (rkl) {
        du = Q[at] * (lq[at] - lp[at] - g5);
        edu = Q[at] * (eq[at] + ep[at] + 4 * u * (std::fabs(lq[at]) + std::fabs(lp[at]) + std::fabs(g5))) +
              std::fabs(du) * rq + tiny * (std::fabs(lq[at]) + std::fabs(lp[at]) + std::fabs(g5) + 1);
      } else {
        const double inner = (1 - beta) * (lq[at] - lm[at]) - g5;
        du = Q[at] * inner;
        edu = Q[at] * ((1 - beta) * (eq[at] + em[at]) + 4 * u * (std::fabs(lq[at]) + std::fabs(lm[at]) + std::fabs(g5))) +
              std::fabs(du) * rq + tiny * (std::fabs(inner) + 1);
      }
      double gv = sf * du, err = std::fabs(sf) * edu + 4 * u * std::fabs(gv);
      if (c.hard) {  // hf (exp(s - s_max - log sum_s) - [j == target])
        const double s = s_of(i, j), ps = std::exp(s - rs[i] - rs[2 * N + i]), is_target = j == st.target[i];
        gv += hf * (ps - is_target);
        err += std::fabs(hf) * (ps * (std::expm1(z_error(st, at) + 4 * u * (std::fabs(s) + std::fabs(rs[i]) +
                                                                              std::fabs(rs[2 * N + i]))) + 4 * u) +
                                4 * u * is_target + tiny) +
               4 * u * std::fabs(gv);
      }
      if constexpr (kMmaPath<T>) {
        G[at] = to_d(from_d<T>(gv));
        dG[at] = to_d(from_d<T>(gv + err)) - to_d(from_d<T>(gv - err));  // 0 unless near a rounding boundary
      } else {
        G[at] = gv, dG[at] = err;
      }
    }
  }
  std::vector<A> gx(c.want_x ? N * c.Ds : 0, A(0)), gw(c.want_w ? V * c.Ds : 0, A(0)), gb(c.want_b ? V : 0, A(0));
  p.splits = 1, p.part = nullptr, p.target_logit = nullptr, p.row_stats = rs.data();
  p.row_scale = c.row_scale ? row_scale.data() : nullptr, p.scale = 0.375;
  p.grad_x = c.want_x ? gx.data() : nullptr, p.grad_w = c.want_w ? gw.data() : nullptr;
  p.grad_b = c.want_b ? gb.data() : nullptr;
  require(launch_blocked_distillation_gradients(p, dtype_of<T>(), nullptr) == cudaSuccess, "kd gradients launch");
  const std::string tagg = tag + (c.row_scale ? " row_scale" : "") + (c.want_x ? "" : " no_dx") +
                           (c.want_w ? "" : " no_dw") + (c.want_b ? "" : " no_db");
  check_blocked_products("kd", tagg, st, G, dG, gx, gw, gb);
}

template <typename T>
void check_blocked_distillation_dtype(const char* name, bool quick) {
  using C = KdBlockedCase;
  if (quick) {  // ThreadSanitizer: two tiles in a split (the loops' barriers), the teacher's logits then
                // the student's in each tile, the JSD with the hard term, all three products
    check_blocked_distillation<T>(name, C{65, 129, 40, 72, {1}, 0.5, 2.0, true, true, true, false, true});
    return;
  }
  // forward KL, JSD, reverse KL, each with and without a target; temperatures 0.5, 1, 2; N at and past
  // the 64-row tiles, V at and past the 128-column tiles; Ds and Dt apart (the student's and teacher's
  // k-steps), 130 past the slices of D; splits: 2 tiles in one, one per split, empty ones; each of
  // dX, dW, db left out once; fp16/bf16: misaligned (the element-wise copies), student and teacher.
  check_blocked_distillation<T>(name, C{1, 1, 8, 8, {1, 2}, 0.0, 1.0, false, false, false});
  check_blocked_distillation<T>(name, C{65, 129, 40, 72, {1, 3}, 0.5, 2.0, true, true, false, false, true, true,
                                        true, false});
  check_blocked_distillation<T>(name, C{130, 300, 130, 24, {2, 5}, 1.0, 0.5, true, true, true, false, false, true,
                                        false});
  check_blocked_distillation<T>(name, C{65, 7, 8, 8, {1}, 0.5, 1.0, false, false, true, false, true, false});
  check_blocked_distillation<T>(name, C{130, 129, 40, 72, {4}, 0.0, 2.0, true, true, true, kMmaPath<T>});
  check_blocked_distillation<T>(name, C{1, 300, 130, 24, {3}, 1.0, 1.0, false, true, true});
  check_blocked_distillation<T>(name, C{65, 300, 8, 8, {1}, 0.0, 0.5, true, false, true, false, true});
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  check_dtype<float>("float32", quick);
  std::printf("float32: %d checks, %d failures\n", checks, failures);
  if (!quick) {
    check_dtype<double>("float64", false);
    std::printf("float64: %d checks, %d failures\n", checks, failures);
    check_dtype<__nv_bfloat16>("bfloat16", false);
    std::printf("bfloat16: %d checks, %d failures\n", checks, failures);
    check_dtype<__half>("float16", false);
    std::printf("float16: %d checks, %d failures\n", checks, failures);
    // logits of order 1e3: the max kept apart from the log-sum
    check_cross_entropy<float>("float32", CeCase{3, 1000, 0.1, 0, 0, 1000});
    check_cross_entropy<float>("float32", CeCase{3, 1000, 0.0, 30.0, 0, 1000});
    for (double beta : {0.0, 0.5, 1.0}) check_distillation<float>("float32", KdCase{3, 1000, 1.0, beta, 1.0, 300});
    std::printf("large logits: %d checks, %d failures\n", checks, failures);
  }
  check_blocked_dtype<float>("float32", quick);
  check_blocked_dtype<__nv_bfloat16>("bfloat16", quick);
  if (!quick) {
    check_blocked_dtype<__half>("float16", false);
    check_blocked_dtype<double>("float64", false);
  }
  std::printf("blocked: %d checks, %d failures\n", checks, failures);
  check_blocked_distillation_dtype<float>("float32", quick);
  check_blocked_distillation_dtype<__nv_bfloat16>("bfloat16", quick);
  if (!quick) {
    check_blocked_distillation_dtype<__half>("float16", false);
    check_blocked_distillation_dtype<double>("float64", false);
  }
  std::printf("blocked distillation: %d checks, %d failures\n", checks, failures);
  for (const auto& [what, ratio] : worst) std::printf("worst %s: %.3f of its bound\n", what.c_str(), ratio);
  std::printf("total: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
