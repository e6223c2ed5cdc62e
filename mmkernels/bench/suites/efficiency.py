"""Dense efficiency (issue 13): the attention forward's FLOP rate as a fraction of the best GEMM rate of
the same run, the faster of F.linear and one-input fused_concat_linear at 4096x2048x2048.

The GEMM case sets the rate (params role "gemm"); each attention case's fraction is printed by the
runner and saved with the results (report.efficiency). Attention FLOPs count its two GEMMs only
(4 B H Lq Lk E), so the softmax work is what the fraction loses besides GEMM efficiency.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkernels

from ..core import OURS, Built, Case, Contender, Suite, make_step, randn, tol_for

GEMM = (4096, 2048, 2048)  # M, K, N
# (B, H, L, E): self-attention sized, Lq = Lk = L; the float32 targets 90% on both, bfloat16 80% / 70%.
ATTENTION = [(4, 16, 2048, 128), (8, 8, 1024, 64)]
DTYPES = (torch.float32, torch.bfloat16)


def _build_gemm(dtype, device) -> Built:
    M, K, N = GEMM
    x = randn(M, K, dtype=dtype, device=device)
    w = randn(N, K, dtype=dtype, device=device, scale=K ** -0.5)
    return Built([
        Contender(OURS, make_step(lambda: mmkernels.fused_concat_linear([x], w, None), "fwd", [], None)),
        Contender("linear", make_step(lambda: F.linear(x, w), "fwd", [], None)),
    ], oracle="linear", tol=tol_for(dtype))


def _build_attention(B, H, L, E, dtype, device) -> Built:
    q, k, v = (randn(B, H, L, E, dtype=dtype, device=device) for _ in range(3))
    return Built([
        Contender(OURS, make_step(lambda: mmkernels.cross_modal_attention(q, k, v), "fwd", [], None)),
        Contender("sdpa", make_step(lambda: F.scaled_dot_product_attention(q, k, v), "fwd", [], None)),
    ], oracle="sdpa", tol=tol_for(dtype))


def _cases() -> list[Case]:
    cases = []
    M, K, N = GEMM
    for dtype in DTYPES:
        cases.append(Case(
            suite="efficiency", shape=f"gemm {M}x{K}x{N}", mode="fwd", dtype=dtype,
            build=lambda device, dtype=dtype: _build_gemm(dtype, device),
            params={"role": "gemm", "M": M, "K": K, "N": N}, baselines=("linear",), devices=("cpu",),
            flops=2.0 * M * K * N, default=dtype == torch.float32))
        for B, H, L, E in ATTENTION:
            cases.append(Case(
                suite="efficiency", shape=f"attn B{B} H{H} L{L} E{E}", mode="fwd", dtype=dtype,
                build=lambda device, s=(B, H, L, E), dtype=dtype: _build_attention(*s, dtype, device),
                params={"role": "attention", "B": B, "H": H, "L": L, "E": E}, baselines=("sdpa",),
                devices=("cpu",), flops=4.0 * B * H * L * L * E,
                default=dtype == torch.float32 and (B, H, L, E) == ATTENTION[1]))
    return cases


SUITE = Suite(
    "efficiency", "attention forward's FLOP rate / the best GEMM rate of the run (CPU)",
    _cases,
    contenders={
        OURS: "gemm: fused_concat_linear([x], W); attn: cross_modal_attention(q, k, v)",
        "linear": "F.linear(x, W): with ours, sets the run's best GEMM rate",
        "sdpa": "F.scaled_dot_product_attention(q, k, v), for comparison",
    })
