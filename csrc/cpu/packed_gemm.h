// A float32 GEMM for CPUs with AVX2 + FMA but no AVX-512 (AMD Zen 2/3, Intel before Skylake-X), where
// torch's oneDNN matmul refuses the CPU and MKL's sgemm reaches 64-74% of the FMA peak on the shapes
// this project runs (benchmarks/RESULTS.md, "Session 13"). The classic layout: panels of A and B
// copied once per block into the order a 6 x 16 register tile reads them, so the inner loop is two
// loads, six broadcasts and twelve fused multiply-adds per k.
#pragma once
#include <cstdint>

namespace mmkernels::cpu::packed_gemm {

// Whether this CPU runs it (AVX2 and FMA).
bool available();

// C[i, j] (+)= sum_k A(i, k) B(k, j) for i < M, j < N, k < K, where A(i, k) = a[i * a_i + k * a_k] and
// B(k, j) = b[k * b_k + j * b_j] (any strides: transposed and sliced operands read in place); C
// row-major with row stride ldc, added to where `accumulate`, else overwritten (C not read).
// Threads: at::parallel_for over blocks of C; inside a parallel region, this thread alone.
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_i, int64_t a_k, const float* b, int64_t b_k,
          int64_t b_j, float* c, int64_t ldc, bool accumulate);

}  // namespace mmkernels::cpu::packed_gemm
