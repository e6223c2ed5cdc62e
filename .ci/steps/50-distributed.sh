#!/usr/bin/env bash
# examples/distributed_train.py under torchrun on 2 CPU processes (gloo), in each of its modes: it
# must train (held-out accuracy) and exit cleanly. tests/distributed (run with the other tests)
# checks the numbers against one process.
set -euo pipefail
PY=${PY:-$(pwd)/.venv/bin/python}
t0=$(date +%s)
for mode in "" "--tp" "--checkpoint" "--fsdp --checkpoint"; do
  echo "--- torchrun --nproc-per-node 2 examples/distributed_train.py $mode"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29517 \
    examples/distributed_train.py --steps 20 --expect-accuracy 0.9 $mode
done
echo "distributed example done in $(( $(date +%s) - t0 ))s"
