// See packed_gemm.h. Blocks (the usual three-level scheme, sized for Zen 3: 32 KB L1d, 512 KB L2):
// - kKc rows of B and columns of A at a time (a 6 x 16 tile's panels, 6 KB and 16 KB, stay in L1);
// - B's kKc x kNc block packed once, by all threads, into 16-column panels (k-major);
// - C cut into jobs of kMc rows x kNt columns; a job packs its rows of A (kMc x kKc, 96 KB: L2) into
//   6-row panels and sweeps its tiles, B's panels from L2/L3.
// Panels are zero-padded to whole tiles; a tile at C's edge is computed whole into a buffer and the
// part inside C written.
#include "packed_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MMK_PACKED_GEMM_AVX2 1
#define MMK_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace mmkernels::cpu::packed_gemm {
namespace {

constexpr int64_t kMr = 6, kNr = 16;
constexpr int64_t kKc = 256, kMc = 96, kNt = 256, kNc = 2048;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Rows [i0, i0 + rows) of A, columns [k0, k0 + kc), as 6-row panels: panel p, step k at
// dst[(p * kc + k) * 6 + r].
void pack_a(const float* a, int64_t a_i, int64_t a_k, int64_t i0, int64_t rows, int64_t k0, int64_t kc, float* dst) {
  for (int64_t p = 0; p * kMr < rows; ++p) {
    float* panel = dst + p * kc * kMr;
    for (int64_t r = 0; r < kMr; ++r) {
      const int64_t i = p * kMr + r;
      if (i >= rows) {
        for (int64_t k = 0; k < kc; ++k) panel[k * kMr + r] = 0.0f;
        continue;
      }
      const float* src = a + (i0 + i) * a_i + k0 * a_k;
      for (int64_t k = 0; k < kc; ++k) panel[k * kMr + r] = src[k * a_k];
    }
  }
}

// Columns [j0, j0 + 16 * panels) of B's rows [k0, k0 + kc), as 16-column panels (columns at or beyond n
// zero): panel q, step k at dst[(q * kc + k) * 16 + j].
void pack_b(const float* b, int64_t b_k, int64_t b_j, int64_t n, int64_t k0, int64_t kc, int64_t q0, int64_t q1,
            float* dst) {
  for (int64_t q = q0; q < q1; ++q) {
    float* panel = dst + q * kc * kNr;
    const int64_t j0 = q * kNr, cols = std::min(kNr, n - j0);
    const float* src = b + k0 * b_k + j0 * b_j;
    if (b_j == 1) {
      for (int64_t k = 0; k < kc; ++k) {
        std::copy(src + k * b_k, src + k * b_k + cols, panel + k * kNr);
        std::fill(panel + k * kNr + cols, panel + (k + 1) * kNr, 0.0f);
      }
    } else {
      for (int64_t j = 0; j < kNr; ++j) {
        if (j >= cols) {
          for (int64_t k = 0; k < kc; ++k) panel[k * kNr + j] = 0.0f;
          continue;
        }
        for (int64_t k = 0; k < kc; ++k) panel[k * kNr + j] = src[k * b_k + j * b_j];
      }
    }
  }
}

#ifdef MMK_PACKED_GEMM_AVX2

// The 6 x 16 tile: C (+)= A panel @ B panel over kc steps; C row stride ldc, read only if `add`.
MMK_AVX2 void tile(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, bool add) {
  __m256 acc[kMr][2];
  for (int r = 0; r < kMr; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
    for (int r = 0; r < kMr; ++r) {
      const __m256 x = _mm256_broadcast_ss(ap + r);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
    ap += kMr;
    bp += kNr;
  }
  for (int r = 0; r < kMr; ++r) {
    float* row = c + r * ldc;
    if (add) {
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(row));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(row + 8));
    }
    _mm256_storeu_ps(row, acc[r][0]);
    _mm256_storeu_ps(row + 8, acc[r][1]);
  }
}

// One job: rows [i0, i0 + rows) x columns [j0, j0 + cols) of C (j0 relative to the packed block, whose
// first column is C's column jc), steps [k0, k0 + kc).
MMK_AVX2 void job(const float* a, int64_t a_i, int64_t a_k, const float* packed_b, int64_t i0, int64_t rows,
                  int64_t j0, int64_t cols, int64_t k0, int64_t kc, float* c, int64_t ldc, bool add) {
  thread_local std::vector<float> packed_a;
  packed_a.resize(round_up(kMc, kMr) * kKc);
  pack_a(a, a_i, a_k, i0, rows, k0, kc, packed_a.data());
  alignas(32) float edge[kMr * kNr];
  for (int64_t j = 0; j < cols; j += kNr) {
    const float* bp = packed_b + (j0 + j) / kNr * kc * kNr;
    const int64_t n = std::min(kNr, cols - j);
    for (int64_t i = 0; i < rows; i += kMr) {
      const float* ap = packed_a.data() + i / kMr * kc * kMr;
      float* out = c + (i0 + i) * ldc + j0 + j;
      const int64_t m = std::min(kMr, rows - i);
      if (m == kMr && n == kNr) {
        tile(kc, ap, bp, out, ldc, add);
        continue;
      }
      tile(kc, ap, bp, edge, kNr, false);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t s = 0; s < n; ++s) out[r * ldc + s] = add ? out[r * ldc + s] + edge[r * kNr + s] : edge[r * kNr + s];
      }
    }
  }
}

#endif  // MMK_PACKED_GEMM_AVX2

}  // namespace

bool available() {
#ifdef MMK_PACKED_GEMM_AVX2
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_i, int64_t a_k, const float* b, int64_t b_k,
          int64_t b_j, float* c, int64_t ldc, bool accumulate) {
#ifdef MMK_PACKED_GEMM_AVX2
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + N, 0.0f);
    }
    return;
  }
  thread_local std::vector<float> packed_b;
  const int64_t m_jobs = (M + kMc - 1) / kMc;
  for (int64_t jc = 0; jc < N; jc += kNc) {
    const int64_t nc = std::min(kNc, N - jc), panels = (nc + kNr - 1) / kNr, n_jobs = (nc + kNt - 1) / kNt;
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      const bool add = accumulate || k0 > 0;
      packed_b.resize(panels * kc * kNr);
      float* pb = packed_b.data();
      at::parallel_for(0, panels, 8, [&](int64_t q0, int64_t q1) { pack_b(b + jc * b_j, b_k, b_j, nc, k0, kc, q0, q1, pb); });
      at::parallel_for(0, m_jobs * n_jobs, 1, [&](int64_t first, int64_t last) {
        for (int64_t t = first; t < last; ++t) {
          const int64_t i0 = t / n_jobs * kMc, j0 = t % n_jobs * kNt;
          job(a, a_i, a_k, pb, i0, std::min(kMc, M - i0), j0, std::min(kNt, nc - j0), k0, kc, c + jc, ldc, add);
        }
      });
    }
  }
#else
  (void)M, (void)N, (void)K, (void)a, (void)a_i, (void)a_k, (void)b, (void)b_k, (void)b_j, (void)c, (void)ldc,
      (void)accumulate;
#endif
}

}  // namespace mmkernels::cpu::packed_gemm
