// See small_gemm.h. The AVX2 + FMA loops are compiled for that target only (a function attribute, not
// a build flag) and chosen at run time; other CPUs get the plain loops.
#include "small_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MMK_SMALL_GEMM_AVX2 1
#define MMK_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace mmkernels::cpu::small_gemm {
namespace {

void dot_rows_plain(int64_t I, int64_t J, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < I; ++i) {
    for (int64_t j = 0; j < J; ++j) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += a[i * lda + k] * b[j * ldb + k];
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + s : s;
    }
  }
}

// As outer_avx2: each sum one fused multiply-add chain over r from 0, then added to C (see small_gemm.h).
void outer_plain(int64_t I, int64_t J, int64_t R, const float* a, int64_t a_i, int64_t a_r, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  std::vector<float> sums(J);
  for (int64_t i = 0; i < I; ++i) {
    std::fill(sums.begin(), sums.end(), 0.0f);
    for (int64_t r = 0; r < R; ++r) {
      const float g = a[i * a_i + r * a_r];
      for (int64_t j = 0; j < J; ++j) sums[j] = std::fma(g, b[r * ldb + j], sums[j]);
    }
    float* row = c + i * ldc;
    for (int64_t j = 0; j < J; ++j) row[j] = accumulate ? row[j] + sums[j] : sums[j];
  }
}

#ifdef MMK_SMALL_GEMM_AVX2

// Lanes [0, n) of an 8-float load or store (n <= 8); masked lanes are neither read nor written.
MMK_AVX2 inline __m256i lanes(int64_t n) {
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - std::clamp<int64_t>(n, 0, 8)));
}

// The four sums of a0..a3's lanes, in order.
MMK_AVX2 inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// One 8-lane step of dot_tile: all lanes, or the first n (a masked tail that reads nothing beyond).
template <int MR, int NR, int NA, bool kTail>
MMK_AVX2 inline void dot_step(__m256 (&s)[MR][NA], const float* a, int64_t lda, const float* b, int64_t ldb,
                              __m256i mask) {
  __m256 x[MR];
  for (int i = 0; i < MR; ++i) x[i] = kTail ? _mm256_maskload_ps(a + i * lda, mask) : _mm256_loadu_ps(a + i * lda);
  for (int j = 0; j < NR; ++j) {
    const __m256 w = kTail ? _mm256_maskload_ps(b + j * ldb, mask) : _mm256_loadu_ps(b + j * ldb);
    for (int i = 0; i < MR; ++i) s[i][j] = _mm256_fmadd_ps(x[i], w, s[i][j]);
  }
}

// An MR x NR tile of dot_rows: MR rows of A against NR rows of B, 8 lanes of k at a time (MR * NR
// accumulators), reduced across lanes once at the end, four at a time (the same order for each).
template <int MR, int NR>
MMK_AVX2 void dot_tile(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                       bool accumulate) {
  constexpr int kGroups = (NR + 3) / 4;
  __m256 s[MR][kGroups * 4];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < kGroups * 4; ++j) s[i][j] = _mm256_setzero_ps();
  }
  const __m256i none = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) dot_step<MR, NR, kGroups * 4, false>(s, a + k, lda, b + k, ldb, none);
  if (k < K) dot_step<MR, NR, kGroups * 4, true>(s, a + k, lda, b + k, ldb, lanes(K - k));
  for (int i = 0; i < MR; ++i) {
    alignas(16) float sums[kGroups * 4];
    for (int g = 0; g < kGroups; ++g)
      _mm_store_ps(sums + 4 * g, sum4(s[i][4 * g], s[i][4 * g + 1], s[i][4 * g + 2], s[i][4 * g + 3]));
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + sums[j] : sums[j];
  }
}

// The tile of up to NR rows of B from row j on (fewer at the end).
template <int MR, int NR>
MMK_AVX2 void dot_tiles(int64_t J, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                        int64_t ldc, int64_t j, bool accumulate) {
  if constexpr (NR > 1) {
    if (J - j < NR) return dot_tiles<MR, NR - 1>(J, K, a, lda, b, ldb, c, ldc, j, accumulate);
  }
  dot_tile<MR, NR>(K, a, lda, b + j * ldb, ldb, c + j, ldc, accumulate);
}

MMK_AVX2 void dot_rows_avx2(int64_t I, int64_t J, int64_t K, const float* a, int64_t lda, const float* b,
                            int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  // Four rows of B (W) at a time, every row of A (x) against them: B is read once, A (few rows) from
  // cache. One row of A (a decoding step's query) takes eight rows of B at a time: eight independent
  // chains keep both FMA units busy, where four would wait on each one's latency.
  if (I == 1) {
    for (int64_t j = 0; j < J; j += 8) dot_tiles<1, 8>(J, K, a, lda, b, ldb, c, ldc, j, accumulate);
    return;
  }
  for (int64_t j = 0; j < J; j += 4) {
    int64_t i = 0;
    for (; i + 2 <= I; i += 2) dot_tiles<2, 4>(J, K, a + i * lda, lda, b, ldb, c + i * ldc, ldc, j, accumulate);
    if (i < I) dot_tiles<1, 4>(J, K, a + i * lda, lda, b, ldb, c + i * ldc, ldc, j, accumulate);
  }
}

// Lanes [0, min(n, 8)) of x: a plain load when all eight are there, else masked (mask = lanes(n)).
MMK_AVX2 inline __m256 load8(const float* x, int64_t n, __m256i mask) {
  return n >= 8 ? _mm256_loadu_ps(x) : _mm256_maskload_ps(x, mask);
}

// An MR x 8 NV tile of outer (kFull), or its first n columns: NV 8-lane column vectors per row of C,
// a broadcast of A(i, r) times B's row r added per step. kFull makes the column count a constant, so
// the lane tests below fold away. The loops over the tile are unrolled by pragma: without it GCC
// keeps the accumulators in memory and stores them on every step.
template <int MR, int NV, bool kFull>
MMK_AVX2 void outer_tile(int64_t R, const float* a, int64_t a_i, int64_t a_r, const float* b, int64_t ldb, float* c,
                         int64_t ldc, int64_t n, bool accumulate) {
  const int64_t cols = kFull ? 8 * NV : n;
  __m256 s[MR][NV];
  __m256i mask[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    mask[v] = lanes(cols - 8 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) s[i][v] = _mm256_setzero_ps();
  }
  for (int64_t r = 0; r < R; ++r) {
    const float* row = b + r * ldb;
    __m256 w[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) w[v] = load8(row + 8 * v, cols - 8 * v, mask[v]);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 g = _mm256_broadcast_ss(a + i * a_i + r * a_r);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) s[i][v] = _mm256_fmadd_ps(g, w[v], s[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* out = c + i * ldc;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (accumulate) s[i][v] = _mm256_add_ps(s[i][v], load8(out + 8 * v, cols - 8 * v, mask[v]));
      if (cols >= 8 * (v + 1)) {
        _mm256_storeu_ps(out + 8 * v, s[i][v]);
      } else {
        _mm256_maskstore_ps(out + 8 * v, mask[v], s[i][v]);
      }
    }
  }
}

// Columns [0, n) of C, n <= 16 (kFull: n = 16), six rows at a time and the rest in smaller tiles.
template <bool kFull>
MMK_AVX2 void outer_panel(int64_t I, int64_t R, const float* a, int64_t a_i, int64_t a_r, const float* b, int64_t ldb,
                          float* c, int64_t ldc, int64_t n, bool accumulate) {
  // Rows left over after the six-row tiles: 1 or 2 run with the last six as 4 + 3 or 4 + 4 (a tile
  // of one or two rows has too few independent accumulators to keep the FMA units busy).
  const int64_t six = (I % 6 == 1 || I % 6 == 2) && I > 6 ? I / 6 - 1 : I / 6;
  int64_t i = 0;
  for (; i < 6 * six; i += 6) outer_tile<6, 2, kFull>(R, a + i * a_i, a_i, a_r, b, ldb, c + i * ldc, ldc, n, accumulate);
  if (I - i >= 7) {
    outer_tile<4, 2, kFull>(R, a + i * a_i, a_i, a_r, b, ldb, c + i * ldc, ldc, n, accumulate);
    i += 4;
  }
  const float* ar = a + i * a_i;
  float* cr = c + i * ldc;
  switch (I - i) {
    case 5: return outer_tile<5, 2, kFull>(R, ar, a_i, a_r, b, ldb, cr, ldc, n, accumulate);
    case 4: return outer_tile<4, 2, kFull>(R, ar, a_i, a_r, b, ldb, cr, ldc, n, accumulate);
    case 3: return outer_tile<3, 2, kFull>(R, ar, a_i, a_r, b, ldb, cr, ldc, n, accumulate);
    case 2: return outer_tile<2, 2, kFull>(R, ar, a_i, a_r, b, ldb, cr, ldc, n, accumulate);
    case 1: return outer_tile<1, 2, kFull>(R, ar, a_i, a_r, b, ldb, cr, ldc, n, accumulate);
    default: return;
  }
}

MMK_AVX2 void outer_avx2(int64_t I, int64_t J, int64_t R, const float* a, int64_t a_i, int64_t a_r, const float* b,
                         int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  // Tiles of six rows of C by 16 columns: twelve accumulators, two loads of B and six broadcasts of A
  // per twelve multiply-adds. Column panels outside, rows inside: the panel of B (R x 16) is read from
  // L1 by every row tile, and A, which every panel reads again, streams from L2. A lone row (a decoding
  // step's P V) takes 64 columns at a time, reading each row of B in 256-byte runs.
  if (I == 1) {
    for (int64_t j = 0; j < J; j += 64) {
      const int64_t n = std::min<int64_t>(64, J - j);
      if (n == 64) {
        outer_tile<1, 8, true>(R, a, a_i, a_r, b + j, ldb, c + j, ldc, n, accumulate);
      } else {
        outer_tile<1, 8, false>(R, a, a_i, a_r, b + j, ldb, c + j, ldc, n, accumulate);
      }
    }
    return;
  }
  // With two or more row tiles, each panel is first copied to a contiguous buffer: B's rows may be a
  // multiple of 256 bytes apart (V or K rows of head dim 64 or 128, in place), and such a panel falls
  // into a few L1 sets and is evicted before the next row tile reads it.
  thread_local std::vector<float> panel;
  const bool pack = I >= 12;
  if (pack && static_cast<int64_t>(panel.size()) < R * 16) panel.resize(R * 16);
  for (int64_t j = 0; j < J; j += 16) {
    const int64_t n = std::min<int64_t>(16, J - j);
    const float* bp = b + j;
    int64_t ldp = ldb;
    if (pack) {
      float* dst = panel.data();
      if (n == 16) {
        for (int64_t r = 0; r < R; ++r) {
          _mm256_storeu_ps(dst + r * 16, _mm256_loadu_ps(b + r * ldb + j));
          _mm256_storeu_ps(dst + r * 16 + 8, _mm256_loadu_ps(b + r * ldb + j + 8));
        }
      } else {
        for (int64_t r = 0; r < R; ++r) std::copy_n(b + r * ldb + j, n, dst + r * 16);
      }
      bp = dst, ldp = 16;
    }
    if (n == 16) {
      outer_panel<true>(I, R, a, a_i, a_r, bp, ldp, c + j, ldc, n, accumulate);
    } else {
      outer_panel<false>(I, R, a, a_i, a_r, bp, ldp, c + j, ldc, n, accumulate);
    }
  }
}

// MMKERNELS_SMALL_GEMM_PLAIN=1 takes the plain loops on any CPU (CTest runs them that way too).
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("MMKERNELS_SMALL_GEMM_PLAIN") == nullptr;
  return yes;
}

#endif  // MMK_SMALL_GEMM_AVX2

}  // namespace

bool vectorised() {
#ifdef MMK_SMALL_GEMM_AVX2
  return has_avx2();
#else
  return false;
#endif
}

void dot_rows(int64_t I, int64_t J, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
              int64_t ldc, bool accumulate) {
#ifdef MMK_SMALL_GEMM_AVX2
  if (has_avx2()) return dot_rows_avx2(I, J, K, a, lda, b, ldb, c, ldc, accumulate);
#endif
  dot_rows_plain(I, J, K, a, lda, b, ldb, c, ldc, accumulate);
}

void outer(int64_t I, int64_t J, int64_t R, const float* a, int64_t a_i, int64_t a_r, const float* b, int64_t ldb,
           float* c, int64_t ldc, bool accumulate) {
#ifdef MMK_SMALL_GEMM_AVX2
  if (has_avx2()) return outer_avx2(I, J, R, a, a_i, a_r, b, ldb, c, ldc, accumulate);
#endif
  outer_plain(I, J, R, a, a_i, a_r, b, ldb, c, ldc, accumulate);
}

}  // namespace mmkernels::cpu::small_gemm
