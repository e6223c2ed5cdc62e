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
#  - cross_modal_attention, a row whose every score is NaN (so it sees no key) and a NaN value:
#    backward formed dS = 0 * NaN there, so grad_q was NaN where the reference's is 0 (a real bug,
#    fixed on the CPU and in the CUDA kernel, with a regression test);
#  - nn.GatedCrossAttention, float32, a query that sees one key: the materialised softmax's backward
#    gives dS = 0 exactly there, a flash backward (ours, and SDPA's) rounding noise, which the
#    LayerNorm in front amplified 300x on inputs of scale 1e-3. PyTorch's own float32 error is now
#    measured with SDPA too when the plain reference alone would fail a result (fuzz_support.
#    flash_reference): ours was 1.9x SDPA's there;
#  - convert(), float32, a model with a degenerate LayerNorm (two features) or a post-norm encoder
#    behind a cross-attention on scale-10 media: its backward amplifies forward rounding
#    differently for every evaluation order (ours up to 15x PyTorch's own float32 error, with every
#    op within PyTorch's own precision). convert() is fuzzed in float64 only (see fuzz_table.py).
#  - cross_modal_attention, bfloat16, E != Ev, scale-10 logits (CI, 2026-11-27): dK off by 3% of its
#    scale, as SDPA's flash kernel is too (both form D = rowsum(dO O) from the bfloat16 O), but SDPA
#    fell back to its math kernel for E != Ev, so the harness had no flash evaluation to compare
#    with: flash_reference now zero-pads the head dims and forces the flash kernel;
#  - cross_modal_attention, float32, logits of 1e5: backward recomputed the scores as K Q^T, which
#    the BLAS may sum in another order than the forward's Q K^T; one ulp there is 1% of a
#    probability (a real bug, fixed: same GEMM and row kernel as the forward; regression test);
#  - cross_modal_attention, float32, an infinite value whose probability is subnormal (1e-40): the
#    kernel's exp flushed it to 0, so the output was 0 * inf = NaN where PyTorch's is inf (a real
#    bug, fixed: the exp keeps subnormal results; regression test).
#  - cross_modal_attention, an infinite key that gives a query a -inf score, and a NaN value behind
#    it (CI, 2026-12-02): out = 0 * NaN + ... is NaN in both, but the reference blocked that key's
#    gradient, so its D = sum P dP stayed finite while the kernels' rowsum(dO O) (and SDPA's) is NaN.
#    The reference's softmax-times-values now has the flash backward's formula (D = rowsum(dO O),
#    dS = 0 where P = 0), as the kernels' (regression test). The same fix covers a key whose
#    probability underflows to exactly 0 in a row made NaN by another key (local, seed 7): the
#    materialised softmax formed 0 * NaN there, the kernels 0 (regression test).
#  - cross_modal_attention, float16, values of 65504 (local, seed 2): a true grad_k of 84963 is +Inf
#    in float16, and ours was, but the harness compared it with the finite float64 value. It now
#    also accepts the float64 reference rounded to the case's dtype.
# Also: no example database in the long profile, so the seed alone fixes the draw (replayed
# examples can make two runs of one seed draw different cases, as CI and a local run once did).
# Run from the repo root: bash tests/hardening/long/run_long_fuzz.sh
PY=${PY:-$(pwd)/.venv/bin/python}
t0=$(date +%s)
# A fixed seed in CI: a CI verdict must not depend on the draw. Fresh random cases are for local runs
# (drop --hypothesis-seed, or set MMKERNELS_FUZZ_SEED). 2000 cases for each of the 12 entries: 24000
# in all, 268 s on 2 idle cores (2026-11-26). The draw on CI's machine has differed from a local run
# of the same seed, so the verdict is checked over several seeds before landing (RESULTS.md).
MMKERNELS_FUZZ_PROFILE=long MMKERNELS_FUZZ_EXAMPLES=${MMKERNELS_FUZZ_EXAMPLES:-2000} \
  "$PY" -m pytest -q -p no:cacheprovider --hypothesis-seed="${MMKERNELS_FUZZ_SEED:-20261126}" tests/hardening/test_fuzz.py
echo "long fuzz profile done in $(( $(date +%s) - t0 ))s"
