// The Python extension module mmkernels._C. Loading it runs the TORCH_LIBRARY registrations; it
// also records the torch (and CUDA) version it was compiled against, checked at import.
#include <Python.h>
#include <torch/headeronly/version.h>

#define MMK_STR2(x) #x
#define MMK_STR(x) MMK_STR2(x)

static PyModuleDef mmkernels_module = {PyModuleDef_HEAD_INIT, "_C", "mmkernels compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&mmkernels_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version",
                             MMK_STR(TORCH_VERSION_MAJOR) "." MMK_STR(TORCH_VERSION_MINOR) "." MMK_STR(
                                 TORCH_VERSION_PATCH));
#ifdef MMKERNELS_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
