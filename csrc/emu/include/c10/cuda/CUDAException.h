// Emulation build (MMK_EMU): the launch check reports what the CPU executor found in the launch.
#pragma once
#include "../../../emu.h"
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::mmk_emu::check_last_launch()
