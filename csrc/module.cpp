// The Python extension module mmkernels._C. Loading it runs the TORCH_LIBRARY registrations; it
// also records the torch (and CUDA) version it was compiled against, checked at import.
#include <Python.h>
#include <torch/headeronly/version.h>

#ifdef MMKERNELS_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION, e.g. 13000 for 13.0

#include <cstdio>
#endif

#include "cpu/matmul.h"
#include "small_calls.h"

#define MMK_STR2(x) #x
#define MMK_STR(x) MMK_STR2(x)

// Which library the CPU kernels' float32 GEMMs use now (csrc/cpu/matmul.cpp), for reports.
static PyObject* cpu_float32_gemm(PyObject*, PyObject*) {
  return PyUnicode_FromString(mmkernels::cpu::matmul_uses_onednn(at::kFloat) ? "oneDNN" : "ATen mm (MKL)");
}

static PyMethodDef mmkernels_methods[] = {
    {"cpu_float32_gemm", cpu_float32_gemm, METH_NOARGS, "The library of the CPU kernels' float32 GEMMs."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef mmkernels_module = {PyModuleDef_HEAD_INIT, "_C", "mmkernels compiled kernels", -1,
                                       mmkernels_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&mmkernels_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddFunctions(m, mmkernels::small_call_method_table()) < 0) return nullptr;
  if (PyModule_AddFunctions(m, mmkernels::attention_call_method_table()) < 0) return nullptr;
  PyModule_AddStringConstant(m, "torch_version",
                             MMK_STR(TORCH_VERSION_MAJOR) "." MMK_STR(TORCH_VERSION_MINOR) "." MMK_STR(
                                 TORCH_VERSION_PATCH));
#ifdef MMKERNELS_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
  // The CUDA toolkit the kernels were compiled with (e.g. "13.0"), compared with torch's at import.
  char cuda_version[16];
  std::snprintf(cuda_version, sizeof(cuda_version), "%d.%d", CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10);
  PyModule_AddStringConstant(m, "cuda_version", cuda_version);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
