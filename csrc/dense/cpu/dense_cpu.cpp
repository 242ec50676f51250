// CPU dense + activation: ATen's BLAS for the GEMM, bias folded into it, and
// the activation in one vectorized pass over the output, rows split over
// threads; backward fuses the activation gradient with the bias reduction.
// The row loops are in dense_kernels.cpp, compiled once per CPU capability.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "common/parallel_rows.h"
#include "dense/dense.h"
#include "dense/cpu/cpu_product.h"
#include "dense/cpu/dense_kernels.h"

namespace bigkernels {
namespace {

// The bias gradient is summed over fixed blocks of rows, each into its own
// partial row, and the partial rows by ATen's (cascaded) sum, in double (the
// kernel adds 4 rows in registers first): what is left is mostly each row's
// own rounding of dz, which torch's float sum of the same dz has too. Fixed
// blocks make the result independent of the thread count (deterministic).
constexpr int64_t kBiasBlockRows = 64;

// Whether the product runs on decode_rows (a few rows of x, as in decoding):
// a weight with unit column stride (GPT-2's transposed Conv1D weight goes to
// BLAS) and a dtype with a kernel.
bool use_decode_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& up_weight) {
  const auto rows_in_place = [](const at::Tensor& w) { return w.stride(1) == 1 && w.stride(0) >= w.size(1); };
  return x.size(0) >= decode_min_rows(x.scalar_type()) && x.size(0) <= decode_max_rows(x.scalar_type()) &&
         x.size(1) >= 1 && rows_in_place(weight) &&
         (!up_weight.has_value() || rows_in_place(*up_weight));
}

// x @ [weight; up_weight]^T + bias on decode_rows, the weight's rows split
// over threads; each half writes its own columns of z.
at::Tensor decode_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& up_weight,
                          const std::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1), rows = weight.size(0);
  const int64_t Nz = up_weight.has_value() ? 2 * rows : rows;
  const int64_t ldx = (K + kDecodeKPad - 1) / kDecodeKPad * kDecodeKPad;
  at::Tensor xf = at::zeros({M, ldx}, x.options().dtype(at::kFloat));
  xf.narrow(1, 0, K).copy_(x);
  at::Tensor z = at::empty({M, Nz}, x.options());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const DenseCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(dense_cpu_kernels);
  const int64_t size = x.element_size();
  const int64_t grain = std::max<int64_t>(16, 65536 / (K * size));  // >= 64 KB of weight per thread's share
  for (int half = 0; half < (up_weight.has_value() ? 2 : 1); ++half) {
    const at::Tensor& w = half == 0 ? weight : *up_weight;
    const char* bh = b.defined() ? static_cast<const char*>(b.const_data_ptr()) + half * rows * size : nullptr;
    char* zh = static_cast<char*>(z.mutable_data_ptr()) + half * rows * size;
    at::parallel_for(0, rows, grain, [&](int64_t n0, int64_t n1) {
      kernels.decode_rows(x.scalar_type(), xf.const_data_ptr<float>(), ldx, M, K, w.const_data_ptr(), w.stride(0),
                          bh, zh, Nz, n0, n1);
    });
  }
  return z;
}

// oneDNN's inner product through ATen's mkldnn::_linear_pointwise (the op
// torch.compile's CPU inference passes call). It adds the bias in its
// epilogue, not by addmm's copy of the broadcast bias into the output first,
// and on this project's AMD host its float kernels beat MKL's sgemm by 5-17 %
// (docs/PERFORMANCE.md). Taken for float and bf16 with a contiguous weight
// (oneDNN copies a transposed one per call: 1.7x slower at one AVX2 shape)
// and enough rows. The activation stays in our pass: oneDNN's post-ops were
// slower on AVX2 (GELU, float32), and in bf16 they break torch's NaN and inf
// results (relu(NaN) = 0, silu(-inf) = NaN). oneDNN sums K in one chain: in float32 its error is up
// to ~3x MKL's at K 768-3072, ~5e-6 of the output's scale, within the tests'
// floor. Each new row count builds a primitive (1-3 ms, then cached).
constexpr int64_t kOneDnnMinRows = 32;

std::optional<c10::OperatorHandle> onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      at::hasMKLDNN() ? c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""}) : std::nullopt;
  return op;
}

at::Tensor onednn_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const auto linear =
      onednn_linear()->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                        c10::string_view, c10::List<std::optional<at::Scalar>>,
                                        std::optional<c10::string_view>)>();
  // oneDNN reads the bias as dense: a strided one (b[::4]) gave wrong sums.
  const std::optional<at::Tensor> dense_bias = bias.has_value() ? std::optional(bias->contiguous()) : std::nullopt;
  return linear.call(x, weight, dense_bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// Whether oneDNN builds the product for this dtype: it has no bf16 one below
// AVX-512 (a real AVX2 CPU, or ONEDNN_MAX_CPU_ISA=AVX2) and refuses. Asked
// once per dtype with a 1x1 product.
bool onednn_builds_product(at::ScalarType dtype) {
  const auto probe = [](at::ScalarType t) {
    if (!onednn_linear().has_value()) return false;
    try {
      const at::Tensor one = at::ones({1, 1}, at::TensorOptions().dtype(t));
      onednn_product(one, one, std::nullopt);
      return true;
    } catch (const std::exception&) {
      return false;
    }
  };
  static const bool float32 = probe(at::kFloat), bfloat16 = probe(at::kBFloat16);
  return dtype == at::kFloat ? float32 : dtype == at::kBFloat16 && bfloat16;
}

bool runs_onednn_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& up_weight) {
  return !up_weight.has_value() && x.size(0) >= kOneDnnMinRows && x.size(1) > 0 && weight.size(0) > 0 &&
         weight.is_contiguous() && at::globalContext().userEnabledMkldnn() && onednn_builds_product(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> dense_forward_cpu(const at::Tensor& input,
                                                     const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     c10::string_view activation,
                                                     bool save_preactivation,
                                                     const std::optional<at::Tensor>& up_weight) {
  const Activation act = parse_activation(activation);
  const DenseShape s = check_dense_args(input, weight, bias, act, up_weight);
  const at::Tensor x = as_matrix(input, s.M, s.K);
  // One GEMM, which BLAS parallelises well, then the activation in one
  // parallel pass. Splitting the GEMM into blocks of rows so that each
  // block's activation runs while it is in L2 was slower here: BLAS packs the
  // weight again for every block (docs/PERFORMANCE.md). BLAS reads the weight
  // in either layout, so a transposed one (GPT-2's Conv1D weight, passed as
  // weight.t()) is not copied. The bias: oneDNN's product adds it in its
  // epilogue (runs_onednn_product). Elsewhere, in float32/64 our pass adds
  // it, for addmm first copies the broadcast bias into the output, a pass of
  // its own (8 % of a 5120x384x1536 call); in bf16/fp16 the GEMM adds it
  // before its one rounding, which a pass after the rounded product could not.
  //
  // A few rows (decoding) run on our decode_rows instead, which reads each
  // weight row once for all of them at the memory's bandwidth; it adds the
  // bias itself, in float before its one rounding.
  const bool decode = use_decode_rows(x, weight, up_weight);
  const bool onednn = !decode && runs_onednn_product(x, weight, up_weight);
  const bool bias_in_pass = !decode && !onednn && bias.has_value() && act != Activation::kNone &&
                            (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
  const std::optional<at::Tensor> gemm_bias = bias_in_pass ? std::nullopt : bias;
  const at::Tensor wt = weight.t();
  at::Tensor z = decode                  ? decode_product(x, weight, up_weight, bias)
                 : onednn                ? onednn_product(x, weight, bias)
                 : up_weight.has_value() ? gated_preactivation(x, weight, *up_weight, gemm_bias)
                 : gemm_bias.has_value() ? at::addmm(*gemm_bias, x, wt)
                                         : at::mm(x, wt);
  // Without a pre-activation to keep, the activation runs in place.
  const bool in_place = !is_gated(act) && !save_preactivation;
  at::Tensor out = in_place ? z : at::empty({s.M, s.Nout}, x.options());

  if (!(in_place && act == Activation::kNone)) {
    const DenseCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(dense_cpu_kernels);
    const at::Tensor b = bias_in_pass ? bias->contiguous() : at::Tensor();
    void* zp = z.mutable_data_ptr();
    const void* bp = bias_in_pass ? b.const_data_ptr() : nullptr;
    void* op = out.mutable_data_ptr();
    at::parallel_for(0, s.M, grain_rows(s.Nz), [&](int64_t r0, int64_t r1) {
      kernels.forward_rows(x.scalar_type(), act, zp, bp, save_preactivation, op, r0, r1, s.Nz, s.Nout);
    });
  }

  at::Tensor preact = save_preactivation ? with_leading_dims_of(input, z) : at::empty({0}, x.options());
  return {with_leading_dims_of(input, out), preact};
}

void activation_backward_cpu(const at::Tensor& grad_out, const at::Tensor& saved, Activation act,
                             bool saved_is_output, at::Tensor& grad_preact,
                             at::Tensor* grad_bias) {
  const int64_t M = grad_out.size(0), nout = grad_out.size(1), nz = grad_preact.size(1);
  const DenseCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(dense_cpu_kernels);
  const int64_t blocks = (M + kBiasBlockRows - 1) / kBiasBlockRows;
  at::Tensor partial;  // one row of column sums per block of rows
  double* partial_rows = nullptr;
  if (grad_bias) {
    partial = at::zeros({blocks, nz}, grad_bias->options().dtype(at::kDouble));
    partial_rows = partial.mutable_data_ptr<double>();
  }
  const void* g = grad_out.const_data_ptr();
  const void* sv = saved.const_data_ptr();
  void* dz = grad_preact.mutable_data_ptr();
  const int64_t grain = std::max<int64_t>(1, grain_rows(nz) / kBiasBlockRows);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* dbias = partial_rows ? partial_rows + b * nz : nullptr;
      kernels.backward_rows(grad_out.scalar_type(), act, saved_is_output, g, sv, dz, dbias,
                            b * kBiasBlockRows, std::min(M, (b + 1) * kBiasBlockRows), nz, nout);
    }
  });
  if (grad_bias) *grad_bias = partial.sum(0);  // double: the caller rounds it once to the dtype
}

}  // namespace

at::Tensor cpu_linear_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (runs_onednn_product(x, weight, std::nullopt)) return onednn_product(x, weight, bias);
  return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("dense_forward", &dense_forward_cpu);
  m.impl("dense_backward", &dense_backward<&activation_backward_cpu>);
}

}  // namespace bigkernels
