#!/usr/bin/env bash
# The long differential-fuzzing profile: random cases for every op, module and convert() (thousands
# of them in all; MMKERNELS_FUZZ_EXAMPLES per entry). A failure prints the falsifying case and a
# @reproduce_failure blob to replay it.
set -euo pipefail
# Run by .ci/steps/30-long-fuzz.sh. Failures it found, and what became of them:
#  - cross_modal_attention with stride-0 keys/values: MKL refused ld = 0 (a real bug, fixed, with a
#    regression test);
#  - low_rank_fusion, float32, NaN rank weight: ATen's float32 addmm ignores a NaN alpha, so the
#    backward lost the NaN (a real bug, fixed, with a regression test);
#  - fused_concat_linear, float32, saturated tanh: the gradient 1 - y*y keeps no relative precision,
#    in PyTorch's own float32 too: a result may now differ from float64 by up to 2x the reference's
#    own error in its dtype (fuzz_support.assert_matches; the run prints how often that was needed);
#  - cross_modal_attention, a query whose only key has a NaN score and a NaN value: the reference
#    multiplied the value by a zero probability (NaN) where its contract says zeros; fixed there.
# Not yet triaged (2026-11-26, commit 32c99c0, MMKERNELS_FUZZ_EXAMPLES=2000, the CI seed; 18 min on 2
# busy cores): two entries fail beyond the 400 cases CI runs:
#  - cross_modal_attention, float64, Lq = Lk = 1, the only key and its value NaN: our grad_k is NaN where
#    the reference's is 0 (which side is right for a NaN score needs a decision, then a fix);
#  - nn.GatedCrossAttention, float32: grad of attn.k_proj_weight off by 1.4e-4 where 9.5e-5 is allowed
#    (probably the K/V projection on the visible rows only, a different float32 summation order).
# So "thousands of cases per op" (issue 7) is not what CI runs yet: 400 per entry, 4800 in all.
# Run from the repo root: bash tests/hardening/long/run_long_fuzz.sh
PY=${PY:-$(pwd)/.venv/bin/python}
t0=$(date +%s)
# A fixed seed in CI: a CI verdict must not depend on the draw. Fresh random cases are for local runs
# (drop --hypothesis-seed). 400 cases for each of the 12 entries: 4800 in all. Measured on 2 cores:
# 250 each 80 s (lightly loaded); 800 each 344 s; 600 each 14.5 min wall (8.9 min CPU) under a load
# average of 5 from another job. Sized for about 5 minutes on an unshared machine.
MMKERNELS_FUZZ_PROFILE=long MMKERNELS_FUZZ_EXAMPLES=${MMKERNELS_FUZZ_EXAMPLES:-400} \
  "$PY" -m pytest -q -p no:cacheprovider --hypothesis-seed="${MMKERNELS_FUZZ_SEED:-20261126}" tests/hardening/test_fuzz.py
echo "long fuzz profile done in $(( $(date +%s) - t0 ))s"
