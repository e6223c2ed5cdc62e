// Host-code emulation (MMK_EMU_HOST): kernels launch on the emulator, which has no streams.
#pragma once
#include <cuda_runtime_api.h>

namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace at::cuda
