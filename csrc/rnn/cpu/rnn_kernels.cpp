// The RNN family's CPU gate loops on at::vec::Vectorized: each row's gates,
// state update and (backward) gate gradients in one pass over the hidden
// units, while the step's recurrent product is still in cache. Compiled once
// per CPU capability (setup.py; capability.h).
#include "rnn/cpu/rnn_kernels.h"

#include "common/vec_gemm.h"
#include "common/vec_math.h"

namespace bigkernels {
namespace CPU_CAPABILITY {
namespace {

// Calls f(j, n) for the vectors [j, j + n) of units [u0, u1).
template <typename V, typename F>
inline void for_each_vector(int64_t u0, int64_t u1, F&& f) {
  for (int64_t j = u0; j < u1; j += V::size()) f(j, std::min<int64_t>(V::size(), u1 - j));
}

template <typename V>
inline V load(const typename V::value_type* p, int64_t n) {
  return n == V::size() ? V::loadu(p) : V::loadu(p, n);
}
template <typename V>
inline void store(typename V::value_type* p, const V& v, int64_t n) {
  if (n == V::size()) {
    v.store(p);
  } else {
    v.store(p, static_cast<int>(n));
  }
}

template <typename C>
void forward_rows(RnnMode mode, int64_t r0, int64_t r1, int64_t u0, int64_t u1, int64_t H, const C* xproj,
                  const C* bias_x, const C* hproj, const C* bias_hh, const C* h_prev, C* h_out, C* c, C* ws) {
  using V = at::vec::Vectorized<C>;
  using M = MathOps<V>;
  const int64_t G = rnn_gates(mode), W = rnn_workspace_width(mode, H);
  for (int64_t r = r0; r < r1; ++r) {
    const C* xr = xproj + r * G * H;
    const C* hr = hproj + r * G * H;
    C* hrow = h_out + r * H;
    C* w = ws ? ws + r * W : nullptr;
    for_each_vector<V>(u0, u1, [&](int64_t j, int64_t n) {
      const auto x = [&](int64_t k) {  // gate k's input projection and bias
        const V v = load<V>(xr + k * H + j, n);
        return bias_x ? v + load<V>(bias_x + k * H + j, n) : v;
      };
      const auto gate = [&](int64_t k) { return x(k) + load<V>(hr + k * H + j, n); };
      if (mode == RnnMode::kLSTM) {
        const V i = stable_sigmoid(gate(0)), f = stable_sigmoid(gate(1)), g = M::tanh(gate(2)),
                o = stable_sigmoid(gate(3));
        const V cn = f * load<V>(c + r * H + j, n) + i * g;
        store(c + r * H + j, cn, n);
        store(hrow + j, o * M::tanh(cn), n);
        if (w) {
          store(w + j, i, n), store(w + H + j, f, n), store(w + 2 * H + j, g, n), store(w + 3 * H + j, o, n);
          store(w + 4 * H + j, cn, n);
        }
      } else if (mode == RnnMode::kGRU) {
        const auto hh = [&](int64_t k) {
          const V v = load<V>(hr + k * H + j, n);
          return bias_hh ? v + load<V>(bias_hh + k * H + j, n) : v;
        };
        const V rg = stable_sigmoid(x(0) + hh(0));
        const V z = stable_sigmoid(x(1) + hh(1));
        const V hn = hh(2);
        const V ng = M::tanh(x(2) + rg * hn);
        const V hp = load<V>(h_prev + r * H + j, n);
        store(hrow + j, ng + z * (hp - ng), n);  // (1 - z) n + z h
        if (w) store(w + j, rg, n), store(w + H + j, z, n), store(w + 2 * H + j, ng, n), store(w + 3 * H + j, hn, n);
      } else {
        const V a = gate(0);
        const V y = mode == RnnMode::kTanh ? M::tanh(a) : M::relu(a);
        store(hrow + j, y, n);
        if (w) store(w + j, y, n);
      }
    });
  }
}

template <typename C>
void backward_rows(RnnMode mode, int64_t r0, int64_t r1, int64_t u0, int64_t u1, int64_t H, C* dh, const C* grad_out,
                   const C* ws, const C* h_prev, const C* c_prev, C* dc, C* dgx, C* dgh) {
  using V = at::vec::Vectorized<C>;
  using M = MathOps<V>;
  const int64_t G = rnn_gates(mode), W = rnn_workspace_width(mode, H);
  const V one(1);
  for (int64_t r = r0; r < r1; ++r) {
    C* dhr = dh + r * H;
    const C* gor = grad_out ? grad_out + r * H : nullptr;
    const C* w = ws + r * W;
    C* gx = dgx + r * G * H;
    for_each_vector<V>(u0, u1, [&](int64_t j, int64_t n) {
      const V d = gor ? load<V>(dhr + j, n) + load<V>(gor + j, n) : load<V>(dhr + j, n);
      if (mode == RnnMode::kLSTM) {
        const V i = load<V>(w + j, n), f = load<V>(w + H + j, n), g = load<V>(w + 2 * H + j, n),
                o = load<V>(w + 3 * H + j, n), tc = M::tanh(load<V>(w + 4 * H + j, n));
        const V dct = load<V>(dc + r * H + j, n) + d * o * (one - tc * tc);
        store(gx + j, dct * g * i * (one - i), n);
        store(gx + H + j, dct * load<V>(c_prev + r * H + j, n) * f * (one - f), n);
        store(gx + 2 * H + j, dct * i * (one - g * g), n);
        store(gx + 3 * H + j, d * tc * o * (one - o), n);
        store(dc + r * H + j, dct * f, n);
      } else if (mode == RnnMode::kGRU) {
        C* gh = dgh + r * G * H;
        const V rg = load<V>(w + j, n), z = load<V>(w + H + j, n), ng = load<V>(w + 2 * H + j, n),
                hn = load<V>(w + 3 * H + j, n);
        const V dn = d * (one - z) * (one - ng * ng);  // through n's tanh
        const V dr = dn * hn * rg * (one - rg);
        const V dz = d * (load<V>(h_prev + r * H + j, n) - ng) * z * (one - z);
        store(gx + j, dr, n), store(gh + j, dr, n);
        store(gx + H + j, dz, n), store(gh + H + j, dz, n);
        store(gx + 2 * H + j, dn, n), store(gh + 2 * H + j, dn * rg, n);
        store(dhr + j, d * z, n);
      } else {
        const V y = load<V>(w + j, n);
        store(gx + j, mode == RnnMode::kTanh ? d * (one - y * y) : d * M::step(y), n);
      }
    });
  }
}

// float for float, half and bfloat16 inputs; double for double.
template <typename F>
void dispatch_accumulator(c10::ScalarType acc, F&& f) {
  switch (acc) {
    case c10::ScalarType::Float: return f(float{});
    case c10::ScalarType::Double: return f(double{});
    default: TORCH_CHECK_TYPE(false, "bigkernels.rnn: no CPU gate kernel for accumulator ", acc);
  }
}

void gemm_any(c10::ScalarType acc, int64_t m, int64_t n, int64_t k, const void* a, int64_t a_row, int64_t a_col,
              const void* b, int64_t ldb, void* c, int64_t ldc, bool accumulate) {
  dispatch_accumulator(acc, [&](auto x) {
    using C = decltype(x);
    gemm_acc(m, n, k, static_cast<const C*>(a), a_row, a_col, static_cast<const C*>(b), ldb, static_cast<C*>(c),
             ldc, accumulate);
  });
}

void forward_rows_any(c10::ScalarType acc, RnnMode mode, int64_t r0, int64_t r1, int64_t u0, int64_t u1, int64_t H,
                      const void* xproj, const void* bias_x, const void* hproj, const void* bias_hh,
                      const void* h_prev, void* h_out, void* c, void* ws) {
  dispatch_accumulator(acc, [&](auto a) {
    using C = decltype(a);
    forward_rows(mode, r0, r1, u0, u1, H, static_cast<const C*>(xproj), static_cast<const C*>(bias_x),
                 static_cast<const C*>(hproj), static_cast<const C*>(bias_hh), static_cast<const C*>(h_prev),
                 static_cast<C*>(h_out), static_cast<C*>(c), static_cast<C*>(ws));
  });
}

void backward_rows_any(c10::ScalarType acc, RnnMode mode, int64_t r0, int64_t r1, int64_t u0, int64_t u1, int64_t H,
                       void* dh, const void* grad_out, const void* ws, const void* h_prev, const void* c_prev, void* dc,
                       void* dgates_x, void* dgates_h) {
  dispatch_accumulator(acc, [&](auto a) {
    using C = decltype(a);
    backward_rows(mode, r0, r1, u0, u1, H, static_cast<C*>(dh), static_cast<const C*>(grad_out),
                  static_cast<const C*>(ws), static_cast<const C*>(h_prev), static_cast<const C*>(c_prev),
                  static_cast<C*>(dc), static_cast<C*>(dgates_x), static_cast<C*>(dgates_h));
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY

extern const RnnCpuKernels BK_CAPABILITY_NAME(rnn_cpu_kernels) = {
    4 * at::vec::Vectorized<float>::size(),  // gemm_acc's column tile
#if defined(CPU_CAPABILITY_DEFAULT)
    false,
#else
    true,
#endif
    &CPU_CAPABILITY::gemm_any,
    &CPU_CAPABILITY::forward_rows_any,
    &CPU_CAPABILITY::backward_rows_any,
};

}  // namespace bigkernels
