// Float32 GEMMs on raw pointers, register-blocked AVX2 + FMA loops (plain loops elsewhere),
// single-threaded (callers split the work):
// - fused_concat_linear's forward and backward where M is at most kMaxRows (fusion heads, decoding
//   steps): there a BLAS call's fixed cost (its checks, packing W, handing work to threads) is most of
//   the time (issue 19); these read each operand once, in place;
// - the attention's block GEMMs on CPUs where oneDNN does not run (AVX2-only: outer's 6 x 16 tiles
//   against MKL's sgemm on AMD Zen 3, cross_modal_attention.cpp).
#pragma once
#include <cstdint>

namespace mmkernels::cpu::small_gemm {

// The most rows (M) fused_concat_linear sends here.
constexpr int64_t kMaxRows = 32;

// C[i, j] (+)= sum_k A[i, k] * B[j, k] for i < I, j < J, k < K: A's rows at a + i * lda, B's at
// b + j * ldb, both contiguous along k (x @ W.T with W in nn.Linear's layout, or Q K^T with K's rows in
// place); C row-major, stride ldc, added to where `accumulate`, else overwritten. Each sum is formed
// in the same order whatever I and J (the attention's grouped-query decoding forms a group's scores in
// one call and backward recomputes them one row at a time: cross_modal_attention.cpp).
void dot_rows(int64_t I, int64_t J, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
              int64_t ldc, bool accumulate);

// C[i, j] (+)= sum_r A(i, r) * B[r, j] for i < I, j < J, r < R, where A(i, r) = a[i * a_i + r * a_r]
// (any strides: gz or gz.T) and B's rows are contiguous at b + r * ldb; C row-major, stride ldc,
// added to where `accumulate`, else overwritten. Each sum is one fused multiply-add chain over r
// from 0, on every CPU (the attention's backward relies on that order: cross_modal_attention.cpp).
void outer(int64_t I, int64_t J, int64_t R, const float* a, int64_t a_i, int64_t a_r, const float* b, int64_t ldb,
           float* c, int64_t ldc, bool accumulate);

// Whether these kernels run their AVX2 + FMA loops on this CPU (else plain loops). The attention's
// float block GEMMs take outer for every size where they do and oneDNN does not serve the CPU.
bool vectorised();

}  // namespace mmkernels::cpu::small_gemm
