#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (sm_90) whose python3 has a CUDA build of torch,
# pytest and pytest-benchmark, and no network. From the repository root:
#     OUT=/some/dir benchmarks/gpu_check.sh
# Builds the extension in place for sm_90 with every core, runs every CUDA test (-m cuda), runs
# compute-sanitizer memcheck and racecheck on a short workload of every kernel of ours, runs the CUDA
# benchmarks (concat-linear, attention, then the bench runner's CUDA suite if time is left), and
# writes logs and JSON under $OUT (default ./gpu_check_out). The whole run is held under 8 minutes:
# each step has its own limit, cut to what is left of a global budget (BUDGET_S, default 450 s after
# start-up); a step with too little time left is skipped and says so. A failing step does not stop the
# later ones, except a failed build. The short table printed last is the result: record it (card,
# commit, numbers) in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
t0=$(date +%s)
DEADLINE=$(( t0 + ${BUDGET_S:-450} ))
SUMMARY=()

# run NAME LIMIT_SECONDS CMD...: output to $OUT/NAME.log; verdict and duration into the summary.
run() {
  local name=$1 limit=$2
  shift 2
  local s left
  s=$(date +%s)
  left=$(( DEADLINE - s ))
  if [ "$left" -lt 25 ]; then
    SUMMARY+=("$(printf '%-16s %-16s' "$name" 'SKIPPED (budget)')")
    return 99
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$(( s - t0 ))s] $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? verdict=ok
  [ $rc -ne 0 ] && verdict="FAIL (rc $rc)"
  [ $rc -eq 124 ] && verdict="TIMEOUT"
  SUMMARY+=("$(printf '%-16s %-16s %4ss' "$name" "$verdict" "$(( $(date +%s) - s ))")")
  tail -n 3 "$OUT/$name.log"
  return $rc
}

{
  nvidia-smi -L || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "cores $(nproc)"
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
SUMMARY+=("$(printf '%-16s %-16s' ptxas "$([ $ptxas_rc -eq 0 ] && echo 'ok (no spills)' || echo 'SPILLS')")")

run cuda_tests 150 "$PY" -m pytest -q -m cuda tests -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"

SAN=$(command -v compute-sanitizer || ls "$CUDA_HOME"/compute-sanitizer/compute-sanitizer 2>/dev/null || true)
if [ -n "$SAN" ]; then
  # Only our kernels are instrumented (kns=mmkernels: the namespace in every kernel name of ours);
  # without the caching allocator memcheck sees accesses past a tensor, not only past a block.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run memcheck 55 "$SAN" --tool memcheck --kernel-name kns=mmkernels \
    --error-exitcode 3 "$PY" benchmarks/cuda_sanitize_case.py
  run racecheck 55 "$SAN" --tool racecheck --kernel-name kns=mmkernels --error-exitcode 3 \
    "$PY" benchmarks/cuda_sanitize_case.py
else
  SUMMARY+=("sanitizers       SKIPPED (compute-sanitizer not found)")
fi

run bench_concat 70 "$PY" benchmarks/cuda_concat_linear.py --quick --reps 30 --json "$OUT/bench_concat_linear.json"
if [ -f benchmarks/gpu_attention_bench.py ]; then
  run bench_attention 70 "$PY" benchmarks/gpu_attention_bench.py --quick --reps 10 --json "$OUT/bench_attention.json"
fi
if "$PY" -c 'import mmkernels.bench.cli' >/dev/null 2>&1; then
  run bench_suite 90 "$PY" -m mmkernels.bench --device cuda --quick --no-compile --json "$OUT/bench_suite.json"
fi

echo
echo "=== GPU check summary ($(( $(date +%s) - t0 ))s; logs and JSON in $OUT)"
cat "$OUT/env.txt"
echo "tests:     $(grep -E '(passed|failed|error)' "$OUT/cuda_tests.log" 2>/dev/null | tail -n 1)"
echo "ptxas:     $(tail -n 1 "$OUT/ptxas.txt")"
for t in memcheck racecheck; do
  [ -f "$OUT/$t.log" ] && echo "$t: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$t.log" | tail -n 1)"
done
printf '%s\n' "${SUMMARY[@]}"
echo
[ -f "$OUT/bench_concat.log" ] && tail -n 9 "$OUT/bench_concat.log"
