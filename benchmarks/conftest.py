"""pytest-benchmark glue: the cases come from mmkernels.bench's registry (one definition for both
tools), and every contender is checked against the case's oracle before it is timed.

Run with ``python -m pytest benchmarks --benchmark-only``. Threads: MMKERNELS_BENCH_THREADS (default 2).
Unlike ``python -m mmkernels.bench``, pytest-benchmark times one contender after another, not
interleaved, and gives no interval on a ratio; use the runner for speed-ups on a busy machine.
"""
from __future__ import annotations

import os

import pytest
import torch

from mmkernels.bench.core import OURS, Case, rel_error, seed

torch.set_num_threads(int(os.environ.get("MMKERNELS_BENCH_THREADS", "2")))


def case_params(cases: list[Case]) -> list:
    """(case, contender) pairs as pytest params, grouped so pytest-benchmark compares within a case."""
    return [pytest.param(c, name, id=f"{c.id}-{name}") for c in cases for name in (OURS, *c.baselines)]


def bench_case(benchmark, case: Case, contender: str) -> None:
    torch._dynamo.reset()
    seed(case.id)
    built = case.build(torch.device("cpu"))
    steps = {c.name: c for c in built.contenders}
    if steps[contender].step is None:
        pytest.skip(f"{contender} unavailable: {steps[contender].reason}")
    step = steps[contender].step
    out = step()  # also compiles the torch.compile contender, outside the timing
    if contender != built.oracle:
        err = rel_error(built.for_check(contender, out), built.for_check(built.oracle, steps[built.oracle].step()))
        assert err <= built.tol, f"{contender} differs from {built.oracle}: rel error {err:.3g}"
    del out
    benchmark.group = case.id
    benchmark.extra_info.update(case.params, contender=contender, mode=case.mode, dtype=case.dtype_name,
                                notes=built.notes)
    benchmark.pedantic(step, warmup_rounds=2, rounds=20, iterations=1)
