// Host-code emulation (MMK_EMU_HOST, tests/emu/test_emu_low_rank_fusion_host.py): the one CUDA runtime
// type the launch headers name, declared as the emulator declares it, so launcher symbols match.
#pragma once
using cudaStream_t = struct CUstream_st*;
