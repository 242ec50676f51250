// Activation functions and their derivatives, written once for the CPU and
// CUDA kernels so that both compute the same thing.
//
// This header is deliberately free of torch headers: it is included by .cu
// files, whose compile time the torch headers would dominate.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define BK_HD __host__ __device__ __forceinline__
#else
#define BK_HD inline __attribute__((always_inline))
#endif

namespace bigkernels {

// The order is part of nothing public: Python passes activations by name.
enum class Activation : int {
  kNone = 0,
  kReLU,
  kGELU,      // exact: z * Phi(z), with erf
  kGELUTanh,  // tanh approximation
  kSiLU,
  kSigmoid,
  kTanh,
  kSwiGLU,  // gated: silu(first half) * second half
  kGEGLU,   // gated: gelu(first half) * second half
};

BK_HD bool is_gated(Activation a) {
  return a == Activation::kSwiGLU || a == Activation::kGEGLU;
}

// The elementwise activation applied inside a gated one (or itself).
BK_HD Activation inner_activation(Activation a) {
  if (a == Activation::kSwiGLU) return Activation::kSiLU;
  if (a == Activation::kGEGLU) return Activation::kGELU;
  return a;
}

// True where the derivative can be computed from the activation's output
// alone, so backward can keep the output (which the caller holds anyway)
// instead of the pre-activation. Python's ops/dense.py mirrors this list.
BK_HD bool derivative_from_output(Activation a) {
  return a == Activation::kNone || a == Activation::kReLU ||
         a == Activation::kSigmoid || a == Activation::kTanh;
}

namespace math {

#if !defined(__CUDA_ARCH__)
// Host float versions written without calls or branches so that the CPU
// loops vectorize (glibc's scalar expf/erff would not).
BK_HD float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// exp(x) by Cody-Waite range reduction and the Cephes polynomial; ~1 ulp.
BK_HD float host_expf(float x) {
  x = x > 88.3f ? 88.3f : x;  // keep 2^n finite
  x = x < -87.3f ? -87.3f : x;  // and normal
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to int
  float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, the
// same formula ATen's vectorized erf uses): short enough to keep GELU cheap.
BK_HD float host_erff(float x) {
  float z = x < 0.0f ? -x : x;
  float t = 1.0f / (1.0f + 0.3275911f * z);
  float poly = t * (0.254829592f +
                    t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  float r = 1.0f - poly * host_expf(-z * z);
  return x < 0.0f ? -r : r;
}

// tanh(x): Cephes' odd polynomial near 0 (where 1 - 2/(e^2x + 1) would
// cancel), the exp form elsewhere.
BK_HD float host_tanhf(float x) {
  float z = x < 0.0f ? -x : x;
  float x2 = x * x;
  float small =
      ((((-5.70498872745e-3f * x2 + 2.06390887954e-2f) * x2 - 5.37397155531e-2f) * x2 +
        1.33314422036e-1f) * x2 - 3.33332819422e-1f) * x2 * x + x;
  float large = 1.0f - 2.0f / (host_expf(2.0f * z) + 1.0f);
  large = x < 0.0f ? -large : large;
  return z < 0.625f ? small : large;
}
#endif

BK_HD float exp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return host_expf(x);
#endif
}
BK_HD float erf(float x) {
#if defined(__CUDA_ARCH__)
  return ::erff(x);
#else
  return host_erff(x);
#endif
}
BK_HD float tanh(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  return host_tanhf(x);
#endif
}
BK_HD double exp(double x) { return ::exp(x); }
BK_HD double erf(double x) { return ::erf(x); }
BK_HD double tanh(double x) { return ::tanh(x); }

}  // namespace math

// y = act(z) for the non-gated activations (A is never a gated one).
template <Activation A, typename T>
BK_HD T act_forward(T z) {
  constexpr T kHalf = T(0.5), kOne = T(1);
  if constexpr (A == Activation::kNone) {
    return z;
  } else if constexpr (A == Activation::kReLU) {
    return z > T(0) ? z : (z != z ? z : T(0));  // NaN stays NaN, as in torch
  } else if constexpr (A == Activation::kGELU) {
    return kHalf * z * (kOne + math::erf(z * T(0.70710678118654752440)));
  } else if constexpr (A == Activation::kGELUTanh) {
    T inner = T(0.79788456080286535588) * (z + T(0.044715) * z * z * z);
    return kHalf * z * (kOne + math::tanh(inner));
  } else if constexpr (A == Activation::kSiLU) {
    return z / (kOne + math::exp(-z));
  } else if constexpr (A == Activation::kSigmoid) {
    return kOne / (kOne + math::exp(-z));
  } else {
    static_assert(A == Activation::kTanh, "gated activations are not elementwise");
    return math::tanh(z);
  }
}

// d act / dz at the pre-activation z.
template <Activation A, typename T>
BK_HD T act_grad_from_input(T z) {
  constexpr T kHalf = T(0.5), kOne = T(1);
  if constexpr (A == Activation::kNone) {
    return kOne;
  } else if constexpr (A == Activation::kReLU) {
    return z > T(0) ? kOne : T(0);
  } else if constexpr (A == Activation::kGELU) {
    T cdf = kHalf * (kOne + math::erf(z * T(0.70710678118654752440)));
    T pdf = T(0.39894228040143267794) * math::exp(-kHalf * z * z);
    return cdf + z * pdf;
  } else if constexpr (A == Activation::kGELUTanh) {
    constexpr T kBeta = T(0.79788456080286535588), kKappa = T(0.044715);
    T t = math::tanh(kBeta * (z + kKappa * z * z * z));
    return kHalf * (kOne + t) +
           kHalf * z * (kOne - t * t) * kBeta * (kOne + T(3) * kKappa * z * z);
  } else if constexpr (A == Activation::kSiLU) {
    T s = kOne / (kOne + math::exp(-z));
    return s * (kOne + z * (kOne - s));
  } else if constexpr (A == Activation::kSigmoid) {
    T s = kOne / (kOne + math::exp(-z));
    return s * (kOne - s);
  } else {
    static_assert(A == Activation::kTanh, "gated activations are not elementwise");
    T t = math::tanh(z);
    return kOne - t * t;
  }
}

// d act / dz from the output y = act(z); only where derivative_from_output(A).
template <Activation A, typename T>
BK_HD T act_grad_from_output(T y) {
  if constexpr (A == Activation::kNone) {
    return T(1);
  } else if constexpr (A == Activation::kReLU) {
    return y > T(0) ? T(1) : T(0);
  } else if constexpr (A == Activation::kSigmoid) {
    return y * (T(1) - y);
  } else {
    static_assert(A == Activation::kTanh, "no derivative from the output");
    return T(1) - y * y;
  }
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime value a,
// turning the activation into a template parameter once, outside the loops.
template <Activation A>
struct ActivationTag {
  static constexpr Activation value = A;
};

template <typename F>
BK_HD auto dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kReLU: return f(ActivationTag<Activation::kReLU>{});
    case Activation::kGELU: return f(ActivationTag<Activation::kGELU>{});
    case Activation::kGELUTanh: return f(ActivationTag<Activation::kGELUTanh>{});
    case Activation::kSiLU: return f(ActivationTag<Activation::kSiLU>{});
    case Activation::kSigmoid: return f(ActivationTag<Activation::kSigmoid>{});
    case Activation::kTanh: return f(ActivationTag<Activation::kTanh>{});
    default: return f(ActivationTag<Activation::kNone>{});
  }
}

// Dispatches only over the activations whose derivative comes from the output.
template <typename F>
BK_HD auto dispatch_output_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kReLU: return f(ActivationTag<Activation::kReLU>{});
    case Activation::kSigmoid: return f(ActivationTag<Activation::kSigmoid>{});
    case Activation::kTanh: return f(ActivationTag<Activation::kTanh>{});
    default: return f(ActivationTag<Activation::kNone>{});
  }
}

}  // namespace bigkernels
