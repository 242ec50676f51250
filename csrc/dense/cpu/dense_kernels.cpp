// The dense family's CPU row loops on at::vec::Vectorized. Compiled once per
// CPU capability (setup.py; capability.h): everything here lives in a
// capability-named namespace, and only the table at the end is seen outside.
#include "dense/cpu/dense_kernels.h"

#include "common/vec_math.h"

namespace bigkernels {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
void forward_rows(Activation act, T* z, const T* bias, bool keep_preact, T* out, int64_t r0, int64_t r1,
                  int64_t nz, int64_t nout) {
  using IO = VecIO<T>;
  const bool gated = is_gated(act);
  const auto add = [](const auto& u, const auto& v) { return u + v; };
  const auto mul = [](const auto& u, const auto& v) { return u * v; };
  dispatch_activation(act, [&](auto tag) {
    const auto f = [](const auto& v) { return act_forward<decltype(tag)::value>(v); };
    for (int64_t r = r0; r < r1; ++r) {
      T* zr = z + r * nz;
      T* y = out + r * nout;
      // column c of the pre-activation, plus its bias (kept in z when asked)
      const auto preact = [&](int64_t c, int64_t n) {
        auto v = IO::load(zr + c, n);
        if (bias == nullptr) return v;
        v = map_parts(add, v, IO::load(bias + c, n));
        if (keep_preact) IO::store(zr + c, v, n);
        return v;
      };
      for (int64_t j = 0; j < nout; j += IO::kWidth) {
        const int64_t n = std::min(IO::kWidth, nout - j);
        auto a = map_parts(f, preact(j, n));
        if (gated) a = map_parts(mul, a, preact(nout + j, n));
        IO::store(y + j, a, n);
      }
    }
  });
}

template <typename T>
void backward_rows(Activation act, bool saved_is_output, const T* g, const T* saved, T* dz, double* dbias,
                   int64_t r0, int64_t r1, int64_t nz, int64_t nout) {
  using IO = VecIO<T>;
  using Chunk = typename IO::Chunk;
  const auto mul = [](const auto& u, const auto& v) { return u * v; };
  const auto add = [](const auto& u, const auto& v) { return u + v; };
  const int64_t ns = saved_is_output ? nout : nz;
  // A column chunk goes down kSumRows rows at a time: their dz add up in
  // registers, and only that sum goes into the double bias row (its
  // conversions, per row, cost 10-20 % of the pass; the sum of 4 rounds far
  // less than the float partial row of 64 did).
  constexpr int64_t kSumRows = 4;
  // dz = g * grad(saved), for a derivative taken from the output or the input
  const auto plain = [&](auto grad) {
    for (int64_t r = r0; r < r1; r += kSumRows) {
      const int64_t rows = std::min(kSumRows, r1 - r);
      for (int64_t j = 0; j < nout; j += IO::kWidth) {
        const int64_t n = std::min(IO::kWidth, nout - j);
        Chunk sum;
        for (int64_t k = 0; k < rows; ++k) {
          const int64_t row = r + k;
          const auto v =
              map_parts(mul, IO::load(g + row * nout + j, n), map_parts(grad, IO::load(saved + row * ns + j, n)));
          IO::store(dz + row * nz + j, v, n);
          sum = k == 0 ? v : map_parts(add, sum, v);
        }
        if (dbias) IO::accumulate_double(dbias + j, sum, n);
      }
    }
  };
  if (saved_is_output) {
    dispatch_output_activation(act, [&](auto tag) {
      plain([](const auto& y) { return act_grad_from_output<decltype(tag)::value>(y); });
    });
  } else if (!is_gated(act)) {
    dispatch_activation(act, [&](auto tag) {
      plain([](const auto& z) { return act_grad_from_input<decltype(tag)::value>(z); });
    });
  } else {
    // act(z1) * z2: dz1 = g * z2 * act'(z1), dz2 = g * act(z1)
    dispatch_activation(act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      const auto grad = [](const auto& v) { return act_grad_from_input<A>(v); };
      const auto forward = [](const auto& v) { return act_forward<A>(v); };
      for (int64_t r = r0; r < r1; r += kSumRows) {
        const int64_t rows = std::min(kSumRows, r1 - r);
        for (int64_t j = 0; j < nout; j += IO::kWidth) {
          const int64_t n = std::min(IO::kWidth, nout - j);
          Chunk sum1, sum2;
          for (int64_t k = 0; k < rows; ++k) {
            const int64_t row = r + k;
            const T* sr = saved + row * nz;
            const auto go = IO::load(g + row * nout + j, n), z1 = IO::load(sr + j, n), z2 = IO::load(sr + nout + j, n);
            const auto d1 = map_parts(mul, map_parts(mul, go, z2), map_parts(grad, z1));
            const auto d2 = map_parts(mul, go, map_parts(forward, z1));
            IO::store(dz + row * nz + j, d1, n);
            IO::store(dz + row * nz + nout + j, d2, n);
            sum1 = k == 0 ? d1 : map_parts(add, sum1, d1);
            sum2 = k == 0 ? d2 : map_parts(add, sum2, d2);
          }
          if (dbias) {
            IO::accumulate_double(dbias + j, sum1, n);
            IO::accumulate_double(dbias + nout + j, sum2, n);
          }
        }
      }
    });
  }
}

void forward_rows_any(c10::ScalarType dtype, Activation act, void* z, const void* bias, bool keep_preact,
                      void* out, int64_t r0, int64_t r1, int64_t nz, int64_t nout) {
  dispatch_storage_type(dtype, [&](auto t) {
    using T = decltype(t);
    forward_rows(act, static_cast<T*>(z), static_cast<const T*>(bias), keep_preact, static_cast<T*>(out), r0,
                 r1, nz, nout);
  });
}

void backward_rows_any(c10::ScalarType dtype, Activation act, bool saved_is_output, const void* g,
                       const void* saved, void* dz, double* dbias, int64_t r0, int64_t r1, int64_t nz,
                       int64_t nout) {
  dispatch_storage_type(dtype, [&](auto t) {
    using T = decltype(t);
    backward_rows(act, saved_is_output, static_cast<const T*>(g), static_cast<const T*>(saved),
                  static_cast<T*>(dz), dbias, r0, r1, nz, nout);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY

extern const DenseCpuKernels BK_CAPABILITY_NAME(dense_cpu_kernels) = {
    &CPU_CAPABILITY::forward_rows_any,
    &CPU_CAPABILITY::backward_rows_any,
};

}  // namespace bigkernels
