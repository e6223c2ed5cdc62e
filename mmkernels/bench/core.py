"""Cases, contenders and the suite registry.

A suite is a function ``(quick: bool) -> list[Case]`` registered under a name. A Case is cheap to
create; ``Case.build(device)`` allocates the inputs and returns the contenders, each a zero-argument
callable running one step (a forward, or a forward plus backward). The first contender is ours; the
contender named by ``Built.oracle`` is the reference its result is checked against.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

OURS = "mmkernels"
SKIP_COMPILE = False  # set by --no-compile


@dataclass
class Contender:
    name: str
    step: Callable[[], Any] | None  # None when unavailable
    reason: str = ""  # why it is unavailable (e.g. torch.compile failed)


@dataclass
class Built:
    contenders: list[Contender]
    oracle: str  # the contender whose output is the correctness reference
    tol: float  # max |ours - oracle| / max |oracle| allowed, per output tensor


@dataclass
class Case:
    suite: str
    shape: str  # human-readable shape, e.g. "8192x(512,768,128)->256"
    mode: str  # "fwd" or "fwd+bwd"
    dtype: torch.dtype
    build: Callable[[torch.device], Built] = field(repr=False)
    params: dict = field(default_factory=dict)  # the shape as numbers, for JSON/CSV
    baselines: tuple[str, ...] = ()  # the contenders other than ours, in table order
    devices: tuple[str, ...] = ("cpu", "cuda")
    flops: float = 0.0  # for GFLOP/s, 0 when not meaningful

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def id(self) -> str:
        return f"{self.suite}-{self.mode}-{self.dtype_name}-{self.shape}"


# name -> (cases(quick) -> list[Case], why-unavailable() -> str | None)
SUITES: dict[str, tuple[Callable[[bool], list[Case]], Callable[[], str | None]]] = {}


def register_suite(name: str, unavailable: Callable[[], str | None] = lambda: None):
    """Registers ``fn(quick) -> list[Case]``; ``unavailable()`` returns a reason to skip, or None."""

    def wrap(fn):
        SUITES[name] = (fn, unavailable)
        return fn

    return wrap


def suite_cases(name: str, quick: bool = False) -> list[Case]:
    _load_suites()
    cases, _ = SUITES[name]
    return cases(quick)


def suite_unavailable(name: str) -> str | None:
    _load_suites()
    return SUITES[name][1]()


def all_suites() -> list[str]:
    _load_suites()
    return list(SUITES)


def _load_suites() -> None:
    from . import suites  # noqa: F401  (registers on import)


# ----------------------------------------------------------------------------- step helpers


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


def compiled(fn: Callable, name: str = "compile") -> tuple[Callable | None, str]:
    """torch.compile(fn) compiled lazily on first call; the runner's warm-up absorbs the compile time."""
    if SKIP_COMPILE:
        return None, "skipped (--no-compile)"
    try:
        return torch.compile(fn, dynamic=False), ""
    except Exception as err:  # e.g. no C++ compiler, unsupported Python
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


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
