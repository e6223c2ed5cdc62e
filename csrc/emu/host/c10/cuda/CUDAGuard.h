// Host-code emulation (MMK_EMU_HOST): CPU tensors stand in for device memory; there is no device to set.
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
