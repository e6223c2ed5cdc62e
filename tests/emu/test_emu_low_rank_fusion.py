"""The low_rank_fusion CUDA kernels (csrc/cuda/low_rank_fusion_elementwise.cu) executed from their own
source on the emulation harness. The projections they read are made here as the host code
(csrc/cuda/low_rank_fusion_cuda.cpp) makes them, one (rows, R * N) matrix per modality; the kernels'
results are checked against mmkernels/reference.py and autograd in float64, on the same rounded
inputs, and the host's composition of the parameter gradients from the kernel's dP is checked too."""
from __future__ import annotations

import ctypes

import pytest
import torch

import emu_build
from harness import DTYPE_CODE, harness, ptr
from mmkernels import reference

pytestmark = pytest.mark.emu

# (atol, rtol) against float64 from the same rounded inputs; outputs are O(1) (see make_case).
TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2), torch.float32: (2e-5, 1e-4),
       torch.float64: (1e-10, 1e-8)}
# (rows, modality widths, N, R): single elements, a modality with no features (its projection is the
# appended 1's row alone), sizes that are no multiple of anything, the most modalities one launch takes.
SHAPES = [
    (1, (1,), 1, 1),
    (3, (5, 0, 7), 17, 3),
    (37, (4, 6), 33, 5),
    (2, (3, 1, 2, 5, 1, 2, 4, 3), 9, 2),
    (11, (8,), 70, 1),
]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(rows, widths, n, r, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # Projections of O(1): factors scaled so each P_m is about 1 in magnitude, their product too.
    xs = [torch.randn(rows, d, generator=gen).to(dtype) for d in widths]
    fs = [(torch.randn(r, d + 1, n, generator=gen) / (d + 1) ** 0.5).to(dtype) for d in widths]
    w = (torch.randn(r, generator=gen) / r ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    return xs, fs, w, b


def projections(xs, fs, acc):
    """What the host code computes per chunk: x_m @ F_m[:, :D, :] as (rows, R * N), and F_m[:, D, :] as (R * N,)."""
    proj, rows = [], []
    for x, f in zip(xs, fs):
        r, d1, n = f.shape
        fw = f[:, : d1 - 1, :].permute(1, 0, 2).reshape(d1 - 1, r * n).to(acc)
        proj.append((x.to(acc) @ fw).contiguous() if d1 > 1 else None)
        rows.append(f[:, d1 - 1, :].reshape(r * n).to(acc).contiguous())
    return proj, rows


def pointers(ts):
    return (ctypes.c_void_p * len(ts))(*[None if t is None else t.data_ptr() for t in ts])


def run_forward(proj, rows, w_acc, bias, out, R, N, h=None, expect_errors=False):
    buffers = {f"proj{m}": p for m, p in enumerate(proj)}
    buffers.update({f"row{m}": t for m, t in enumerate(rows)}, w=w_acc, bias=bias, out=out)
    return (h or harness()).run("emu_lrf_forward", DTYPE_CODE[out.dtype], len(proj), pointers(proj), pointers(rows),
                                ptr(w_acc), ptr(bias), ptr(out), out.shape[0], N, R, buffers=buffers,
                                expect_errors=expect_errors)


def run_backward(proj, rows, grads, grad_out, w_acc, w_partial, R, N, h=None, expect_errors=False):
    buffers = {f"proj{m}": p for m, p in enumerate(proj)}
    buffers.update({f"row{m}": t for m, t in enumerate(rows)}, grad_out=grad_out, w=w_acc, w_partial=w_partial)
    buffers.update({f"grad{m}": g for m, g in enumerate(grads) if g is not None and g is not proj[m]})
    return (h or harness()).run("emu_lrf_backward", DTYPE_CODE[grad_out.dtype], len(proj), pointers(proj),
                                pointers(rows), pointers(grads), ptr(grad_out), ptr(w_acc), ptr(w_partial),
                                grad_out.shape[0], N, R, buffers=buffers, expect_errors=expect_errors)


def check(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_forward(dtype, shape, with_bias):
    rows_n, widths, N, R = shape
    xs, fs, w, b = make_case(rows_n, widths, N, R, dtype, seed=hash(shape) % 1000)
    acc = acc_dtype(dtype)
    proj, rows = projections(xs, fs, acc)
    out = torch.full((rows_n, N), float("nan")).to(dtype)
    run_forward(proj, rows, w.to(acc), b if with_bias else None, out, R, N)
    d = lambda ts: [t.double() for t in ts]
    expected = reference.low_rank_fusion(d(xs), d(fs), w.double(), b.double() if with_bias else None)
    check(out, expected, dtype, "out")


def test_forward_folded_slot_and_rank_zero():
    # A slot with no row (the host's fold of modalities past the eighth) multiplies its projection
    # as it is; with R = 0 the output is the bias alone.
    xs, fs, w, b = make_case(6, (3, 4), 10, 2, torch.float64, seed=1)
    proj, rows = projections(xs, fs, torch.float64)
    folded = (proj[1] + rows[1]).contiguous()
    out = torch.empty(6, 10, dtype=torch.float64)
    run_forward([proj[0], folded], [rows[0], None], w, b, out, 2, 10)
    check(out, reference.low_rank_fusion(xs, fs, w, b), torch.float64, "folded")
    empty = torch.empty(6, 0, dtype=torch.float64)
    run_forward([empty], [torch.empty(0, dtype=torch.float64)], torch.empty(0, dtype=torch.float64), b, out, 0, 10)
    check(out, b.expand(6, 10), torch.float64, "R = 0")


def expected_backward(xs, fs, w, grad_out):
    """dP_m (rows, R * N) and grad w by autograd through the projections, in float64."""
    proj, rows = projections([x.double() for x in xs], [f.double() for f in fs], torch.float64)
    R, N = fs[0].shape[0], fs[0].shape[2]
    n_rows = xs[0].shape[0]
    P = [((p if p is not None else torch.zeros(n_rows, R * N, dtype=torch.float64)) + r).view(n_rows, R, N)
         .detach().requires_grad_() for p, r in zip(proj, rows)]
    wd = w.double().requires_grad_()
    prod = P[0]
    for p in P[1:]:
        prod = prod * p
    out = torch.einsum("brn,r->bn", prod, wd)
    grads = torch.autograd.grad(out, [*P, wd], grad_out.double())
    return [g.reshape(g.shape[0], R * N) for g in grads[:-1]], grads[-1]


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward(dtype, shape):
    rows_n, widths, N, R = shape
    xs, fs, w, _ = make_case(rows_n, widths, N, R, dtype, seed=hash(shape) % 1000 + 7)
    grad_out = torch.randn(rows_n, N).to(dtype)
    acc = acc_dtype(dtype)
    proj, rows = projections(xs, fs, acc)
    # dP overwrites the projection where there is one (as the host does); a featureless modality gets its own.
    grads = [p if p is not None else torch.full((rows_n, R * N), float("nan"), dtype=acc) for p in proj]
    blocks = harness().lib.emu_lrf_backward_blocks(rows_n, N)
    w_partial = torch.full((R, blocks), float("nan"), dtype=acc)
    run_backward(proj, rows, grads, grad_out, w.to(acc), w_partial, R, N)
    exp_dp, exp_gw = expected_backward(xs, fs, w, grad_out)
    for m, (g, e) in enumerate(zip(grads, exp_dp)):
        check(g, e, dtype, f"dP[{m}]")
    check(w_partial.sum(1), exp_gw, dtype, "grad rank_weight")


def test_backward_zero_projections_and_skipped_outputs():
    # Exact zeros in a projection (prefix/suffix products, no division), a modality whose dP is not
    # wanted (its buffer stays untouched), and no rank-weight partials asked for.
    xs, fs, w, _ = make_case(9, (3, 5, 2), 13, 4, torch.float64, seed=3)
    proj, rows = projections(xs, fs, torch.float64)
    proj[1][2:5] = -rows[1]  # P_1 = 0 on rows 2..4
    sentinel = proj[2].clone()
    grads = [proj[0], proj[1], None]
    grad_out = torch.randn(9, 13, dtype=torch.float64)
    P = [(p + r).view(9, 4, 13) for p, r in zip(proj, rows)]
    pd = [t.clone().requires_grad_() for t in P]
    out = torch.einsum("brn,r->bn", pd[0] * pd[1] * pd[2], w)
    exp = torch.autograd.grad(out, pd[:2], grad_out)
    run_backward(proj, rows, grads, grad_out, w, None, 4, 13)
    check(grads[0], exp[0].reshape(9, 52), torch.float64, "dP[0]")
    check(grads[1], exp[1].reshape(9, 52), torch.float64, "dP[1]")
    assert torch.equal(proj[2], sentinel), "a dP that was not asked for was written"


def test_backward_grid_stride_and_host_composition():
    # More (row, column) elements than the backward grid has threads (the grid-stride loop), and the
    # parameter gradients composed from dP exactly as the host code does, against autograd on the reference.
    rows_n, widths, N, R = 300, (3, 2), 120, 2
    xs, fs, w, b = make_case(rows_n, widths, N, R, torch.float64, seed=5)
    blocks = harness().lib.emu_lrf_backward_blocks(rows_n, N)
    assert blocks * 256 < rows_n * N
    grad_out = torch.randn(rows_n, N, dtype=torch.float64)
    proj, rows = projections(xs, fs, torch.float64)
    w_partial = torch.empty(R, blocks, dtype=torch.float64)
    run_backward(proj, rows, list(proj), grad_out, w, w_partial, R, N)
    leaves = [t.clone().requires_grad_() for t in (*xs, *fs, w, b)]
    m = len(xs)
    out = reference.low_rank_fusion(leaves[:m], leaves[m : 2 * m], leaves[-2], leaves[-1])
    exp = torch.autograd.grad(out, leaves, grad_out)
    for i, (x, f, dp) in enumerate(zip(xs, fs, proj)):
        d = x.shape[1]
        fw_t = f[:, :d, :].permute(0, 2, 1).reshape(R * N, d)  # (R * N, D)
        check(dp @ fw_t, exp[i], torch.float64, f"grad inputs[{i}]")
        gf = torch.empty_like(f)
        gf[:, :d, :] = (x.t() @ dp).view(d, R, N).permute(1, 0, 2)
        gf[:, d, :] = dp.sum(0).view(R, N)
        check(gf, exp[m + i], torch.float64, f"grad factors[{i}]")
    check(w_partial.sum(1), exp[-2], torch.float64, "grad rank_weight")


# Teeth: bugs planted in a temporary copy of the kernel file (as in test_emu_teeth.py) must be
# reported by the harness or give a wrong result.
KERNEL = emu_build.CSRC / "cuda" / "low_rank_fusion_elementwise.cu"


def plant(old, new):
    text = KERNEL.read_text()
    assert text.count(old) == 1, f"the planted line is no longer in {KERNEL.name}: {old!r}"
    return harness(((KERNEL.name, text.replace(old, new)),), ("cuda/low_rank_fusion_elementwise.cu",))


def test_planted_missing_barrier_in_the_rank_weight_reduction_is_caught():
    h = plant("      if (tid < width) partial[tid] += partial[tid + width];\n      __syncthreads();",
              "      if (tid < width) partial[tid] += partial[tid + width];")
    xs, fs, w, _ = make_case(20, (3, 2), 30, 2, torch.float32, seed=2)
    proj, rows = projections(xs, fs, torch.float32)
    partial = torch.empty(2, harness().lib.emu_lrf_backward_blocks(20, 30))
    errors = run_backward(proj, rows, list(proj), torch.randn(20, 30), w, partial, 2, 30, h=h, expect_errors=True)
    assert any("race" in e for e in errors), errors


def test_planted_wrong_suffix_product_is_caught():
    h = plant("suffix[m - 1] = suffix[m] * p[m];", "suffix[m - 1] = suffix[m] * p[m - 1];")
    xs, fs, w, _ = make_case(5, (3, 2, 4), 7, 2, torch.float64, seed=4)
    proj, rows = projections(xs, fs, torch.float64)
    grad_out = torch.randn(5, 7, dtype=torch.float64)
    exp_dp, _ = expected_backward(xs, fs, w, grad_out)
    run_backward(proj, rows, list(proj), grad_out, w, None, 2, 7, h=h)
    assert not torch.allclose(proj[0], exp_dp[0]), "a wrong suffix product went unnoticed"


def test_planted_loop_bound_past_the_end_is_caught():
    h = plant("int64_t(blockIdx.x) * kLrfThreads + threadIdx.x; i < total;",
              "int64_t(blockIdx.x) * kLrfThreads + threadIdx.x; i <= total;")
    xs, fs, w, b = make_case(3, (4,), 5, 2, torch.float32, seed=6)
    proj, rows = projections(xs, fs, torch.float32)
    errors = run_forward(proj, rows, w, b, torch.empty(3, 5), 2, 5, h=h, expect_errors=True)
    assert any("global out of bounds" in e for e in errors), errors
