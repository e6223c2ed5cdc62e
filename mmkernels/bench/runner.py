"""Runs one case: build, check correctness against the oracle, time interleaved, measure memory."""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from .core import OURS, Case, rel_error, seed
from .memory import peak_extra_bytes
from .timing import Budget, Stats, measure


class CorrectnessError(RuntimeError):
    pass


@dataclass
class Result:
    case: Case
    device: str
    times: dict[str, Stats] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)  # peak extra bytes of one step
    unavailable: dict[str, str] = field(default_factory=dict)  # contender -> reason
    error: str = ""  # set when ours is wrong or failed: nothing was timed
    rel_err: dict[str, float] = field(default_factory=dict)

    def speedup(self, baseline: str) -> float | None:
        """baseline median / our median (> 1: we are faster)."""
        if self.error or baseline not in self.times or OURS not in self.times:
            return None
        return self.times[baseline].median_s / self.times[OURS].median_s


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160] if lines else ''}"


def run_case(case: Case, device: torch.device, budget: Budget, with_memory: bool = True) -> Result:
    res = Result(case, device.type)
    torch._dynamo.reset()  # a fresh compile per case: static shapes, no recompile limit
    seed(case.id)
    built = case.build(device)
    steps = {}
    for c in built.contenders:
        if c.step is None:
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

    res.times = measure(steps, device, budget)
    if with_memory:
        for name, step in steps.items():
            res.memory[name] = peak_extra_bytes(step, device)
    return res
