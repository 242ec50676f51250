// Runs the RNN persistent kernels (csrc/rnn/cuda/*.cu) under host emulation
// (emu_cuda.h: a cooperative launch runs every block at once, so the grid
// barrier meets) and checks them against float64: every mode, fp32, bf16 and
// fp16, several grid sizes (units per block), packed sequences in both
// directions, persistent (one cooperative launch) and per step, and a
// cooperative launch the emulation refuses (more than 16 blocks), which must
// run per step and leave no error behind; fp16/bf16 take the tensor-core
// product (mma.sync, ldmatrix), with W_hh's slice kept in shared memory or
// streamed a depth slice at a time (the fallback of hidden sizes too large to
// keep it), fp32 the SIMT one. The forward is checked step by step from the
// kernel's own previous outputs (each step's error alone, at the dtype's rounding), and
// inference (no workspace) against training; the backward against a float64
// backward through time over the kernel's own forward. Built and run by
// tests/test_cuda_emulation.py; exits non-zero on any mismatch.
#include "emu_cuda.h"
#include "rnn/cuda/launchers.h"

#include <cmath>
#include <random>
#include <string>

using namespace bigkernels;
using namespace bigkernels::cuda;

static int failures = 0, checks = 0;
static void check(bool ok, const std::string& what, double got, double want) {
  ++checks;
  if (!ok && ++failures <= 20) std::printf("MISMATCH %s: got %.8g want %.8g\n", what.c_str(), got, want);
}

template <typename T> T from_d(double v);
template <> float from_d(double v) { return (float)v; }
template <> __half from_d(double v) { return __float2half_rn((float)v); }
template <> __nv_bfloat16 from_d(double v) { return __float2bfloat16_rn((float)v); }
static double to_d(float v) { return v; }
static double to_d(__half v) { return __half2float(v); }
static double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> RnnDType dtype_of();
template <> RnnDType dtype_of<float>() { return RnnDType::kFloat32; }
template <> RnnDType dtype_of<__half>() { return RnnDType::kFloat16; }
template <> RnnDType dtype_of<__nv_bfloat16>() { return RnnDType::kBFloat16; }
template <typename T> double rounding();
template <> double rounding<float>() { return 2e-6; }
template <> double rounding<__half>() { return 1.5e-3; }
template <> double rounding<__nv_bfloat16>() { return 1e-2; }

static double sig(double x) { return 1 / (1 + std::exp(-x)); }

struct Case {
  RnnMode mode;
  std::vector<int64_t> batch;  // per time index, never growing
  int64_t H;
  int units;
  bool reverse, bias;
  bool stream_w_hh = false;
};

template <typename T>
void run_case(const Case& cs, std::mt19937& rng, bool persistent) {
  const RnnMode mode = cs.mode;
  const int64_t T_ = cs.batch.size(), B = cs.batch[0], H = cs.H, G = rnn_gates(mode), GH = G * H,
                W = rnn_workspace_width(mode, H);
  std::vector<int64_t> offset(T_);
  int64_t N = 0;
  for (int64_t t = 0; t < T_; ++t) offset[t] = N, N += cs.batch[t];
  std::normal_distribution<double> normal;
  const double scale = 1.0 / std::sqrt(double(H));
  std::vector<float> xproj(N * GH), b_hh(GH), cx(B * H);
  std::vector<T> w_hh(GH * H), hx(B * H), grad_out(N * H);
  for (auto& v : xproj) v = (float)normal(rng);
  for (auto& v : b_hh) v = (float)(0.5 * normal(rng));
  for (auto& v : cx) v = (float)normal(rng);
  for (auto& v : w_hh) v = from_d<T>(2 * scale * normal(rng));
  for (auto& v : hx) v = from_d<T>(normal(rng));
  for (auto& v : grad_out) v = from_d<T>(normal(rng));
  const bool gru_bias = mode == RnnMode::kGRU && cs.bias;

  std::vector<T> out(N * H), out_inference(N * H);
  std::vector<float> ws(N * W), c = cx, c_inference = cx;
  unsigned barrier[2] = {0, 0};
  RnnStepPlan plan{cs.batch.data(), offset.data(), T_, B, H, N, cs.reverse};
  RnnForwardParams fp{mode, dtype_of<T>(), plan, xproj.data(), w_hh.data(), gru_bias ? b_hh.data() : nullptr,
                      hx.data(), mode == RnnMode::kLSTM ? c.data() : nullptr, out.data(), ws.data(), barrier,
                      cs.units, persistent, cs.stream_w_hh};
  const bool refused = persistent && (H + cs.units - 1) / cs.units > kEmulatedCooperativeBlocks;
  std::string name = std::string(mode == RnnMode::kLSTM ? "lstm" : mode == RnnMode::kGRU ? "gru"
                                 : mode == RnnMode::kTanh ? "tanh" : "relu") +
                     " H" + std::to_string(H) + " U" + std::to_string(cs.units) + " T" + std::to_string(T_) +
                     (cs.reverse ? " reverse" : "") + " dtype" + std::to_string(int(dtype_of<T>())) +
                     (refused ? " cooperative-refused" : persistent ? " persistent" : " per-step") +
                     (cs.stream_w_hh ? " streamed" : "");
  // A launch succeeds and leaves no error for cudaGetLastError (a refused
  // cooperative launch records one, which the launcher must clear).
  const auto launched = [&](cudaError_t e, const char* what) {
    const cudaError_t last = cudaGetLastError();
    check(e == cudaSuccess && last == cudaSuccess, name + " " + what, int(e), int(last));
    return e == cudaSuccess;
  };
  if (!launched(launch_rnn_forward(fp, nullptr), "forward launch")) return;
  RnnForwardParams ip = fp;  // inference: no workspace
  ip.out = out_inference.data();
  ip.ws = nullptr;
  ip.c = mode == RnnMode::kLSTM ? c_inference.data() : nullptr;
  if (!launched(launch_rnn_forward(ip, nullptr), "inference launch")) return;
  for (int64_t i = 0; i < N * H; ++i) check(to_d(out[i]) == to_d(out_inference[i]), name + " inference", to_d(out_inference[i]), to_d(out[i]));

  // Forward, step by step from the kernel's own previous rows.
  const double tol = rounding<T>();
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = cs.reverse ? T_ - 1 - s : s, tp = cs.reverse ? t + 1 : t - 1;
    const int64_t from_prev = s == 0 ? 0 : std::min(cs.batch[t], cs.batch[tp]);
    for (int64_t b = 0; b < cs.batch[t]; ++b) {
      const int64_t row = offset[t] + b;
      const bool cont = b < from_prev;
      auto hprev = [&](int64_t k) { return cont ? to_d(out[(offset[tp] + b) * H + k]) : to_d(hx[b * H + k]); };
      for (int64_t j = 0; j < H; ++j) {
        double z[4], hh[4];
        for (int g = 0; g < G; ++g) {
          double acc = 0;
          for (int64_t k = 0; k < H; ++k) acc += to_d(w_hh[(g * H + j) * H + k]) * hprev(k);
          hh[g] = acc + (gru_bias ? b_hh[g * H + j] : 0.0);
          z[g] = xproj[row * GH + g * H + j] + hh[g];
        }
        double h_new;
        std::vector<double> want;
        if (mode == RnnMode::kLSTM) {
          const double c_prev = cont ? ws[(offset[tp] + b) * W + 4 * H + j] : cx[b * H + j];
          const double i = sig(z[0]), f = sig(z[1]), g = std::tanh(z[2]), o = sig(z[3]), cn = f * c_prev + i * g;
          h_new = o * std::tanh(cn);
          want = {i, f, g, o, cn};
        } else if (mode == RnnMode::kGRU) {
          const double r = sig(z[0]), zz = sig(z[1]), n = std::tanh(xproj[row * GH + 2 * H + j] + r * hh[2]);
          h_new = (1 - zz) * n + zz * hprev(j);
          want = {r, zz, n, hh[2]};
        } else {
          h_new = mode == RnnMode::kTanh ? std::tanh(z[0]) : std::max(0.0, z[0]);
          want = {h_new};
        }
        const double got = to_d(out[row * H + j]);
        check(std::abs(got - h_new) <= tol * std::max(1.0, std::abs(h_new)), name + " out", got, h_new);
        for (size_t q = 0; q < want.size(); ++q) {
          const double gw = ws[row * W + q * H + j];
          check(std::abs(gw - want[q]) <= 2e-5 * std::max(1.0, std::abs(want[q])), name + " workspace", gw, want[q]);
        }
      }
    }
  }
  if (mode == RnnMode::kLSTM) {  // the final cell state is every row's last c
    for (int64_t b = 0; b < B; ++b) {
      int64_t last = -1;
      for (int64_t s = 0; s < T_; ++s) {
        const int64_t t = cs.reverse ? T_ - 1 - s : s;
        if (b < cs.batch[t]) last = offset[t] + b;
      }
      for (int64_t j = 0; j < H; ++j) check(c[b * H + j] == ws[last * W + 4 * H + j], name + " cy", c[b * H + j], ws[last * W + 4 * H + j]);
    }
  }

  // Backward through time in float64 over the kernel's forward.
  std::vector<float> dh(B * H), dc(B * H), dgx(N * GH), dgh(N * GH);
  for (auto& v : dh) v = (float)normal(rng);
  for (auto& v : dc) v = (float)normal(rng);
  std::vector<double> rdh(dh.begin(), dh.end()), rdc(dc.begin(), dc.end()), rgx(N * GH), rgh(N * GH);
  barrier[0] = barrier[1] = 0;
  RnnBackwardParams bp{mode, dtype_of<T>(), plan, w_hh.data(), hx.data(), mode == RnnMode::kLSTM ? cx.data() : nullptr,
                       out.data(), ws.data(), grad_out.data(), dh.data(), mode == RnnMode::kLSTM ? dc.data() : nullptr,
                       dgx.data(), mode == RnnMode::kGRU ? dgh.data() : dgx.data(), barrier, cs.units, persistent};
  if (!launched(launch_rnn_backward(bp, nullptr), "backward launch")) return;
  for (int64_t s = T_ - 1; s >= 0; --s) {
    const int64_t t = cs.reverse ? T_ - 1 - s : s, tp = cs.reverse ? t + 1 : t - 1;
    const int64_t from_prev = s == 0 ? 0 : std::min(cs.batch[t], cs.batch[tp]);
    for (int64_t b = 0; b < cs.batch[t]; ++b) {
      const int64_t row = offset[t] + b;
      const bool cont = b < from_prev;
      for (int64_t j = 0; j < H; ++j) {
        const double d = to_d(grad_out[row * H + j]) + rdh[b * H + j];
        const float* w = ws.data() + row * W;
        double* gx = rgx.data() + row * GH;
        double* gh = (mode == RnnMode::kGRU ? rgh.data() : rgx.data()) + row * GH;
        if (mode == RnnMode::kLSTM) {
          const double i = w[j], f = w[H + j], g = w[2 * H + j], o = w[3 * H + j], tc = std::tanh(w[4 * H + j]);
          const double c_prev = cont ? ws[(offset[tp] + b) * W + 4 * H + j] : cx[b * H + j];
          const double dct = rdc[b * H + j] + d * o * (1 - tc * tc);
          gx[j] = dct * g * i * (1 - i), gx[H + j] = dct * c_prev * f * (1 - f), gx[2 * H + j] = dct * i * (1 - g * g);
          gx[3 * H + j] = d * tc * o * (1 - o);
          rdc[b * H + j] = dct * f;
        } else if (mode == RnnMode::kGRU) {
          const double r = w[j], z = w[H + j], n = w[2 * H + j], hn = w[3 * H + j];
          const double hp = cont ? to_d(out[(offset[tp] + b) * H + j]) : to_d(hx[b * H + j]);
          const double dn = d * (1 - z) * (1 - n * n);
          gx[j] = gh[j] = dn * hn * r * (1 - r);
          gx[H + j] = gh[H + j] = d * (hp - n) * z * (1 - z);
          gx[2 * H + j] = dn, gh[2 * H + j] = dn * r;
          rdh[b * H + j] = d * z;
        } else {
          const double y = w[j];
          gx[j] = mode == RnnMode::kTanh ? d * (1 - y * y) : (y > 0 ? d : 0);
        }
      }
    }
    for (int64_t b = 0; b < cs.batch[t]; ++b) {
      const double* gh = (mode == RnnMode::kGRU ? rgh.data() : rgx.data()) + (offset[t] + b) * GH;
      for (int64_t k = 0; k < H; ++k) {
        double acc = mode == RnnMode::kGRU ? rdh[b * H + k] : 0.0;
        for (int64_t r = 0; r < GH; ++r) acc += gh[r] * to_d(w_hh[r * H + k]);
        rdh[b * H + k] = acc;
      }
    }
  }
  const auto close = [&](double got, double want) { return std::abs(got - want) <= 1e-4 * std::max(1.0, std::abs(want)); };
  for (int64_t i = 0; i < N * GH; ++i) {
    check(close(dgx[i], rgx[i]), name + " dgates_x", dgx[i], rgx[i]);
    if (mode == RnnMode::kGRU) check(close(dgh[i], rgh[i]), name + " dgates_h", dgh[i], rgh[i]);
  }
  for (int64_t i = 0; i < B * H; ++i) {
    check(close(dh[i], rdh[i]), name + " grad_hx", dh[i], rdh[i]);
    if (mode == RnnMode::kLSTM) check(close(dc[i], rdc[i]), name + " grad_cx", dc[i], rdc[i]);
  }
}

int main(int argc, char** argv) {
  std::mt19937 rng(0);
  if (argc > 1 && std::string(argv[1]) == "--quick") {  // the race check's set (ThreadSanitizer)
    for (RnnMode mode : {RnnMode::kLSTM, RnnMode::kGRU}) {
      run_case<float>({mode, {3, 2}, 37, 8, false, true}, rng, true);             // persistent, 5 blocks
      run_case<__nv_bfloat16>({mode, {4, 3, 1}, 20, 16, true, true}, rng, false);  // packed, reverse, per step
    }
    run_case<__nv_bfloat16>({RnnMode::kLSTM, {2, 1}, 150, 30, true, true}, rng, true);  // tensor cores
    run_case<__half>({RnnMode::kGRU, {2, 1}, 150, 40, false, true, true}, rng, true);  // streamed W_hh
    run_case<float>({RnnMode::kTanh, {2, 1}, 17, 1, false, true}, rng, true);  // 17 blocks: refused, per step
    std::printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
  }
  const RnnMode modes[] = {RnnMode::kTanh, RnnMode::kReLU, RnnMode::kLSTM, RnnMode::kGRU};
  for (RnnMode mode : modes) {
    // Each case in one dtype and launch mode, so that the set covers each
    // dtype and mode without running every combination (an emulated warp
    // shuffle is two thread barriers: the emulation is slow).
    run_case<float>({mode, {3, 3, 3, 3}, 37, 8, false, true}, rng, true);  // 5 blocks, the last one partial
    run_case<__nv_bfloat16>({mode, {4, 3, 3, 1}, 20, 16, true, true}, rng, true);  // packed, reverse: each
                                                                                  // sequence starts from hx at its end
    run_case<__half>({mode, {4, 3, 3, 1}, 20, 3, false, false}, rng, false);  // packed, forward, 7 blocks, per step
    run_case<float>({mode, {1, 1, 1}, 1, 1, false, true}, rng, true);       // one unit, one row
    run_case<float>({mode, {2, 2}, 33, 33, true, true}, rng, false);        // one block holds every unit, per step
    run_case<__nv_bfloat16>({mode, {3, 2}, 9, 4, false, true}, rng, false);
    run_case<float>({mode, {70, 66}, 5, 2, false, true}, rng, true);  // more rows than the forward's chunk
    run_case<__nv_bfloat16>({mode, {3, 2}, 150, 30, true, true}, rng, true);  // tensor cores: two depth slices
    run_case<__half>({mode, {70, 9}, 7, 7, false, true}, rng, false);        // tensor cores: two row chunks
    // W_hh streamed a depth slice at a time: two slices, persistent and per step, two row chunks
    run_case<__nv_bfloat16>({mode, {3, 2}, 150, 30, false, true, true}, rng, true);
    run_case<__half>({mode, {70, 9}, 20, 3, true, true, true}, rng, false);
    run_case<float>({mode, {3, 3, 2}, 37, 2, true, true}, rng, true);  // 19 blocks: refused, per step
  }
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
