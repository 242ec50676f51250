// The extension module and the library-wide ops. Each family defines its own
// ops' schemas once, in a TORCH_LIBRARY_FRAGMENT in csrc/<family>/<family>.cpp;
// its CPU and CUDA kernels register in csrc/<family>/{cpu,cuda}/, its autograd
// in csrc/<family>/<family>_autograd.cpp, and the fake (meta) implementations
// and the reference double backward from Python (bigkernels/ops/<family>.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/capability.h"

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
}
