#!/usr/bin/env bash
# CI, CUDA part (no GPU needed; run by .ci/run after the CPU build and tests).
#
# In its own venv with the CUDA 13.0 build of torch 2.14.1: builds a GPU wheel of mmkernels from a
# copy of the sources (sm_80 and sm_90 SASS plus sm_90 PTX; our sources compile with warnings as
# errors), fails on ptxas spills in our kernels, checks the wheel's contents (library, device code,
# recorded torch/CUDA versions), installs it, imports it without a GPU and checks that every op has
# a CUDA kernel. Nothing here can run a kernel: benchmarks/gpu_check.sh does that on a GPU machine.
# Measured (2 cores shared with other jobs, load average 10-15): venv + torch 2.14.1 install 330 s,
# the wheel build for two architectures 850 s (concat-linear and attention kernels), the checks 20 s:
# 1205 s in all. Each step prints its start time, so CI logs show where the time goes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
t0=$(date +%s)
step() { echo; echo "=== cuda [$(( $(date +%s) - t0 ))s] $*"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmkernels-cuda-ci.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
VENV=$WORK/venv
ARCHS="8.0;9.0+PTX"

step "venv with torch 2.14.1 (the CUDA 13.0 build)"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.14.1 numpy ninja setuptools wheel
PY=$VENV/bin/python
SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
export CUDA_HOME=/usr/local/cuda
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export PATH="$VENV/bin:$CUDA_HOME/bin:$PATH"
export MMKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS=${MAX_JOBS:-2}
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
nvcc --version | tail -n 2

step "copy the tracked sources (the checkout's CPU build stays untouched)"
mkdir -p "$WORK/src"
git ls-files -z | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | xargs -0 cp --parents -t "$WORK/src"

step "build the GPU wheel: MMKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=\"$ARCHS\" pip wheel --no-build-isolation --no-deps ."
if ! (cd "$WORK/src" && pip wheel -v --no-build-isolation --no-deps -w "$WORK/dist" .) >"$WORK/build.log" 2>&1; then
  grep -E "error|warning" "$WORK/build.log" | head -n 50 || true
  tail -n 60 "$WORK/build.log"
  echo "FAIL: the CUDA build failed (log above)"
  exit 1
fi
mkdir -p "$ROOT/build" && cp "$WORK/build.log" "$ROOT/build/cuda-ci-build.log"  # kept for inspection
echo "build log: build/cuda-ci-build.log"

step "ptxas: registers and spills of every kernel of ours (fails on any spill)"
"$PY" .ci/cuda/ptxas_report.py "$WORK/build.log"

step "wheel contents"
WHEEL=$(ls "$WORK"/dist/mmkernels-*.whl)
TORCH_V=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
CUDA_V=$("$PY" -c 'import torch; print(torch.version.cuda)')
"$PY" .ci/cuda/check_wheel.py "$WHEEL" "$TORCH_V" "$CUDA_V" "$ARCHS"

step "install the wheel, import it without a GPU, every op has a CUDA kernel"
"$VENV/bin/pip" install -q --no-deps "$WHEEL"
(cd "$WORK" && "$PY" "$ROOT/.ci/cuda/check_cuda_ops.py")

step "CUDA part done in $(( $(date +%s) - t0 ))s"
