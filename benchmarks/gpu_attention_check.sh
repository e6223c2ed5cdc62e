#!/usr/bin/env bash
# The attention part of the GPU check (issue 5): the CUDA attention tests, compute-sanitizer memcheck
# and racecheck on a short case list, and the attention benchmark (bf16, vs SDPA backends and
# nn.MultiheadAttention). Called by benchmarks/gpu_check.sh after it has built the extension; alone,
# it builds in place for sm_90 first if the CUDA kernels are missing. Logs and JSON go to $OUT.
# Time budget (for gpu_check.sh's 8 minutes): tests <= 200 s, sanitizers <= 2 x 60 s, bench <= 150 s,
# each under `timeout` so that one hang cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmkernels-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0

if ! "$PY" -c "import torch, mmkernels; assert torch._C._dispatch_has_kernel_for_dispatch_key('mmkernels::cross_modal_attention', 'CUDA')" 2>/dev/null; then
  echo "== building the extension for sm_90"
  MMKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) "$PY" setup.py build_ext --inplace >"$OUT/attn_build.log" 2>&1 \
    || { tail -n 40 "$OUT/attn_build.log"; echo "FAIL: build"; exit 1; }
fi

echo "== attention CUDA tests"
timeout 200 "$PY" -m pytest -q -m cuda tests/test_cuda_cross_modal_attention.py >"$OUT/attn_tests.log" 2>&1 || status=1
tail -n 15 "$OUT/attn_tests.log"

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool (attention kernels only)"
  timeout 60 "$SAN" --tool "$tool" --kernel-name kns=attn --error-exitcode 3 \
    "$PY" benchmarks/attention_sanitizer_cases.py >"$OUT/attn_$tool.log" 2>&1
  rc=$?
  tail -n 3 "$OUT/attn_$tool.log"
  [ $rc -eq 0 ] || { echo "FAIL: $tool rc=$rc"; status=1; }
done

echo "== attention benchmark"
timeout 150 "$PY" benchmarks/gpu_attention_bench.py --json "$OUT/attention_bench.json" >"$OUT/attention_bench.log" 2>&1 || status=1
tail -n 30 "$OUT/attention_bench.log"
exit $status
