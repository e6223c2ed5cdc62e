// See transpose.h. The float version moves 16 x 16 tiles through AVX-512 registers where the CPU has
// AVX-512 (chosen at run time: the extension itself is built for baseline x86-64); a scalar loop
// over the same tiles otherwise, and for double.
#include "transpose.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MMK_HAVE_AVX512_TRANSPOSE 1
// GCC's AVX-512 shuffle intrinsics start from _mm512_undefined_ps(), which -Wall reports as
// uninitialised once inlined here.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace mmkernels::cpu {
namespace {

constexpr int64_t kTile = 16;

template <typename T>
void transpose_scalar(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c)
          std::memcpy(dst + c * ldd + r, src + r * lds + c, sizeof(T));  // bits, whatever T's storage held
}

#ifdef MMK_HAVE_AVX512_TRANSPOSE
// One tile of up to 16 x 16: rows past `rows` read as zeros, columns past `cols` are masked off, and
// only the first `rows` lanes of each of the `cols` output rows are stored.
__attribute__((target("avx512f"))) void tile_avx512(const void* src_words, int64_t lds, int rows, int cols,
                                                    void* dst_words, int64_t ldd) {
  const auto* src = static_cast<const float*>(src_words);  // only loaded and stored: bits unchanged
  auto* dst = static_cast<float*>(dst_words);
  const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1u);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1u);
  __m512 a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = i < rows ? _mm512_maskz_loadu_ps(col_mask, src + i * lds) : _mm512_setzero_ps();
  // Interleave pairs of rows (32-bit), then pairs of pairs (64-bit), then 128-bit lanes twice.
  for (int i = 0; i < 16; i += 2) {
    b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    a[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b[i]), _mm512_castps_pd(b[i + 2])));
    a[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b[i]), _mm512_castps_pd(b[i + 2])));
    a[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b[i + 1]), _mm512_castps_pd(b[i + 3])));
    a[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b[i + 1]), _mm512_castps_pd(b[i + 3])));
  }
  for (int i = 0; i < 4; ++i) {
    b[i] = _mm512_shuffle_f32x4(a[i], a[i + 4], 0x88);
    b[i + 4] = _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD);
    b[i + 8] = _mm512_shuffle_f32x4(a[i + 8], a[i + 12], 0x88);
    b[i + 12] = _mm512_shuffle_f32x4(a[i + 8], a[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    a[i] = _mm512_shuffle_f32x4(b[i], b[i + 8], 0x88);
    a[i + 8] = _mm512_shuffle_f32x4(b[i], b[i + 8], 0xDD);
  }
  // a[c] is now column c.
  for (int c = 0; c < cols; ++c) _mm512_mask_storeu_ps(dst + c * ldd, row_mask, a[c]);
}
#endif

// 32-bit elements, moved bit for bit: through AVX-512 registers by tiles, else the scalar loop.
template <typename T>
void transpose_words(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  static_assert(sizeof(T) == 4);
#ifdef MMK_HAVE_AVX512_TRANSPOSE
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) {
    for (int64_t r0 = 0; r0 < rows; r0 += kTile)
      for (int64_t c0 = 0; c0 < cols; c0 += kTile)
        tile_avx512(src + r0 * lds + c0, lds, static_cast<int>(std::min(kTile, rows - r0)),
                    static_cast<int>(std::min(kTile, cols - c0)), dst + c0 * ldd + r0, ldd);
    return;
  }
#endif
  transpose_scalar(src, lds, rows, cols, dst, ldd);
}

}  // namespace

void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  transpose_words(src, lds, rows, cols, dst, ldd);
}

void transpose(const uint32_t* src, int64_t lds, int64_t rows, int64_t cols, uint32_t* dst, int64_t ldd) {
  transpose_words(src, lds, rows, cols, dst, ldd);
}

void transpose(const double* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) {
  transpose_scalar(src, lds, rows, cols, dst, ldd);
}

}  // namespace mmkernels::cpu
