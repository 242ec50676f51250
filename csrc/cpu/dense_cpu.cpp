// CPU dense + activation: ATen's BLAS for the GEMM, bias folded into it, and
// the activation in one vectorized pass over the output, rows split over
// threads; backward fuses the activation gradient with the bias reduction.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../include/dense_common.h"

namespace bigkernels {
namespace {

// The float loops are compiled for several x86 ISA levels and picked at load
// time, so a plain x86-64 build still runs AVX2/AVX-512 code where it can.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BK_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define BK_CPU_CLONES
#endif
#define BK_ALWAYS_INLINE inline __attribute__((always_inline))

// ---- row loops: T is float or double; the caller converts bf16/half rows ----

// y[j] = act(z[j]) (y may be z), or act(z[j]) * z[nout + j] when gated.
template <typename T>
BK_ALWAYS_INLINE void forward_row(Activation act, const T* z, T* y, int64_t nout) {
  const bool gated = is_gated(act);
  dispatch_activation(inner_activation(act), [&](auto tag) __attribute__((always_inline)) {
    constexpr Activation A = decltype(tag)::value;
    if (gated) {
#pragma omp simd
      for (int64_t j = 0; j < nout; ++j) y[j] = act_forward<A>(z[j]) * z[nout + j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < nout; ++j) y[j] = act_forward<A>(z[j]);
    }
  });
}

// dz = g * act'(...) from the saved row s (output or pre-activation, width
// nout or 2*nout when gated); dbias += dz when dbias is not null.
template <typename T, typename Acc>
BK_ALWAYS_INLINE void backward_row(Activation act, bool saved_is_output, const T* g, const T* s,
                                   T* dz, Acc* dbias, int64_t nout) {
  if (saved_is_output) {
    dispatch_output_activation(act, [&](auto tag) __attribute__((always_inline)) {
      constexpr Activation A = decltype(tag)::value;
#pragma omp simd
      for (int64_t j = 0; j < nout; ++j) dz[j] = g[j] * act_grad_from_output<A>(s[j]);
    });
  } else if (is_gated(act)) {
    dispatch_activation(inner_activation(act), [&](auto tag) __attribute__((always_inline)) {
      constexpr Activation A = decltype(tag)::value;
#pragma omp simd
      for (int64_t j = 0; j < nout; ++j) {
        const T z1 = s[j], z2 = s[nout + j];
        dz[j] = g[j] * z2 * act_grad_from_input<A>(z1);
        dz[nout + j] = g[j] * act_forward<A>(z1);
      }
    });
  } else {
    dispatch_activation(act, [&](auto tag) __attribute__((always_inline)) {
      constexpr Activation A = decltype(tag)::value;
#pragma omp simd
      for (int64_t j = 0; j < nout; ++j) dz[j] = g[j] * act_grad_from_input<A>(s[j]);
    });
  }
  if (dbias != nullptr) {
    const int64_t width = is_gated(act) ? 2 * nout : nout;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) dbias[j] += static_cast<Acc>(dz[j]);
  }
}

// The row loops as called: float through the ISA clones, double as is.
BK_CPU_CLONES void activation_forward_row(Activation act, const float* z, float* y, int64_t nout) {
  forward_row<float>(act, z, y, nout);
}
void activation_forward_row(Activation act, const double* z, double* y, int64_t nout) {
  forward_row<double>(act, z, y, nout);
}
BK_CPU_CLONES void activation_backward_row(Activation act, bool saved_is_output, const float* g,
                                           const float* s, float* dz, float* dbias, int64_t nout) {
  backward_row<float, float>(act, saved_is_output, g, s, dz, dbias, nout);
}
void activation_backward_row(Activation act, bool saved_is_output, const double* g, const double* s,
                             double* dz, double* dbias, int64_t nout) {
  backward_row<double, double>(act, saved_is_output, g, s, dz, dbias, nout);
}

// float for float/bf16/half, double for double.
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
constexpr bool kNeedsConversion = !std::is_same_v<scalar_t, compute_t<scalar_t>>;

template <typename From, typename To>
BK_ALWAYS_INLINE void convert(const From* src, To* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<To>(src[j]);
}

// bf16 <-> fp32 by bit manipulation (round to nearest even, as c10 does), so
// that these loops vectorize too.
BK_CPU_CLONES void convert(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(bits[j]) << 16;
    std::memcpy(dst + j, &u, sizeof u);
  }
}
BK_CPU_CLONES void convert(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    std::memcpy(&u, src + j, sizeof u);
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    bits[j] = src[j] != src[j] ? uint16_t{0x7FC0} : rounded;  // NaN stays a quiet NaN
  }
}

// Rows [r0, r1) of the activation epilogue: out = act(z) (z is [rows, nz]).
template <typename scalar_t>
void forward_rows(Activation act, const scalar_t* z, scalar_t* out, int64_t r0, int64_t r1,
                  int64_t nz, int64_t nout) {
  using C = compute_t<scalar_t>;
  std::vector<C> zbuf(kNeedsConversion<scalar_t> ? nz : 0), ybuf(zbuf.size() ? nout : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* zr = z + r * nz;
    scalar_t* yr = out + r * nout;
    if constexpr (kNeedsConversion<scalar_t>) {
      convert(zr, zbuf.data(), nz);
      activation_forward_row(act, zbuf.data(), ybuf.data(), nout);
      convert(ybuf.data(), yr, nout);
    } else {
      activation_forward_row(act, zr, yr, nout);
    }
  }
}

// Rows [r0, r1) of the activation backward: dz = g * act'(saved), and the
// column sums of dz added to dbias (when not null).
template <typename scalar_t>
void backward_rows(Activation act, bool saved_is_output, const scalar_t* g, const scalar_t* saved,
                   scalar_t* dz, compute_t<scalar_t>* dbias, int64_t r0, int64_t r1, int64_t ns,
                   int64_t nz, int64_t nout) {
  using C = compute_t<scalar_t>;
  std::vector<C> gbuf, sbuf, dbuf;
  if constexpr (kNeedsConversion<scalar_t>) gbuf.resize(nout), sbuf.resize(ns), dbuf.resize(nz);
  for (int64_t r = r0; r < r1; ++r) {
    if constexpr (kNeedsConversion<scalar_t>) {
      convert(g + r * nout, gbuf.data(), nout);
      convert(saved + r * ns, sbuf.data(), ns);
      activation_backward_row(act, saved_is_output, gbuf.data(), sbuf.data(), dbuf.data(), dbias, nout);
      convert(dbuf.data(), dz + r * nz, nz);
    } else {
      activation_backward_row(act, saved_is_output, g + r * nout, saved + r * ns, dz + r * nz, dbias, nout);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> dense_forward_cpu(const at::Tensor& input,
                                                     const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     c10::string_view activation,
                                                     bool save_preactivation) {
  const Activation act = parse_activation(activation);
  const DenseShape s = check_dense_args(input, weight, bias, act);
  const at::Tensor x = input.reshape({s.M, s.K}).contiguous();
  const at::Tensor wt = weight.contiguous().t();
  // One GEMM with the bias folded in, which BLAS parallelises well, then the
  // activation in one parallel pass. Splitting the GEMM into blocks of rows
  // so that each block's activation runs while it is in L2 was slower here:
  // BLAS packs the weight again for every block (docs/PERFORMANCE.md).
  at::Tensor z = bias.has_value() ? at::addmm(*bias, x, wt) : at::mm(x, wt);
  // Without a pre-activation to keep, the activation runs in place.
  const bool in_place = !is_gated(act) && !save_preactivation;
  at::Tensor out = in_place ? z : at::empty({s.M, s.Nout}, x.options());
  const bool has_epilogue = !(in_place && act == Activation::kNone);

  if (has_epilogue) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dense_forward_cpu", [&] {
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, s.M, 16, [&](int64_t r0, int64_t r1) {
        forward_rows<scalar_t>(act, zp, op, r0, r1, s.Nz, s.Nout);
      });
    });
  }

  at::Tensor preact = save_preactivation ? z.view(leading_shape_with(input, s.Nz))
                                         : at::empty({0}, x.options());
  return {out.view(leading_shape_with(input, s.Nout)), preact};
}

void activation_backward_cpu(const at::Tensor& grad_out, const at::Tensor& saved, Activation act,
                             bool saved_is_output, at::Tensor& grad_preact,
                             at::Tensor* grad_bias) {
  const int64_t M = grad_out.size(0), nout = grad_out.size(1), nz = grad_preact.size(1);
  const int64_t ns = saved.size(1);
  const int num_threads = at::get_num_threads();
  // One partial bias sum per thread, added up at the end.
  at::Tensor partial;
  if (grad_bias) partial = at::zeros({num_threads, nz}, grad_bias->options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "activation_backward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* sv = saved.const_data_ptr<scalar_t>();
    scalar_t* dz = grad_preact.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
      C* dbias = grad_bias ? partial.mutable_data_ptr<C>() + at::get_thread_num() * nz : nullptr;
      backward_rows(act, saved_is_output, g, sv, dz, dbias, r0, r1, ns, nz, nout);
    });
  });
  if (grad_bias) *grad_bias = partial.sum(at::IntArrayRef{0});
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("dense_forward", &dense_forward_cpu);
  m.impl("dense_backward", &dense_backward<&activation_backward_cpu>);
}

}  // namespace bigkernels
