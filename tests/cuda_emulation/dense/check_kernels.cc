// Runs the dense CUDA kernels (csrc/dense/cuda/*.cu) under host emulation (emu_cuda.h)
// and checks them against a float64 reference: every activation, every
// dtype, TF32, odd sizes, K = 0, the pre-activation output, misaligned
// storage, and the fused activation/bias backward. Built and run by
// tests/test_cuda_emulation.py; exits non-zero on any mismatch.
#include "emu_cuda.h"
#include "dense/cuda/launchers.h"
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>

using namespace bigkernels;
using namespace bigkernels::cuda;

static double act_ref(Activation a, double z) {
  switch (a) {
    case Activation::kNone: return z;
    case Activation::kReLU: return z > 0 ? z : 0;
    case Activation::kGELU: return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0)));
    case Activation::kGELUTanh: return 0.5 * z * (1 + std::tanh(std::sqrt(2 / M_PI) * (z + 0.044715 * z * z * z)));
    case Activation::kSiLU: return z / (1 + std::exp(-z));
    case Activation::kSigmoid: return 1 / (1 + std::exp(-z));
    case Activation::kTanh: return std::tanh(z);
    default: std::abort();
  }
}
static double grad_ref(Activation a, double z) {
  const double h = 1e-6;
  return (act_ref(a, z + h) - act_ref(a, z - h)) / (2 * h);
}
static Activation inner(Activation a) {
  return a == Activation::kSwiGLU ? Activation::kSiLU : a == Activation::kGEGLU ? Activation::kGELU : a;
}
static bool gated(Activation a) { return a == Activation::kSwiGLU || a == Activation::kGEGLU; }

template <typename T> T from_d(double v);
template <> float from_d(double v) { return (float)v; }
template <> double from_d(double v) { return v; }
template <> __half from_d(double v) { return __float2half_rn((float)v); }
template <> __nv_bfloat16 from_d(double v) { return __float2bfloat16_rn((float)v); }
static double to_d(float v) { return v; }
static double to_d(double v) { return v; }
static double to_d(__half v) { return __half2float(v); }
static double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::kFloat32; }
template <> DType dtype_of<double>() { return DType::kFloat64; }
template <> DType dtype_of<__half>() { return DType::kFloat16; }
template <> DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

// Storage with a chosen misalignment (in elements) from a 64-byte boundary.
template <typename T>
struct Buffer {
  std::vector<unsigned char> raw;
  T* p;
  Buffer(size_t n, int offset = 0) : raw((n + 64) * sizeof(T) + 64) {
    uintptr_t a = (reinterpret_cast<uintptr_t>(raw.data()) + 63) / 64 * 64;
    p = reinterpret_cast<T*>(a) + offset;
  }
};

static int failures = 0, checks = 0;
static void expect_close(const char* what, const std::string& tag, double got, double want, double tol) {
  ++checks;
  if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) {
    if (failures < 20) std::printf("MISMATCH %s %s: got %.8g want %.8g\n", what, tag.c_str(), got, want);
    ++failures;
  }
}

template <typename T>
void check_forward(int64_t M, int64_t K, int64_t Nout, Activation act, bool bias, bool preact, bool tf32,
                   int misalign, double tol, bool split_weight = false) {
  const int64_t Nz = gated(act) ? 2 * Nout : Nout;
  std::mt19937 gen(M * 131 + K * 7 + Nout);
  std::normal_distribution<double> nd;
  Buffer<T> x(M * K, misalign), w(Nz * K, misalign), b(Nz), out(M * Nout), pre(M * Nz);
  for (int64_t i = 0; i < M * K; ++i) x.p[i] = from_d<T>(nd(gen));
  for (int64_t i = 0; i < Nz * K; ++i) w.p[i] = from_d<T>(nd(gen) / std::sqrt(std::max<int64_t>(K, 1)));
  for (int64_t i = 0; i < Nz; ++i) b.p[i] = from_d<T>(nd(gen));
  DenseForwardParams p{};
  p.x = x.p; p.w = w.p; p.bias = bias ? b.p : nullptr; p.out = out.p; p.preact = preact ? pre.p : nullptr;
  p.M = M; p.K = K; p.Nz = Nz; p.Nout = Nout; p.act = act; p.dtype = dtype_of<T>(); p.allow_tf32 = tf32;
  // split_weight (gated): the second half from its own buffer (up_weight), and
  // NaN where it used to be in w, so that reading the old place shows.
  Buffer<T> w_up(split_weight ? Nout * K : 0, misalign);
  std::vector<T> second_half;
  if (split_weight) {
    second_half.assign(w.p + Nout * K, w.p + Nz * K);
    for (int64_t i = 0; i < Nout * K; ++i) {
      w_up.p[i] = w.p[Nout * K + i];
      w.p[Nout * K + i] = from_d<T>(std::numeric_limits<double>::quiet_NaN());
    }
    p.w_up = w_up.p;
  }
  require(launch_dense_forward(p, nullptr) == cudaSuccess, "launch");
  if (split_weight) std::copy(second_half.begin(), second_half.end(), w.p + Nout * K);  // for the reference
  const std::string tag = "M" + std::to_string(M) + " K" + std::to_string(K) + " N" + std::to_string(Nout) +
                          " act" + std::to_string((int)act) + " dtype" + std::to_string((int)p.dtype) +
                          (tf32 ? " tf32" : "") + (misalign ? " misaligned" : "") +
                          (split_weight ? " up_weight" : "");
  for (int64_t m = 0; m < M; ++m) {
    std::vector<double> z(Nz);
    for (int64_t n = 0; n < Nz; ++n) {
      double s = bias ? to_d(b.p[n]) : 0;
      for (int64_t k = 0; k < K; ++k) s += to_d(x.p[m * K + k]) * to_d(w.p[n * K + k]);
      z[n] = s;
      if (preact) expect_close("preact", tag, to_d(pre.p[m * Nz + n]), s, tol);
    }
    for (int64_t n = 0; n < Nout; ++n) {
      const double want = gated(act) ? act_ref(inner(act), z[n]) * z[Nout + n] : act_ref(act, z[n]);
      expect_close("out", tag, to_d(out.p[m * Nout + n]), want, tol);
    }
  }
}

template <typename T, typename Acc>
void check_backward(int64_t M, int64_t Nout, Activation act, bool from_output, bool bias, double tol) {
  const int64_t Nz = gated(act) ? 2 * Nout : Nout, ns = from_output ? Nout : Nz;
  std::mt19937 gen(M * 17 + Nout);
  std::normal_distribution<double> nd;
  Buffer<T> g(M * Nout), s(M * ns), dz(M * Nz);
  // every partial the kernel owes is written: start from NaN so a gap shows
  std::vector<Acc> partials(activation_backward_partial_rows(M) * Nz, std::numeric_limits<Acc>::quiet_NaN());
  for (int64_t i = 0; i < M * Nout; ++i) g.p[i] = from_d<T>(nd(gen));
  for (int64_t i = 0; i < M * ns; ++i) {
    double v = nd(gen);
    if (from_output) v = act == Activation::kReLU ? std::max(v, 0.0) : act_ref(act, v);  // a real output
    s.p[i] = from_d<T>(v);
  }
  ActivationBackwardParams p{};
  p.grad_out = g.p; p.saved = s.p; p.grad_preact = dz.p; p.bias_partials = bias ? partials.data() : nullptr;
  p.M = M; p.Nz = Nz; p.Nout = Nout; p.act = act; p.saved_is_output = from_output; p.dtype = dtype_of<T>();
  require(launch_activation_backward(p, nullptr) == cudaSuccess, "launch");
  const std::string tag = "bwd M" + std::to_string(M) + " N" + std::to_string(Nout) + " act" +
                          std::to_string((int)act) + (from_output ? " from-output" : "");
  std::vector<double> sums(Nz, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < Nout; ++n) {
      const double go = to_d(g.p[m * Nout + n]), sv = to_d(s.p[m * ns + n]);
      double d1, d2 = 0;
      if (from_output) {
        d1 = go * (act == Activation::kReLU ? (sv > 0) : act == Activation::kSigmoid ? sv * (1 - sv) : 1 - sv * sv);
      } else if (gated(act)) {
        const double z2 = to_d(s.p[m * ns + Nout + n]);
        d1 = go * z2 * grad_ref(inner(act), sv);
        d2 = go * act_ref(inner(act), sv);
        expect_close("dz2", tag, to_d(dz.p[m * Nz + Nout + n]), d2, tol);
        sums[Nout + n] += d2;
      } else {
        d1 = go * (act == Activation::kNone ? 1.0 : grad_ref(act, sv));
      }
      expect_close("dz", tag, to_d(dz.p[m * Nz + n]), d1, tol);
      sums[n] += d1;
    }
  if (bias)
    for (int64_t n = 0; n < Nz; ++n) {
      double db = 0;
      for (int64_t r = 0; r < activation_backward_partial_rows(M); ++r) db += partials[r * Nz + n];
      expect_close("dbias", tag, db, sums[n], tol * 4);
    }
}

// act(z) and act'(z) at extreme z, the true limits where torch's formulas
// give NaN (activations.h): the K = 0 forward gives act(bias) exactly, and
// the backward of a unit gradient gives act'(z).
void check_extremes() {
  const double inf = INFINITY;
  const double z[] = {-inf, -1e30, -100, 0, 100, 1e30, inf};
  struct Row { Activation act; double y[7], dy[7]; };
  const Row rows[] = {
      {Activation::kNone, {-inf, -1e30, -100, 0, 100, 1e30, inf}, {1, 1, 1, 1, 1, 1, 1}},
      {Activation::kReLU, {0, 0, 0, 0, 100, 1e30, inf}, {0, 0, 0, 0, 1, 1, 1}},
      {Activation::kGELU, {0, 0, 0, 0, 100, 1e30, inf}, {0, 0, 0, 0.5, 1, 1, 1}},
      {Activation::kGELUTanh, {0, 0, 0, 0, 100, 1e30, inf}, {0, 0, 0, 0.5, 1, 1, 1}},
      {Activation::kSiLU, {0, 0, 0, 0, 100, 1e30, inf}, {0, 0, 0, 0.5, 1, 1, 1}},
      {Activation::kSigmoid, {0, 0, 0, 0.5, 1, 1, 1}, {0, 0, 0, 0.25, 0, 0, 0}},
      {Activation::kTanh, {-1, -1, -1, 0, 1, 1, 1}, {0, 0, 0, 1, 0, 0, 0}},
  };
  auto same = [](double got, double want) {
    return std::isinf(want) ? got == want : std::fabs(got - want) <= 1e-6 * (1 + std::fabs(want));
  };
  for (const Row& row : rows) {
    const std::string tag = "extremes act" + std::to_string((int)row.act);
    std::vector<float> bias(z, z + 7), out(7), g(7, 1.0f), dz(7);
    DenseForwardParams p{};  // K = 0: out = act(bias)
    p.x = out.data(); p.w = out.data(); p.bias = bias.data(); p.out = out.data();
    p.M = 1; p.K = 0; p.Nz = p.Nout = 7; p.act = row.act; p.dtype = DType::kFloat32;
    require(launch_dense_forward(p, nullptr) == cudaSuccess, "launch");
    ActivationBackwardParams q{};
    q.grad_out = g.data(); q.saved = bias.data(); q.grad_preact = dz.data();
    q.M = 1; q.Nz = q.Nout = 7; q.act = row.act; q.dtype = DType::kFloat32;
    require(launch_activation_backward(q, nullptr) == cudaSuccess, "launch");
    for (int i = 0; i < 7; ++i) {
      checks += 2;
      if (!same(out[i], row.y[i])) {
        std::printf("MISMATCH %s: act(%g) = %g, want %g\n", tag.c_str(), z[i], out[i], row.y[i]);
        ++failures;
      }
      if (!same(dz[i], row.dy[i])) {
        std::printf("MISMATCH %s: act'(%g) = %g, want %g\n", tag.c_str(), z[i], dz[i], row.dy[i]);
        ++failures;
      }
    }
  }
}

// The race check's set (--quick, run under ThreadSanitizer, where a thread
// costs ~20x): every kernel and epilogue once, over more k-tiles than
// pipeline stages, two row tiles and a partial column tile.
int quick_checks() {
  for (Activation a : {Activation::kGELU, Activation::kSwiGLU}) {
    check_forward<__nv_bfloat16>(130, 200, 70, a, true, true, false, 0, 1e-2);
    check_forward<__half>(33, 131, 12, a, true, false, false, 0, 2e-3);
    check_forward<float>(130, 200, 70, a, true, true, true, 0, 5e-3);
    check_forward<float>(33, 131, 12, a, true, true, false, 0, 1e-5);
    check_forward<double>(7, 33, 5, a, true, true, false, 0, 1e-10);
    check_backward<__nv_bfloat16, float>(63, 45, a, false, true, 1e-2);
    check_backward<float, float>(63, 45, a, false, true, 1e-4);
  }
  check_forward<__nv_bfloat16>(130, 200, 70, Activation::kSwiGLU, true, true, false, 0, 1e-2, true);
  check_forward<float>(33, 131, 12, Activation::kSwiGLU, true, true, false, 0, 1e-5, true);
  check_backward<float, float>(63, 45, Activation::kTanh, true, true, 1e-5);
  std::printf("total: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--quick") return quick_checks();
  const Activation acts[] = {Activation::kNone, Activation::kReLU, Activation::kGELU, Activation::kGELUTanh,
                             Activation::kSiLU, Activation::kSigmoid, Activation::kTanh, Activation::kSwiGLU,
                             Activation::kGEGLU};
  struct Shape { int64_t M, K, N; };
  const Shape shapes[] = {{1, 1, 1}, {7, 33, 5}, {130, 64, 70}, {129, 40, 129}, {5, 0, 3}, {40, 24, 200}};
  for (Activation a : acts)
    for (const Shape& s : shapes) {
      const bool preact = s.M % 2 == 1;
      check_forward<__nv_bfloat16>(s.M, s.K, s.N, a, true, preact, false, 0, 1e-2);
      check_forward<__half>(s.M, s.K, s.N, a, s.K % 2 == 0, !preact, false, 0, 2e-3);
      check_forward<float>(s.M, s.K, s.N, a, true, preact, false, 0, 1e-5);
      check_forward<float>(s.M, s.K, s.N, a, true, preact, true, 0, 5e-3);
      check_forward<double>(s.M, s.K, s.N, a, s.N % 2 == 0, true, false, 0, 1e-10);
    }
  std::printf("forward: %d checks, %d failures\n", checks, failures);
  // More k-tiles than pipeline stages (K > 96), with K % 8 == 0 (16-byte copies) and not; and a gated
  // width that is a multiple of 4 but not of 8 (its z1 columns end inside a 16-byte chunk).
  for (Activation a : {Activation::kGELU, Activation::kSwiGLU}) {
    check_forward<__nv_bfloat16>(70, 200, 72, a, true, true, false, 0, 1e-2);
    check_forward<__half>(33, 131, 12, a, true, true, false, 0, 2e-3);
    check_forward<__half>(9, 16, 12, a, false, true, false, 0, 2e-3);
    check_forward<float>(70, 200, 72, a, true, true, true, 0, 5e-3);
    check_forward<float>(33, 131, 12, a, true, true, false, 0, 1e-5);
  }
  std::printf("deep K, odd widths: %d checks, %d failures\n", checks, failures);
  // gated with the second half in its own tensor (up_weight), every kernel
  for (Activation a : {Activation::kSwiGLU, Activation::kGEGLU}) {
    check_forward<__nv_bfloat16>(130, 200, 70, a, true, true, false, 0, 1e-2, true);
    check_forward<__half>(9, 16, 12, a, false, true, false, 0, 2e-3, true);
    check_forward<float>(70, 200, 72, a, true, true, true, 0, 5e-3, true);
    check_forward<float>(33, 131, 12, a, false, false, false, 0, 1e-5, true);
    check_forward<double>(7, 33, 5, a, true, true, false, 0, 1e-10, true);
    check_forward<float>(70, 64, 50, a, true, true, true, 1, 5e-3, true);
  }
  std::printf("up_weight: %d checks, %d failures\n", checks, failures);
  // misaligned storage with K % 8 == 0: the 16-byte copies must not be taken
  check_forward<__nv_bfloat16>(70, 64, 50, Activation::kReLU, true, true, false, 1, 1e-2);
  check_forward<float>(70, 64, 50, Activation::kGELU, true, true, true, 1, 5e-3);
  std::printf("misaligned: %d checks, %d failures\n", checks, failures);
  // more than one group of 8 row tiles (the last one partial), two column tiles
  for (Activation a : {Activation::kReLU, Activation::kSwiGLU}) {
    check_forward<__nv_bfloat16>(1100, 8, 140, a, true, false, false, 0, 1e-2);
    check_forward<float>(1100, 8, 140, a, true, true, false, 0, 1e-5);
  }
  std::printf("grouped tiles: %d checks, %d failures\n", checks, failures);
  check_extremes();
  std::printf("extremes: %d checks, %d failures\n", checks, failures);
  for (Activation a : acts)
    for (int64_t M : {1, 63, 200})
      for (int64_t N : {1, 45}) {
        check_backward<__nv_bfloat16, float>(M, N, a, false, true, 1e-2);
        check_backward<float, float>(M, N, a, false, M % 2 == 1, 1e-4);
        check_backward<double, double>(M, N, a, false, true, 1e-6);
        if (a == Activation::kReLU || a == Activation::kSigmoid || a == Activation::kTanh)
          check_backward<float, float>(M, N, a, true, true, 1e-5);
      }
  // A launch the hardware would refuse is refused here too, and the launcher
  // reports it: an output of more tiles than a grid can hold (never touched).
  {
    DenseForwardParams p{};
    p.M = int64_t(1) << 40; p.K = 8; p.Nz = p.Nout = int64_t(1) << 20; p.act = Activation::kReLU;
    p.dtype = DType::kBFloat16;
    ++checks;
    if (launch_dense_forward(p, nullptr) != cudaErrorInvalidConfiguration) {
      std::printf("MISMATCH launch: a grid of 2^45 tiles was not refused\n");
      ++failures;
    }
    ++checks;
    bk_emulate_launch([] { std::abort(); }, dim3(1), dim3(2048), 0);  // too many threads: must not run
    if (cudaGetLastError() != cudaErrorInvalidConfiguration || cudaGetLastError() != cudaSuccess) {
      std::printf("MISMATCH launch: 2048 threads a block were not refused, or the error did not clear\n");
      ++failures;
    }
  }
  std::printf("total: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
