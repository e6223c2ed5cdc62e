// Out-of-place matrix transposes for the CPU attention's block operands: its GEMMs (cpublas::brgemm)
// take row-major operands only, so K_j, V_j, Q_i and dO_i are transposed into per-thread scratch.
#pragma once
#include <cstdint>

namespace mmkernels::cpu {

// dst (cols x rows, leading dim ldd) = src (rows x cols, leading dim lds) transposed.
void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd);
void transpose(const double* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd);
// 32-bit words of any meaning, moved bit for bit (pairs of bfloat16 for the VNNI layout).
void transpose(const uint32_t* src, int64_t lds, int64_t rows, int64_t cols, uint32_t* dst, int64_t ldd);

}  // namespace mmkernels::cpu
