"""Large inputs: 64-bit indexing (more than 2^31 elements in one tensor, more than 2^31 rows).

Marked `slow`: skipped by the default run (`-m "not slow"` is not implied, so each test also skips
unless MMKERNELS_LARGE_TESTS=1), run by .ci/steps/40-large-inputs.sh. Each test skips itself when
the machine lacks the memory it needs. Rows are independent in these ops, so correctness is checked
on sampled rows (the first ones, the ones either side of 2^31 elements / rows, the last ones)
against the float64 reference of those rows alone.
"""
from __future__ import annotations

import os

import pytest
import torch

import mmkernels
from mmkernels import reference

from fuzz_support import TOLERANCES

INT32_MAX = 2**31 - 1

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MMKERNELS_LARGE_TESTS") != "1",
                       reason="large-input tests need MMKERNELS_LARGE_TESTS=1 (and the memory)"),
]


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def need_gib(gib: float) -> None:
    avail = _available_gib()
    if avail < gib:
        pytest.skip(f"needs about {gib:.0f} GiB of free memory, {avail:.1f} GiB available")


def sample_rows(m: int, boundary: int):
    """Row indices to check: the edges and both sides of `boundary` (the row holding element 2^31)."""
    picks = {0, 1, 2, m - 3, m - 2, m - 1, boundary - 2, boundary - 1, boundary, boundary + 1}
    return torch.tensor(sorted(i for i in picks if 0 <= i < m))


def check_rows(out, rows, xs, w, b, activation):
    want = reference.fused_concat_linear([x[rows].double() for x in xs], w.double(),
                                         None if b is None else b.double(), activation)
    atol, rtol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out[rows].double(), want, atol=atol * max(want.abs().max().item(), 1.0), rtol=rtol)


def test_fcl_more_than_2_31_rows():
    # One input of 2^31 + 1 rows (bfloat16, 4 GiB) and as many output rows: M itself overflows int32.
    need_gib(10)
    m = INT32_MAX + 2
    x = torch.empty(m, 1, dtype=torch.bfloat16)
    x.view(-1)[: 1 << 20].normal_()
    x.view(-1)[1 << 20 :].fill_(0.5)
    x[-(1 << 10) :].normal_()  # random values at the end too, so a wrapped index would show
    w = torch.randn(1, 1, dtype=torch.bfloat16)
    b = torch.randn(1, dtype=torch.bfloat16)
    out = mmkernels.fused_concat_linear([x], w, b, "relu")
    assert out.shape == (m, 1)
    check_rows(out, sample_rows(m, INT32_MAX), [x], w, b, "relu")


def test_fcl_output_more_than_2_31_elements_forward_and_backward():
    # Output (M, 16) with M * 16 > 2^31 (4 GiB in bfloat16) from two narrow segments; backward with
    # the output as its own incoming gradient (no extra 4 GiB), activation "none" so gz aliases it.
    need_gib(10)
    n = 16
    m = (INT32_MAX + 1) // n + 1
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(m, d, dtype=torch.bfloat16, generator=g).requires_grad_() for d in (1, 2)]
    w = torch.randn(n, 3, dtype=torch.bfloat16, generator=g).requires_grad_()
    b = torch.randn(n, dtype=torch.bfloat16, generator=g).requires_grad_()
    out = mmkernels.fused_concat_linear(xs, w, b, "none")
    assert out.shape == (m, n) and out.numel() > INT32_MAX
    rows = sample_rows(m, (INT32_MAX + 1) // n)
    check_rows(out.detach(), rows, [x.detach() for x in xs], w.detach(), b.detach(), "none")

    gx0, gx1, gw, gb = torch.autograd.grad(out, [*xs, w, b], out.detach())
    grad = out.detach()
    for gx, cols in ((gx0, slice(0, 1)), (gx1, slice(1, 3))):
        want = grad[rows].double() @ w.detach()[:, cols].double()
        torch.testing.assert_close(gx[rows].double(), want, atol=3e-2 * max(want.abs().max().item(), 1.0), rtol=2e-2)
    # Reductions over 2^27 rows: compare with a float64 sum, loosely (bf16 result of a long float32 sum).
    want_gb = torch.zeros(n, dtype=torch.float64)
    want_gw = torch.zeros(n, 3, dtype=torch.float64)
    for start in range(0, m, 1 << 24):
        chunk = grad[start : start + (1 << 24)].double()
        want_gb += chunk.sum(0)
        want_gw += chunk.T @ torch.cat([x.detach()[start : start + (1 << 24)] for x in xs], -1).double()
    torch.testing.assert_close(gb.double(), want_gb, atol=2e-2 * want_gb.abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(gw.double(), want_gw, atol=2e-2 * want_gw.abs().max().item(), rtol=2e-2)
