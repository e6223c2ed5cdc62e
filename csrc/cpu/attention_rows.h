// Row kernels of the CPU attention: the elementwise work between the block GEMMs (scale + mask +
// max, exp + sum, rescale, dropout factors, dS). The float versions live in attention_rows.cpp,
// compiled for several instruction sets (target_clones) with a vectorisable exp, because the
// extension itself is built for baseline x86-64; the double versions (gradcheck) are plain loops.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

namespace mmkernels::cpu::rows {

// s = s * scale + bias (bias may be null; where bias is -inf, s = -inf whatever the score, so a hidden
// key stays hidden even for a NaN query); returns max(s), or NaN if any s is NaN (a NaN row).
float scale_bias_max(float* s, const float* bias, int64_t n, float scale);
// s = exp(s - m); returns sum(s). Entries at -inf give exactly 0.
float exp_sum(float* s, int64_t n, float m);
// x *= a
void scale(float* x, int64_t n, float a);
// s = exp(s * scale + bias - lse) for one query row (bias may be null), with s * scale + bias
// rounded exactly as scale_bias_max rounds it, so that backward's probabilities are the forward's to
// the bit. All 0 when lse = +inf (a row that saw no key); NaN everywhere when lse is NaN (a row
// whose visible scores held a NaN, whose output is NaN too) except at hidden keys (-inf), which are 0.
void probs_from_scores(float* s, const float* bias, int64_t n, float scale, float lse);
// ds = p * (dp - d) * scale for one query row; ds may alias dp. All 0 when lse = +inf (a row that
// saw no key), whatever dp holds: its gradient is zero even where a value is NaN; 0 where p is 0.
void dscore(float* ds, const float* p, const float* dp, float d, float lse, int64_t n, float scale);
// z[c] = inv_keep where hash(key, j0 + c) >= threshold else 0: one query row over a run of keys.
void dropout_factors_row(float* z, uint64_t key, uint32_t j0, int64_t n, uint32_t threshold, float inv_keep);
// x *= z
void mul(float* x, const float* z, int64_t n);
// out[r] = sum_c x[r][c] * y[r][c] for r < rows (leading dims ldx, ldy), each as one fused
// multiply-add after another, c = 0 .. n-1: the order and rounding in which the GEMM micro-kernel
// forms each dP = dO V^T entry. So a row that sees one key (P = 1, O = V exactly) gets D = dP to
// the bit, hence dS = 0, as the materialised softmax's gradient is.
void dot_rows(const float* x, int64_t ldx, const float* y, int64_t ldy, int64_t rows, int64_t n, float* out);
// dst = bfloat16(src), round to nearest even (bit patterns; src finite).
void to_bf16(const float* src, uint16_t* dst, int64_t n);
// dst = bfloat16(exp(s - m)), returns the sum of the float exponentials: exp_sum then to_bf16 in
// one pass where the CPU has AVX512-BF16 (its exponentials are exp_sum's, summed in another order),
// else those two calls. s is scratch: it may be overwritten.
float exp_sum_to_bf16(float* s, int64_t n, float m, uint16_t* dst);
// dst[2c] = a[c], dst[2c + 1] = b[c] (0 where b is null), c < n: two rows of 16-bit values
// interleaved, the VNNI-2 layout of a bfloat16 GEMM operand.
void interleave_pairs(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* dst);

// Double versions: the same contracts, plain loops (gradcheck shapes only).
double scale_bias_max(double* s, const double* bias, int64_t n, double scale);
double exp_sum(double* s, int64_t n, double m);
void scale(double* x, int64_t n, double a);
void probs_from_scores(double* s, const double* bias, int64_t n, double scale, double lse);
void dscore(double* ds, const double* p, const double* dp, double d, double lse, int64_t n, double scale);
void dropout_factors_row(double* z, uint64_t key, uint32_t j0, int64_t n, uint32_t threshold, double inv_keep);
void mul(double* x, const double* z, int64_t n);
void dot_rows(const double* x, int64_t ldx, const double* y, int64_t ldy, int64_t rows, int64_t n, double* out);

}  // namespace mmkernels::cpu::rows
