// Force-included (-include) first in every translation unit of the emulation build (MMK_EMU).
// The host-side library headers the kernel files include are read here, before the CUDA
// built-ins of emu.h become macros and before __CUDA_ARCH__ is defined (which would make them take
// their device branches); their include guards turn the kernels' own #includes into no-ops.
#pragma once
#define MMK_EMU 1
#ifdef MMK_EMU_ATEN  // the concat-linear files (fcl_launch.h includes ATen's Tensor)
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#endif
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "emu.h"

// The device code is compiled as for sm_90 (kernels that guard on the architecture take that path).
#define __CUDA_ARCH__ 900

// `__shared__ alignas(16) T x[]` is valid CUDA (__shared__ is an attribute there) but
// `thread_local alignas(16)` is not valid C++: from here on, alignas is the GNU attribute, which may
// follow thread_local. (Every standard header the kernels include has been read above.)
#define alignas(n) __attribute__((aligned(n)))
