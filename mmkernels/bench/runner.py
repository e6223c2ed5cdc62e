"""Runs one case: build, check correctness against the oracle, time interleaved, then measure memory
in a separate pass, and attach a confidence interval to every speed-up."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from . import stats
from .core import OURS, Case, Options, rel_error, seed
from .memory import peak_extra_bytes
from .timing import Budget, Stats, measure

# Past the time budget, a case keeps repeating while a speed-up's interval still spans 1.0 and is
# wider than +-SETTLED_HALFWIDTH (Budget.max_seconds caps it).
SETTLED_HALFWIDTH = 0.05


@dataclass
class Result:
    case: Case
    device: str
    times: dict[str, Stats] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)  # peak extra bytes of one step
    unavailable: dict[str, str] = field(default_factory=dict)  # contender -> reason
    error: str = ""  # set when ours is wrong or failed: nothing was timed
    rel_err: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # Built.notes
    intervals: dict[str, stats.Interval] = field(default_factory=dict)  # baseline -> speed-up interval
    wall_s: float = 0.0  # what the case cost: build, checks, compiling, timing and memory

    def speedup(self, baseline: str) -> float | None:
        """baseline median / our median (> 1: we are faster)."""
        if self.error or baseline not in self.times or OURS not in self.times:
            return None
        return self.times[baseline].median_s / self.times[OURS].median_s

    def verdict(self, baseline: str) -> str | None:
        """wins / loses / inconclusive (the speed-up's interval spans 1.0), None when not timed."""
        return self.intervals[baseline].verdict() if baseline in self.intervals else None


def speedup_intervals(samples: dict[str, list[float]]) -> dict[str, stats.Interval]:
    """Paired-bootstrap interval of baseline / ours for every baseline in ``samples``."""
    return {name: stats.paired_ratio(xs, samples[OURS]) for name, xs in samples.items() if name != OURS}


def _settled(samples: dict[str, list[float]]) -> bool:
    return all(iv.verdict() != "inconclusive" or iv.rel_halfwidth <= SETTLED_HALFWIDTH
               for iv in speedup_intervals(samples).values())


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160] if lines else ''}"


def run_case(case: Case, device: torch.device, budget: Budget, options: Options = Options()) -> Result:
    t0 = time.perf_counter()
    try:
        res = _run(case, device, budget, options)
    except Exception as err:  # building the case, or timing it, raised: an error row, and the run goes on
        res = Result(case, device.type, error=f"raised {_reason(err)}")
    res.wall_s = time.perf_counter() - t0
    return res


def _run(case: Case, device: torch.device, budget: Budget, options: Options) -> Result:
    res = Result(case, device.type)
    torch._dynamo.reset()  # a fresh compile per case: static shapes, no recompile limit
    seed(case.id)
    built = case.build(device)
    res.notes = built.notes
    steps = {}
    for c in built.contenders:
        if c.compiles and not options.compile:
            res.unavailable[c.name] = "skipped (--no-compile)"
        elif c.step is None:
            res.unavailable[c.name] = c.reason or "unavailable"
        else:
            steps[c.name] = c.step

    # Correctness first: one call of each contender (this also compiles the torch.compile ones).
    outputs = {}
    for name in list(steps):
        try:
            outputs[name] = steps[name]()
        except Exception as err:  # a baseline failing is reported as n/a; ours failing is an error
            if name == OURS:
                res.error = f"{OURS} failed: {_reason(err)}"
                return res
            res.unavailable[name] = _reason(err)
            del steps[name]
    if built.oracle not in outputs:
        res.error = f"oracle {built.oracle!r} unavailable: {res.unavailable.get(built.oracle)}"
        return res
    outputs = {name: built.for_check(name, out) for name, out in outputs.items()}
    for name, out in outputs.items():
        if name == built.oracle:
            continue
        err = rel_error(out, outputs[built.oracle])
        res.rel_err[name] = err
        if err > built.tol:
            msg = f"{name} differs from {built.oracle}: rel error {err:.3g} > {built.tol:.3g}"
            if name == OURS:
                res.error = "WRONG RESULT: " + msg
                return res
            res.unavailable[name] = msg
            del steps[name]
    del outputs
    gc.collect()

    res.times = measure(steps, device, budget, settled=_settled)
    res.intervals = speedup_intervals({n: t.samples_s for n, t in res.times.items()})
    if options.memory:  # after the timing: the profiler never runs during a timed repetition
        for name, step in steps.items():
            res.memory[name] = peak_extra_bytes(step, device)
    return res
