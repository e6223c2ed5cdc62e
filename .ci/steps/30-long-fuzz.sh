#!/usr/bin/env bash
# The long differential-fuzzing profile (tests/hardening/long/run_long_fuzz.sh): every op, module and
# convert() against the float64 reference, with the fixed CI seed (the verdict must not depend on
# the draw) and MMKERNELS_FUZZ_EXAMPLES cases per entry (see that script for the count and the
# measured time). Prints the per-entry case counts at the end.
set -euo pipefail
bash tests/hardening/long/run_long_fuzz.sh
