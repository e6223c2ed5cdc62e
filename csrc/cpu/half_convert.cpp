// See half_convert.h.
#include "half_convert.h"

#include <bit>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MMKERNELS_NO_CLONES)
#define MMK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMK_CLONES
#endif

namespace mmkernels::cpu {

// The half's exponent and mantissa bits, shifted into a float's place, read as a float give the
// value times 2^-112 (the exponent biases differ by 127 - 15), exactly, subnormal halves included;
// one exact multiply by 2^112 restores it. Exponent 31 (Inf / NaN) becomes the float's 255 instead.
MMK_CLONES void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t sign = static_cast<uint32_t>(h[i] & 0x8000u) << 16;
    const uint32_t bits = static_cast<uint32_t>(h[i] & 0x7fffu) << 13;
    const float scaled = std::bit_cast<float>(bits) * 0x1p112f;
    const uint32_t magnitude = bits >= (0x7c00u << 13) ? (bits | 0x7f800000u) : std::bit_cast<uint32_t>(scaled);
    dst[i] = std::bit_cast<float>(magnitude | sign);
  }
}

}  // namespace mmkernels::cpu
