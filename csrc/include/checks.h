// Argument checks shared by the CPU and CUDA kernels. Every message names the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define MMK_CHECK_ARG(cond, arg, ...) TORCH_CHECK(cond, "mmkernels: argument '", arg, "': ", __VA_ARGS__)

namespace mmkernels {

inline void check_same_device_dtype(const at::Tensor& t, const at::Tensor& ref, const char* arg) {
  MMK_CHECK_ARG(t.device() == ref.device(), arg, "expected device ", ref.device(), ", got ", t.device());
  MMK_CHECK_ARG(t.scalar_type() == ref.scalar_type(), arg, "expected dtype ", ref.scalar_type(), ", got ",
                t.scalar_type());
}

}  // namespace mmkernels
