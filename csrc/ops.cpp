// Operator schema for lasers_ext and the Python module that loads it (`import lasers_ext._C`).
// Kernels register themselves per dispatch key in their own files (cpu/omp_cpu.cpp, cuda/omp_cuda.cu);
// the fake (meta) kernel and the autograd formula are registered from Python in lasers_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

// Empty module: importing it runs the static TORCH_LIBRARY registrations of this shared library.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(lasers_ext, m) {
  m.def("batch_omp(Tensor x, Tensor dictionary, int sparsity, float? tol=None) -> (Tensor, Tensor)");
}
