#!/usr/bin/env bash
# Large-input tests (more than 2^31 elements in one tensor; marked slow). Each test skips itself when
# the machine has less free memory than it needs (about 10 GiB).
set -euo pipefail
PY=${PY:-$(pwd)/.venv/bin/python}
t0=$(date +%s)
MMKERNELS_LARGE_TESTS=1 "$PY" -m pytest -q -p no:cacheprovider -m slow -rs tests/hardening/test_large_inputs.py
echo "large-input tests done in $(( $(date +%s) - t0 ))s"
