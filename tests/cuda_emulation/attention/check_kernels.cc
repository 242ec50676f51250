// Runs the attention CUDA kernels (csrc/attention/cuda/) under host emulation
// (emu_cuda.h, shim/common/ptx_sm80.cuh) and checks them against a float64
// reference: forward (output, lse) and backward (dQ, dK, dV), fp16 and bf16,
// every head-dim bucket with padded and unequal E/Ev, odd L and S, causal
// both alignments, windows, bool / float / key-padding masks, fully masked
// rows, GQA/MQA, dropout, strided query and key. First it checks the
// emulated ldmatrix and mma.sync against the fragment tables of the PTX ISA.
// Built and run by tests/test_cuda_emulation.py; exits non-zero on any mismatch.
#include "emu_cuda.h"
#include "attention/cuda/launchers.h"
#include "common/counter_rng.h"
#include "common/ptx_sm80.cuh"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <sys/wait.h>
#include <unistd.h>
#include <string>
#include <tuple>
#include <vector>

using namespace bigkernels;
using namespace bigkernels::cuda;

static int failures = 0, checks = 0;
static double worst_out = 0, worst_grad = 0;  // largest error seen, in units of the tolerance
static void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    if (failures < 30) std::printf("MISMATCH %s\n", what.c_str());
    ++failures;
  }
}

// ---- the emulated warp instructions against the PTX ISA's tables ----

static uint16_t bf16_bits(float v) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
static uint32_t two(float lo, float hi) { return bf16_bits(lo) | (uint32_t(bf16_bits(hi)) << 16); }

// A[r][c] = r * 16 + c (exact in bf16), B[k][n] = k - n, both 16 x 16 / 16 x 8.
static float a_at(int r, int c) { return float(r * 16 + c); }
static float b_at(int k, int n) { return float(k - n); }

static void fragment_kernel(int* bad) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  auto* m = reinterpret_cast<uint16_t*>(dynamic_smem());  // A, 16 rows of 16
  if (lane == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) m[r * 16 + c] = bf16_bits(a_at(r, c));
  __syncwarp();
  // ldmatrix.x4: lanes 0-15 address rows 0-15 at column 0, lanes 16-31 at column 8,
  // so matrices 0..3 are A's quarters (rows 0-7 | 8-15) x (cols 0-7 | 8-15): A's fragment.
  uint32_t r4[4];
  ldmatrix<4, false>(r4, m + (lane % 16) * 16 + (lane / 16) * 8);
  const uint32_t want_a[4] = {two(a_at(g, 2 * t), a_at(g, 2 * t + 1)), two(a_at(g + 8, 2 * t), a_at(g + 8, 2 * t + 1)),
                              two(a_at(g, 2 * t + 8), a_at(g, 2 * t + 9)),
                              two(a_at(g + 8, 2 * t + 8), a_at(g + 8, 2 * t + 9))};
  for (int i = 0; i < 4; ++i) bad[lane] |= (r4[i] != want_a[i]) << i;
  // .trans x1 on rows 0-7, cols 0-7: lane gets column g, rows 2t and 2t+1.
  uint32_t r1[1];
  ldmatrix<1, true>(r1, m + (lane % 8) * 16);
  bad[lane] |= (r1[0] != two(a_at(2 * t, g), a_at(2 * t + 1, g))) << 4;
  // x2 on rows 0-7 at cols 0 and 8: lane gets row g of each.
  uint32_t r2[2];
  ldmatrix<2, false>(r2, m + (lane % 8) * 16 + ((lane / 8) % 2) * 8);
  bad[lane] |= (r2[1] != two(a_at(g, 2 * t + 8), a_at(g, 2 * t + 9))) << 5;
  // mma: fragments built by hand from the tables; D = A B must land at
  // c[0..1] = D[g][2t..2t+1], c[2..3] = D[g+8][2t..2t+1].
  const uint32_t b[2] = {two(b_at(2 * t, g), b_at(2 * t + 1, g)), two(b_at(2 * t + 8, g), b_at(2 * t + 9, g))};
  float c[4] = {1.f, 2.f, 3.f, 4.f};
  mma_m16n8k16<__nv_bfloat16>(c, want_a, b);
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    double d = 1 + i;
    for (int k = 0; k < 16; ++k) d += a_at(row, k) * b_at(k, col);
    bad[lane] |= (c[i] != d) << (6 + i);
  }
  // shuffles
  bad[lane] |= (__shfl_xor_sync(0xffffffffu, lane * 10, 5) != (lane ^ 5) * 10) << 10;
  bad[lane] |= (__shfl_sync(0xffffffffu, float(lane), 7) != 7.f) << 11;
}

static void check_fragments() {
  int bad[32] = {};
  auto kernel = fragment_kernel;
  bk_emulate_launch(kernel, dim3(1), dim3(32), 16 * 16 * 2, bad);
  for (int lane = 0; lane < 32; ++lane) expect(bad[lane] == 0, "fragment layout, lane " + std::to_string(lane) +
                                                                   " bits " + std::to_string(bad[lane]));
}

// ---- attention ----

template <typename T> T from_d(double v);
template <> __half from_d(double v) { return __float2half_rn((float)v); }
template <> __nv_bfloat16 from_d(double v) { return __float2bfloat16_rn((float)v); }
template <> float from_d(double v) { return (float)v; }
template <> double from_d(double v) { return v; }
static double to_d(__half v) { return __half2float(v); }
static double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
static double to_d(float v) { return v; }
static double to_d(double v) { return v; }
template <typename T> AttentionDType dtype_of();
template <> AttentionDType dtype_of<__half>() { return AttentionDType::kFloat16; }
template <> AttentionDType dtype_of<__nv_bfloat16>() { return AttentionDType::kBFloat16; }
template <> AttentionDType dtype_of<float>() { return AttentionDType::kFloat32; }
template <> AttentionDType dtype_of<double>() { return AttentionDType::kFloat64; }
template <typename T> const char* name_of() {
  return std::is_same_v<T, __half> ? "fp16" : std::is_same_v<T, __nv_bfloat16> ? "bf16"
         : std::is_same_v<T, float> ? "fp32" : "fp64";
}

// 16-byte aligned storage.
template <typename T>
struct Buffer {
  std::vector<unsigned char> raw;
  T* p;
  explicit Buffer(size_t n) : raw(n * sizeof(T) + 128) {  // slack: room for a view one element in
    p = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) / 64 * 64);
  }
};

enum class Mask { kNone, kBool, kFloat, kKeyPadding };

struct Case {
  int B, Hq, Hkv, L, S, E, Ev;
  int64_t left = -1, right = -1;
  bool bottom_right = false;
  Mask mask = Mask::kNone;
  float dropout = 0.f;
  bool strided = false;  // q and k as [B, positions, H, D] (transposed views, as Hugging Face passes)
  double peak = 1;       // q's scale: > 1 makes the softmax peaky, so that O and D = rowsum(dO O) are large
  int last_valid = -1;   // key padding: keys the last batch keeps (-1: all but a few), so whole tiles are masked
  bool misaligned_grad_out = false;  // grad_out one element past an aligned start (the op must copy such a view)
  float softcap = 0.f;               // Gemma 2's cap on the scaled scores (0: none)
  int alibi = 0;                     // ALiBi slopes: 0 none, 1 per head [Hq], 2 per batch and head [B, Hq]
  std::string name() const {
    char s[240];
    std::snprintf(s, sizeof s, "B%d H%d/%d L%d S%d E%d Ev%d window(%lld,%lld)%s mask%d p%.2f%s peak%.0f cap%.1f "
                  "alibi%d", B, Hq, Hkv, L, S, E, Ev, (long long)left, (long long)right,
                  bottom_right ? " bottom-right" : "", (int)mask, dropout, strided ? " strided" : "", peak, softcap,
                  alibi);
    return s;
  }
};

// Dispatch as the op does: tensor cores for 16-bit types, SIMT for float and
// double; the head-dim bucket.
template <typename T, bool kForward, int kD>
cudaError_t launch_bucket(const AttentionParams& p) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return kForward ? launch_attention_forward_simt<T, kD>(p, nullptr) : launch_attention_backward_simt<T, kD>(p, nullptr);
  } else {
    return kForward ? launch_attention_forward<T, kD>(p, nullptr) : launch_attention_backward<T, kD>(p, nullptr);
  }
}
template <typename T, bool kForward>
cudaError_t launch(const AttentionParams& p) {
  switch (attention_head_dim_bucket(std::max(p.E, p.Ev))) {
    case 64: return launch_bucket<T, kForward, 64>(p);
    case 128: return launch_bucket<T, kForward, 128>(p);
    case 256: return launch_bucket<T, kForward, 256>(p);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
void run_case(const Case& c, double tol) {
  const int64_t B = c.B, Hq = c.Hq, Hkv = c.Hkv, L = c.L, S = c.S, E = c.E, Ev = c.Ev;
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;  // lse and delta
  const std::string tag = std::string(name_of<T>()) + " " + c.name();
  std::mt19937 gen(L * 7919 + S * 31 + E + Hq);
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> ud;
  // q [B, Hq, L, E] or [B, L, Hq, E]; k likewise; v, out, grads contiguous
  Buffer<T> q(B * Hq * L * E), k(B * Hkv * S * E), v(B * Hkv * S * Ev), out(B * Hq * L * Ev), dout(B * Hq * L * Ev);
  Buffer<T> dq(B * Hq * L * E), dk(B * Hkv * S * E), dv(B * Hkv * S * Ev);
  const int64_t qs[3] = {Hq * L * E, c.strided ? E : L * E, c.strided ? Hq * E : E};
  const int64_t ks[3] = {Hkv * S * E, c.strided ? E : S * E, c.strided ? Hkv * E : E};
  const int64_t vs[3] = {Hkv * S * Ev, S * Ev, Ev};
  for (int64_t i = 0; i < B * Hq * L * E; ++i) q.p[i] = from_d<T>(c.peak * nd(gen));
  for (int64_t i = 0; i < B * Hkv * S * E; ++i) k.p[i] = from_d<T>(nd(gen));
  for (int64_t i = 0; i < B * Hkv * S * Ev; ++i) v.p[i] = from_d<T>(nd(gen));
  for (int64_t i = 0; i < B * Hq * L * Ev; ++i) dout.p[i] = from_d<T>(nd(gen));
  auto Q = [&](int64_t b, int64_t h, int64_t i, int64_t e) { return to_d(q.p[b * qs[0] + h * qs[1] + i * qs[2] + e]); };
  auto K = [&](int64_t b, int64_t h, int64_t j, int64_t e) { return to_d(k.p[b * ks[0] + h * ks[1] + j * ks[2] + e]); };
  auto V = [&](int64_t b, int64_t h, int64_t j, int64_t e) { return to_d(v.p[b * vs[0] + h * vs[1] + j * vs[2] + e]); };

  // masks: bool [B, Hq, L, S] with a fully masked row; float [L, S]
  // broadcast over batch and heads; key padding [B, 1, 1, S]
  std::vector<unsigned char> bool_mask;
  Buffer<T> float_mask(L * S);
  Buffer<bool> pad_mask(B * S);
  AttentionParams p{};
  if (c.mask == Mask::kBool) {
    bool_mask.resize(B * Hq * L * S);
    for (auto& m : bool_mask) m = ud(gen) < 0.7;
    for (int64_t j = 0; j < S; ++j) bool_mask[(0 * Hq + 0) * L * S + (L / 2) * S + j] = 0;  // nothing to attend
    p.mask = bool_mask.data(), p.mask_is_bool = true;
    const int64_t st[4] = {Hq * L * S, L * S, S, 1};
    std::memcpy(p.mask_strides, st, sizeof st);
  } else if (c.mask == Mask::kFloat) {
    for (int64_t i = 0; i < L * S; ++i) float_mask.p[i] = from_d<T>(2 * nd(gen));
    p.mask = float_mask.p;
    const int64_t st[4] = {0, 0, S, 1};
    std::memcpy(p.mask_strides, st, sizeof st);
  } else if (c.mask == Mask::kKeyPadding) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t keep = b == B - 1 && c.last_valid >= 0 ? c.last_valid : S - 1 - 3 * b;
      for (int64_t j = 0; j < S; ++j) pad_mask.p[b * S + j] = j < keep;
    }
    p.mask = pad_mask.p, p.mask_is_bool = true;
    const int64_t st[4] = {S, 0, 0, 1};
    std::memcpy(p.mask_strides, st, sizeof st);
  }
  const int64_t offset = c.bottom_right ? S - L : 0;
  auto allowed = [&](int64_t b, int64_t h, int64_t i, int64_t j, double& add) {
    add = 0;
    const int64_t pos = i + offset;
    if ((c.left >= 0 && j < pos - c.left) || (c.right >= 0 && j > pos + c.right)) return false;
    if (p.mask == nullptr) return true;
    const int64_t at = b * p.mask_strides[0] + h * p.mask_strides[1] + i * p.mask_strides[2] + j * p.mask_strides[3];
    if (p.mask_is_bool) return static_cast<const bool*>(p.mask)[at];
    add = to_d(static_cast<const T*>(p.mask)[at]);
    return true;
  };

  p.dtype = dtype_of<T>();
  p.q = q.p, p.k = k.p, p.v = v.p;
  std::memcpy(p.q_strides, qs, sizeof qs), std::memcpy(p.k_strides, ks, sizeof ks), std::memcpy(p.v_strides, vs, sizeof vs);
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.L = L, p.S = S, p.E = E, p.Ev = Ev;
  p.scale = 1.0f / std::sqrt((float)E);
  p.dropout_p = c.dropout;
  p.dropout_seed = 0x1234567890abcdefull + L;
  p.window_left = c.left, p.window_right = c.right, p.diagonal_offset = offset;
  p.softcap = c.softcap;
  std::vector<A> slopes(c.alibi == 2 ? B * Hq : Hq);
  for (auto& s : slopes) s = static_cast<A>(0.05 + 0.3 * ud(gen));
  if (c.alibi > 0) p.alibi_slopes = slopes.data(), p.alibi_batch_stride = c.alibi == 2 ? Hq : 0;
  std::vector<A> lse(B * Hq * L), delta(B * Hq * L);
  p.out = out.p, p.lse = lse.data();
  expect(launch<T, true>(p) == cudaSuccess, tag + ": forward launch");

  // float64 reference: P (with the dropout scale M folded into PM), O, lse,
  // then the gradients; the same rows the kernel saw.
  const double scale = p.scale, keep_scale = 1.0 / (1.0 - c.dropout);
  std::vector<double> ref_dq(B * Hq * L * E, 0.0), ref_dk(B * Hkv * S * E, 0.0), ref_dv(B * Hkv * S * Ev, 0.0);
  std::vector<double> ref_ds(B * Hq * L * S, 0.0);  // the scores' gradient: a float mask's
  std::vector<double> P(S), M(S), dP(S), CS(S, 1.0);  // CS: the softcap's derivative
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / (Hq / Hkv), row0 = (b * Hq + h) * L;
      for (int64_t i = 0; i < L; ++i) {
        double mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          double add, dot = 0;
          if (!allowed(b, h, i, j, add)) { P[j] = -INFINITY; continue; }
          for (int64_t e = 0; e < E; ++e) dot += Q(b, h, i, e) * K(b, hk, j, e);
          double x = dot * scale;
          if (c.softcap > 0) {
            const double t = std::tanh(x / c.softcap);
            x = c.softcap * t, CS[j] = 1 - t * t;
          }
          if (c.alibi > 0) x -= slopes[(c.alibi == 2 ? b * Hq : 0) + h] * std::fabs(double(i + offset - j));
          P[j] = x + add;
          mx = std::max(mx, P[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += P[j] = mx == -INFINITY ? 0 : std::exp(P[j] - mx);
        for (int64_t j = 0; j < S; ++j) {
          P[j] = sum > 0 ? P[j] / sum : 0;
          const uint64_t counter = static_cast<uint64_t>(((b * Hq + h) * L + i) * S + j);
          M[j] = c.dropout > 0 ? (counter_uniform(p.dropout_seed, counter) >= c.dropout ? keep_scale : 0) : 1;
        }
        const double want_lse = sum > 0 ? mx + std::log(sum) : -INFINITY;
        const double got_lse = lse[row0 + i];
        expect(std::isinf(want_lse) ? got_lse == want_lse : std::fabs(got_lse - want_lse) <= tol * (1 + std::fabs(want_lse)),
               tag + ": lse row " + std::to_string(i) + " got " + std::to_string(got_lse) + " want " +
                   std::to_string(want_lse));
        double d = 0;  // D = rowsum(dO * O) from the kernel's own output, as the op computes it
        for (int64_t e = 0; e < Ev; ++e) {
          double o = 0;
          for (int64_t j = 0; j < S; ++j) o += P[j] * M[j] * V(b, hk, j, e);
          const double got = to_d(out.p[(row0 + i) * Ev + e]);
          worst_out = std::max(worst_out, std::fabs(got - o) / (tol * (1 + std::fabs(o))));
          expect(std::fabs(got - o) <= tol * (1 + std::fabs(o)), tag + ": out[" + std::to_string(i) + "][" +
                                                                     std::to_string(e) + "] got " + std::to_string(got) +
                                                                     " want " + std::to_string(o));
          d += to_d(dout.p[(row0 + i) * Ev + e]) * got;
        }
        delta[row0 + i] = static_cast<A>(d);
        for (int64_t j = 0; j < S; ++j) {
          if (P[j] == 0) continue;
          double dpm = 0;  // (dO V^T)[i][j]
          for (int64_t e = 0; e < Ev; ++e) {
            dpm += to_d(dout.p[(row0 + i) * Ev + e]) * V(b, hk, j, e);
            ref_dv[((b * Hkv + hk) * S + j) * Ev + e] += P[j] * M[j] * to_d(dout.p[(row0 + i) * Ev + e]);
          }
          dP[j] = P[j] * (dpm * M[j] - d);  // dS
          ref_ds[(row0 + i) * S + j] = dP[j];
          dP[j] *= CS[j];  // through the softcap: the scaled scores' gradient
          for (int64_t e = 0; e < E; ++e) {
            ref_dq[(row0 + i) * E + e] += scale * dP[j] * K(b, hk, j, e);
            ref_dk[((b * Hkv + hk) * S + j) * E + e] += scale * dP[j] * Q(b, h, i, e);
          }
        }
      }
    }

  if (c.misaligned_grad_out) {  // the same values, one element further on
    std::memmove(dout.p + 1, dout.p, B * Hq * L * Ev * sizeof(T));
    p.grad_out = dout.p + 1;
  } else {
    p.grad_out = dout.p;
  }
  p.delta = delta.data();
  p.grad_q = dq.p, p.grad_k = dk.p, p.grad_v = dv.p;
  std::vector<A> grad_mask(c.mask == Mask::kFloat ? B * Hq * L * S : 0, A(0));
  p.grad_mask = grad_mask.empty() ? nullptr : grad_mask.data();
  expect(launch<T, false>(p) == cudaSuccess, tag + ": backward launch");
  // Gradients sum over many products: compare against the tensor's scale.
  auto compare = [&](const char* what, const auto* got, const std::vector<double>& want) {
    double biggest = 0;
    for (double w : want) biggest = std::max(biggest, std::fabs(w));
    int shown = 0;
    for (size_t x = 0; x < want.size(); ++x) {
      const double g = to_d(got[x]);
      worst_grad = std::max(worst_grad, std::fabs(g - want[x]) / (tol * (1 + biggest)));
      const bool ok = std::fabs(g - want[x]) <= tol * (1 + biggest) && std::isfinite(g);
      expect(ok || shown > 3, tag + ": " + what + "[" + std::to_string(x) + "] got " + std::to_string(g) + " want " +
                                  std::to_string(want[x]));
      shown += !ok;
    }
  };
  compare("dq", dq.p, ref_dq);
  compare("dk", dk.p, ref_dk);
  compare("dv", dv.p, ref_dv);
  if (!grad_mask.empty()) compare("grad_mask", grad_mask.data(), ref_ds);
}

// Sequences packed end to end (AttentionParams::cu_seqlens_q): q [Tq, Hq, E],
// k [Tk, Hkv, E], v [Tk, Hkv, Ev] as the op passes them (batch strides 0),
// out, lse, dO, delta and the gradients head-major over the packed rows;
// each sequence against a float64 reference of its own, bottom-right.
struct VarlenCase {
  std::vector<int64_t> lens_q, lens_k;
  int Hq, Hkv, E, Ev;
  int64_t left = -1, right = -1;
  float dropout = 0.f, softcap = 0.f;
  std::string name() const {
    std::string s = "varlen q";
    for (int64_t n : lens_q) s += " " + std::to_string(n);
    s += " k";
    for (int64_t n : lens_k) s += " " + std::to_string(n);
    char rest[120];
    std::snprintf(rest, sizeof rest, " H%d/%d E%d Ev%d window(%lld,%lld) p%.2f cap%.1f", Hq, Hkv, E, Ev,
                  (long long)left, (long long)right, dropout, softcap);
    return s + rest;
  }
};

template <typename T>
void run_varlen_case(const VarlenCase& c, double tol) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const std::string tag = std::string(name_of<T>()) + " " + c.name();
  const int64_t B = c.lens_q.size(), Hq = c.Hq, Hkv = c.Hkv, E = c.E, Ev = c.Ev;
  std::vector<int64_t> cu_q{0}, cu_k{0}, offsets;
  int64_t max_q = 0, max_k = 0, counters = 0;
  for (int64_t b = 0; b < B; ++b) {
    cu_q.push_back(cu_q.back() + c.lens_q[b]), cu_k.push_back(cu_k.back() + c.lens_k[b]);
    max_q = std::max(max_q, c.lens_q[b]), max_k = std::max(max_k, c.lens_k[b]);
    offsets.push_back(counters);
    counters += Hq * c.lens_q[b] * c.lens_k[b];
  }
  const int64_t Tq = cu_q.back(), Tk = cu_k.back();
  std::mt19937 gen(Tq * 7919 + Tk * 31 + E);
  std::normal_distribution<double> nd;
  Buffer<T> q(Tq * Hq * E), k(Tk * Hkv * E), v(Tk * Hkv * Ev), out(Hq * Tq * Ev), dout(Hq * Tq * Ev);
  Buffer<T> dq(Hq * Tq * E), dk(Hkv * Tk * E), dv(Hkv * Tk * Ev);
  for (int64_t i = 0; i < Tq * Hq * E; ++i) q.p[i] = from_d<T>(nd(gen));
  for (int64_t i = 0; i < Tk * Hkv * E; ++i) k.p[i] = from_d<T>(nd(gen));
  for (int64_t i = 0; i < Tk * Hkv * Ev; ++i) v.p[i] = from_d<T>(nd(gen));
  for (int64_t i = 0; i < Hq * Tq * Ev; ++i) dout.p[i] = from_d<T>(nd(gen));
  auto Q = [&](int64_t row, int64_t h, int64_t e) { return to_d(q.p[(row * Hq + h) * E + e]); };
  auto K = [&](int64_t row, int64_t h, int64_t e) { return to_d(k.p[(row * Hkv + h) * E + e]); };
  auto V = [&](int64_t row, int64_t h, int64_t e) { return to_d(v.p[(row * Hkv + h) * Ev + e]); };

  AttentionParams p{};
  p.dtype = dtype_of<T>();
  p.q = q.p, p.k = k.p, p.v = v.p;
  const int64_t qs[3] = {0, E, Hq * E}, ks[3] = {0, E, Hkv * E}, vs[3] = {0, Ev, Hkv * Ev};
  std::memcpy(p.q_strides, qs, sizeof qs), std::memcpy(p.k_strides, ks, sizeof ks), std::memcpy(p.v_strides, vs, sizeof vs);
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.L = max_q, p.S = max_k, p.E = E, p.Ev = Ev;
  p.scale = 1.0f / std::sqrt((float)E);
  p.dropout_p = c.dropout;
  p.dropout_seed = 0x5eed + Tq;
  p.window_left = c.left, p.window_right = c.right;
  p.softcap = c.softcap;
  p.cu_seqlens_q = cu_q.data(), p.cu_seqlens_k = cu_k.data(), p.total_q = Tq, p.total_k = Tk;
  p.dropout_offsets = c.dropout > 0 ? offsets.data() : nullptr;
  std::vector<A> lse(Hq * Tq), delta(Hq * Tq);
  p.out = out.p, p.lse = lse.data();
  expect(launch<T, true>(p) == cudaSuccess, tag + ": forward launch");

  const double scale = p.scale, keep_scale = 1.0 / (1.0 - c.dropout);
  std::vector<double> ref_dq(Hq * Tq * E, 0.0), ref_dk(Hkv * Tk * E, 0.0), ref_dv(Hkv * Tk * Ev, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = c.lens_q[b], S = c.lens_k[b], q0 = cu_q[b], k0 = cu_k[b];
    std::vector<double> P(S), M(S), CS(S, 1.0);
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / (Hq / Hkv);
      for (int64_t i = 0; i < L; ++i) {
        const int64_t pos = i + S - L, row = h * Tq + q0 + i;  // bottom-right; head-major row
        double mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          if ((c.left >= 0 && j < pos - c.left) || (c.right >= 0 && j > pos + c.right)) { P[j] = -INFINITY; continue; }
          double x = 0;
          for (int64_t e = 0; e < E; ++e) x += Q(q0 + i, h, e) * K(k0 + j, hk, e);
          x *= scale;
          if (c.softcap > 0) {
            const double t = std::tanh(x / c.softcap);
            x = c.softcap * t, CS[j] = 1 - t * t;
          }
          P[j] = x;
          mx = std::max(mx, x);
        }
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += P[j] = mx == -INFINITY ? 0 : std::exp(P[j] - mx);
        for (int64_t j = 0; j < S; ++j) {
          P[j] = sum > 0 ? P[j] / sum : 0;
          const uint64_t counter = static_cast<uint64_t>(offsets[b] + (h * L + i) * S + j);
          M[j] = c.dropout > 0 ? (counter_uniform(p.dropout_seed, counter) >= c.dropout ? keep_scale : 0) : 1;
        }
        const double want_lse = sum > 0 ? mx + std::log(sum) : -INFINITY;
        expect(std::isinf(want_lse) ? lse[row] == want_lse : std::fabs(lse[row] - want_lse) <= tol * (1 + std::fabs(want_lse)),
               tag + ": lse of sequence " + std::to_string(b) + " row " + std::to_string(i));
        double d = 0;
        for (int64_t e = 0; e < Ev; ++e) {
          double o = 0;
          for (int64_t j = 0; j < S; ++j) o += P[j] * M[j] * V(k0 + j, hk, e);
          const double got = to_d(out.p[row * Ev + e]);
          worst_out = std::max(worst_out, std::fabs(got - o) / (tol * (1 + std::fabs(o))));
          expect(std::fabs(got - o) <= tol * (1 + std::fabs(o)), tag + ": out of sequence " + std::to_string(b) +
                                                                     " row " + std::to_string(i) + " got " +
                                                                     std::to_string(got) + " want " + std::to_string(o));
          d += to_d(dout.p[row * Ev + e]) * got;
        }
        delta[row] = static_cast<A>(d);
        for (int64_t j = 0; j < S; ++j) {
          if (P[j] == 0) continue;
          double dpm = 0;
          for (int64_t e = 0; e < Ev; ++e) {
            dpm += to_d(dout.p[row * Ev + e]) * V(k0 + j, hk, e);
            ref_dv[(hk * Tk + k0 + j) * Ev + e] += P[j] * M[j] * to_d(dout.p[row * Ev + e]);
          }
          const double ds = P[j] * (dpm * M[j] - d) * CS[j];
          for (int64_t e = 0; e < E; ++e) {
            ref_dq[row * E + e] += scale * ds * K(k0 + j, hk, e);
            ref_dk[(hk * Tk + k0 + j) * E + e] += scale * ds * Q(q0 + i, h, e);
          }
        }
      }
    }
  }
  p.grad_out = dout.p, p.delta = delta.data();
  p.grad_q = dq.p, p.grad_k = dk.p, p.grad_v = dv.p;
  expect(launch<T, false>(p) == cudaSuccess, tag + ": backward launch");
  auto compare = [&](const char* what, const T* got, const std::vector<double>& want) {
    double biggest = 0;
    for (double w : want) biggest = std::max(biggest, std::fabs(w));
    int shown = 0;
    for (size_t x = 0; x < want.size(); ++x) {
      const double g = to_d(got[x]);
      worst_grad = std::max(worst_grad, std::fabs(g - want[x]) / (tol * (1 + biggest)));
      const bool ok = std::fabs(g - want[x]) <= tol * (1 + biggest) && std::isfinite(g);
      expect(ok || shown > 3, tag + ": " + what + "[" + std::to_string(x) + "] got " + std::to_string(g) + " want " +
                                  std::to_string(want[x]));
      shown += !ok;
    }
  };
  compare("dq", dq.p, ref_dq);
  compare("dk", dk.p, ref_dk);
  compare("dv", dv.p, ref_dv);
}

template <typename T>
void run_varlen_all(double tol, bool quick = false) {
  // empty sequences, one row, more than a tile, keys longer and shorter than queries
  VarlenCase mixed{{5, 0, 70, 1, 129}, {5, 3, 70, 0, 129}, 4, 2, 64, 64};
  run_varlen_case<T>(mixed, tol);
  VarlenCase causal{{3, 40, 66}, {90, 40, 20}, 2, 2, 64, 64};
  causal.right = 0;  // bottom-right per sequence: the 46 first rows of the last see no key
  run_varlen_case<T>(causal, tol);
  if (quick) return;
  VarlenCase window{{33, 100}, {33, 130}, 2, 1, 128, 128};
  window.left = 10, window.right = 4;
  run_varlen_case<T>(window, tol);
  VarlenCase shaped{{17, 64, 2}, {17, 64, 40}, 4, 1, 256, 256};
  shaped.right = 0, shaped.dropout = 0.25f, shaped.softcap = 2.f;
  run_varlen_case<T>(shaped, tol);
}

// Decoding against a KV cache: q [B, Lq, Hq, E] and caches [B, capacity,
// Hkv, E] read in place through [B, H, L, D] strides, each batch attending
// to its first seqlens_k[b] keys, bottom-right; the decoding kernel with its
// keys split (few rows per key head) or the forward kernels (more).
struct KvCase {
  std::vector<int64_t> seqlens;
  int Hq, Hkv, Lq, capacity, E, Ev;
  int64_t right = -1, left = -1;
  float softcap = 0.f;
  bool alibi = false;
  int64_t keys_per_split = 0;  // 0: no split
  int page_size = 0;           // > 0: the caches as shuffled pages of this many keys (block_table)
  // dense: no seqlens_k, every batch's S = seqlens[b] = capacity, this
  // diagonal (scaled_dot_product_attention's decoding shapes)
  bool dense = false;
  int64_t diagonal = 0;
  std::string name() const {
    std::string s = page_size > 0 ? "paged" + std::to_string(page_size) + " kvcache S" : "kvcache S";
    if (dense) s = "dense diagonal " + std::to_string(diagonal) + " S";
    for (int64_t n : seqlens) s += " " + std::to_string(n);
    char rest[140];
    std::snprintf(rest, sizeof rest, " H%d/%d Lq%d cap%d E%d Ev%d window(%lld,%lld) cap%.1f alibi%d split%lld", Hq,
                  Hkv, Lq, capacity, E, Ev, (long long)left, (long long)right, softcap, (int)alibi,
                  (long long)keys_per_split);
    return s + rest;
  }
};

template <typename T>
void run_kvcache_case(const KvCase& c, double tol) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const std::string tag = std::string(name_of<T>()) + " " + c.name();
  const int64_t B = c.seqlens.size(), Hq = c.Hq, Hkv = c.Hkv, L = c.Lq, cap = c.capacity, E = c.E, Ev = c.Ev;
  std::mt19937 gen(cap * 13 + L * 7 + E);
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> ud;
  const int64_t ps = c.page_size, per_batch = ps > 0 ? (cap + ps - 1) / ps : 0;
  const int64_t cache_rows = ps > 0 ? B * per_batch * ps : B * cap;
  Buffer<T> q(B * L * Hq * E), k(cache_rows * Hkv * E), v(cache_rows * Hkv * Ev), out(B * Hq * L * Ev);
  for (int64_t i = 0; i < B * L * Hq * E; ++i) q.p[i] = from_d<T>(nd(gen));
  for (int64_t i = 0; i < cache_rows * Hkv * E; ++i) k.p[i] = from_d<T>(nd(gen));
  for (int64_t i = 0; i < cache_rows * Hkv * Ev; ++i) v.p[i] = from_d<T>(nd(gen));
  std::vector<A> slopes(Hq);
  for (auto& s : slopes) s = static_cast<A>(0.05 + 0.3 * ud(gen));
  AttentionParams p{};
  p.dtype = dtype_of<T>();
  p.q = q.p, p.k = k.p, p.v = v.p;
  const int64_t qs[3] = {L * Hq * E, E, Hq * E}, ks[3] = {cap * Hkv * E, E, Hkv * E}, vs[3] = {cap * Hkv * Ev, Ev, Hkv * Ev};
  std::memcpy(p.q_strides, qs, sizeof qs), std::memcpy(p.k_strides, ks, sizeof ks), std::memcpy(p.v_strides, vs, sizeof vs);
  int64_t longest = 0;
  for (int64_t n : c.seqlens) longest = std::max(longest, n);
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.L = L, p.S = longest, p.E = E, p.Ev = Ev;
  p.scale = 1.0f / std::sqrt((float)E);
  p.window_left = c.left, p.window_right = c.right;
  p.softcap = c.softcap;
  if (c.alibi) p.alibi_slopes = slopes.data();
  p.seqlens_k = c.dense ? nullptr : c.seqlens.data();
  p.diagonal_offset = c.diagonal;
  for (int64_t n : c.seqlens) expect(!c.dense || n == cap, tag + ": a dense case's lengths are its capacity");
  // paged: batch b's key block j is page table[b][j], the pages shuffled; key
  // n of batch b then sits at row table[b][n / ps] * ps + n % ps of the caches'
  // [pages * ps, Hkv, D] rows, which the reference reads through key_at
  std::vector<int64_t> table(B * per_batch);
  for (int64_t x = 0; x < B * per_batch; ++x) table[x] = (x * 7 + 3) % (B * per_batch);  // a permutation (7 coprime)
  if (ps > 0) {
    p.block_table = table.data(), p.block_table_stride = per_batch, p.page_size = ps;
    const int64_t kp[3] = {ps * Hkv * E, E, Hkv * E}, vp[3] = {ps * Hkv * Ev, Ev, Hkv * Ev};
    std::memcpy(p.k_strides, kp, sizeof kp), std::memcpy(p.v_strides, vp, sizeof vp);
  }
  const auto key_at = [&](int64_t b, int64_t n) {  // row of key n of batch b in the [rows, Hkv, D] caches
    return ps > 0 ? table[b * per_batch + n / ps] * ps + n % ps : b * cap + n;
  };
  std::vector<A> lse(B * Hq * L);
  p.out = out.p, p.lse = lse.data();
  const bool decode = ps > 0 || Hq / Hkv * L <= 16;
  std::vector<A> split_out, split_lse;
  if (decode) {
    p.keys_per_split = c.keys_per_split > 0 ? c.keys_per_split : std::max<int64_t>(1, longest);
    p.splits = std::max<int64_t>(1, (longest + p.keys_per_split - 1) / p.keys_per_split);
    split_out.assign(p.splits * B * Hq * L * Ev, A(NAN)), split_lse.assign(p.splits * B * Hq * L, A(NAN));
    p.split_out = split_out.data(), p.split_lse = split_lse.data();
    cudaError_t e = cudaErrorInvalidValue;
    switch (attention_head_dim_bucket(std::max(E, Ev))) {
      case 64: e = launch_attention_decode<T, 64>(p, nullptr); break;
      case 128: e = launch_attention_decode<T, 128>(p, nullptr); break;
      case 256: e = launch_attention_decode<T, 256>(p, nullptr); break;
    }
    expect(e == cudaSuccess, tag + ": decode launch");
  } else {
    expect(launch<T, true>(p) == cudaSuccess, tag + ": forward launch");
  }
  const double scale = p.scale;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t S = c.seqlens[b];
    std::vector<double> P(S);
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / (Hq / Hkv);
      for (int64_t i = 0; i < L; ++i) {
        const int64_t pos = i + (c.dense ? c.diagonal : S - L), row = (b * Hq + h) * L + i;
        double mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          if ((c.left >= 0 && j < pos - c.left) || (c.right >= 0 && j > pos + c.right)) { P[j] = -INFINITY; continue; }
          double x = 0;
          for (int64_t e = 0; e < E; ++e)
            x += to_d(q.p[(b * L + i) * Hq * E + h * E + e]) * to_d(k.p[key_at(b, j) * Hkv * E + hk * E + e]);
          x *= scale;
          if (c.softcap > 0) x = c.softcap * std::tanh(x / c.softcap);
          if (c.alibi) x -= slopes[h] * std::fabs(double(pos - j));
          P[j] = x;
          mx = std::max(mx, x);
        }
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += P[j] = mx == -INFINITY ? 0 : std::exp(P[j] - mx);
        const double want_lse = sum > 0 ? mx + std::log(sum) : -INFINITY;
        expect(std::isinf(want_lse) ? lse[row] == want_lse : std::fabs(lse[row] - want_lse) <= tol * (1 + std::fabs(want_lse)),
               tag + ": lse of batch " + std::to_string(b) + " head " + std::to_string(h) + " row " + std::to_string(i) +
                   " got " + std::to_string(lse[row]) + " want " + std::to_string(want_lse));
        for (int64_t e = 0; e < Ev; ++e) {
          double o = 0;
          for (int64_t j = 0; j < S; ++j) o += (sum > 0 ? P[j] / sum : 0) * to_d(v.p[key_at(b, j) * Hkv * Ev + hk * Ev + e]);
          const double got = to_d(out.p[row * Ev + e]);
          worst_out = std::max(worst_out, std::fabs(got - o) / (tol * (1 + std::fabs(o))));
          expect(std::fabs(got - o) <= tol * (1 + std::fabs(o)), tag + ": out of batch " + std::to_string(b) +
                                                                     " head " + std::to_string(h) + " row " +
                                                                     std::to_string(i) + " got " + std::to_string(got) +
                                                                     " want " + std::to_string(o));
        }
      }
    }
  }
}

template <typename T>
void run_kvcache_all(double tol, bool quick = false) {
  // one token, GQA 4:1, batches of different lengths (an empty cache, one past a split, the whole capacity)
  KvCase one{{0, 129, 300}, 8, 2, 1, 300, 128, 128};
  one.right = 0, one.keys_per_split = 64;
  run_kvcache_case<T>(one, tol);
  if (quick) return;
  KvCase unsplit{{37, 5}, 4, 4, 1, 64, 64, 64};  // MHA, one split
  run_kvcache_case<T>(unsplit, tol);
  KvCase several{{90, 200}, 6, 2, 3, 256, 64, 48};  // 3 queries (speculative), 9 rows, Ev < E
  several.right = 0, several.left = 40, several.keys_per_split = 50;
  run_kvcache_case<T>(several, tol);
  KvCase shaped{{150, 33, 1}, 4, 1, 2, 160, 256, 256};  // MQA at head dim 256: two row groups
  shaped.right = 0, shaped.softcap = 3.f, shaped.alibi = true, shaped.keys_per_split = 64;
  run_kvcache_case<T>(shaped, tol);
  KvCase prefill{{70, 130}, 4, 2, 20, 160, 64, 64};  // 40 rows per key head: the forward kernels
  prefill.right = 0, prefill.alibi = true;
  run_kvcache_case<T>(prefill, tol);
  KvCase top_left{{200, 200}, 8, 2, 3, 200, 64, 64};  // dense, causal from the top left: row i sees keys 0..i
  top_left.dense = true, top_left.right = 0, top_left.keys_per_split = 64;
  run_kvcache_case<T>(top_left, tol);
  KvCase dense_mqa{{333}, 4, 1, 2, 333, 128, 128};  // dense, bottom-right, softcap and ALiBi
  dense_mqa.dense = true, dense_mqa.diagonal = 331, dense_mqa.right = 0, dense_mqa.softcap = 2.f;
  dense_mqa.alibi = true, dense_mqa.keys_per_split = 100;
  run_kvcache_case<T>(dense_mqa, tol);
  for (int ps : {16, 48}) {  // paged, pages shuffled, splits across page boundaries
    KvCase paged{{0, 100, 157}, 8, 2, 2, 160, 64, 64};
    paged.right = 0, paged.keys_per_split = 40, paged.page_size = ps;
    run_kvcache_case<T>(paged, tol);
  }
}

// The op's rule for reading a tensor in place (launchers.h): a contiguous
// view at an odd storage offset must be refused, so that it gets copied.
static void check_layout_rule() {
  Buffer<uint16_t> t(8 * 64 + 8);
  const int64_t sizes[2] = {8, 64}, strides[2] = {64, 1};
  expect(attention_readable_in_chunks(t.p, 2, sizes, strides), "layout rule: aligned and contiguous");
  expect(!attention_readable_in_chunks(t.p + 1, 2, sizes, strides), "layout rule: contiguous at an odd offset");
  const int64_t odd_row_stride[2] = {69, 1}, gapped[2] = {72, 1}, one_row_sizes[2] = {1, 64};
  expect(!attention_readable_in_chunks(t.p, 2, sizes, odd_row_stride), "layout rule: odd row stride");
  expect(attention_readable_in_chunks(t.p, 2, sizes, gapped), "layout rule: row stride a multiple of 8");
  expect(attention_readable_in_chunks(t.p, 2, one_row_sizes, odd_row_stride), "layout rule: one row, any stride");
  const int64_t narrow_sizes[2] = {8, 60}, strided_cols[2] = {128, 2};
  expect(!attention_readable_in_chunks(t.p, 2, narrow_sizes, strides), "layout rule: width not a multiple of 8");
  expect(!attention_readable_in_chunks(t.p, 2, sizes, strided_cols), "layout rule: strided last dim");
}

// And the emulation refuses the kernels' 16-byte copies of a misaligned
// grad_out (in a child process: the check aborts), as the GPU would fault.
static void check_misaligned_grad_out_is_refused() {
  std::fflush(stdout);
  int fds[2];
  if (pipe(fds) != 0) { expect(false, "pipe"); return; }
  const pid_t child = fork();
  if (child == 0) {
    dup2(fds[1], 2);
    Case c{1, 1, 1, 20, 30, 64, 64};
    c.misaligned_grad_out = true;
    run_case<__nv_bfloat16>(c, 6e-3);
    _exit(0);
  }
  close(fds[1]);
  std::string said;
  char buf[256];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) said.append(buf, n);
  close(fds[0]);
  int status = 0;
  waitpid(child, &status, 0);
  expect(!(WIFEXITED(status) && WEXITSTATUS(status) == 0) && said.find("cp.async 16-byte alignment") != std::string::npos,
         "a misaligned grad_out is refused by the emulation's alignment check; the child said: " + said);
}

// Every case for one dtype; `quick` keeps the head dims and one case per feature.
template <typename T>
void run_all(double tol, bool quick = false) {
  // head dims: every bucket, padded (E < bucket) and E != Ev
  for (auto [E, Ev] : {std::pair{64, 64}, {8, 8}, {40, 40}, {128, 128}, {80, 96}, {256, 256}, {160, 192}, {64, 128}})
    run_case<T>(Case{1, 2, 1, 17, 33, E, Ev}, tol);
  // Empty ranges: key tiles no query reaches and query tiles that reach no
  // key. The kernels must still drain their copies and write zeros.
  for (auto [E, L, S, left, right] : {std::tuple{64, 67, 131, -1, 0},    // top-left causal, S > L: last key tile idle
                                      std::tuple{256, 67, 131, -1, 0},   // the same with 16-row SIMT tiles
                                      std::tuple{64, 40, 200, 5, 5},     // a narrow window: key tiles past 45 idle
                                      std::tuple{128, 200, 40, 3, 3},    // and query tiles past 43 see no key
                                      std::tuple{64, 1, 131, -1, 0},     // L = 1, causal: one key allowed
                                      std::tuple{64, 1, 100, -1, -1}}) { // L = 1, full
    Case c{1, 2, 1, L, S, E, E};
    c.left = left, c.right = right;
    run_case<T>(c, tol);
    if (quick) break;
  }
  if (quick) {
    Case c{1, 4, 2, 40, 70, 64, 64};
    c.right = 0, c.bottom_right = true, c.mask = Mask::kBool, c.dropout = 0.2f;
    run_case<T>(c, tol);
    Case padded{2, 2, 1, 40, 100, 64, 64};
    padded.mask = Mask::kKeyPadding, padded.last_valid = 5;
    run_case<T>(padded, tol);
    Case shaped{2, 4, 2, 40, 70, 64, 64};
    shaped.right = 0, shaped.bottom_right = true, shaped.softcap = 2.f, shaped.alibi = 2, shaped.peak = 3;
    run_case<T>(shaped, tol);
    return;
  }
  run_case<T>(Case{1, 1, 1, 1, 1, 64, 64}, tol);
  run_case<T>(Case{2, 2, 2, 113, 203, 64, 64}, tol);
  run_case<T>(Case{1, 1, 1, 127, 255, 128, 128}, tol);
  run_case<T>(Case{1, 1, 1, 100, 33, 64, 64}, tol);
  Case causal{1, 2, 2, 70, 70, 64, 64};
  causal.right = 0;  // top-left causal
  run_case<T>(causal, tol);
  Case causal_br{1, 2, 2, 40, 130, 64, 64};
  causal_br.right = 0, causal_br.bottom_right = true;
  run_case<T>(causal_br, tol);
  Case causal_tl_short{1, 1, 1, 130, 40, 64, 64};  // rows past the last key: nothing to attend... except j <= i
  causal_tl_short.right = 0, causal_tl_short.bottom_right = true;  // the first 90 rows see no key
  run_case<T>(causal_tl_short, tol);
  for (auto [L, S] : {std::pair{1, 65}, {3, 129}}) {  // decoding: the last allowed key opens a tile
    Case decode{1, 2, 1, L, S, 64, 64};
    decode.right = 0, decode.bottom_right = true;
    run_case<T>(decode, tol);
  }
  Case window{1, 1, 1, 150, 150, 64, 64};
  window.left = 20, window.right = 5;
  run_case<T>(window, tol);
  for (Mask m : {Mask::kBool, Mask::kFloat, Mask::kKeyPadding}) {
    Case masked{2, 2, 1, 45, 77, 64, 64};
    masked.mask = m;
    run_case<T>(masked, tol);
  }
  Case padded{2, 2, 1, 70, 200, 64, 64};  // the last batch keeps 10 keys: its later key tiles are skipped
  padded.mask = Mask::kKeyPadding, padded.last_valid = 10;
  run_case<T>(padded, tol);
  run_case<T>(Case{1, 4, 2, 33, 65, 64, 64}, tol);  // GQA
  run_case<T>(Case{2, 3, 1, 20, 70, 128, 128}, tol);  // MQA
  for (double peak : {1.0, 3.0}) {
    Case dropout{1, 2, 2, 66, 80, 64, 64};
    dropout.dropout = 0.3f, dropout.peak = peak;
    run_case<T>(dropout, tol);
  }
  Case peaky{1, 2, 1, 50, 90, 64, 64};
  peaky.peak = 3;
  run_case<T>(peaky, tol);
  Case strided{2, 2, 2, 30, 50, 64, 64};
  strided.strided = true;
  run_case<T>(strided, tol);
  // Gemma 2's softcap (peaky scores, so that it bends them) and ALiBi, alone
  // and together with causality, a window, a float mask and dropout
  Case capped{1, 2, 1, 50, 90, 64, 64};
  capped.softcap = 1.5f, capped.peak = 3;
  run_case<T>(capped, tol);
  Case alibi{2, 4, 2, 70, 130, 128, 128};
  alibi.alibi = 1, alibi.right = 0, alibi.bottom_right = true;
  run_case<T>(alibi, tol);
  Case both{2, 2, 2, 45, 77, 64, 64};
  both.softcap = 2.f, both.alibi = 2, both.peak = 3, both.mask = Mask::kFloat, both.left = 30;
  run_case<T>(both, tol);
  Case both_dropout{1, 2, 1, 66, 80, 256, 256};
  both_dropout.softcap = 3.f, both_dropout.alibi = 1, both_dropout.dropout = 0.3f, both_dropout.peak = 3;
  run_case<T>(both_dropout, tol);
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--quick") {  // the race check's set (ThreadSanitizer): each kernel family
    run_all<__nv_bfloat16>(6e-3, /*quick=*/true);
    run_all<float>(5e-6, /*quick=*/true);
    run_varlen_all<__nv_bfloat16>(6e-3, /*quick=*/true);
    run_varlen_all<float>(5e-6, /*quick=*/true);
    run_kvcache_all<__nv_bfloat16>(6e-3, /*quick=*/true);
    std::printf("%d checks, %d failures\n", checks, failures);
    return failures != 0;
  }
  check_misaligned_grad_out_is_refused();  // first: fork before this process has run any threads
  check_layout_rule();
  check_fragments();
  run_all<__nv_bfloat16>(6e-3);
  run_varlen_all<__nv_bfloat16>(6e-3);
  run_kvcache_all<__nv_bfloat16>(6e-3);
  std::printf("bf16: worst error %.3f of the tolerance (output), %.3f (gradients)\n", worst_out, worst_grad);
  worst_out = worst_grad = 0;
  run_all<__half>(1e-3);
  std::printf("fp16: worst error %.3f of the tolerance (output), %.3f (gradients)\n", worst_out, worst_grad);
  worst_out = worst_grad = 0;
  run_all<float>(5e-6);
  run_varlen_all<float>(5e-6);
  run_kvcache_all<float>(5e-6);
  std::printf("fp32: worst error %.3f of the tolerance (output), %.3f (gradients)\n", worst_out, worst_grad);
  worst_out = worst_grad = 0;
  run_all<double>(1e-13, /*quick=*/true);
  run_varlen_all<double>(1e-13, /*quick=*/true);
  run_kvcache_all<double>(1e-13);
  std::printf("fp64: worst error %.3f of the tolerance (output), %.3f (gradients)\n", worst_out, worst_grad);
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures != 0;
}
