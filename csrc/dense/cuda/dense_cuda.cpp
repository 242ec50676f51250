// CUDA implementations of the dense ops: tensors in, checks, raw-pointer
// launches on the current stream (kernels in dense_forward.cu and
// activation_backward.cu).
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "dense/dense.h"
#include "dense/cuda/launchers.h"

namespace bigkernels {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "bigkernels.dense: unsupported dtype ", t);
  }
}

// Whether the sm_90a CUTLASS forward may run: compiled in (BIGKERNELS_SM90=1
// at build time) and asked for (BIGKERNELS_SM90=1 at run time), until a GPU
// run has checked it against the reference (it has never run).
// Read on every call (a getenv, far below a launch), so that the benchmark
// can time both paths in one run.
bool sm90_opted_in() {
#ifdef BIGKERNELS_SM90
  const char* v = std::getenv("BIGKERNELS_SM90");
  return v != nullptr && std::strcmp(v, "1") == 0;
#else
  return false;
#endif
}

int compute_capability_major(const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
  return major;
}

std::tuple<at::Tensor, at::Tensor> dense_forward_cuda(const at::Tensor& input,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      c10::string_view activation,
                                                      bool save_preactivation,
                                                      const std::optional<at::Tensor>& up_weight) {
  const Activation act = parse_activation(activation);
  const DenseShape s = check_dense_args(input, weight, bias, act, up_weight);
  const c10::cuda::CUDAGuard guard(input.device());

  const at::Tensor x = as_matrix(input, s.M, s.K);
  const at::Tensor w = weight.contiguous();
  const at::Tensor w_up = up_weight.has_value() ? up_weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.M, s.Nout}, x.options());
  at::Tensor preact = save_preactivation ? at::empty({s.M, s.Nz}, x.options())
                                         : at::empty({0}, x.options());

  cuda::DenseForwardParams p{};
  p.x = x.const_data_ptr();
  p.w = w.const_data_ptr();
  p.w_up = w_up.defined() ? w_up.const_data_ptr() : nullptr;
  p.bias = b.defined() ? b.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.preact = save_preactivation ? preact.mutable_data_ptr() : nullptr;
  p.M = s.M, p.K = s.K, p.Nz = s.Nz, p.Nout = s.Nout;
  p.act = act;
  p.dtype = to_kernel_dtype(x.scalar_type());
  // TF32 exists from sm_80 on; before that fp32 runs on the exact FMA kernel.
  const int major = compute_capability_major(input);
  p.allow_tf32 = at::globalContext().allowTF32CuBLAS() && major >= 8;
  p.use_sm90 = major == 9 && sm90_opted_in();
  // The tensor-core kernel (cp.async, bf16 mma) needs sm_80; the FMA one does not.
  TORCH_CHECK(!cuda::dense_forward_uses_tensor_cores(p) || major >= 8, "bigkernels.dense: ",
              x.scalar_type(), " runs on tensor cores, which need compute capability 8.0 or newer; "
              "this GPU has ", major, ".x (float32 and float64 run on any GPU)");
  C10_CUDA_CHECK(cuda::launch_dense_forward(p, c10::cuda::getCurrentCUDAStream()));

  if (save_preactivation) preact = with_leading_dims_of(input, preact);
  return {with_leading_dims_of(input, out), preact};
}

void activation_backward_cuda(const at::Tensor& grad_out, const at::Tensor& saved, Activation act,
                              bool saved_is_output, at::Tensor& grad_preact,
                              at::Tensor* grad_bias) {
  const int64_t M = grad_out.size(0), Nz = grad_preact.size(1);
  // Partial column sums, one row per row of the kernel's grid, added up by
  // ATen's (deterministic) sum: no atomics, the same bits every run.
  at::Tensor partials;
  if (grad_bias) partials = at::empty({cuda::activation_backward_partial_rows(M), Nz}, grad_bias->options());
  cuda::ActivationBackwardParams p{};
  p.grad_out = grad_out.const_data_ptr();
  p.saved = saved.const_data_ptr();
  p.grad_preact = grad_preact.mutable_data_ptr();
  p.bias_partials = grad_bias ? partials.mutable_data_ptr() : nullptr;
  p.M = M, p.Nout = grad_out.size(1), p.Nz = Nz;
  p.act = act;
  p.saved_is_output = saved_is_output;
  p.dtype = to_kernel_dtype(grad_out.scalar_type());
  C10_CUDA_CHECK(cuda::launch_activation_backward(p, c10::cuda::getCurrentCUDAStream()));
  if (grad_bias) *grad_bias = partials.sum(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("dense_forward", &dense_forward_cuda);
  m.impl("dense_backward", &dense_backward<&activation_backward_cuda>);
}

}  // namespace bigkernels
