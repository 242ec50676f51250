// Autograd in C++ for our ops: the pieces every family's Autograd kernel uses.
//
// Why C++: torch.library's Python autograd wrapper ran on every call, under
// no_grad too, and cost ~5 us of a ~10 us dense call on tiny tensors (and its
// garbage triggered Python's gc in loops). Here the Autograd-key kernel is a
// torch::autograd::Function whose forward redispatches below autograd to the
// device kernel, and whose backward calls the family's backward op.
//
// Double backward (create_graph=True): our backward kernels are not
// differentiable themselves, so there the backward calls the family's
// `*_backward_reference` op instead, which bigkernels/ops/<family>.py
// implements (CompositeImplicitAutograd) on reference.py's PyTorch ops: the
// one reference stays in Python.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <optional>

namespace bigkernels {

// The typed handle of one of our ops, looked up once per call site:
//   static const auto op = find_op<Signature>("bigkernels::dense_forward");
template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Which of a Function's tensor arguments need a gradient, by argument.
// `given[i]` says whether argument i was passed: autograd numbers only the
// given ones (an absent optional tensor takes no edge).
template <size_t N>
std::array<bool, N> needs_grad_by_argument(const torch::autograd::AutogradContext* ctx,
                                           const std::array<bool, N>& given) {
  std::array<bool, N> needs{};
  size_t edge = 0;
  for (size_t i = 0; i < N; ++i) needs[i] = given[i] && ctx->needs_input_grad(edge++);
  return needs;
}

// An optional tensor from a saved one (saved undefined when it was absent).
inline std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace bigkernels
