// The CPU kernels' GEMMs (float32 routed to the fastest of oneDNN, packed_gemm and ATen's mm,
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

// Whether matmul_out sends `dtype`'s large GEMMs to oneDNN, or to packed_gemm (the rule of matmul.cpp):
// both split one GEMM over threads better than callers' row blocks do.
bool matmul_uses_onednn(at::ScalarType dtype);
bool matmul_uses_packed(at::ScalarType dtype);

// Who runs large float32 GEMMs now, for reports: "oneDNN", "packed_gemm (AVX2)" or "ATen mm (MKL)".
const char* float32_gemm_name();

}  // namespace mmkernels::cpu
