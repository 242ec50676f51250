// Activation functions and their derivatives, written once for every kernel:
// the CUDA kernels run them on float/double scalars, the CPU kernels on
// at::vec::Vectorized (csrc/common/vec_math.h supplies the MathOps for those).
//
// This header is deliberately free of torch headers: it is included by .cu
// files, whose compile time the torch headers would dominate.
//
// Infinities: wherever the true limit at +-inf is finite, the result is that
// limit (silu(-inf) = 0, gelu(-inf) = 0, gelu'(+-inf) = 1 or 0, ...), where
// torch's formulas give NaN (inf * 0). NaN in gives NaN out. sigmoid is
// computed from exp(-|z|), so it neither overflows nor flushes: sigmoid(-100)
// is 3.7e-44 (a float denormal), where torch gives 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>

#if defined(__CUDACC__)
#define BK_HD __host__ __device__ __forceinline__
#else
#define BK_HD inline __attribute__((always_inline))
#endif

namespace bigkernels {

// The one list of activations: X(python name, enum name). The order is part
// of nothing public: Python passes activations by name. bigkernels/reference.py
// holds the Python list; tests/test_dense.py checks that the two agree.
#define BK_FOR_EACH_ACTIVATION(X) \
  X(none, kNone)                  \
  X(relu, kReLU)                  \
  X(gelu, kGELU) /* exact: z * Phi(z), with erf */ \
  X(gelu_tanh, kGELUTanh) /* tanh approximation */ \
  X(silu, kSiLU)                  \
  X(sigmoid, kSigmoid)            \
  X(tanh, kTanh)                  \
  X(swiglu, kSwiGLU) /* gated: silu(first half) * second half */ \
  X(geglu, kGEGLU)   /* gated: gelu(first half) * second half */

enum class Activation : int {
#define BK_ENUM(name, value) value,
  BK_FOR_EACH_ACTIVATION(BK_ENUM)
#undef BK_ENUM
};

// Reached only if an Activation holds a value outside the enum, which
// parse_activation() makes impossible: loud, never a silent identity.
[[noreturn]] BK_HD void unreachable_activation() {
#if defined(__CUDA_ARCH__) && defined(__CUDACC__)
  __trap();
  __builtin_unreachable();
#else
  std::abort();
#endif
}

BK_HD constexpr bool is_gated(Activation a) {
  return a == Activation::kSwiGLU || a == Activation::kGEGLU;
}

// The elementwise activation applied inside a gated one (or itself).
BK_HD constexpr Activation inner_activation(Activation a) {
  if (a == Activation::kSwiGLU) return Activation::kSiLU;
  if (a == Activation::kGEGLU) return Activation::kGELU;
  return a;
}

// True where the derivative can be computed from the activation's output
// alone, so backward can keep the output (which the caller holds anyway)
// instead of the pre-activation. Python: reference.DERIVATIVE_FROM_OUTPUT.
BK_HD bool derivative_from_output(Activation a) {
  return a == Activation::kNone || a == Activation::kReLU ||
         a == Activation::kSigmoid || a == Activation::kTanh;
}

// The few primitives the formulas below need, for float and double (host and
// device). csrc/common/vec_math.h specializes MathOps for at::vec::Vectorized.
// Every comparison is false for NaN, so each primitive passes NaN through.
template <typename T>
struct MathOps {
  static BK_HD T exp(T x) { return ::exp(x); }
  static BK_HD T erf(T x) { return ::erf(x); }
  static BK_HD T tanh(T x) { return ::tanh(x); }
  static BK_HD T abs(T x) { return x < T(0) ? T(0) - x : x; }
  static BK_HD T if_negative(T c, T a, T b) { return c < T(0) ? a : b; }
  static BK_HD T at_least(T x, T lo) { return x < lo ? lo : x; }
  static BK_HD T clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
  static BK_HD T relu(T x) { return x <= T(0) ? T(0) : x; }
  static BK_HD T step(T x) { return x <= T(0) ? T(0) : T(1); }  // relu's derivative (1 at NaN, as torch)
};
template <>
BK_HD float MathOps<float>::exp(float x) { return ::expf(x); }
template <>
BK_HD float MathOps<float>::erf(float x) { return ::erff(x); }
template <>
BK_HD float MathOps<float>::tanh(float x) { return ::tanhf(x); }

// Beyond +-kSaturate every activation and derivative has reached its limit in
// float and double alike (exp(-1e4) is 0), so clamping there turns inf * 0
// into the limit without changing any finite result.
constexpr double kSaturate = 1e4;

// 1 / (1 + exp(-z)) from exp(-|z|) <= 1: no overflow, no early flush to 0.
template <typename T>
BK_HD T stable_sigmoid(T z) {
  using M = MathOps<T>;
  const T e = M::exp(T(0) - M::abs(z));
  const T r = T(1) / (T(1) + e);
  return M::if_negative(z, e * r, r);
}

// y = act(z) for the non-gated activations (A is never a gated one).
template <Activation A, typename T>
BK_HD T act_forward(T z) {
  using M = MathOps<T>;
  if constexpr (A == Activation::kNone) {
    return z;
  } else if constexpr (A == Activation::kReLU) {
    return M::relu(z);
  } else if constexpr (A == Activation::kGELU) {
    z = M::at_least(z, T(-kSaturate));
    return T(0.5) * z * (T(1) + M::erf(z * T(0.70710678118654752440)));
  } else if constexpr (A == Activation::kGELUTanh) {
    z = M::at_least(z, T(-kSaturate));
    const T inner = T(0.79788456080286535588) * (z + T(0.044715) * z * z * z);
    return T(0.5) * z * (T(1) + M::tanh(inner));
  } else if constexpr (A == Activation::kSiLU) {
    z = M::at_least(z, T(-kSaturate));
    return z * stable_sigmoid(z);
  } else if constexpr (A == Activation::kSigmoid) {
    return stable_sigmoid(z);
  } else {
    static_assert(A == Activation::kTanh, "gated activations are not elementwise");
    return M::tanh(z);
  }
}

// d act / dz at the pre-activation z.
template <Activation A, typename T>
BK_HD T act_grad_from_input(T z) {
  using M = MathOps<T>;
  if constexpr (A == Activation::kNone) {
    return T(1);
  } else if constexpr (A == Activation::kReLU) {
    return M::step(z);
  } else if constexpr (A == Activation::kGELU) {
    z = M::clamp(z, T(-kSaturate), T(kSaturate));
    const T cdf = T(0.5) * (T(1) + M::erf(z * T(0.70710678118654752440)));
    const T pdf = T(0.39894228040143267794) * M::exp(T(-0.5) * z * z);
    return cdf + z * pdf;
  } else if constexpr (A == Activation::kGELUTanh) {
    constexpr double kBeta = 0.79788456080286535588, kKappa = 0.044715;
    z = M::clamp(z, T(-kSaturate), T(kSaturate));
    const T z2 = z * z;
    const T t = M::tanh(T(kBeta) * (z + T(kKappa) * z2 * z));
    return T(0.5) * (T(1) + t) +
           T(0.5) * z * (T(1) - t * t) * T(kBeta) * (T(1) + T(3 * kKappa) * z2);
  } else if constexpr (A == Activation::kSiLU) {
    z = M::clamp(z, T(-kSaturate), T(kSaturate));
    const T s = stable_sigmoid(z);
    return s * (T(1) + z * (T(1) - s));
  } else if constexpr (A == Activation::kSigmoid) {
    const T s = stable_sigmoid(z);
    return s * (T(1) - s);
  } else {
    static_assert(A == Activation::kTanh, "gated activations are not elementwise");
    const T t = M::tanh(z);
    return T(1) - t * t;
  }
}

// d act / dz from the output y = act(z); only where derivative_from_output(A).
template <Activation A, typename T>
BK_HD T act_grad_from_output(T y) {
  if constexpr (A == Activation::kNone) {
    return T(1);
  } else if constexpr (A == Activation::kReLU) {
    return MathOps<T>::step(y);
  } else if constexpr (A == Activation::kSigmoid) {
    return y * (T(1) - y);
  } else {
    static_assert(A == Activation::kTanh, "no derivative from the output");
    return T(1) - y * y;
  }
}

// Calls f(ActivationTag<A>{}) for the runtime value a, turning the activation
// into a template parameter once, outside the loops. Gated activations are
// dispatched by their inner activation (the caller handles the gate).
template <Activation A>
struct ActivationTag {
  static constexpr Activation value = A;
};

template <typename F>
BK_HD auto dispatch_activation(Activation a, F&& f) {
  switch (inner_activation(a)) {
    case Activation::kNone: return f(ActivationTag<Activation::kNone>{});
    case Activation::kReLU: return f(ActivationTag<Activation::kReLU>{});
    case Activation::kGELU: return f(ActivationTag<Activation::kGELU>{});
    case Activation::kGELUTanh: return f(ActivationTag<Activation::kGELUTanh>{});
    case Activation::kSiLU: return f(ActivationTag<Activation::kSiLU>{});
    case Activation::kSigmoid: return f(ActivationTag<Activation::kSigmoid>{});
    case Activation::kTanh: return f(ActivationTag<Activation::kTanh>{});
    default: unreachable_activation();
  }
}

// Dispatches only over the activations whose derivative comes from the output.
template <typename F>
BK_HD auto dispatch_output_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kNone: return f(ActivationTag<Activation::kNone>{});
    case Activation::kReLU: return f(ActivationTag<Activation::kReLU>{});
    case Activation::kSigmoid: return f(ActivationTag<Activation::kSigmoid>{});
    case Activation::kTanh: return f(ActivationTag<Activation::kTanh>{});
    default: unreachable_activation();
  }
}

}  // namespace bigkernels
