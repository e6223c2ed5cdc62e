// Emulation build (MMK_EMU): the few CUDA runtime types and calls our kernel sources use, backed
// by the CPU executor of csrc/emu/runtime.cpp. Found before any real CUDA header by include order.
#pragma once
#include "../emu.h"
