// Operator schema for lasers_ext and the Python module that loads it (`import lasers_ext._C`).
// Kernels register themselves per dispatch key in their own files (cpu/omp_cpu.cpp, cuda/omp_cuda_op.cpp);
// the fake (meta) kernel and the autograd formula are registered from Python in lasers_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

// Importing the module runs the static TORCH_LIBRARY registrations of this shared library. Its only attribute,
// `with_cuda`, says whether the CUDA sources were compiled in (setup.py defines LASERS_WITH_CUDA for them).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef LASERS_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(lasers_ext, m) {
  m.def("batch_omp(Tensor x, Tensor dictionary, int sparsity, float? tol=None) -> (Tensor, Tensor)");
  // The dictionary as every compiled backend codes against it (omp_core.h's atom_norm and gram_entry, the same
  // numbers on every device): atoms_t (M, K) unit atoms transposed, gram (K, K), inv_norm (K).
  m.def("prepare_dictionary(Tensor dictionary) -> (Tensor, Tensor, Tensor)");
}
