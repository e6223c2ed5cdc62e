"""fused_concat_linear vs eager F.relu(F.linear(torch.cat(xs, -1), W, b)) and torch.compile of it.

Forward cases also time a bare GEMM on an input concatenated beforehand (outside the timing): the
same relu(linear(.)) without the concatenation, i.e. the best the fused op could do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkernels

from ..core import OURS, Built, Case, Contender, Suite, compiled_contender, make_step, randn, tol_for

# (M rows, input widths, N) from issue 2.
SHAPES = [
    (8192, (512, 768, 128), 256),
    (4096, (2048, 2048, 512), 1024),
    (65536, (64, 64, 64), 32),
    (16384, (256, 256), 128),
    (32, (2048, 1024), 512),
]
DEFAULT_SHAPE = SHAPES[0]  # the default run: this shape, float32, forward and forward + backward
ACTIVATION = "relu"


def eager(xs, weight, bias):
    return F.relu(F.linear(torch.cat(xs, -1), weight, bias))


def _build(M, widths, N, mode, dtype, device) -> Built:
    K = sum(widths)
    grad = mode != "fwd"
    xs = [randn(M, d, dtype=dtype, device=device, requires_grad=grad) for d in widths]
    weight = randn(N, K, dtype=dtype, device=device, scale=K ** -0.5, requires_grad=grad)
    bias = randn(N, dtype=dtype, device=device, scale=0.1, requires_grad=grad)
    leaves = [*xs, weight, bias]
    grad_out = randn(M, N, dtype=dtype, device=device) if grad else None

    contenders = [
        Contender(OURS, make_step(lambda: mmkernels.fused_concat_linear(xs, weight, bias, ACTIVATION), mode, leaves, grad_out)),
        Contender("eager", make_step(lambda: eager(xs, weight, bias), mode, leaves, grad_out)),
        compiled_contender("compile", eager, lambda f: make_step(lambda: f(xs, weight, bias), mode, leaves, grad_out)),
    ]
    if mode == "fwd":
        x_cat = torch.cat(xs, -1)
        contenders.append(Contender("gemm", make_step(lambda: F.relu(F.linear(x_cat, weight, bias)), mode, [], None)))
    return Built(contenders, oracle="eager", tol=tol_for(dtype))


def make_case(M: int, widths: tuple[int, ...], N: int, mode: str, dtype: torch.dtype, default: bool = False) -> Case:
    K = sum(widths)
    return Case(
        suite="concat_linear",
        shape=f"{M}x({','.join(map(str, widths))})->{N}",
        mode=mode,
        dtype=dtype,
        build=lambda device: _build(M, widths, N, mode, dtype, device),
        params={"M": M, "widths": list(widths), "N": N, "activation": ACTIVATION},
        baselines=("eager", "compile", "gemm") if mode == "fwd" else ("eager", "compile"),
        flops=2.0 * M * K * N * (1 if mode == "fwd" else 3),
        default=default,
    )


def _cases() -> list[Case]:
    return [make_case(M, widths, N, mode, dtype,
                      default=dtype == torch.float32 and (M, widths, N) == DEFAULT_SHAPE)
            for dtype in (torch.float32, torch.bfloat16)
            for mode in ("fwd", "fwd+bwd")
            for M, widths, N in SHAPES]


SUITE = Suite(
    "concat_linear", "mmkernels.fused_concat_linear (relu) vs linear over torch.cat", _cases,
    contenders={
        OURS: "mmkernels.fused_concat_linear(xs, W, b, 'relu'): one GEMM per input, no concatenation",
        "eager": "F.relu(F.linear(torch.cat(xs, -1), W, b)) in eager PyTorch",
        "compile": "torch.compile of the eager composition (inductor)",
        "gemm": "F.relu(F.linear(x, W, b)) on an input concatenated beforehand (forward only): the floor",
    })
