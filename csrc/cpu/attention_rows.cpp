// See attention_rows.h. The float loops are written so that GCC vectorises them (no calls, no
// branches: selects only; for AVX2 that needs -fno-trapping-math, see setup.py and
// tests/test_vectorised_rows.py), and cloned per instruction set; the loader picks the best at load time.
// One exception: exp_sum_to_bf16's AVX512-BF16 loop is written with intrinsics, because GCC vectorises
// a loop with float inputs and bfloat16 outputs at half width (measured slower than two passes).
#include "attention_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "dropout_hash.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MMKERNELS_NO_CLONES)
#define MMK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MMK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
// GCC 12 reports the _mm512_undefined_*() that its AVX-512 intrinsics start from as uninitialised
// (a false report, located in the header): so the header is included with those warnings off.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#define MMK_CLONES
#endif

namespace mmkernels::cpu::rows {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp_approx's constants, shared with its AVX-512 twin exp16.
constexpr float kExpLowest = -104.0f, kLog2e = 1.44269504088896341f, kRoundMagic = 12582912.0f;
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f, kExpScale = 0x1p-64f;
constexpr float kExpC6 = 1.3888889e-03f * kExpScale, kExpC5 = 8.3333333e-03f * kExpScale,
                kExpC4 = 4.1666667e-02f * kExpScale, kExpC3 = 1.6666667e-01f * kExpScale, kExpC2 = 0.5f * kExpScale,
                kExpC1 = kExpScale;
constexpr int32_t kExpBias = 127 + 64;  // the float exponent's bias plus kExpScale's 64

// exp(x) for the softmax's x <= 0 (valid up to x = 43): x = k ln2 + r, |r| <= ln2/2, exp(r) by a
// degree-6 polynomial (relative error ~2e-7), 2^k through the exponent bits. The polynomial's
// coefficients carry a factor 2^-64 and the exponent 64 more, so that results below 2^-126 come out
// of the one final multiply correctly rounded to subnormals, as std::exp's do (a probability of
// 1e-40 times an infinite value is infinite, not 0 * inf = NaN), at no extra cost. x is clamped at
// -104 (-inf included), whose result rounds to exactly 0; NaN fails the comparison and stays NaN.
// One clamp and no other select, so that each clone is a straight run of vector instructions.
inline float exp_approx(float x) {
  const float xc = x < kExpLowest ? kExpLowest : x;
  const float t = xc * kLog2e;
  const float kf = (t + kRoundMagic) - kRoundMagic;  // round to nearest without a call
  const float r = (xc - kf * kLn2Hi) - kf * kLn2Lo;
  float p = kExpC6;
  p = p * r + kExpC5;
  p = p * r + kExpC4;
  p = p * r + kExpC3;
  p = p * r + kExpC2;
  p = p * r + kExpC1;
  p = p * r + kExpC1;
  const int32_t bits = (static_cast<int32_t>(kf) + kExpBias) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return p * two_k;
}

}  // namespace

MMK_CLONES float scale_bias_max(float* s, const float* bias, int64_t n, float scale) {
  float m = kNegInf;
  int nan = 0;  // a NaN score makes the row's max NaN: max() alone would skip it
  if (bias != nullptr) {
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t c = 0; c < n; ++c) {
      // A key hidden by a -inf bias stays hidden whatever its score (a NaN query included).
      const float x = bias[c] == kNegInf ? kNegInf : s[c] * scale + bias[c];
      s[c] = x;
      m = std::max(m, x);
      nan |= x != x;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t c = 0; c < n; ++c) {
      const float x = s[c] * scale;
      s[c] = x;
      m = std::max(m, x);
      nan |= x != x;
    }
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

MMK_CLONES float exp_sum(float* s, int64_t n, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    const float e = exp_approx(s[c] - m);
    s[c] = e;
    sum += e;
  }
  return sum;
}

MMK_CLONES void scale(float* x, int64_t n, float a) {
  for (int64_t c = 0; c < n; ++c) x[c] *= a;
}

MMK_CLONES void probs_from_scores(float* s, const float* bias, int64_t n, float scale, float lse) {
  if (lse == std::numeric_limits<float>::infinity()) {
    std::fill_n(s, n, 0.0f);
    return;
  }
  // x exactly as scale_bias_max forms it (stored, then read back: no contraction with - lse).
  if (bias != nullptr) {
    for (int64_t c = 0; c < n; ++c) s[c] = bias[c] == kNegInf ? kNegInf : s[c] * scale + bias[c];
  } else {
    for (int64_t c = 0; c < n; ++c) s[c] = s[c] * scale;
  }
  // A hidden key (-inf) has probability exactly 0, even in a NaN row (lse NaN): it is never read.
  for (int64_t c = 0; c < n; ++c) s[c] = s[c] == kNegInf ? 0.0f : exp_approx(s[c] - lse);
}

MMK_CLONES void dscore(float* ds, const float* p, const float* dp, float d, float lse, int64_t n, float scale) {
  if (lse == std::numeric_limits<float>::infinity()) {
    std::fill_n(ds, n, 0.0f);
    return;
  }
  // p = 0 (a hidden key) passes no gradient, even in a NaN row (d NaN).
  for (int64_t c = 0; c < n; ++c) ds[c] = p[c] == 0.0f ? 0.0f : p[c] * (dp[c] - d) * scale;
}

MMK_CLONES void dropout_factors_row(float* z, uint64_t key, uint32_t j0, int64_t n, uint32_t threshold,
                                    float inv_keep) {
  for (int64_t c = 0; c < n; ++c) z[c] = dropout_hash(key, j0 + static_cast<uint32_t>(c)) >= threshold ? inv_keep : 0.0f;
}

MMK_CLONES void mul(float* x, const float* z, int64_t n) {
  for (int64_t c = 0; c < n; ++c) x[c] *= z[c];
}

MMK_CLONES void dot_rows(const float* x, int64_t ldx, const float* y, int64_t ldy, int64_t rows, int64_t n,
                         float* out) {
  // Eight rows at a time: eight independent chains hide the latency of each fused multiply-add.
  constexpr int64_t kRows = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t nr = std::min(kRows, rows - r0);
    float s[kRows] = {};
    for (int64_t c = 0; c < n; ++c)
      for (int64_t k = 0; k < nr; ++k) s[k] = std::fma(x[(r0 + k) * ldx + c], y[(r0 + k) * ldy + c], s[k]);
    std::copy_n(s, nr, out + r0);
  }
}

MMK_CLONES void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    uint32_t u;
    std::memcpy(&u, src + c, sizeof(u));
    dst[c] = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

#ifdef MMK_AVX512_BF16
namespace {

// exp_approx on 16 lanes, the same operations in the order GCC vectorises it for x86-64-v4 (the
// clamp's lanes, x < -104 and -inf, zeroed by the last multiply; NaN stays NaN).
MMK_AVX512_BF16 inline __m512 exp16(__m512 x) {
  const __m512 kf = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kRoundMagic)),
                                  _mm512_set1_ps(kRoundMagic));
  __m512 r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExpC6), r, _mm512_set1_ps(kExpC5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC1));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(kf), _mm512_set1_epi32(kExpBias)), 23);
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLowest), _CMP_NLT_US);
  return _mm512_maskz_mul_ps(kept, p, _mm512_castsi512_ps(bits));
}

// Two vectors per step, converted together (vcvtne2ps2bf16), two partial sums; a masked tail.
MMK_AVX512_BF16 float exp_sum_to_bf16_avx512(const float* s, int64_t n, float m, uint16_t* dst) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + c), vm));
    const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + c + 16), vm));
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
    _mm512_storeu_si512(dst + c, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
  }
  for (; c < n; c += 16) {
    const __mmask16 lanes = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1);
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), lanes, s + c);
    const __m512 e = exp16(_mm512_sub_ps(x, vm));
    sum0 = _mm512_mask_add_ps(sum0, lanes, sum0, e);
    _mm256_mask_storeu_epi16(dst + c, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

bool has_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return yes;
}

}  // namespace
#endif

float exp_sum_to_bf16(float* s, int64_t n, float m, uint16_t* dst) {
#ifdef MMK_AVX512_BF16
  if (has_avx512_bf16()) return exp_sum_to_bf16_avx512(s, n, m, dst);
#endif
  const float sum = exp_sum(s, n, m);
  to_bf16(s, dst, n);
  return sum;
}

MMK_CLONES void interleave_pairs(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* dst) {
  if (b == nullptr) {
    for (int64_t c = 0; c < n; ++c) dst[2 * c] = a[c], dst[2 * c + 1] = 0;
  } else {
    for (int64_t c = 0; c < n; ++c) dst[2 * c] = a[c], dst[2 * c + 1] = b[c];
  }
}

// ------------------------------------------------------------------------------------------ double

double scale_bias_max(double* s, const double* bias, int64_t n, double scale) {
  constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
  double m = kNegInfD;
  bool nan = false;
  for (int64_t c = 0; c < n; ++c) {
    s[c] = bias != nullptr && bias[c] == kNegInfD ? kNegInfD : s[c] * scale + (bias != nullptr ? bias[c] : 0.0);
    m = std::max(m, s[c]);
    nan = nan || std::isnan(s[c]);
  }
  return nan ? std::numeric_limits<double>::quiet_NaN() : m;
}

double exp_sum(double* s, int64_t n, double m) {
  double sum = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    s[c] = std::exp(s[c] - m);
    sum += s[c];
  }
  return sum;
}

void scale(double* x, int64_t n, double a) {
  for (int64_t c = 0; c < n; ++c) x[c] *= a;
}

void probs_from_scores(double* s, const double* bias, int64_t n, double scale, double lse) {
  const bool none = lse == std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    const double b = bias != nullptr ? bias[c] : 0.0;
    const double x = b == -std::numeric_limits<double>::infinity() ? b : s[c] * scale + b;
    s[c] = none || x == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(x - lse);
  }
}

void dscore(double* ds, const double* p, const double* dp, double d, double lse, int64_t n, double scale) {
  const bool none = lse == std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < n; ++c) ds[c] = none || p[c] == 0.0 ? 0.0 : p[c] * (dp[c] - d) * scale;
}

void dropout_factors_row(double* z, uint64_t key, uint32_t j0, int64_t n, uint32_t threshold, double inv_keep) {
  for (int64_t c = 0; c < n; ++c) z[c] = dropout_hash(key, j0 + static_cast<uint32_t>(c)) >= threshold ? inv_keep : 0.0;
}

void mul(double* x, const double* z, int64_t n) {
  for (int64_t c = 0; c < n; ++c) x[c] *= z[c];
}

void dot_rows(const double* x, int64_t ldx, const double* y, int64_t ldy, int64_t rows, int64_t n, double* out) {
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0.0;
    for (int64_t c = 0; c < n; ++c) s = std::fma(x[r * ldx + c], y[r * ldy + c], s);
    out[r] = s;
  }
}

}  // namespace mmkernels::cpu::rows
