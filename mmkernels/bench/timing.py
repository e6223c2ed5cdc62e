"""Interleaved timing: every repetition runs each contender once, in a rotating order, so slow drifts
of the machine (other processes, frequency changes) hit all contenders alike. Keeps every sample;
reports the median. Once the time budget is spent, repetitions continue (up to ``max_seconds``) while
the caller's ``settled`` test says the spread is still too wide for a verdict.

CPU: time.perf_counter around a batch of calls (enough calls that one sample lasts >= min_sample_s),
with the garbage collector off. CUDA: CUDA events around the batch, synchronising between samples.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Stats:
    median_s: float
    q1_s: float
    q3_s: float
    reps: int  # number of samples
    calls_per_rep: int
    samples_s: list[float] = field(default_factory=list, repr=False)  # time per call, one per repetition


@dataclass
class Budget:
    warmup: int = 3  # calls per contender before any timing
    min_reps: int = 15
    max_reps: int = 200
    seconds: float = 2.0  # total timing time per case, all contenders together, once min_reps is reached
    min_sample_s: float = 2e-3  # CPU: batch calls so one sample is not dominated by timer resolution
    max_seconds: float = 6.0  # the most timing time per case while the spread stays too wide


QUICK = Budget(warmup=2, min_reps=7, max_reps=40, seconds=0.6, max_seconds=1.5)


def _sample(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def measure(steps: dict[str, Callable[[], object]], device: torch.device, budget: Budget,
            settled: Callable[[dict[str, list[float]]], bool] = lambda samples: True) -> dict[str, Stats]:
    """Median time per call of each step, contenders interleaved round-robin per repetition.

    Stops after ``budget.seconds`` (and at least ``min_reps``) if ``settled(samples)``, else goes on
    until it is, or ``budget.max_seconds`` or ``max_reps`` is reached.
    """
    names = list(steps)
    for name in names:
        for _ in range(budget.warmup):
            steps[name]()
    # Calibrate the batch size per contender from one more call.
    calls = {}
    for name in names:
        t = _sample(steps[name], 1, device)
        calls[name] = 1 if device.type == "cuda" else max(1, min(1000, int(budget.min_sample_s / max(t, 1e-9)) + 1))
    samples: dict[str, list[float]] = {n: [] for n in names}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t_start = time.perf_counter()
        next_check = 0  # settled() costs a bootstrap (~10 ms): asked past the budget, then every 8 reps
        for rep in range(budget.max_reps):
            order = names[rep % len(names):] + names[: rep % len(names)]  # rotate who goes first
            for name in order:
                samples[name].append(_sample(steps[name], calls[name], device))
            spent = time.perf_counter() - t_start
            if rep + 1 >= budget.min_reps and spent > budget.seconds:
                if spent > budget.max_seconds:
                    break
                if rep >= next_check:
                    if settled(samples):
                        break
                    next_check = rep + 8
            gc.collect(0) if rep % 16 == 15 else None  # keep young-generation garbage from piling up
    finally:
        if was_enabled:
            gc.enable()
    out = {}
    for name, xs in samples.items():
        q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
        out[name] = Stats(statistics.median(xs), q[0], q[2], len(xs), calls[name], xs)
    return out
