// float16 -> float conversion of contiguous runs, for the CPU kernels that compute float16 in float
// blocks. The extension is built for baseline x86-64 (no F16C), where c10::Half converts one value
// at a time in software; this loop is branch-free and cloned per instruction set, so it vectorises.
#pragma once
#include <c10/util/Half.h>

#include <cstdint>

namespace mmkernels::cpu {

// dst[i] = float(src[i]) for i < n: exact, subnormals, infinities and NaN (payload kept) included.
void half_to_float(const c10::Half* src, float* dst, int64_t n);

}  // namespace mmkernels::cpu
