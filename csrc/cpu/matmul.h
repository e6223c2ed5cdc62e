// The CPU kernels' GEMMs (float32 routed to the faster of the two GEMM libraries that torch links,
// bfloat16 / float16 in float32 where torch has no fast kernel for them):
// fused_concat_linear's through matmul_out; the attention's blocks through cpublas::brgemm where
// matmul_uses_onednn, else matmul_out. See matmul.cpp for the rule.
#pragma once
#include <ATen/core/Tensor.h>

namespace mmkernels::cpu {

// out (M x N) = a (M x K) @ b (K x N), or out += a @ b with `accumulate`. Any strides, views included
// (a transposed or column-sliced weight, a column block of a gradient): nothing is copied.
void matmul_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// Whether this CPU runs ATen's mkldnn_matmul at all (see matmul.cpp); matmul_uses_onednn needs it.
bool onednn_matmul_runs();

// Whether matmul_out forms `dtype`'s (bfloat16, float16) products in float32 (see matmul.cpp).
bool half_gemm_in_float(at::ScalarType dtype);

// Whether matmul_out sends `dtype` to oneDNN (the rule of matmul.cpp), for tests and reports.
bool matmul_uses_onednn(at::ScalarType dtype);

}  // namespace mmkernels::cpu
