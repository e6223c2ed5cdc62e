#!/usr/bin/env bash
# The long differential-fuzzing profile: fresh random cases for every op and module (thousands of
# them in all; MMKERNELS_FUZZ_EXAMPLES per op), and the bad-input matrix again. A failure prints the
# falsifying case and a @reproduce_failure blob to replay it.
set -euo pipefail
# NOT run by .ci/run yet: with the seed below it still reports two failures to triage (2026-11-26):
#  - fused_concat_linear, float32, tanh with a 1e3-scaled input: the saturated gradient 1 - y*y loses
#    all relative precision in float32 (as PyTorch's own tanh_backward does); the harness's tolerance
#    floor expects more than float32 can give there.
#  - low_rank_fusion: not yet analysed.
# A third (cross_modal_attention with stride-0 keys/values: MKL refused ld = 0) was a real bug, fixed
# with a regression test. Run from the repo root: bash tests/hardening/long/run_long_fuzz.sh
PY=${PY:-$(pwd)/.venv/bin/python}
t0=$(date +%s)
# A fixed seed in CI: a CI verdict must not depend on the draw. Fresh random cases are for local runs
# (drop --hypothesis-seed); the count is sized to keep this step to a few minutes on 2 cores.
MMKERNELS_FUZZ_PROFILE=long MMKERNELS_FUZZ_EXAMPLES=${MMKERNELS_FUZZ_EXAMPLES:-400} \
  "$PY" -m pytest -q -p no:cacheprovider --hypothesis-seed="${MMKERNELS_FUZZ_SEED:-20261126}" tests/hardening/test_fuzz.py
echo "long fuzz profile done in $(( $(date +%s) - t0 ))s"
