// Runs the loss family's CUDA row passes (csrc/losses/cuda/*.cu) under host
// emulation (emu_cuda.h) and checks them against float64: cross-entropy
// (label smoothing, softcap, z-loss; the forward with the gradient and the
// backward from a given lse with per-row scales) and distillation (forward
// KL, reverse KL, JSD; temperatures; with and without the hard term), every
// dtype, widths below, at and past the block's 256 threads (1, 7, 33, 256,
// 257, 1000, 4099), more rows than the grid (a cap of 2 blocks: the kernels
// grid-stride), and logits of order 1e3. Outputs start as NaN, so an element
// never written fails. Built and run by tests/test_cuda_emulation.py; exits
// non-zero on any mismatch.
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
  for (const auto& [what, ratio] : worst) std::printf("worst %s: %.3f of its bound\n", what.c_str(), ratio);
  std::printf("total: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
