#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (sm_90) whose python3 has a CUDA build of torch,
# pytest and pytest-benchmark, and no network. From the repository root:
#     OUT=/some/dir benchmarks/gpu_check.sh
# Builds the extension in place for sm_90 with every core, runs the CUDA tests, runs
# compute-sanitizer memcheck and racecheck on a short CUDA workload, runs the CUDA benchmarks, and
# writes logs and JSON under $OUT (default ./gpu_check_out). Each step has its own time limit (all
# together under 8 minutes); a failing step does not stop the later ones, except a failed build.
# The short table printed last is the result; record it in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
t0=$(date +%s)
SUMMARY=()

# run NAME LIMIT_SECONDS CMD...: output to $OUT/NAME.log, status and duration into the summary.
run() {
  local name=$1 limit=$2
  shift 2
  local s=$(date +%s)
  echo "=== [$(( s - t0 ))s] $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -ne 0 ] && verdict="FAIL (rc $rc)"
  [ $rc -eq 124 ] && verdict="TIMEOUT"
  SUMMARY+=("$(printf '%-14s %-14s %4ss' "$name" "$verdict" "$(( $(date +%s) - s ))")")
  tail -n 3 "$OUT/$name.log"
  return $rc
}

{
  nvidia-smi -L || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
  git rev-parse HEAD 2>/dev/null || true
  nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
[ -d "$SITE/nvidia/cu13/include" ] && export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export MMKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-$(nproc)}

if ! run build 200 "$PY" setup.py build_ext --inplace --build-temp build/gpu-check; then
  grep -E "error" "$OUT/build.log" | head -n 20
  printf '%s\n' "${SUMMARY[@]}"
  exit 1
fi
"$PY" .ci/cuda/ptxas_report.py "$OUT/build.log" >"$OUT/ptxas.txt" 2>&1
ptxas_rc=$?
SUMMARY+=("$(printf '%-14s %-14s' ptxas "$([ $ptxas_rc -eq 0 ] && echo 'ok (no spills)' || echo 'SPILLS')")")

run cuda_tests 130 "$PY" -m pytest -q -m cuda tests -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"

SAN=$(command -v compute-sanitizer || ls "$CUDA_HOME"/compute-sanitizer/compute-sanitizer 2>/dev/null || true)
if [ -n "$SAN" ]; then
  # No caching allocator: memcheck then sees every out-of-bounds access, not only those past a block.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run memcheck 50 "$SAN" --tool memcheck --error-exitcode 1 \
    "$PY" benchmarks/cuda_sanitize_case.py
  run racecheck 50 "$SAN" --tool racecheck --error-exitcode 1 "$PY" benchmarks/cuda_sanitize_case.py
else
  SUMMARY+=("sanitizer      SKIPPED (compute-sanitizer not found)")
fi

run bench_fcl 80 "$PY" benchmarks/cuda_concat_linear.py --quick --reps 30 --json "$OUT/bench_fcl.json"
if "$PY" -c 'import mmkernels.bench.cli' >/dev/null 2>&1; then
  run bench_suite 70 "$PY" -m mmkernels.bench --device cuda --quick --no-compile --json "$OUT/bench_suite.json"
fi

echo
echo "=== GPU check summary ($(( $(date +%s) - t0 ))s; logs and JSON in $OUT)"
head -n 1 "$OUT/env.txt"
grep -E "passed|failed|error" "$OUT/cuda_tests.log" | tail -n 1
tail -n 1 "$OUT/ptxas.txt"
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT"/memcheck.log "$OUT"/racecheck.log 2>/dev/null
printf '%s\n' "${SUMMARY[@]}"
echo
tail -n 12 "$OUT/bench_fcl.log"
