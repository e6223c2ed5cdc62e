"""CUDA kernels of fused_concat_linear against mmkernels/reference.py.

Marked `cuda` and skipped where no GPU is present. Both forward paths (the fused tensor-core kernel
and the per-segment cuBLAS path) are forced in turn through MMKERNELS_FCL_CUDA_PATH, besides the
automatic choice, so each is covered whatever the dispatch rule picks.
"""
import itertools

import pytest
import torch

import mmkernels
from mmkernels import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ACTIVATIONS = list(reference.ACTIVATIONS)
PATHS = ["auto", "fused", "cublas"]
# (atol, rtol) against a float64 reference computed from the same (rounded) inputs; outputs are
# O(1) because the weight is scaled by 1/sqrt(K).
TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2), torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-10)}
# (leading dims, segment widths, N): odd sizes, one segment, widths not a multiple of 8 (the
# element-wise loader), several K tiles, many segments, and more than the fused kernel's 32.
SHAPES = [
    ((1,), (17,), 1),
    ((3,), (1, 3), 17),
    ((123,), (17, 123, 64), 3),
    ((2, 5), (8, 16, 24), 123),
    ((257,), (64, 128), 64),
    ((130,), (256, 40, 8), 300),
    ((33,), tuple([8] * 12 + [3] * 5), 40),
    ((20,), tuple([5] * 40), 24),
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("MMKERNELS_FCL_CUDA_PATH", request.param)
    return request.param


def make_case(lead, widths, n, dtype, device="cuda", bias=True, requires_grad=False, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k = sum(widths)
    xs = [torch.randn(*lead, d, generator=gen).to(device=device, dtype=dtype) for d in widths]
    w = (torch.randn(n, k, generator=gen) / max(k, 1) ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype) if bias else None
    for t in [*xs, w] + ([b] if bias else []):
        t.requires_grad_(requires_grad)
    return xs, w, b


def expected(xs, w, b, act):
    """The reference in float64 from the same inputs, so only our rounding is measured."""
    d = lambda t: None if t is None else t.detach().double()
    return reference.fused_concat_linear([d(x) for x in xs], d(w), d(b), act)


def assert_close(actual, ref, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), ref, atol=atol, rtol=rtol)


def test_cuda_kernels_registered():
    # A GPU is here: the CUDA build must have been made (MMKERNELS_CUDA), or these tests would only
    # exercise the reference fallback. (Coverage of every op is CI's check: .ci/cuda/check_cuda_ops.py.)
    assert mmkernels.build_info()["with_cuda"], "mmkernels was built without CUDA kernels"
    for op in ("fused_concat_linear", "fused_concat_linear_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkernels::{op}", "CUDA"), op


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_forward(path, dtype, act):
    for lead, widths, n in SHAPES:
        xs, w, b = make_case(lead, widths, n, dtype)
        out = mmkernels.fused_concat_linear(xs, w, b, act)
        assert out.shape == (*lead, n) and out.dtype == dtype and out.device == w.device
        assert_close(out, expected(xs, w, b, act), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_no_bias_and_preact(path, dtype):
    xs, w, _ = make_case((77,), (17, 40), 33, dtype, bias=False)
    out, pre = torch.ops.mmkernels.fused_concat_linear.default(xs, w, None, "silu")
    assert_close(pre, expected(xs, w, None, "none"), dtype)
    assert_close(out, expected(xs, w, None, "silu"), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_non_contiguous_inputs(path, dtype):
    gen = torch.Generator(device="cpu").manual_seed(1)
    big = torch.randn(50, 200, generator=gen).to("cuda", dtype)
    xs = [
        big[:, 3:20],  # row stride 200, misaligned start: element-wise loads
        big[:, 40:104],  # row stride 200, 16-byte aligned start
        big[:, 120:184:2],  # column stride 2: made contiguous
        torch.randn(7, 50, generator=gen).to("cuda", dtype).t(),  # transposed
    ]
    k = sum(x.shape[-1] for x in xs)
    w_big = torch.randn(24, 2 * k, generator=gen).to("cuda", dtype) / k**0.5
    w = w_big[:, ::2]  # strided weight
    b = torch.randn(48, generator=gen).to("cuda", dtype)[::2]
    out = mmkernels.fused_concat_linear(xs, w, b, "gelu")
    assert_close(out, expected(xs, w, b, "gelu"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty(path, dtype):
    xs, w, b = make_case((0,), (5, 8), 6, dtype)
    assert mmkernels.fused_concat_linear(xs, w, b, "relu").shape == (0, 6)
    xs, w, b = make_case((4,), (0, 0), 6, dtype)  # K == 0: act(bias)
    assert_close(mmkernels.fused_concat_linear(xs, w, b, "tanh"), expected(xs, w, b, "tanh"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_backward(path, dtype, act):
    for lead, widths, n in [SHAPES[2], SHAPES[3], SHAPES[6]]:
        xs, w, b = make_case(lead, widths, n, dtype, requires_grad=True)
        out = mmkernels.fused_concat_linear(xs, w, b, act)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_in = [t.detach().double().requires_grad_() for t in [*xs, w, b]]
        if act == "relu":
            # relu's mask where a pre-activation is within rounding of 0 may legitimately differ from
            # float64's; take it from our forward so only the backward's arithmetic is compared.
            mask = (out.detach() > 0).double()
            ref = reference.fused_concat_linear(ref_in[:-2], ref_in[-2], ref_in[-1], "none") * mask
        else:
            ref = reference.fused_concat_linear(ref_in[:-2], ref_in[-2], ref_in[-1], act)
        ref.backward(grad.double())
        atol, rtol = TOL[dtype]
        for ours, theirs in zip([*xs, w, b], ref_in):
            # Gradients sum over M or N terms: scale the tolerance with the reduction length.
            scale = max(1.0, theirs.grad.abs().max().item())
            torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=atol * scale * 4, rtol=rtol * 4)


def test_backward_partial_requires_grad(path):
    xs, w, b = make_case((9,), (8, 5, 16), 12, torch.bfloat16)
    xs[1].requires_grad_()
    w.requires_grad_()
    mmkernels.fused_concat_linear(xs, w, b, "sigmoid").sum().backward()
    assert xs[0].grad is None and xs[2].grad is None and b.grad is None
    assert xs[1].grad is not None and w.grad is not None


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_float64(act):
    xs, w, b = make_case((3,), (2, 5), 4, torch.float64, requires_grad=True)
    f = lambda *t: mmkernels.fused_concat_linear(list(t[:-2]), t[-2], t[-1], act)
    assert torch.autograd.gradcheck(f, (*xs, w, b))


# opcheck and torch.compile are slow (seconds per case): one run per path, not the full cross product.
PATH_DTYPES = [("fused", torch.bfloat16), ("cublas", torch.float16), ("auto", torch.float32)]


@pytest.mark.parametrize("forced,dtype", PATH_DTYPES, ids=lambda v: str(v))
def test_opcheck(monkeypatch, forced, dtype):
    monkeypatch.setenv("MMKERNELS_FCL_CUDA_PATH", forced)
    for act in ["relu", "gelu"]:
        xs, w, b = make_case((2, 9), (8, 17), 24, dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.mmkernels.fused_concat_linear.default, (xs, w, b, act))
        out, pre = torch.ops.mmkernels.fused_concat_linear.default(xs, w, b, act)
        g = torch.randn_like(out)
        torch.library.opcheck(
            torch.ops.mmkernels.fused_concat_linear_backward.default,
            (g, [x.detach() for x in xs], w.detach(), out.detach(), pre.detach(), act, [True, True], True, True),
        )


@pytest.mark.parametrize("forced,dtype", PATH_DTYPES, ids=lambda v: str(v))
def test_torch_compile_fullgraph(monkeypatch, forced, dtype):
    monkeypatch.setenv("MMKERNELS_FCL_CUDA_PATH", forced)
    torch._dynamo.reset()

    def f(a, c, w, b):
        return mmkernels.fused_concat_linear([a, c], w, b, "gelu_tanh").relu().sum()

    xs, w, b = make_case((5, 7), (16, 9), 40, dtype, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(xs[0], xs[1], w, b)
    out.backward()
    grads = [t.grad.clone() for t in [*xs, w, b]]
    for t in [*xs, w, b]:
        t.grad = None
    f(xs[0], xs[1], w, b).backward()
    atol, rtol = TOL[dtype]
    for g, t in zip(grads, [*xs, w, b]):
        torch.testing.assert_close(g, t.grad, atol=atol * 10, rtol=rtol * 10)


def test_honours_current_stream(path):
    """Inputs written on a side stream behind a long sleep: a kernel on another stream would read
    them before the write lands."""
    xs, w, b = make_case((300,), (64, 24), 48, torch.bfloat16)
    fresh = [torch.randn_like(x) for x in xs]
    want = expected(fresh, w, b, "relu")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time on this stream
        for x, f in zip(xs, fresh):
            x.copy_(f)
        out = mmkernels.fused_concat_linear(xs, w, b, "relu")
        grad_ready = out.float().sum()
    side.synchronize()
    assert_close(out, want, torch.bfloat16)
    assert torch.isfinite(grad_ready)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_non_default_device(path):
    torch.cuda.set_device(0)
    for dtype, act in itertools.product([torch.bfloat16, torch.float32], ["none", "silu"]):
        xs, w, b = make_case((37,), (8, 13), 20, dtype, device="cuda:1", requires_grad=True)
        out = mmkernels.fused_concat_linear(xs, w, b, act)
        assert out.device == torch.device("cuda:1")
        assert_close(out, expected(xs, w, b, act), dtype)
        out.sum().backward()
        assert w.grad.device == torch.device("cuda:1")
