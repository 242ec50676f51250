// Runs the norm CUDA kernels (csrc/norm/cuda/*.cu) under host emulation
// (emu_cuda.h) and checks them against float64: LayerNorm and RMSNorm, every
// dtype, with and without residual, weight and bias, widths on both sides of
// the warp-per-row / block-per-row switch (1, 7, 33, 1000, 1024, 1025, 4096,
// 4097), 16-byte and single-element accesses (and storage too misaligned for
// the former), more rows than the grid (a small grid cap, so the kernels grid-stride),
// rows with a large mean (a one-pass variance cancels there), a small
// variance where eps dominates, the backward (grad_input with and without
// grad_sum, the weight and bias gradients from the partial rows) fed the
// kernel's own saved mean and rstd, and empty inputs. Outputs start as NaN, so
// an element never written fails. Built and run by
// tests/test_cuda_emulation.py; exits non-zero on any mismatch.
#include "emu_cuda.h"
#include "norm/cuda/launchers.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

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

template <typename T> NormDType dtype_of();
template <> NormDType dtype_of<float>() { return NormDType::kFloat32; }
template <> NormDType dtype_of<double>() { return NormDType::kFloat64; }
template <> NormDType dtype_of<__half>() { return NormDType::kFloat16; }
template <> NormDType dtype_of<__nv_bfloat16>() { return NormDType::kBFloat16; }

// The sum's rounding, as the kernel must do it: in the compute type, then to T.
template <typename T> T add_rounded(T a, T b) { return from_d<T>((float)(to_d(a) + to_d(b))); }
template <> double add_rounded(double a, double b) { return a + b; }
template <> float add_rounded(float a, float b) { return a + b; }

// Relative precision of T's storage (half an ulp at 1 is the rounding; one ulp of slack).
template <typename T> double ulp();
template <> double ulp<float>() { return 1.2e-7; }
template <> double ulp<double>() { return 2.3e-16; }
template <> double ulp<__half>() { return 9.8e-4; }
template <> double ulp<__nv_bfloat16>() { return 7.9e-3; }

template <typename T> using acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

static int failures = 0, checks = 0;
static std::map<std::string, double> worst;  // per quantity, the largest error over its bound (printed last)
// |got - want| <= tol * scale; NaN never passes.
static void expect(const std::string& what, double got, double want, double tol, double scale) {
  ++checks;
  if (tol > 0) {
    double& w = worst[what.substr(0, what.find(' ', what.find(' ') + 1))];  // e.g. "out bfloat16"
    w = std::max(w, std::fabs(got - want) / (tol * scale));
  }
  if (!(std::fabs(got - want) <= tol * scale)) {
    if (failures < 20) std::printf("MISMATCH %s: got %.10g want %.10g (tol %.3g x %.3g)\n", what.c_str(), got, want,
                                   tol, scale);
    ++failures;
  }
}

struct Case {
  int64_t M, N;
  bool rms, residual, weight, bias;
  double offset = 0, spread = 3, eps = 1e-5;
  int64_t max_blocks = 0;
  bool backward = true, grad_sum = true, params = true;  // params: the weight/bias gradient kernel
  int misalign = 0;  // elements by which the input (and grad_out) start past a 16-byte boundary
};

static std::string describe(const char* dtype, const Case& c) {
  return std::string(dtype) + " M" + std::to_string(c.M) + " N" + std::to_string(c.N) + (c.rms ? " rms" : " layer") +
         (c.residual ? " +res" : "") + (c.weight ? " w" : "") + (c.bias ? " b" : "") +
         (c.offset ? " offset" + std::to_string((int)c.offset) : "") + " spread" + std::to_string(c.spread) +
         " eps" + std::to_string(c.eps) + (c.max_blocks ? " grid" + std::to_string(c.max_blocks) : "") +
         (c.misalign ? " misaligned" : "");
}

// tol: the output's (relative to its largest value); the statistics and
// the reductions are checked at the compute type's precision (stat_tol).
template <typename T>
void check_case(const char* name, const Case& c, double tol) {
  using A = acc<T>;
  // float accumulation: a few ulps of the row's size; more where the mean is far from zero
  const bool dbl = std::is_same_v<T, double>;
  const double mean_tol = dbl ? 1e-14 : 1e-6, stat_tol = (dbl ? 1e-13 : 1e-5) * (1 + c.offset / c.spread * 1e-2);
  const int64_t M = c.M, N = c.N, n = M * N;
  const std::string tag = describe(name, c);
  std::mt19937 gen(M * 7919 + N * 31 + c.rms * 5 + c.residual * 3 + c.weight + c.offset);
  std::normal_distribution<double> nd;
  const T nan = from_d<T>(std::numeric_limits<double>::quiet_NaN());
  const A anan = std::numeric_limits<A>::quiet_NaN();
  std::vector<T> x(n), r(n), w(N), b(N), out(n, nan), sum(n, nan);
  for (auto& v : x) v = from_d<T>(c.offset + c.spread * nd(gen));
  for (auto& v : r) v = from_d<T>(c.spread * nd(gen));
  for (auto& v : w) v = from_d<T>(1 + 0.5 * nd(gen));
  for (auto& v : b) v = from_d<T>(nd(gen));
  std::vector<A> mean(M, anan), rstd(M, anan);

  // 16-byte accesses exactly where rows start 16-byte aligned (std::vector's
  // storage is; the misaligned copy is not)
  const int vec = 16 / sizeof(T), want_width = c.misalign || N % vec ? 1 : vec;
  std::vector<T> x_misaligned(n + vec);
  std::copy(x.begin(), x.end(), x_misaligned.begin() + c.misalign);
  NormForwardParams p{};
  p.input = c.misalign ? x_misaligned.data() + c.misalign : x.data();
  p.residual = c.residual ? r.data() : nullptr;
  p.weight = c.weight ? w.data() : nullptr;
  p.bias = c.bias ? b.data() : nullptr;
  p.out = out.data();
  p.sum = c.residual ? sum.data() : nullptr;
  p.mean = c.rms ? nullptr : mean.data();
  p.rstd = rstd.data();
  p.M = M, p.N = N, p.eps = c.eps, p.dtype = dtype_of<T>(), p.max_blocks = c.max_blocks;
  expect("forward vector width " + tag, norm_forward_vector_width(p), want_width, 0, 1);
  require(launch_norm_forward(p, nullptr) == cudaSuccess, "forward launch");

  // What is normalised: the sum rounded to T (checked first), else the input.
  std::vector<T> xs = x;
  if (c.residual)
    for (int64_t i = 0; i < n; ++i) {
      xs[i] = add_rounded(x[i], r[i]);
      expect("sum " + tag, to_d(sum[i]), to_d(xs[i]), 0, 1);  // bit-exact (NaN fails)
    }
  std::vector<double> ref_mean(M), ref_rstd(M), xhat(n);
  double out_scale = 1;
  std::vector<double> want(n);
  for (int64_t m = 0; m < M; ++m) {
    const T* row = xs.data() + m * N;
    double mu = 0, var = 0;
    if (!c.rms) {
      for (int64_t j = 0; j < N; ++j) mu += to_d(row[j]);
      mu /= N;
    }
    for (int64_t j = 0; j < N; ++j) var += (to_d(row[j]) - mu) * (to_d(row[j]) - mu);
    var /= N;
    // eps is cast to the compute type, as the kernel (and the CPU op) does
    const double rs = 1 / std::sqrt(var + (double)(A)c.eps);
    ref_mean[m] = mu, ref_rstd[m] = rs;
    if (!c.rms) expect("mean " + tag, mean[m], mu, mean_tol, c.spread + std::fabs(mu));
    expect("rstd " + tag, rstd[m], rs, stat_tol, rs);
    for (int64_t j = 0; j < N; ++j) {
      xhat[m * N + j] = (to_d(row[j]) - mu) * rs;
      double y = xhat[m * N + j] * (c.weight ? to_d(w[j]) : 1.0) + (c.bias ? to_d(b[j]) : 0.0);
      want[m * N + j] = y;
      out_scale = std::max(out_scale, std::fabs(y));
    }
  }
  for (int64_t i = 0; i < n; ++i) expect("out " + tag, to_d(out[i]), want[i], tol, out_scale);
  if (!c.backward) return;

  // Backward from the kernel's own saved statistics, as the op runs it.
  std::vector<T> dy(n), ds(n), dx(n, nan);
  for (auto& v : dy) v = from_d<T>(nd(gen));
  for (auto& v : ds) v = from_d<T>(nd(gen));
  const int64_t rows = norm_backward_partial_rows(M, c.max_blocks);
  std::vector<A> pw(rows * N, anan), pb(rows * N, anan);
  NormBackwardParams q{};
  std::vector<T> dy_misaligned(n + vec);
  std::copy(dy.begin(), dy.end(), dy_misaligned.begin() + c.misalign);
  q.grad_out = c.misalign ? dy_misaligned.data() + c.misalign : dy.data();
  q.grad_sum = c.grad_sum ? ds.data() : nullptr;
  q.x = xs.data();
  q.weight = c.weight ? w.data() : nullptr;
  q.mean = c.rms ? nullptr : mean.data();
  q.rstd = rstd.data();
  q.grad_input = dx.data();
  q.weight_partials = c.params && c.weight ? pw.data() : nullptr;
  q.bias_partials = c.params ? pb.data() : nullptr;
  q.M = M, q.N = N, q.dtype = dtype_of<T>(), q.max_blocks = c.max_blocks;
  expect("backward vector width " + tag, norm_backward_vector_width(q), want_width, 0, 1);
  require(launch_norm_backward(q, nullptr) == cudaSuccess, "backward launch");
  std::vector<double> want_dx(n);
  double dx_scale = 1;
  for (int64_t m = 0; m < M; ++m) {
    double c1 = 0, c2 = 0;
    for (int64_t j = 0; j < N; ++j) {
      const double g = to_d(dy[m * N + j]) * (c.weight ? to_d(w[j]) : 1.0);
      c1 += g * xhat[m * N + j];
      c2 += g;
    }
    c1 /= N, c2 = c.rms ? 0 : c2 / N;
    for (int64_t j = 0; j < N; ++j) {
      const double g = to_d(dy[m * N + j]) * (c.weight ? to_d(w[j]) : 1.0);
      double d = ref_rstd[m] * (g - c2 - xhat[m * N + j] * c1);
      // the terms' own size: what the rounding of the compute type scales with
      double terms = ref_rstd[m] * (std::fabs(g) + std::fabs(c2) + std::fabs(xhat[m * N + j] * c1));
      if (c.grad_sum) d += to_d(ds[m * N + j]), terms += std::fabs(to_d(ds[m * N + j]));
      dx_scale = std::max(dx_scale, terms);
      want_dx[m * N + j] = d;
    }
  }
  for (int64_t i = 0; i < n; ++i) expect("dx " + tag, to_d(dx[i]), want_dx[i], tol, dx_scale);
  for (int64_t j = 0; j < N && c.params; ++j) {
    double dw = 0, db = 0, dw_abs = 0, db_abs = 0, got_w = 0, got_b = 0;
    for (int64_t m = 0; m < M; ++m) {
      const double g = to_d(dy[m * N + j]);
      dw += g * xhat[m * N + j], dw_abs += std::fabs(g * xhat[m * N + j]);
      db += g, db_abs += std::fabs(g);
    }
    for (int64_t k = 0; k < rows; ++k) got_w += pw[k * N + j], got_b += pb[k * N + j];
    if (c.weight) expect("dweight " + tag, got_w, dw, stat_tol * 4, 1 + dw_abs);
    expect("dbias " + tag, got_b, db, stat_tol, 1 + db_abs);
  }
}

template <typename T>
void check_dtype(const char* name, double tol) {
  for (int64_t N : {1, 7, 33, 1000, 1024, 1025})
    for (bool rms : {false, true})
      for (bool residual : {false, true})
        for (int affine = 0; affine < 3; ++affine) {  // none, weight, weight + bias
          Case c{N == 1 ? 9 : 5, N, rms, residual, affine > 0, affine > 1 && !rms};
          c.grad_sum = residual;
          check_case<T>(name, c, tol);
        }
  // the widest rows: block-per-row, one row more than the grid cap, with
  // single-element (4097) and 16-byte (4096) accesses; the weight/bias kernel
  // (129 blocks of 256 threads here) once
  for (int64_t N : {4096, 4097})
    for (bool rms : {false, true}) {
      Case c{3, N, rms, true, true, !rms};
      c.max_blocks = 2;
      c.params = N == 4097 && !rms;
      check_case<T>(name, c, tol);
    }
  // a width that allows 16-byte accesses, on storage that does not: both layouts
  for (int64_t N : {64, 2048}) {
    Case c{5, N, false, true, true, true};
    c.misalign = 1;
    check_case<T>(name, c, tol);
  }
  // more rows than the grid on both row kernels, and more chunks of rows
  // (64) than grid rows in the weight/bias kernel (200 rows over 2)
  for (int64_t N : {33, 1500}) {
    Case c{N < 1024 ? 200 : 7, N, false, true, true, true};
    c.max_blocks = 2;
    check_case<T>(name, c, tol);
  }
  // small variance: eps dominates rstd; a large eps too
  for (double eps : {1e-5, 0.5}) {
    Case c{6, 100, false, false, true, true};
    c.spread = eps < 0.1 ? 1e-3 : 3, c.eps = eps;
    check_case<T>(name, c, tol);
    c.rms = true, c.bias = false;
    check_case<T>(name, c, tol);
  }
}

// A large mean against a small spread: E[x^2] - mean^2 would cancel to
// noise, and a plain two-pass mean in float is off by far more than the half
// ulp (5e-4 at 1e4) that storing it in float costs; 1e-4 of the output's
// scale fails without the deviations' correction (0.86 of the bound then
// at 2e-4, 0.26 with it).
void check_large_mean() {
  for (int64_t N : {256, 2000}) {
    Case c{6, N, false, false, true, true};
    c.offset = 1e4, c.spread = 3;
    check_case<float>("float32", c, 1e-4);
    c.residual = true;
    check_case<float>("float32", c, 1e-4);
    check_case<double>("float64", c, 1e-10);
  }
}

void check_empty() {
  // Nothing to do, nothing touched: null pointers everywhere.
  for (auto [M, N] : {std::pair<int64_t, int64_t>{0, 5}, {3, 0}, {0, 0}}) {
    NormForwardParams p{};
    p.M = M, p.N = N, p.dtype = NormDType::kFloat32;
    NormBackwardParams q{};
    q.M = M, q.N = N, q.dtype = NormDType::kFloat32;
    ++checks;
    if (launch_norm_forward(p, nullptr) != cudaSuccess || launch_norm_backward(q, nullptr) != cudaSuccess) {
      std::printf("MISMATCH empty M%ld N%ld: launch failed\n", (long)M, (long)N);
      ++failures;
    }
  }
  ++checks;
  if (norm_backward_partial_rows(0, 0) != 0 || norm_backward_partial_rows(64, 0) != 1 ||
      norm_backward_partial_rows(65, 0) != 2 || norm_backward_partial_rows(1000, 3) != 3) {
    std::printf("MISMATCH norm_backward_partial_rows\n");
    ++failures;
  }
}

// The race check's set (--quick, under ThreadSanitizer, where a thread costs
// ~20x): each kernel on both row layouts and both access widths, with every
// operand, and a grid cap that makes the kernels grid-stride; the
// weight/bias kernel (35 blocks of 256 threads at these widths) once per layout.
int quick_checks() {
  for (bool rms : {false, true}) {
    Case warp{150, 40, rms, true, true, !rms};  // 16-byte accesses
    warp.max_blocks = 2;
    check_case<float>("float32", warp, 1e-5);
    warp.N = 41;  // single elements
    warp.params = false;
    check_case<float>("float32", warp, 1e-5);
    Case block{3, 1100, rms, true, true, !rms};  // single elements (1100 % 8 != 0)
    block.max_blocks = 2;
    block.params = !rms;
    check_case<__nv_bfloat16>("bfloat16", block, 1e-2);
    block.N = 1104;  // 16-byte accesses
    block.params = false;
    check_case<__nv_bfloat16>("bfloat16", block, 1e-2);
  }
  std::printf("total: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--quick") return quick_checks();
  check_dtype<float>("float32", 1e-5);
  std::printf("float32: %d checks, %d failures\n", checks, failures);
  check_dtype<double>("float64", 1e-12);
  std::printf("float64: %d checks, %d failures\n", checks, failures);
  check_dtype<__nv_bfloat16>("bfloat16", 8e-3);
  std::printf("bfloat16: %d checks, %d failures\n", checks, failures);
  check_dtype<__half>("float16", 1e-3);
  std::printf("float16: %d checks, %d failures\n", checks, failures);
  check_large_mean();
  std::printf("large mean: %d checks, %d failures\n", checks, failures);
  check_empty();
  for (const auto& [what, ratio] : worst) std::printf("worst %s: %.3f of its bound\n", what.c_str(), ratio);
  std::printf("total: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
