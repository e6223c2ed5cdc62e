"""The benchmark's vocabulary: options, contenders, cases and suites, plus helpers for writing cases.

A leaf module: it imports nothing from the rest of ``mmkernels.bench``, so suites, the runner and the
report all import it and never each other's internals. The registry of suites is
``mmkernels.bench.suites.SUITES``.

A Case is cheap to create; ``Case.build(device)`` allocates the inputs and returns the contenders,
each a zero-argument callable running one step (a forward, or a forward plus backward). The first
contender is ours; the contender named by ``Built.oracle`` is the reference its result is checked
against.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

OURS = "mmkernels"
SCOPES = ("quick", "default", "full")


@dataclass(frozen=True)
class Options:
    """What a run measures, passed from the command line to the runner (no module globals)."""

    compile: bool = True  # time the torch.compile contenders (compiling costs seconds per case)
    memory: bool = True  # measure peak memory, in a pass of its own after the timing


@dataclass
class Contender:
    name: str
    step: Callable[[], Any] | None  # None when unavailable
    reason: str = ""  # why it is unavailable (e.g. torch.compile failed)
    compiles: bool = False  # a torch.compile contender: left out when Options.compile is False


@dataclass
class Built:
    contenders: list[Contender]
    oracle: str  # the contender whose output is the correctness reference
    tol: float  # max relative error (see rel_error) allowed against the oracle
    # Per contender, a function taking its output to the layout the check compares in (e.g. padded
    # results to packed rows); applied in the correctness check only, never timed.
    check_layout: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    # What the builder measured beside the timing (e.g. how much of a step ours can change at all),
    # one line each; the report prints them with the case's notes.
    notes: list[str] = field(default_factory=list)

    def for_check(self, name: str, output: Any) -> Any:
        """Contender ``name``'s output in the layout the correctness check compares in."""
        return self.check_layout.get(name, lambda o: o)(output)


@dataclass
class Case:
    suite: str
    shape: str  # human-readable shape in the README's notation, e.g. "8192x(512,768,128)->256"
    mode: str  # "fwd" or "fwd+bwd"
    dtype: torch.dtype
    build: Callable[[torch.device], Built] = field(repr=False)
    params: dict = field(default_factory=dict)  # the shape as numbers, for JSON/CSV
    baselines: tuple[str, ...] = ()  # the contenders other than ours, in table order
    devices: tuple[str, ...] = ("cpu", "cuda")
    flops: float = 0.0  # for GFLOP/s, 0 when not meaningful
    default: bool = False  # one of the suite's representative cases, run without --full

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def id(self) -> str:
        return f"{self.suite}-{self.mode}-{self.dtype_name}-{self.shape}"


@dataclass(frozen=True)
class Suite:
    """A named family of cases. ``cases()`` returns the full sweep; the default run takes the cases
    marked ``default=True`` (one or two per suite, so that every suite shows up in a short run)."""

    name: str
    about: str  # one line: what is measured against what
    cases: Callable[[], list[Case]] = field(repr=False)
    contenders: dict[str, str] = field(default_factory=dict)  # glossary: contender -> what it runs
    unavailable: Callable[[], str | None] = field(default=lambda: None, repr=False)  # reason to skip

    def select(self, scope: str) -> list[Case]:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        cases = self.cases()
        return cases if scope == "full" else [c for c in cases if c.default]


# ----------------------------------------------------------------------------- helpers for suites


def seed(case_id: str) -> None:
    """Seeds torch from the case, so every run of a case draws the same inputs."""
    torch.manual_seed(zlib.crc32(case_id.encode()))


def randn(*shape, dtype, device, scale=1.0, requires_grad=False) -> torch.Tensor:
    """Random normal inputs (never zeros), so no kernel can take a shortcut on the data."""
    t = torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)


def make_step(fn: Callable[[], torch.Tensor], mode: str, leaves: list[torch.Tensor],
              grad_out: torch.Tensor | None) -> Callable[[], Any]:
    """One forward (under no_grad, as in inference) or one forward + backward (grads of ``leaves``).

    Gradients come from torch.autograd.grad, so nothing accumulates into .grad between repetitions.
    """
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn()
    else:
        def step():
            y = fn()
            return (y, *torch.autograd.grad(y, leaves, grad_out))
    return step


def compiled_contender(name: str, fn: Callable, make: Callable[[Callable], Callable[[], Any]]) -> Contender:
    """A torch.compile contender: ``make(torch.compile(fn))`` gives its step. torch.compile compiles
    lazily on the first call, which the runner makes (and checks) before timing; the runner leaves
    the contender out when compiling is switched off."""
    try:
        fn_c = torch.compile(fn, dynamic=False)
    except Exception as err:  # e.g. no C++ compiler, unsupported Python
        return Contender(name, None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}", compiles=True)
    return Contender(name, make(fn_c), compiles=True)


def tol_for(dtype: torch.dtype) -> float:
    # Tolerance on rel_error. Rounding alone gives ~1e-6 in float32, ~4e-3 in bfloat16. What sets
    # it is relu's kink: where two correct summation orders put a pre-activation on opposite sides
    # of 0, one element of gz differs by |grad_out| ~ 1, which moves grad_bias (and gz) by about
    # 1/sqrt(M*N/2) in this norm: ~1e-3 for the 2M-element outputs here, and float32 does meet such
    # elements (|z| < 1e-6 among millions). A wrong kernel (a segment, the bias or a block missing or
    # mixed up) is off by 1e-2 or more.
    return {torch.float64: 1e-10, torch.float32: 3e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}[dtype]


def rel_error(a, b) -> float:
    """Worst over paired tensors of ||a - b|| / ||b|| (Frobenius norms).

    A norm, not a max: where rounding moves a pre-activation across relu's kink (common in bfloat16,
    possible in float32), the two gradients legitimately differ in a few elements by O(1), which a
    max-based measure would call wrong; a real bug changes the norm.
    """
    if isinstance(a, torch.Tensor):
        a, b = (a,), (b,)
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        if x.shape != y.shape:
            return math.inf
        if y.numel() == 0:
            continue
        denom = y.norm().item() or 1.0
        worst = max(worst, (x - y).norm().item() / denom)
    return worst
