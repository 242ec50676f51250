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

// ---- row loops over the storage type T, computing in float (double for double) ----

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
BK_ALWAYS_INLINE compute_t<T> load(const T* p, int64_t j) {
  return static_cast<compute_t<T>>(p[j]);
}
template <typename T>
BK_ALWAYS_INLINE void store(T* p, int64_t j, compute_t<T> v) {
  p[j] = static_cast<T>(v);
}
// bf16 by bit manipulation (round to nearest even, NaN kept quiet, as c10
// does), so that the loops vectorize with the conversion inside them.
template <>
BK_ALWAYS_INLINE float load(const c10::BFloat16* p, int64_t j) {
  const uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[j]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <>
BK_ALWAYS_INLINE void store(c10::BFloat16* p, int64_t j, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  reinterpret_cast<uint16_t*>(p)[j] = v != v ? uint16_t{0x7FC0} : rounded;
}

// Rows [r0, r1): out = act(z), or act(z1) * z2 when gated (z is [rows, nz],
// out [rows, nout]; out may be z).
template <typename T>
BK_ALWAYS_INLINE void forward_rows(Activation act, const T* z, T* out, int64_t r0, int64_t r1,
                                   int64_t nz, int64_t nout) {
  const bool gated = is_gated(act);
  dispatch_activation(inner_activation(act), [&](auto tag) __attribute__((always_inline)) {
    constexpr Activation A = decltype(tag)::value;
    for (int64_t r = r0; r < r1; ++r) {
      const T* zr = z + r * nz;
      T* y = out + r * nout;
      if (gated) {
#pragma omp simd
        for (int64_t j = 0; j < nout; ++j) store(y, j, act_forward<A>(load(zr, j)) * load(zr, nout + j));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < nout; ++j) store(y, j, act_forward<A>(load(zr, j)));
      }
    }
  });
}

// Rows [r0, r1): dz = g * act'(...) from the saved rows (output, width nout,
// or pre-activation, width nz), and dz's column sums added to dbias (when
// not null) in the same loop.
template <typename T>
BK_ALWAYS_INLINE void backward_rows(Activation act, bool saved_is_output, const T* g, const T* saved,
                                    T* dz, compute_t<T>* dbias, int64_t r0, int64_t r1, int64_t nz,
                                    int64_t nout) {
  using C = compute_t<T>;
  const bool sum = dbias != nullptr;
  const int64_t ns = saved_is_output ? nout : nz;
  for (int64_t r = r0; r < r1; ++r) {
    const T* gr = g + r * nout;
    const T* sr = saved + r * ns;
    T* d = dz + r * nz;
    // dz = g * grad(saved), for a derivative taken from the output or the input
    auto plain = [&](auto grad) __attribute__((always_inline)) {
#pragma omp simd
      for (int64_t j = 0; j < nout; ++j) {
        const C v = load(gr, j) * grad(load(sr, j));
        store(d, j, v);
        if (sum) dbias[j] += v;
      }
    };
    if (saved_is_output) {
      dispatch_output_activation(act, [&](auto tag) __attribute__((always_inline)) {
        plain([](C y) __attribute__((always_inline)) { return act_grad_from_output<decltype(tag)::value>(y); });
      });
    } else if (is_gated(act)) {
      dispatch_activation(inner_activation(act), [&](auto tag) __attribute__((always_inline)) {
        constexpr Activation A = decltype(tag)::value;
#pragma omp simd
        for (int64_t j = 0; j < nout; ++j) {
          const C go = load(gr, j), z1 = load(sr, j), z2 = load(sr, nout + j);
          const C v1 = go * z2 * act_grad_from_input<A>(z1), v2 = go * act_forward<A>(z1);
          store(d, j, v1);
          store(d, nout + j, v2);
          if (sum) dbias[j] += v1, dbias[nout + j] += v2;
        }
      });
    } else {
      dispatch_activation(act, [&](auto tag) __attribute__((always_inline)) {
        plain([](C z) __attribute__((always_inline)) { return act_grad_from_input<decltype(tag)::value>(z); });
      });
    }
  }
}

// The loops as called, per storage type: float and bf16 through the ISA
// clones; double and half (rare on CPUs) compiled once.
#define BK_ROW_LOOPS(T, ATTRIBUTES)                                                            \
  ATTRIBUTES void activation_forward_rows(Activation act, const T* z, T* out, int64_t r0,      \
                                          int64_t r1, int64_t nz, int64_t nout) {              \
    forward_rows<T>(act, z, out, r0, r1, nz, nout);                                            \
  }                                                                                            \
  ATTRIBUTES void activation_backward_rows(Activation act, bool saved_is_output, const T* g,   \
                                           const T* saved, T* dz, compute_t<T>* dbias,         \
                                           int64_t r0, int64_t r1, int64_t nz, int64_t nout) { \
    backward_rows<T>(act, saved_is_output, g, saved, dz, dbias, r0, r1, nz, nout);             \
  }
BK_ROW_LOOPS(float, BK_CPU_CLONES)
BK_ROW_LOOPS(c10::BFloat16, BK_CPU_CLONES)
BK_ROW_LOOPS(double, )
BK_ROW_LOOPS(c10::Half, )
#undef BK_ROW_LOOPS

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
        activation_forward_rows(act, zp, op, r0, r1, s.Nz, s.Nout);
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
  // One partial bias sum per thread, added up at the end.
  at::Tensor partial;
  if (grad_bias) partial = at::zeros({at::get_num_threads(), nz}, grad_bias->options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "activation_backward_cpu", [&] {
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* sv = saved.const_data_ptr<scalar_t>();
    scalar_t* dz = grad_preact.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      auto* dbias = grad_bias ? partial.mutable_data_ptr<compute_t<scalar_t>>() + at::get_thread_num() * nz
                              : nullptr;
      activation_backward_rows(act, saved_is_output, g, sv, dz, dbias, r0, r1, nz, nout);
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
