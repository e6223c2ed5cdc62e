"""cross_modal_attention (the op) against the reference, SDPA, gradcheck, opcheck, compile and export."""
import math

import pytest
import torch
import torch.nn.functional as F
from attention_support import make_masks, make_qkv, run_reference
from conftest import TOLERANCES

import mmkernels
from mmkernels import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OP = torch.ops.mmkernels.cross_modal_attention.default
OP_BWD = torch.ops.mmkernels.cross_modal_attention_backward.default

# (B, H, Lq, Lk, E, Ev): odd sizes, Lq = 1, Lk = 1, Ev != E, several query and key blocks.
SHAPES = [
    (2, 3, 17, 123, 8, 5),
    (1, 2, 3, 17, 16, 16),
    (2, 1, 123, 3, 5, 7),
    (1, 2, 1, 33, 4, 4),
    (3, 2, 5, 1, 4, 3),
    (1, 1, 1, 1, 1, 1),
    (1, 2, 260, 600, 32, 24),
]


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOLERANCES[dtype]
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected, atol=atol * max(scale, 1.0), rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(q, k, v, masks, dtype, **kw):
    out = mmkernels.cross_modal_attention(q, k, v, **masks, **kw)
    ref, leaves = run_reference(q, k, v, masks, **kw)
    assert not torch.isnan(out).any()
    assert_close(out, ref, dtype, "out")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    for name, a, b in zip("qkv", grads, ref_grads):
        assert not torch.isnan(a).any(), name
        assert_close(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_unmasked(shape, dtype):
    q, k, v = make_qkv(*shape, dtype)
    check_against_reference(q, k, v, {}, dtype)


MASK_KINDS = [
    "kpm",
    "ends",
    "ends+len32+bool2d",
    "len32",
    "len64",
    "bool2d",
    "bool4d",
    "float3d",
    "float4d",
    "kpm+len64+bool2d",
    "kpm+float3d",
    "len32+bool4d",
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_matches_reference_masked(kind, dtype):
    for shape in ((2, 3, 17, 123, 8, 5), (2, 2, 150, 300, 16, 8)):
        B, H, Lq, Lk, E, Ev = shape
        q, k, v = make_qkv(*shape, dtype)
        check_against_reference(q, k, v, make_masks(kind, B, H, Lq, Lk, dtype), dtype)


def test_custom_scale_and_lse():
    q, k, v = make_qkv(2, 3, 7, 19, 8, 6, torch.float64)
    out, lse = OP(q, k, v, None, None, None, 0.3, 0.0, None)
    s = q @ k.transpose(-1, -2) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)
    check_against_reference(q, k, v, {}, torch.float64, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    B, L, S, H, E, Ev = 2, 13, 29, 3, 8, 6
    # (B, L, H, E) transposed to (B, H, L, E), as multi-head attention produces them.
    q = torch.randn(B, L, H, E, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, H, E, dtype=dtype).transpose(1, 2).requires_grad_()
    # Last dim not unit-stride.
    v = torch.randn(B, H, S, 2 * Ev, dtype=dtype)[..., ::2].requires_grad_()
    masks = make_masks("kpm+bool2d", B, H, L, S, dtype)
    masks["attn_mask"] = masks["attn_mask"].t().contiguous().t()  # a transposed mask
    check_against_reference(q, k, v, masks, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_key_sequences(dtype):
    # Past 16 key blocks of 512, the forward packs each key block where it uses it instead of keeping
    # the head's packed keys for a whole run of query blocks.
    B, H, L, S, E = 2, 2, 130, 8300, 8
    q, k, v = make_qkv(B, H, L, S, E, 5, dtype)
    check_against_reference(q, k, v, make_masks("kpm", B, H, L, S, dtype), dtype)


@pytest.mark.parametrize("offset, row", [(1, 9), (2, 10), (0, 11)], ids=["odd-offset", "even-offset", "odd-rows"])
def test_bfloat16_keys_at_any_offset_and_row_stride(offset, row):
    # The bfloat16 forward reads K as pairs of bfloat16 (32-bit words): keys whose data or rows are
    # not 4-byte aligned (an odd element offset or row stride) are copied first; aligned ones are not.
    B, H, L, S, E = 2, 2, 7, 21, 8
    q = torch.randn(B, H, L, E, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B * H * S * row + offset, dtype=torch.bfloat16)[offset:].view(B, H, S, row)[..., :E]
    v = torch.randn(B, H, S, 5, dtype=torch.bfloat16, requires_grad=True)
    masks = make_masks("kpm", B, H, L, S, torch.bfloat16)
    check_against_reference(q, k.requires_grad_(), v, masks, torch.bfloat16)


def test_float16_values_convert_exactly():
    # The float16 forward converts blocks of Q, K and V to float (csrc/cpu/half_convert.cpp, branch-
    # free bit arithmetic). With one visible key the output is V's row itself, so every float16 bit
    # pattern (subnormals, infinities and NaN included) must come back unchanged; keys are scaled
    # into the subnormal range, where their conversion must keep the scores right too.
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    v = every.view(1, 1, 1, -1)
    q = torch.randn(1, 1, 3, 8, dtype=torch.float16)
    out = mmkernels.cross_modal_attention(q, torch.randn(1, 1, 1, 8, dtype=torch.float16), v)
    same = (out == v) | (torch.isnan(out) & torch.isnan(v))
    assert same.all(), every[~same[0, 0, 0]][:8]
    k = (torch.randn(1, 2, 40, 16, dtype=torch.float16) * 2**-17).requires_grad_()  # subnormal keys
    q = (torch.randn(1, 2, 5, 16, dtype=torch.float16) * 2**12).requires_grad_()
    check_against_reference(q, k, torch.randn(1, 2, 40, 6, dtype=torch.float16, requires_grad=True), {},
                            torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_result_layouts(dtype):
    # csrc/include/attention_layout.h: out is stored (B, Lq, H, Ev), so merging heads is a view;
    # gradients take their input's layout (here q, k as head-split views of projections, v contiguous).
    B, H, Lq, Lk, E = 2, 3, 5, 7, 4
    q = torch.randn(B, Lq, H * E, dtype=dtype).unflatten(-1, (H, E)).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Lk, H * E, dtype=dtype).unflatten(-1, (H, E)).transpose(1, 2).requires_grad_()
    v = torch.randn(B, H, Lk, E, dtype=dtype, requires_grad=True)
    out = mmkernels.cross_modal_attention(q, k, v)
    assert out.stride() == (Lq * H * E, E, H * E, 1)
    merged = out.transpose(1, 2).reshape(B, Lq, H * E)
    assert merged.is_contiguous() and merged.data_ptr() == out.data_ptr()  # a view, no copy
    merged.backward(torch.randn_like(merged))
    assert q.grad.stride() == q.stride() and k.grad.stride() == k.stride() and v.grad.stride() == v.stride()
    want, _ = run_reference(q, k, v, {})
    assert_close(out, want, dtype, "out")


def test_broadcast_masks_are_not_expanded():
    # A stride-0 expanded view is read through its strides and gives the same as the compact mask
    # (to rounding: MKL's GEMM may take a differently vectorised path for differently aligned scratch).
    B, H, Lq, Lk = 2, 3, 9, 21
    q, k, v = make_qkv(B, H, Lq, Lk, 8, 8, torch.float32, requires_grad=False)
    m = torch.rand(1, 1, Lq, Lk) < 0.6
    a = mmkernels.cross_modal_attention(q, k, v, attn_mask=m)
    b = mmkernels.cross_modal_attention(q, k, v, attn_mask=m.expand(B, H, Lq, Lk))
    c = mmkernels.cross_modal_attention(q, k, v, attn_mask=m.expand(B, H, Lq, Lk).contiguous())
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_stride_zero_keys_and_values():
    # An expanded (stride-0) value or key tensor: BLAS rejects a leading dimension of 0, so the kernel
    # must copy it (found by the long fuzz profile: MKL refused the call and the output was garbage).
    q = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(1, 1, 1, 4, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(1, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    k, v = k0.expand(2, 3, 7, 4), v0.expand(2, 3, 7, 1)
    m = torch.rand(1, 7) < 0.5
    got = mmkernels.cross_modal_attention(q, k, v, attn_mask=m)
    want = reference.cross_modal_attention(q, k, v, attn_mask=m)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k0, v0), g), torch.autograd.grad(want, (q, k0, v0), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_whose_only_score_is_nan_is_nan(dtype):
    # issue 19: a NaN score is a visible score, so a row whose every score is NaN is NaN, output and
    # gradients (it used to be taken for a row that sees no key, and zeroed, hiding the NaN);
    # the same inputs with the key hidden by kv_lengths give zeros and zero gradient.
    q = torch.randn(1, 1, 2, 2, dtype=dtype, requires_grad=True)
    k = torch.tensor([[[[float("nan"), 1.0]]]], dtype=dtype, requires_grad=True)
    v = torch.full((1, 1, 1, 3), float("nan"), dtype=dtype, requires_grad=True)
    got = mmkernels.cross_modal_attention(q, k, v)
    want = reference.cross_modal_attention(q, k, v)
    g = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v), g)
    for a, b in zip((got, *got_grads), (want, *torch.autograd.grad(want, (q, k, v), g))):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert got.isnan().all() and got_grads[0].isnan().all()
    # The hidden key is never read (the reference's dQ = dS K would form 0 * NaN there).
    got = mmkernels.cross_modal_attention(q, k, v, kv_lengths=torch.tensor([0]))
    assert (got == 0).all() and all((t == 0).all() for t in torch.autograd.grad(got, (q, k, v), g))


@pytest.mark.parametrize("visible", ["attn_mask", "kv_lengths"])
@pytest.mark.parametrize(
    "shape", [(2, 2, 1, 3, 17), (1, 2, 130, 257, 64), (2, 1, 7, 700, 33), (1, 1, 3, 8300, 16)], ids=str
)
def test_backward_recomputes_the_forwards_probabilities(shape, visible):
    # Each query row sees one key, so its probability is exactly 1 if backward's recomputed score is
    # the forward's to the bit; with logits of ~1e5 one ulp of difference is a 1% error in P, hence
    # in grad_v (found by the long fuzz profile: backward formed K Q^T, the forward Q K^T). One key
    # per row anywhere (a bool mask: scores with a bias), or the first key only (no bias). Lk = 257
    # and 700: backward once split the forward's 257-wide score GEMM into 256 + 1, which the BLAS
    # rounded differently; its key blocks are now the forward's.
    B, H, Lq, Lk, E = shape
    q = (torch.randn(B, H, Lq, E) * 1e3).requires_grad_()
    k, v = torch.randn(B, H, Lk, E), torch.randn(B, H, Lk, 5, requires_grad=True)
    allowed = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    if visible == "attn_mask":
        allowed.scatter_(-1, torch.randint(0, Lk, (B, H, Lq, 1)), True)
        masks = {"attn_mask": allowed}
    else:
        allowed[..., 0] = True
        masks = {"kv_lengths": torch.ones(B, dtype=torch.int64)}
    k.requires_grad_()
    out = mmkernels.cross_modal_attention(q, k, v, scale=10.0, **masks)
    g = torch.randn_like(out)
    grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), g)
    want = torch.einsum("bhqk,bhqe->bhke", allowed.double(), g.double())
    torch.testing.assert_close(grad_v.double(), want, rtol=1e-5, atol=1e-5)
    # P = 1 and O = V exactly, so D = rowsum(dO O) equals dP = dO V^T to the bit (the same fused
    # multiply-adds in the same order as oneDNN's brgemm, where matmul.cpp's rule runs it) and dS = 0:
    # grad_q and grad_k are exactly zero, as with the materialised softmax (found by the long fuzz:
    # a LayerNorm in front amplified the noise).
    if mmkernels._C.cpu_float32_gemm() == "oneDNN":
        assert (grad_q == 0).all() and (grad_k == 0).all()


def test_subnormal_probability_is_not_flushed():
    # exp(-95) is subnormal in float32 (5.5e-42): PyTorch's softmax keeps it, and so must the
    # kernel's exp, else 5.5e-42 * 1e38 becomes 0 and 5.5e-42 * inf becomes 0 * inf = NaN.
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([0.0, -95.0]).view(1, 1, 2, 1)
    for big, want in ((1e38, math.exp(-95.0) * 1e38), (math.inf, math.inf)):
        v = torch.tensor([0.0, big]).view(1, 1, 2, 1)
        got = mmkernels.cross_modal_attention(q, k, v, scale=1.0).item()
        assert got == pytest.approx(want, rel=2e-3), (big, got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(dtype):
    B, H, Lq, Lk, E, Ev = 3, 2, 6, 140, 8, 5
    q, k, v = make_qkv(B, H, Lq, Lk, E, Ev, dtype)
    lengths = torch.tensor([0, 7, Lk])  # batch 0 sees nothing
    attn = torch.rand(B, 1, Lq, Lk) < 0.7
    attn[1, :, 2] = False  # row 2 of batch 1 sees nothing
    fmask = torch.zeros(H, Lq, Lk, dtype=dtype)
    fmask[1, 4] = float("-inf")  # head 1, row 4 sees nothing, in every batch
    for masks in (
        {"kv_lengths": lengths, "attn_mask": attn},
        {"key_padding_mask": torch.ones(B, Lk, dtype=torch.bool)},
        {"kv_lengths": lengths, "attn_mask": fmask},
    ):
        out = mmkernels.cross_modal_attention(q, k, v, **masks)
        gq, gk, gv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        for t in (out, gq, gk, gv):
            assert not torch.isnan(t).any()
        assert (out[0] == 0).all() and (gq[0] == 0).all() and (gk[0] == 0).all() and (gv[0] == 0).all()
        if "attn_mask" in masks and masks["attn_mask"].dtype == torch.bool:
            assert (out[1, :, 2] == 0).all() and (gq[1, :, 2] == 0).all()
        elif "attn_mask" in masks:
            assert (out[:, 1, 4] == 0).all() and (gq[:, 1, 4] == 0).all()
        check_against_reference(q, k, v, masks, dtype)


def test_zero_sizes():
    for shape in ((2, 2, 0, 5, 4, 3), (2, 2, 5, 0, 4, 3), (0, 2, 5, 5, 4, 3)):
        q, k, v = make_qkv(*shape, torch.float32)
        out = mmkernels.cross_modal_attention(q, k, v)
        assert out.shape == (*shape[:3], shape[5]) and (out == 0).all()
        out.sum().backward()


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_matches_sdpa(mask):
    B, H, Lq, Lk, E = 2, 4, 70, 150, 16
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, torch.float32)
    attn = None
    if mask == "bool":
        attn = torch.rand(B, 1, Lq, Lk) < 0.8
        attn[..., 0] = True  # SDPA gives NaN for rows that see nothing; we give zeros
    elif mask == "float":
        attn = torch.randn(Lq, Lk)
    out = mmkernels.cross_modal_attention(q, k, v, attn_mask=attn, scale=0.2)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=0.2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_float_mask_requiring_grad_gets_its_gradient():
    q, k, v = make_qkv(2, 2, 5, 9, 4, 4, torch.float64)
    m = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v, m: mmkernels.cross_modal_attention(q, k, v, attn_mask=m), (q, k, v, m))


# --------------------------------------------------------------------------- gradcheck / opcheck


def _op_out(q, k, v, kpm=None, lengths=None, attn=None, scale=0.5, p=0.0, seed=None):
    return OP(q, k, v, kpm, lengths, attn, scale, p, seed)[0]


@pytest.mark.parametrize(
    "kind", ["none", "kpm+len64+bool2d", "float4d", "dropout", "masked_rows"],
)
def test_gradcheck(kind):
    B, H, Lq, Lk, E, Ev = 2, 2, 5, 7, 3, 4
    q, k, v = make_qkv(B, H, Lq, Lk, E, Ev, torch.float64)
    masks, p, seed = {}, 0.0, None
    if kind == "dropout":
        p, seed = 0.3, torch.tensor(1234)
    elif kind == "masked_rows":
        masks = {"kv_lengths": torch.tensor([0, 4])}
    elif kind != "none":
        masks = make_masks(kind, B, H, Lq, Lk, torch.float64)
    fn = lambda q, k, v: _op_out(
        q, k, v, masks.get("key_padding_mask"), masks.get("kv_lengths"), masks.get("attn_mask"), 0.5, p, seed
    )
    assert torch.autograd.gradcheck(fn, (q, k, v))  # second order: tests/test_double_backward.py


def _opcheck_args():
    B, H, Lq, Lk, E, Ev = 2, 3, 9, 13, 8, 5
    cases = []
    for dtype in (torch.float32, torch.float64, torch.float16):
        q, k, v = make_qkv(B, H, Lq, Lk, E, Ev, dtype)
        m = make_masks("kpm+len32+bool4d", B, H, Lq, Lk, dtype)
        cases.append((q, k, v, None, None, None, 0.35, 0.0, None))
        cases.append((q, k, v, m["key_padding_mask"], m["kv_lengths"], m["attn_mask"], 0.35, 0.0, None))
        cases.append((q, k, v, None, None, torch.randn(Lq, Lk, dtype=dtype), 0.35, 0.25, torch.tensor(7)))
    return cases


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    args = _opcheck_args()[case]
    torch.library.opcheck(OP, args)
    q, k, v = (t.detach() for t in args[:3])
    out, lse = OP(q, k, v, *args[3:])
    torch.library.opcheck(OP_BWD, (torch.randn_like(out), q, k, v, out, lse, *args[3:]))


# --------------------------------------------------------------------------- compile / export


def test_compile_fullgraph_forward_backward():
    B, H, Lq, Lk, E = 2, 2, 9, 21, 8
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, torch.float32)
    kpm = torch.rand(B, Lk) < 0.3
    attn = torch.rand(Lq, Lk) < 0.8

    def f(q, k, v, kpm, attn, lengths):
        a = mmkernels.cross_modal_attention(q, k, v, key_padding_mask=kpm, attn_mask=attn)
        b = mmkernels.cross_modal_attention(q, k, v, kv_lengths=lengths, dropout_p=0.2)
        return a, b

    lengths = torch.tensor([5, 21])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = compiled(q, k, v, kpm, attn, lengths)
    ea, _ = f(q, k, v, kpm, attn, lengths)
    torch.testing.assert_close(a, ea)
    grads = torch.autograd.grad((a.sum() + b.sum()), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_compile_inductor():
    q, k, v = make_qkv(2, 2, 9, 21, 8, 8, torch.float32)
    f = lambda q, k, v: mmkernels.cross_modal_attention(q, k, v, kv_lengths=torch.tensor([3, 21]))
    out = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_export():
    class M(torch.nn.Module):
        def forward(self, q, k, v, kpm):
            return mmkernels.cross_modal_attention(q, k, v, key_padding_mask=kpm, scale=0.3)

    q, k, v = make_qkv(2, 3, 7, 11, 8, 4, torch.float32, requires_grad=False)
    kpm = torch.rand(2, 11) < 0.3
    ep = torch.export.export(M(), (q, k, v, kpm))
    torch.testing.assert_close(ep.module()(q, k, v, kpm), M()(q, k, v, kpm))


# --------------------------------------------------------------------------- dropout


def recover_keep_mask(B, H, Lq, Lk, p, seed):
    """The kernel's keep mask for this seed: with uniform attention (q = k = 0) and v = I, each
    output element is keep / ((1 - p) Lk)."""
    q = torch.zeros(B, H, Lq, 1, dtype=torch.float64)
    k = torch.zeros(B, H, Lk, 1, dtype=torch.float64)
    v = torch.eye(Lk, dtype=torch.float64).expand(B, H, Lk, Lk)
    out = OP(q, k, v, None, None, None, 1.0, p, torch.tensor(seed))[0]
    return out > 0


def test_dropout_keep_rate():
    B, H, Lq, Lk = 2, 3, 128, 200
    for p in (0.1, 0.5, 0.9):
        keep = recover_keep_mask(B, H, Lq, Lk, p, seed=11)
        n = keep.numel()
        rate = keep.double().mean().item()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, (p, rate)
        # No visible structure: rows and columns keep at about the same rate.
        assert (keep.double().mean((0, 1, 3)) - (1 - p)).abs().max() < 0.12
    assert not recover_keep_mask(B, H, Lq, Lk, 1.0, seed=3).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_reference_with_the_same_mask(dtype):
    B, H, Lq, Lk, E, Ev, p = 2, 2, 33, 150, 8, 6, 0.3
    q, k, v = make_qkv(B, H, Lq, Lk, E, Ev, dtype)
    keep = recover_keep_mask(B, H, Lq, Lk, p, seed=99)
    masks = make_masks("kpm+bool2d", B, H, Lq, Lk, dtype)
    out = OP(q, k, v, masks["key_padding_mask"], None, masks["attn_mask"], E**-0.5, p, torch.tensor(99))[0]
    ref, leaves = run_reference(q, k, v, masks, dropout_p=p, dropout_mask=keep)
    assert_close(out, ref, dtype, "out")
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, leaves, g.double())):
        assert_close(a, b, dtype, f"grad {name}")


def test_dropout_same_seed_same_result():
    q, k, v = make_qkv(2, 2, 40, 70, 8, 8, torch.float32)

    def run(seed):
        torch.manual_seed(seed)
        out = mmkernels.cross_modal_attention(q, k, v, dropout_p=0.4)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    a, b, c = run(5), run(5), run(6)
    for x, y in zip(a, b):  # same mask; values to rounding (MKL's path depends on scratch alignment)
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert not torch.equal(a[0], c[0])
    # dropout_p = 0 is deterministic and equals no dropout at all.
    torch.testing.assert_close(
        mmkernels.cross_modal_attention(q, k, v, dropout_p=0.0), mmkernels.cross_modal_attention(q, k, v)
    )


# --------------------------------------------------------------------------- bad input


def _bad_cases():
    q, k, v = make_qkv(2, 3, 5, 7, 4, 6, torch.float32, requires_grad=False)
    return [
        ("q", (q[0], k, v), {}),
        ("k", (q, k[:1], v), {}),
        ("v", (q, k, v[:, :2]), {}),
        ("k", (q, k[..., :3], v), {}),
        ("v", (q, k, v[:, :, :6]), {}),
        ("k", (q, k.double(), v), {}),
        ("q", (q.int(), k.int(), v.int()), {}),
        ("key_padding_mask", (q, k, v), {"key_padding_mask": torch.zeros(2, 6, dtype=torch.bool)}),
        ("key_padding_mask", (q, k, v), {"key_padding_mask": torch.zeros(2, 7)}),
        ("kv_lengths", (q, k, v), {"kv_lengths": torch.tensor([1, 8])}),
        ("kv_lengths", (q, k, v), {"kv_lengths": torch.tensor([-1, 3])}),
        ("kv_lengths", (q, k, v), {"kv_lengths": torch.tensor([1.0, 3.0])}),
        ("kv_lengths", (q, k, v), {"kv_lengths": torch.tensor([1, 2, 3])}),
        ("attn_mask", (q, k, v), {"attn_mask": torch.zeros(5, 6, dtype=torch.bool)}),
        ("attn_mask", (q, k, v), {"attn_mask": torch.zeros(4, 5, 7, dtype=torch.bool)}),
        ("attn_mask", (q, k, v), {"attn_mask": torch.zeros(5, 7, dtype=torch.int64)}),
        ("attn_mask", (q, k, v), {"attn_mask": torch.zeros(7)}),
        ("dropout_p", (q, k, v), {"dropout_p": 1.5}),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_argument(case):
    name, args, kwargs = _bad_cases()[case]
    with pytest.raises((ValueError, RuntimeError), match=f"argument '{name}'"):
        mmkernels.cross_modal_attention(*args, **kwargs)


@pytest.mark.parametrize(
    "name,pos,value",
    [
        ("kv_lengths", 4, torch.tensor([1, 8])),
        ("kv_lengths", 4, torch.tensor([1.0, 2.0])),
        ("key_padding_mask", 3, torch.zeros(2, 7, dtype=torch.int32)),
        ("attn_mask", 5, torch.zeros(2, 7, 7, dtype=torch.bool)),
        ("dropout_seed", 8, None),
    ],
)
def test_op_checks_in_cpp(name, pos, value):
    # The C++ kernel checks again (the op can be called without the Python wrapper).
    q, k, v = make_qkv(2, 3, 5, 7, 4, 6, torch.float32, requires_grad=False)
    args = [q, k, v, None, None, None, 0.5, 0.3 if name == "dropout_seed" else 0.0, None]
    args[pos] = value
    with pytest.raises(RuntimeError, match=f"argument '{name}'"):
        OP(*args)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    # Few heads and many key blocks: backward splits key blocks over threads (per-thread dQ).
    q, k, v = make_qkv(1, 2, 70, 700, 16, 8, torch.float64)
    masks = {"kv_lengths": torch.tensor([650])}
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_against_reference(q, k, v, masks, torch.float64)
    finally:
        torch.set_num_threads(old)


def test_block_gemm_fallbacks():
    # The block GEMMs' other routes, in a subprocess: float32 with oneDNN switched off (matmul.cpp's
    # rule then sends them to ATen's mm), and float64 as on a torch whose BLAS exports no dgemm_ (loops).
    import os
    import subprocess
    import sys

    code = (
        "import torch, sys; sys.path.insert(0, 'tests');"
        "import test_cross_modal_attention as t;"
        "torch.backends.mkldnn.enabled = False;"
        "[t.check_against_reference(*t.make_qkv(2, 2, 70, 300, 8, 5, d), t.make_masks('kpm+bool2d', 2, 2, 70, 300, d), d)"
        " for d in (torch.float32, torch.float64)]"
    )
    env = dict(os.environ, MMKERNELS_NO_BLAS_SYMBOLS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
