"""CUDA kernels of low_rank_fusion (csrc/cuda/low_rank_fusion_cuda.cpp, low_rank_fusion_elementwise.cu)
against mmkernels/reference.py in float64 and against the CPU kernel.

Marked `cuda` and skipped where no GPU is present: written before any GPU has run them. The kernels'
arithmetic is checked without a GPU by tests/emu/test_emu_low_rank_fusion.py. MMKERNELS_LRF_CUDA_CHUNK_ROWS
forces small row chunks, so the chunk loop is covered on small inputs.
"""
import warnings

import pytest
import torch

import mmkernels
from mmkernels import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# (atol, rtol) against float64 from the same rounded inputs, atol scaled by the result's magnitude.
TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (3e-2, 2e-2), torch.float32: (2e-5, 1e-4),
       torch.float64: (1e-10, 1e-8)}
# (leading dims, modality widths, rank, N): one element, a modality with no features, odd sizes,
# several leading dims, the most modalities one kernel launch takes (8) and more (10: the fold).
SHAPES = [
    ((1,), (1,), 1, 1),
    ((3,), (5, 0, 7), 3, 17),
    ((37,), (4, 6), 5, 33),
    ((2, 9), (16, 31, 8), 4, 65),
    ((129,), (64, 128), 16, 128),
    ((5,), (3, 1, 2, 5, 1, 2, 4, 3), 2, 9),
    ((6,), (2, 3, 1, 0, 2, 4, 1, 3, 2, 5), 3, 11),
]


@pytest.fixture(params=["auto", "7"], ids=["chunk=auto", "chunk=7"])
def chunk(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setenv("MMKERNELS_LRF_CUDA_CHUNK_ROWS", request.param)
    return request.param


def make_case(lead, widths, rank, n, dtype, requires_grad=False, bias=True, seed=0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    # Factors scaled so each projection, and so the product over modalities, is O(1).
    xs = [torch.randn(*lead, d, generator=gen) for d in widths]
    fs = [torch.randn(rank, d + 1, n, generator=gen) / (d + 1) ** 0.5 for d in widths]
    w = torch.randn(rank, generator=gen) / rank**0.5
    b = torch.randn(n, generator=gen) if bias else None
    out = [[t.to(device, dtype).requires_grad_(requires_grad) for t in ts] for ts in (xs, fs)]
    extra = [None if t is None else t.to(device, dtype).requires_grad_(requires_grad) for t in (w, b)]
    return out[0], out[1], extra[0], extra[1]


def double(ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def test_cuda_kernels_registered():
    assert mmkernels.build_info()["with_cuda"], "mmkernels was built without CUDA kernels"
    for op in ("low_rank_fusion", "low_rank_fusion_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkernels::{op}", "CUDA"), op


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(chunk, dtype):
    for i, (lead, widths, rank, n) in enumerate(SHAPES):
        xs, fs, w, b = make_case(lead, widths, rank, n, dtype, seed=i)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback, no warning
            out = mmkernels.low_rank_fusion(xs, fs, w, b)
        assert out.shape == (*lead, n) and out.dtype == dtype and out.device == w.device
        expected = reference.low_rank_fusion(*[double(t) for t in (xs, fs)], *double([w, b]))
        assert_close(out, expected, dtype, f"shape {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(chunk, dtype):
    for i, (lead, widths, rank, n) in enumerate(SHAPES):
        xs, fs, w, b = make_case(lead, widths, rank, n, dtype, requires_grad=True, seed=10 + i)
        out = mmkernels.low_rank_fusion(xs, fs, w, b)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_x, ref_f, (ref_w, ref_b) = double(xs), double(fs), double([w, b])
        reference.low_rank_fusion(ref_x, ref_f, ref_w, ref_b).backward(grad.double())
        names = [f"inputs[{j}]" for j in range(len(xs))] + [f"factors[{j}]" for j in range(len(fs))] + ["w", "b"]
        for name, ours, theirs in zip(names, [*xs, *fs, w, b], [*ref_x, *ref_f, ref_w, ref_b]):
            # Gradients sum over rows or features: a looser bound for the 16-bit types.
            assert_close(ours.grad, theirs.grad, dtype, f"shape {i} grad {name}")


def test_matches_cpu_kernel():
    xs, fs, w, b = make_case((50, 3), (12, 7, 20), 6, 40, torch.float32, requires_grad=True)
    cpu = [[t.detach().cpu().requires_grad_() for t in ts] for ts in (xs, fs)]
    cw, cb = (t.detach().cpu().requires_grad_() for t in (w, b))
    out = mmkernels.low_rank_fusion(xs, fs, w, b)
    out_cpu = mmkernels.low_rank_fusion(cpu[0], cpu[1], cw, cb)
    torch.testing.assert_close(out.cpu(), out_cpu, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out_cpu)
    out.backward(g.cuda())
    out_cpu.backward(g)
    for a, c in zip([*xs, *fs, w, b], [*cpu[0], *cpu[1], cw, cb]):
        torch.testing.assert_close(a.grad.cpu(), c.grad, atol=1e-4, rtol=1e-4)


def test_partial_requires_grad_and_zeros():
    xs, fs, w, b = make_case((9,), (8, 5, 16), 3, 12, torch.float32)
    xs[1].requires_grad_()
    fs[2].requires_grad_()
    with torch.no_grad():
        fs[0][1].zero_()  # a rank whose product is exactly zero
    mmkernels.low_rank_fusion(xs, fs, w, b).sum().backward()
    assert xs[0].grad is None and xs[2].grad is None and fs[0].grad is None and w.grad is None
    ref_x, ref_f, (ref_w, ref_b) = double(xs), double(fs), double([w, b])
    reference.low_rank_fusion(ref_x, ref_f, ref_w, ref_b).sum().backward()
    assert_close(xs[1].grad, ref_x[1].grad, torch.float32, "inputs[1]")
    assert_close(fs[2].grad, ref_f[2].grad, torch.float32, "factors[2]")


def test_non_contiguous_and_empty(chunk):
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(40, 64, generator=gen).cuda()
    xs = [big[:, 1:9], big[:, 10:40:3], torch.randn(5, 40, generator=gen).cuda().t()]
    fs = [torch.randn(8, 4, x.shape[1] + 1, generator=gen).cuda().permute(1, 2, 0) / 3 for x in xs]  # strided
    w, b = torch.randn(4, generator=gen).cuda(), torch.randn(8, generator=gen).cuda()
    assert_close(mmkernels.low_rank_fusion(xs, fs, w, b), reference.low_rank_fusion(xs, fs, w, b), torch.float32)
    xs0 = [x[:0] for x in xs]
    assert mmkernels.low_rank_fusion(xs0, fs, w, b).shape == (0, 8)
    # rank 0: the bias alone
    f0 = [f[:0] for f in fs]
    assert_close(mmkernels.low_rank_fusion(xs, f0, w[:0], b), b.expand(40, 8), torch.float32)


def test_gradcheck_float64():
    for lead, widths, rank, n in [((3,), (2, 0, 3), 2, 4), ((2,), (1, 2, 1, 1, 2, 1, 1, 2, 1), 2, 3)]:
        xs, fs, w, b = make_case(lead, widths, rank, n, torch.float64, requires_grad=True)
        m = len(xs)
        f = lambda *t: mmkernels.low_rank_fusion(t[:m], t[m : 2 * m], t[-2], t[-1])
        assert torch.autograd.gradcheck(f, (*xs, *fs, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_opcheck(dtype):
    xs, fs, w, b = make_case((2, 9), (8, 17), 4, 24, dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.mmkernels.low_rank_fusion.default, (xs, fs, w, b))
    g = torch.randn(2, 9, 24, device="cuda", dtype=dtype)
    torch.library.opcheck(
        torch.ops.mmkernels.low_rank_fusion_backward.default,
        (g, [x.detach() for x in xs], [f.detach() for f in fs], w.detach(), [True, True], [True, True], True, True),
    )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    xs, fs, w, b = make_case((5, 7), (16, 9), 4, 40, torch.float32, requires_grad=True)

    def f(a, c, f0, f1, w, b):
        return mmkernels.low_rank_fusion([a, c], [f0, f1], w, b).tanh().sum()

    args = (*xs, *fs, w, b)
    torch.compile(f, fullgraph=True)(*args).backward()
    grads = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    f(*args).backward()
    for g, t in zip(grads, args):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def test_memory_stays_below_the_references_projections():
    # The reference keeps every modality's (rows, R, N) projection (and autograd keeps them for
    # backward); the kernels keep one chunk's worth (64 MiB) at a time.
    xs, fs, w, b = make_case((8192,), (64, 64, 64), 16, 512, torch.float32, requires_grad=True)
    projections = 3 * 8192 * 16 * 512 * 4  # 768 MiB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = mmkernels.low_rank_fusion(xs, fs, w, b)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < projections / 3, f"peak {peak / 2**20:.0f} MiB vs the reference's {projections / 2**20:.0f} MiB"


def test_honours_current_stream():
    """Inputs written on a side stream behind a long sleep: the op must run on the current stream."""
    side = torch.cuda.Stream()
    xs, fs, w, b = make_case((300,), (32, 16), 4, 64, torch.float32)
    expected = reference.low_rank_fusion(xs, fs, w, b)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        xs_side = [torch.empty_like(x) for x in xs]
        torch.cuda._sleep(50_000_000)
        for dst, src in zip(xs_side, xs):
            dst.copy_(src)
        out = mmkernels.low_rank_fusion(xs_side, fs, w, b)
    torch.cuda.synchronize()
    assert_close(out, expected, torch.float32)
