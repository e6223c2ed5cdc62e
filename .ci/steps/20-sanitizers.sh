#!/usr/bin/env bash
# ASan + UBSan: build the CPU kernels with -fsanitize=address,undefined in a copy of the tree (so the
# normal build is untouched) and run the CPU tests against that build. Any sanitizer report aborts
# the Python process, which fails pytest, which fails CI.
#
# Python and torch are not instrumented: the ASan runtime is LD_PRELOADed so that it comes first,
# and leak detection is off (the interpreter "leaks" by design at exit).
#   MMKERNELS_ASAN_TESTS   test paths (default: tests/); torch.compile/export tests are left out,
#                          they spend their time in the compiler, not in our kernels
#   MMKERNELS_ASAN_DEBUG=1 build -O0 -g instead of -O3 (slower, exact line numbers)
set -euo pipefail
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
t0=$(date +%s)

if [ -n "${MMKERNELS_ASAN_DIR:-}" ]; then
  # A kept directory (for local iterations: ninja then rebuilds only what changed).
  WORK=$MMKERNELS_ASAN_DIR
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmkernels-asan.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi
# Tracked and untracked-but-not-ignored files: the sources, never the normal build's outputs.
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK"

cd "$WORK"
echo "building the sanitized kernels in $WORK"
MMKERNELS_CUDA=0 MMKERNELS_SANITIZE=address,undefined MMKERNELS_DEBUG=${MMKERNELS_ASAN_DEBUG:-0} \
  MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace >build.log 2>&1 || { tail -50 build.log; exit 1; }
SO=$(ls mmkernels/_C*.so)
# The library must really be instrumented (else this step would pass vacuously).
# (No grep -q: it would close the pipe early and pipefail would report nm's SIGPIPE.)
nm -D --undefined-only "$SO" | grep __asan_report >/dev/null || { echo "error: $SO is not instrumented by ASan"; exit 1; }
echo "built in $(( $(date +%s) - t0 ))s"

# libstdc++ preloaded too: python itself does not link it, and ASan's __cxa_throw interceptor must
# find the real one at start-up, or the first C++ exception (any TORCH_CHECK) aborts on a CHECK.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(readlink -f "$(gcc -print-file-name=libstdc++.so)")"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

# The runtime must be live and fatal: a canary overflow has to kill a child process.
# (4 KiB: large enough that Python allocates it with malloc, which ASan guards, not from its arenas.)
# (In a subshell, so that the expected "Aborted" notice goes to /dev/null too.)
if ( "$PY" -c "import ctypes; b = ctypes.create_string_buffer(4096); ctypes.memset(ctypes.addressof(b), 0, 8192)" ) 2>/dev/null; then
  echo "error: ASan did not catch the canary overflow; is LD_PRELOAD=$LD_PRELOAD working?"
  exit 1
fi
# And the tests must import the sanitized copy, not the normal build.
"$PY" -c "import mmkernels, sys; f = mmkernels.__file__; print('testing', f); sys.exit(not f.startswith('$WORK'))"

read -ra PATHS <<<"${MMKERNELS_ASAN_TESTS:-tests}"
# The emulation harness (its own library, built with its own instrumentation) and the 2-process
# distributed tests (the same CPU kernels, through gloo) run in the normal build only.
"$PY" -m pytest -q -p no:cacheprovider "${PATHS[@]}" -m "not slow and not cuda and not emu" -k "not compile and not export" \
  --ignore=tests/distributed
echo "sanitizer step done in $(( $(date +%s) - t0 ))s"
