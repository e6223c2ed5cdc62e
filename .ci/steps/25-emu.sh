#!/usr/bin/env bash
# The CUDA kernels' own source on the CPU emulation harness (csrc/emu, tests/emu; no GPU needed).
# The main pytest run already ran the default emu set (marker `emu`: elementwise and tensor-core
# concat-linear kernels, the warp collectives, attention forward and backward for every head dim,
# dtype and mask kind, the planted-bug teeth); this step adds the long random profile: 60 random
# attention problems (shapes, masks, dropout, layouts) forward and backward against reference.py,
# each under the bounds / race / barrier checks. Needs g++ with -fsanitize=thread instrumentation
# (no tsan runtime) and binutils' addr2line (source lines in reports). Measured: about 4 minutes on
# the 2-core machine shared with other jobs, plus the harness build (about 3 minutes) if the main
# run did not leave it in build/emu.
#
# What this verifies: the kernels' logic, indexing and synchronisation on the emulated memory
# model (PTX fragment layouts, cp.async groups completing at their wait, shared memory visible
# across threads only after a barrier). What only a GPU can: timing, occupancy, bank conflicts,
# the hardware memory model (real reordering), and the exact float32 summation order of mma.sync.
set -euo pipefail
cd "$(dirname "$0")/../.."
MMK_EMU_LONG=1 .venv/bin/python -m pytest -q -m emu tests/emu -k random_cases
