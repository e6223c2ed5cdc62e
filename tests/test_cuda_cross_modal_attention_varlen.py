"""CUDA kernels of cross_modal_attention_varlen (packed sequences on the tensor-core kernels) against
mmkernels/reference.py in float64 and against the CPU kernel.

Marked `cuda` and skipped where no GPU is present. As of the commit that added this file, no GPU has
run it: the kernels are compiled for sm_80 / sm_90 and verified on the emulation harness
(tests/emu/test_emu_attention_varlen.py), not on a GPU. Tolerances: those of the dense CUDA tests.

Covered: every head dim and 16-bit dtype, empty and length-1 sequences, both causal alignments,
grouped-query heads, row strides of fused projections, dropout (the CPU kernel's keep mask, the same
mask in backward, a seed on the device), the fallback (float32, other head dims: one warning,
correct), no warning on the kernels' path, opcheck and torch.compile.
"""
import warnings

import pytest
import torch

import mmkernels
from varlen_support import cpu_keep_masks, make_packed, reference_lse, reference_varlen

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

OP = torch.ops.mmkernels.cross_modal_attention_varlen.default
BWD = torch.ops.mmkernels.cross_modal_attention_varlen_backward.default
TOL = {  # (atol, rtol) for outputs and for gradients, relative to max(1, max |expected|)
    torch.float16: ((4e-3, 4e-3), (1e-2, 1e-2)),
    torch.bfloat16: ((3e-2, 3e-2), (6e-2, 6e-2)),
    torch.float32: ((1e-5, 1e-4), (1e-4, 1e-4)),
}
LENS_Q = [0, 5, 1, 70, 3, 130, 257]
LENS_K = [3, 0, 1, 83, 150, 64, 300]


def assert_close(actual, expected, tol, what):
    atol, rtol = tol
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    torch.testing.assert_close(actual.cpu().double(), expected.double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def check_case(lens_q, lens_k, H, E, dtype, H_kv=None, causal=0, dropout_p=0.0, seed=0, layout="packed"):
    H_kv = H if H_kv is None else H_kv
    g = torch.Generator().manual_seed(len(lens_q) * 100 + E)
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, H, H_kv, E, dtype, g, layout, device="cuda")
    scale = E**-0.5
    seed_t = torch.tensor(seed) if dropout_p > 0 else None
    max_q, max_k = max(lens_q), max(lens_k)
    out, lse = OP(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout_p, seed_t, causal)
    keep = cpu_keep_masks(H, H_kv, cu_q, cu_k, dropout_p, seed) if dropout_p > 0 else None
    ref, leaves = reference_varlen(q, k, v, cu_q, cu_k, scale, causal, keep, dropout_p)
    assert_close(out, ref, TOL[dtype][0], "out")
    torch.testing.assert_close(lse.cpu().double(), reference_lse(q, k, cu_q, cu_k, scale, causal), atol=2e-2,
                               rtol=1e-3)
    dout = torch.randn(out.shape, generator=g).to("cuda", dtype)
    dq, dk, dv = BWD(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, dropout_p, seed_t, causal)
    want = torch.autograd.grad(ref, leaves, dout.cpu().double())
    for name, a, b in zip("qkv", (dq, dk, dv), want):
        assert_close(a, b, TOL[dtype][1], f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("E", [32, 64, 128])
def test_matches_reference(E, dtype):
    check_case(LENS_Q, LENS_K, 2, E, dtype)


@pytest.mark.parametrize("causal", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_causal_both_alignments(dtype, causal):
    check_case([70, 150, 1, 90, 37], [150, 37, 90, 1, 37], 2, 64, dtype, causal=causal)


@pytest.mark.parametrize("H_kv", [1, 2, 4])
def test_grouped_query_heads(H_kv):
    check_case(LENS_Q, LENS_K, 4, 64, torch.float16, H_kv=H_kv, causal=2)


def test_row_strides_of_a_projection():
    check_case([40, 1, 77], [90, 5, 64], 2, 128, torch.bfloat16, layout="projection", causal=1)


def test_dropout_same_mask_as_cpu_and_in_backward():
    check_case([33, 1, 70, 0], [90, 17, 64, 5], 2, 64, torch.float16, H_kv=1, dropout_p=0.3, seed=99)
    # Element for element: q = k = 0 over one-hot values, CUDA and CPU kernels, the same seed.
    lens, H, p = [17, 40, 64], 2, 0.4
    g = torch.Generator().manual_seed(0)
    q, k, v, cu_q, cu_k = make_packed(lens, lens, H, H, 64, torch.float16, g, device="cuda")
    q.zero_(), k.zero_(), v.zero_()
    for k0, n in zip(cu_k.tolist(), lens):
        v[k0:k0 + n, :, :n] = torch.eye(n, device="cuda").unsqueeze(1)
    for seed_t in (torch.tensor(7), torch.tensor(7, device="cuda")):
        out = OP(q, k, v, cu_q, cu_k, 64, 64, 1.0, p, seed_t, 0)[0].cpu()
        want = cpu_keep_masks(H, H, cu_q, cu_k, p, 7)
        for b, q0 in enumerate(cu_q.tolist()[:-1]):
            got = (out[q0:q0 + lens[b], :, :lens[b]] > 0).transpose(0, 1).unsqueeze(0)
            assert torch.equal(got, want[b]), f"sequence {b}"


@pytest.mark.parametrize("dtype,E", [(torch.float32, 64), (torch.float16, 48)], ids=str)
def test_fallback_is_correct(dtype, E):
    # The dense op per sequence, after one warning per process (TORCH_WARN_ONCE: not asserted here,
    # since an earlier test may have drawn it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_case([5, 0, 40], [7, 3, 33], 2, E, dtype, causal=2)


def test_kernels_path_does_not_warn():
    q, k, v, cu_q, cu_k = make_packed([5, 9], [7, 3], 2, 2, 64, torch.float16, torch.Generator(), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, 9, 7, is_causal=True)


def test_opcheck_and_compile():
    g = torch.Generator().manual_seed(1)
    q, k, v, cu_q, cu_k = make_packed([5, 1, 40], [7, 3, 33], 2, 1, 64, torch.float16, g, device="cuda")
    torch.library.opcheck(OP, (q, k, v, cu_q, cu_k, 40, 33, 0.125, 0.0, None, 1))
    q.requires_grad_()
    fn = torch.compile(lambda q: mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, 40, 33), fullgraph=True)
    fn(q).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
