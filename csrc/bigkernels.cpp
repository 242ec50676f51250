// Every op's schema, defined once. The CPU and CUDA kernels register their
// implementations in cpu/ and cuda/; fake (meta) implementations and autograd
// are registered from Python (bigkernels/ops/).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/capability.h"

extern "C" {
// Importing bigkernels._C loads this library, which runs the static
// registrations below; the module itself holds nothing.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(bigkernels, m) {
  // The CPU capability our CPU kernels run at now (DEFAULT, AVX2, AVX512):
  // ATen's, which ATEN_CPU_CAPABILITY can lower.
  m.def("cpu_capability() -> str", [] { return std::string(bigkernels::cpu_capability_name()); });
  // act(input @ weight.T + bias). `preactivation` is input @ weight.T + bias
  // when save_preactivation is true (backward needs it for some activations),
  // else an empty tensor.
  m.def(
      "dense_forward(Tensor input, Tensor weight, Tensor? bias, str activation, "
      "bool save_preactivation) -> (Tensor output, Tensor preactivation)");
  // Gradients of dense_forward. `saved` is the output when saved_is_output,
  // else the pre-activation, or empty to recompute it. Gradients not asked
  // for in output_mask come back as empty tensors.
  m.def(
      "dense_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, "
      "Tensor saved, str activation, bool saved_is_output, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}
