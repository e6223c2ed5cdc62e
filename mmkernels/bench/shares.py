"""The share of one step's CPU time spent in some ops, from the torch profiler: how much of a step
a contender that changes only those ops can change at all (Amdahl's bound on its speed-up).

The whole is the sum of every profiled op's self time, which leaves out Python between ops; so the
share can only be overstated, and the bound drawn from it can only be generous.
"""
from __future__ import annotations

from typing import Callable

from .memory import without_profiler_chatter


def cpu_time_share(step: Callable[[], object], names: set[str]) -> float:
    """The CPU time of the ops in ``names``, children included (no op named may run inside another),
    over the whole, in one call of ``step`` after one unprofiled call (first-call allocations and
    lazy setup)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.cpu_time_total for e in events if e.key in names) / total if total else 0.0
