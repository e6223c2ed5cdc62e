"""CUDA kernels of cross_modal_attention against mmkernels/reference.py and SDPA, in float64.

Marked `cuda` and skipped where no GPU is present. As of the commit that added this file, no GPU has
run it: the tensor-core kernels (csrc/cuda/attention/) are compiled but unverified. Tolerances below
are first guesses from the arithmetic (16-bit P and dS operands, float32 accumulation) and may need
tuning on the first GPU run.

Covered: every head dim (32 / 64 / 128: tensor cores; 16, 48, Ev != E: fallback), float16 /
bfloat16 (tensor cores) and float32 / float64 (fallback), every mask kind and combinations, sizes
that are not multiples of the 64-row tiles (1, 17, 123, 1000), fully-masked rows, Lq = 1, a grid
larger than 65535 blocks, non-contiguous and misaligned inputs, gradients of q, k, v (and of a
float mask that requires grad, through the wrapper's reference path), dropout (keep rate, the same
mask as the CPU kernel for the same seed, reproducibility), streams, opcheck and torch.compile.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import attention_support
import mmkernels
from attention_support import run_reference
from mmkernels import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

OP = torch.ops.mmkernels.cross_modal_attention.default
BWD = torch.ops.mmkernels.cross_modal_attention_backward.default
TC_DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 128]
# (atol, rtol) for outputs and for gradients, relative to max(1, max |expected|): 16-bit P / dS
# operands with float32 accumulation.
TOL = {
    torch.float16: ((4e-3, 4e-3), (1e-2, 1e-2)),
    torch.bfloat16: ((3e-2, 3e-2), (6e-2, 6e-2)),
    torch.float32: ((1e-5, 1e-4), (1e-4, 1e-4)),
    torch.float64: ((1e-10, 1e-8), (1e-10, 1e-8)),
}
MASK_KINDS = ["none", "kpm", "len32", "len64", "bool2d", "bool4d", "float3d", "float4d", "kpm+len32+bool2d", "holes"]


def make_qkv(B, H, Lq, Lk, E, Ev, dtype, requires_grad=True, gen=None):
    return attention_support.make_qkv(B, H, Lq, Lk, E, Ev, dtype, requires_grad, device="cuda", gen=gen)


def make_masks(kind, B, H, Lq, Lk):
    """On the GPU; float4d in bfloat16 whatever q's dtype (a mask dtype other than q's)."""
    return attention_support.make_masks(kind, B, H, Lq, Lk, device="cuda", float4d_dtype=torch.bfloat16)


def assert_close(actual, expected, tol, what=""):
    atol, rtol = tol
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_against_reference(q, k, v, masks, dtype, grads=True, **kw):
    out = mmkernels.cross_modal_attention(q, k, v, **masks, **kw)
    ref, leaves = run_reference(q, k, v, masks, **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert_close(out, ref, TOL[dtype][0], "out")
    if not grads:
        return
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, leaves, g.double())
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, TOL[dtype][1], f"grad {name}")


# --------------------------------------------------------------------------- tensor-core path


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_tensor_core_matches_reference(dtype, E, kind):
    B, H, Lq, Lk = 3, 2, 123, 200
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, dtype)
    check_against_reference(q, k, v, make_masks(kind, B, H, Lq, Lk), dtype)


@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_tensor_core_result_layouts(dtype, E):
    # csrc/include/attention_layout.h: out stored (B, Lq, H, E); dq, dk, dv in q's, k's, v's layout
    # (the kernels write out, dK, dV and the dQ accumulator through these strides).
    B, H, Lq, Lk = 2, 3, 77, 130
    def head_split(L):
        return torch.randn(B, L, H * E, device="cuda", dtype=dtype).unflatten(-1, (H, E)).transpose(1, 2).requires_grad_()
    q, k = head_split(Lq), head_split(Lk)
    v = torch.randn(B, H, Lk, E, device="cuda", dtype=dtype, requires_grad=True)
    out = mmkernels.cross_modal_attention(q, k, v)
    assert out.stride() == (Lq * H * E, E, H * E, 1)
    check_against_reference(q, k, v, make_masks("kpm", B, H, Lq, Lk), dtype)
    out.backward(torch.randn_like(out))
    assert q.grad.stride() == q.stride() and k.grad.stride() == k.stride() and v.grad.stride() == v.stride()


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 17), (17, 1), (17, 17), (123, 1000), (1000, 123), (1000, 1000), (1, 1000)])
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_tile_edges(dtype, E, Lq, Lk):
    q, k, v = make_qkv(2, 2, Lq, Lk, E, E, dtype)
    check_against_reference(q, k, v, make_masks("kpm", 2, 2, Lq, Lk), dtype)


@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["bool", "float"])
def test_matches_sdpa_float64(dtype, E, mask):
    """Against F.scaled_dot_product_attention run in float64 on the upcast inputs (no fully-masked
    rows here: SDPA returns NaN for those)."""
    B, H, Lq, Lk = 2, 3, 77, 300
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, dtype)
    if mask == "bool":
        m = torch.rand(B, 1, Lq, Lk, device="cuda") < 0.8
        m[..., 0] = True
    else:
        m = torch.randn(B, 1, Lq, Lk, device="cuda")
    out = mmkernels.cross_modal_attention(q, k, v, attn_mask=m, scale=0.3)
    up = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*up, attn_mask=m if mask == "bool" else m.double(), scale=0.3)
    assert_close(out, ref, TOL[dtype][0], "out")
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, up, g.double())):
        assert_close(a, b, TOL[dtype][1], f"grad {name}")


@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_fully_masked_rows_give_zeros_and_zero_grad(dtype, E):
    B, H, Lq, Lk = 3, 2, 70, 130
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, dtype)
    kpm = torch.zeros(B, Lk, dtype=torch.bool, device="cuda")
    kpm[0] = True  # batch 0 sees nothing at all
    lengths = torch.tensor([Lk, 0, 5], dtype=torch.int32, device="cuda")  # batch 1 neither
    attn = torch.ones(Lq, Lk, dtype=torch.bool, device="cuda")
    attn[3] = False  # query row 3 of every batch sees nothing
    out, lse = OP(q, k, v, kpm, lengths, attn, E**-0.5, 0.0, None)
    assert torch.isinf(lse[:2]).all() and (lse[:2] > 0).all()
    assert torch.isinf(lse[:, :, 3]).all()
    assert (out[:2] == 0).all() and (out[:, :, 3] == 0).all()
    out = mmkernels.cross_modal_attention(q, k, v, key_padding_mask=kpm, kv_lengths=lengths, attn_mask=attn)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for t in (dq, dk, dv):
        assert not torch.isnan(t).any()
    assert (dq[:2] == 0).all() and (dq[:, :, 3] == 0).all()
    assert (dk[:2] == 0).all() and (dv[:2] == 0).all()
    assert (dk[2, :, 5:] == 0).all() and (dv[2, :, 5:] == 0).all()  # keys past kv_lengths


@pytest.mark.parametrize("dtype,E", [(torch.float16, 64), (torch.bfloat16, 128), (torch.float32, 64), (torch.float16, 48)],
                         ids=str)  # tensor cores (the first two), the fallback (the last two)
def test_nan_query_row_gives_nan_and_nan_gradients(dtype, E):
    # Regression (issue 19 part 3): a row whose visible scores are NaN was taken for a row that sees
    # no key (l > 0 failed): zeros and lse = +inf, so zero gradients. It must be NaN, output and
    # gradients; only a row that sees no key at all gets zeros, whatever its query holds.
    B, H, Lq, Lk = 2, 2, 70, 130
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, dtype, requires_grad=False)
    attn = torch.zeros(Lq, Lk, device="cuda", dtype=dtype)
    attn[3] = -math.inf  # query row 3 of every head sees no key
    q[0, 0, 1, 0] = math.nan  # every score of row 1 of head (0, 0) is NaN
    q[1, 1, 3, 0] = math.nan  # a NaN query in a row that sees nothing: still zeros
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = OP(q.detach(), k.detach(), v.detach(), None, None, attn, E**-0.5, 0.0, None)
    assert torch.isnan(out[0, 0, 1]).all() and torch.isnan(lse[0, 0, 1])
    assert (out[:, :, 3] == 0).all() and torch.isposinf(lse[:, :, 3]).all()
    out = mmkernels.cross_modal_attention(q, k, v, attn_mask=attn)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    assert torch.isnan(out[0, 0, 1]).all() and torch.isnan(dq[0, 0, 1]).all()
    assert torch.isnan(dk[0, 0]).all() and torch.isnan(dv[0, 0]).all()  # the NaN row sees every key
    assert (out[1, 1, 3] == 0).all() and (dq[1, 1, 3] == 0).all()
    # Everything else is what the reference gives with the NaNs replaced by zeros (rows are independent;
    # the zeroed rows are checked above).
    ref, leaves = run_reference(q.detach().nan_to_num(0.0), k, v, {"attn_mask": attn})
    want = torch.autograd.grad(ref, leaves, g.double())
    row_ok = torch.ones(B, H, Lq, 1, dtype=torch.bool, device="cuda")
    row_ok[0, 0, 1] = False
    head_ok = torch.ones(B, H, 1, 1, dtype=torch.bool, device="cuda")
    head_ok[0, 0] = False
    assert_close(out.detach().where(row_ok, 0), ref.where(row_ok, 0), TOL[dtype][0], "out")
    assert_close(dq.where(row_ok, 0), want[0].where(row_ok, 0), TOL[dtype][1], "grad q")
    assert_close(dv.where(head_ok, 0), want[2].where(head_ok, 0), TOL[dtype][1], "grad v")
    # dK = dS^T Q multiplies row 3's zero dS by its NaN query (0 * NaN in the GEMM, as in the
    # reference's own product): head (1, 1) is left out of the dK comparison.
    head_ok[1, 1] = False
    assert_close(dk.where(head_ok, 0), want[1].where(head_ok, 0), TOL[dtype][1], "grad k")


def test_decoding_lq1_and_large_grid():
    # Lq = 1 (decoding) with B * H * tiles > 65535 blocks (the grid is flat in x).
    B, H, Lq, Lk, E = 70, 1000, 1, 17, 32
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, torch.float16)
    check_against_reference(q, k, v, {}, torch.float16)
    q, k, v = make_qkv(64, 12, 1, 1024, 64, 64, torch.bfloat16)
    check_against_reference(q, k, v, make_masks("len32", 64, 12, 1, 1024), torch.bfloat16)


@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_split_key_decoding(dtype, E):
    # Few (b, h, query tile) blocks and long keys: the forward splits the keys over blocks and merges
    # the splits by log-sum-exp (attn::choose_key_splits); masks, kv_lengths (one batch to 0: zeros),
    # lower-right causal, grouped-query heads. Backward is the unsplit kernel's, from the merged lse.
    B, H, Lq, Lk = 2, 4, 3, 5000
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, dtype)
    check_against_reference(q, k, v, make_masks("kpm+len32+bool2d", B, H, Lq, Lk), dtype)
    lengths = torch.tensor([Lk - 7, 0], device="cuda")
    out = mmkernels.cross_modal_attention(q, k, v, kv_lengths=lengths)
    assert (out[1] == 0).all()
    check_against_reference(q, k, v, {"kv_lengths": lengths}, dtype,
                            attn_mask=torch.nn.attention.bias.causal_lower_right(Lq, Lk))
    q, k, v = make_qkv(1, 8, 1, 8192, E, E, dtype)
    k, v = (t[:, :2].detach().requires_grad_() for t in (k, v))
    check_against_reference(q, k, v, {}, dtype, enable_gqa=True)


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_non_contiguous_and_misaligned_inputs(dtype):
    B, H, Lq, Lk, E = 2, 4, 50, 90, 64
    # The nn.MultiheadAttention layout: (B, L, H, E) viewed as (B, H, L, E).
    q = torch.randn(B, Lq, H, E, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Lk, H, E, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    # Rows not 16-byte aligned (a stride of 65 elements): the op copies to a kernel layout.
    v = torch.randn(B, H, Lk, E + 1, device="cuda", dtype=dtype)[..., 1:].requires_grad_()
    check_against_reference(q, k, v, make_masks("kpm+bool2d", B, H, Lq, Lk), dtype)


def test_honours_current_stream():
    q, k, v = make_qkv(4, 4, 300, 500, 64, 64, torch.bfloat16, requires_grad=False)
    expected = mmkernels.cross_modal_attention(q, k, v)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = mmkernels.cross_modal_attention(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_other_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k, v = (t.to("cuda:1") for t in make_qkv(2, 2, 40, 60, 64, 64, torch.float16, requires_grad=False))
    out = mmkernels.cross_modal_attention(q, k, v)
    ref, _ = run_reference(q, k, v, {})
    assert out.device == q.device
    assert_close(out, ref, TOL[torch.float16][0], "out")


# --------------------------------------------------------------------------- causal flag, grouped-query heads
# The tensor-core kernels skip the key tiles past the diagonal (forward) and the query tiles before it
# (backward); grouped-query heads index K / V by h // G and sum dK / dV over the group in one block.
# The fallback (float32 here) applies both in its ATen composition. All of it ran on the emulation
# harness (tests/emu/test_emu_attention.py); on a GPU: UNVERIFIED until a session with one runs this.


def make_gqa(B, H, H_kv, Lq, Lk, E, dtype):
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, dtype)
    k, v = (t[:, :H_kv].detach().contiguous().requires_grad_() for t in (k, v))
    return q, k, v


def causal_kwargs(alignment, Lq, Lk):
    """Upper-left through is_causal=True; lower-right through the CausalBias the decoders pass."""
    if alignment == "upper_left":
        return {"is_causal": True}
    from torch.nn.attention.bias import causal_lower_right

    return {"attn_mask": causal_lower_right(Lq, Lk)}


@pytest.mark.parametrize("Lq,Lk", [(200, 200), (123, 300), (300, 123), (1, 257), (257, 1)], ids=str)
@pytest.mark.parametrize("alignment", ["upper_left", "lower_right"])
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TC_DTYPES + [torch.float32], ids=str)
def test_causal_matches_reference(dtype, E, alignment, Lq, Lk):
    q, k, v = make_qkv(2, 3, Lq, Lk, E, E, dtype)
    check_against_reference(q, k, v, {}, dtype, **causal_kwargs(alignment, Lq, Lk))


@pytest.mark.parametrize("kind", ["kpm", "len32", "bool2d", "float3d", "kpm+len32+bool2d", "holes"])
@pytest.mark.parametrize("alignment", ["upper_left", "lower_right"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_causal_with_masks(dtype, alignment, kind):
    B, H, Lq, Lk = 2, 2, 150, 230
    q, k, v = make_qkv(B, H, Lq, Lk, 64, 64, dtype)
    masks = make_masks(kind, B, H, Lq, Lk)
    if alignment == "upper_left":
        check_against_reference(q, k, v, masks, dtype, is_causal=True)
    else:  # a CausalBias cannot ride along with another attn_mask: lower-right through the op's flag
        if "attn_mask" in masks:
            masks["attn_mask"] = masks["attn_mask"].tril(Lk - Lq) if masks["attn_mask"].dtype == torch.bool else \
                masks["attn_mask"].masked_fill(~reference.causal_visible(2, Lq, Lk, "cuda"), float("-inf"))
            check_against_reference(q, k, v, masks, dtype)
        else:
            check_against_reference(q, k, v, masks, dtype, **causal_kwargs(alignment, Lq, Lk))


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_causal_lower_right_rows_that_see_nothing(dtype):
    # Lq > Lk: the first Lq - Lk rows see no key: zeros, lse = +inf, zero gradients.
    B, H, Lq, Lk, E = 2, 2, 150, 60, 64
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, dtype)
    out, lse = OP(q, k, v, None, None, None, E**-0.5, 0.0, None, 2)
    assert (out[:, :, : Lq - Lk] == 0).all() and torch.isposinf(lse[:, :, : Lq - Lk]).all()
    check_against_reference(q, k, v, {}, dtype, **causal_kwargs("lower_right", Lq, Lk))


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_causal_matches_sdpa_float64(dtype):
    B, H, Lq, Lk, E = 2, 4, 200, 333, 64
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, dtype)
    out = mmkernels.cross_modal_attention(q, k, v, is_causal=True)
    up = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*up, is_causal=True)
    assert_close(out, ref, TOL[dtype][0], "out")
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, up, g.double())):
        assert_close(a, b, TOL[dtype][1], f"grad {name}")


@pytest.mark.parametrize("H_kv", [1, 2, 8])
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TC_DTYPES + [torch.float32], ids=str)
def test_grouped_query_heads_match_reference(dtype, E, H_kv):
    B, H, Lq, Lk = 2, 8, 123, 200
    q, k, v = make_gqa(B, H, H_kv, Lq, Lk, E, dtype)
    check_against_reference(q, k, v, make_masks("kpm+len32+bool2d", B, H, Lq, Lk), dtype, enable_gqa=True)


@pytest.mark.parametrize("H_kv", [1, 4])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_grouped_query_heads_causal_and_sdpa(dtype, H_kv):
    B, H, Lq, Lk, E = 2, 8, 190, 190, 128
    q, k, v = make_gqa(B, H, H_kv, Lq, Lk, E, dtype)
    check_against_reference(q, k, v, make_masks("float3d", B, H, Lq, Lk), dtype, enable_gqa=True, is_causal=True)
    out = mmkernels.cross_modal_attention(q, k, v, is_causal=True, enable_gqa=True)
    up = [t.detach().double() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*up, is_causal=True, enable_gqa=True)
    assert_close(out, ref, TOL[dtype][0], "out vs SDPA")


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_grouped_query_heads_dropout_same_mask_as_cpu(dtype):
    # Dropout rows are keyed by the query head on both devices: the same elements drop.
    q, k, v = make_gqa(2, 6, 2, 40, 96, 64, dtype)
    args = [t.detach() for t in (q, k, v)]
    got = OP(*args, None, None, None, 0.125, 0.3, torch.tensor(5), 1)[0]
    want = torch.ops.mmkernels.cross_modal_attention.default(
        *[t.cpu().double() for t in args], None, None, None, 0.125, 0.3, torch.tensor(5), 1)[0]
    assert_close(got, want, TOL[dtype][0], "out")


def test_grouped_query_heads_never_expand_k_and_v():
    # Multi-query attention over a long key sequence: a (B, H, Lk, E) copy of K and V would be 32x
    # their size; the forward and backward stay far below that.
    B, H, Lq, Lk, E = 1, 32, 64, 65536, 128
    q, k, v = make_gqa(B, H, 1, Lq, Lk, E, torch.bfloat16)
    expanded = 2 * B * H * Lk * E * k.element_size()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = mmkernels.cross_modal_attention(q, k, v, enable_gqa=True)
    out.float().sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < expanded / 8
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


def test_grouped_query_heads_need_enable_gqa():
    q, k, v = make_gqa(1, 4, 2, 10, 10, 64, torch.float16)
    with pytest.raises(ValueError, match="enable_gqa"):
        mmkernels.cross_modal_attention(q, k, v)


def test_causal_and_gqa_take_the_kernels_without_a_warning():
    # The wrapper no longer routes these CUDA calls to the reference (which warned once).
    import warnings

    q, k, v = make_gqa(1, 4, 2, 70, 90, 64, torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mmkernels.cross_modal_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()


# --------------------------------------------------------------------------- fallback path


@pytest.mark.parametrize(
    "dtype,E,Ev",
    [(torch.float32, 64, 64), (torch.float32, 17, 5), (torch.float64, 8, 8), (torch.float16, 48, 48),
     (torch.bfloat16, 64, 32), (torch.float16, 16, 16)],
    ids=str,
)
@pytest.mark.parametrize("kind", ["none", "kpm+len32+float3d", "bool4d"])
def test_fallback_matches_reference(dtype, E, Ev, kind):
    B, H, Lq, Lk = 2, 3, 33, 70
    q, k, v = make_qkv(B, H, Lq, Lk, E, Ev, dtype)
    masks = make_masks(kind, B, H, Lq, Lk)
    if "attn_mask" in masks and masks["attn_mask"].is_floating_point():
        masks["attn_mask"] = masks["attn_mask"].to(dtype)
    check_against_reference(q, k, v, masks, dtype)


def test_fallback_warns_once_naming_the_path():
    code = (
        "import warnings, torch, mmkernels\n"
        "warnings.simplefilter('always')\n"
        "q = torch.randn(1, 1, 4, 8, device='cuda')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    mmkernels.cross_modal_attention(q, q, q); mmkernels.cross_modal_attention(q, q, q)\n"
        "msgs = [str(x.message) for x in w if 'cross_modal_attention' in str(x.message)]\n"
        "print(len(msgs)); print(msgs[0] if msgs else '')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    count, msg = res.stdout.strip().split("\n", 1)
    assert count == "1", res.stdout
    assert "fallback" in msg and "float" in msg, msg


def test_gradcheck_fallback_float64():
    q, k, v = make_qkv(1, 2, 5, 7, 4, 3, torch.float64)
    masks = make_masks("kpm+float3d", 1, 2, 5, 7)
    masks["attn_mask"] = masks["attn_mask"].double()

    def f(q, k, v):
        return mmkernels.cross_modal_attention(q, k, v, **masks)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_float_mask_requiring_grad_gets_its_gradient():
    q, k, v = make_qkv(2, 2, 20, 30, 64, 64, torch.float32)
    m = torch.randn(20, 30, device="cuda", requires_grad=True)
    out = mmkernels.cross_modal_attention(q, k, v, attn_mask=m)
    (gm,) = torch.autograd.grad(out.sum(), (m,))
    m2 = m.detach().double().requires_grad_()
    ref = reference.cross_modal_attention(q.double(), k.double(), v.double(), attn_mask=m2)
    (gm2,) = torch.autograd.grad(ref.sum(), (m2,))
    torch.testing.assert_close(gm.double(), gm2, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- dropout


def recover_keep_mask(B, H, Lq, Lk, p, seed, device, dtype):
    """The kernel's keep mask for this seed: with uniform attention (q = k = 0) and v = I (Lk = E),
    each output element is keep / ((1 - p) Lk)."""
    q = torch.zeros(B, H, Lq, Lk, dtype=dtype, device=device)
    v = torch.eye(Lk, dtype=dtype, device=device).expand(B, H, Lk, Lk)
    out = OP(q, q[:, :, :1].expand(B, H, Lk, Lk), v, None, None, None, 1.0, p, torch.tensor(seed))[0]
    return (out > 0).cpu()


@pytest.mark.parametrize("dtype", TC_DTYPES + [torch.float32], ids=str)
def test_dropout_keep_rate_and_same_mask_as_cpu(dtype):
    B, H, Lq, Lk = 2, 3, 150, 64  # Lk = E = 64: the tensor-core kernel for 16-bit dtypes
    for p in (0.1, 0.5, 0.9):
        keep = recover_keep_mask(B, H, Lq, Lk, p, 11, "cuda", dtype)
        rate = keep.double().mean().item()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5, (p, rate)
        # The same counter-based hash as the CPU kernel: the same elements are dropped.
        assert torch.equal(keep, recover_keep_mask(B, H, Lq, Lk, p, 11, "cpu", torch.float64))
    assert not recover_keep_mask(B, H, Lq, Lk, 1.0, 3, "cuda", dtype).any()


@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_dropout_gradients_match_reference_with_the_same_mask(dtype, E):
    B, H, Lq, Lk, p = 2, 2, 70, 64, 0.3
    q, k, v = make_qkv(B, H, Lq, Lk, E, E, dtype)
    keep = recover_keep_mask(B, H, Lq, Lk, p, 99, "cpu", torch.float64).cuda()
    masks = make_masks("kpm+bool2d", B, H, Lq, Lk)
    out = OP(q, k, v, masks["key_padding_mask"], None, masks["attn_mask"], E**-0.5, p, torch.tensor(99))[0]
    ref, leaves = run_reference(q, k, v, masks, dropout_p=p, dropout_mask=keep)
    assert_close(out, ref, TOL[dtype][0], "out")
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, leaves, g.double())):
        assert_close(a, b, TOL[dtype][1], f"grad {name}")


def test_dropout_same_seed_same_result():
    q, k, v = make_qkv(2, 2, 100, 130, 64, 64, torch.bfloat16)

    def run(seed):
        torch.manual_seed(seed)
        out = mmkernels.cross_modal_attention(q, k, v, dropout_p=0.4)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    a, b, c = run(5), run(5), run(6)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    for x, y in zip(a[2:], b[2:]):  # dk, dv: deterministic; dq sums with atomics (order varies)
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-2, atol=1e-2)
    assert not torch.equal(a[0], c[0])


# --------------------------------------------------------------------------- opcheck, compile


def _opcheck_cases():
    # opcheck takes seconds per case (it runs the op under several tracing modes): one case per
    # kernel family and mask / dropout path, not the cross product (benchmarks/gpu_check.sh has a
    # time budget for every CUDA test).
    dev = "cuda"
    cases = []
    for dtype, E, variant in ((torch.float16, 64, "plain"), (torch.bfloat16, 32, "masks"),
                              (torch.bfloat16, 128, "dropout"), (torch.float32, 24, "masks")):
        q = torch.randn(2, 2, 9, E, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 2, 13, E, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(2, 2, 13, E, device=dev, dtype=dtype, requires_grad=True)
        kpm = torch.rand(2, 13, device=dev) < 0.3
        lengths = torch.tensor([13, 7], dtype=torch.int32, device=dev)
        m = torch.rand(9, 13, device=dev) < 0.8
        if variant == "plain":
            cases.append((q, k, v, None, None, None, E**-0.5, 0.0, None))
        elif variant == "masks":
            cases.append((q, k, v, kpm, lengths, m, 0.3, 0.0, None))
        else:
            cases.append((q, k, v, kpm, None, None, 0.3, 0.25, torch.tensor(7)))
    # The causal flag (lower-right) with grouped-query heads (4 query heads over 2 kv heads), on the
    # tensor cores and on the fallback.
    for dtype, E in ((torch.float16, 64), (torch.float32, 24)):
        q = torch.randn(2, 4, 9, E, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 2, 13, E, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(2, 2, 13, E, device=dev, dtype=dtype, requires_grad=True)
        cases.append((q, k, v, torch.rand(2, 13, device=dev) < 0.3, None, None, 0.3, 0.0, None, 2))
    return cases


@pytest.mark.parametrize("i", range(6))
def test_opcheck(i):
    args = _opcheck_cases()[i]
    torch.library.opcheck(OP, args)


def test_opcheck_backward():
    q, k, v = make_qkv(2, 2, 9, 13, 64, 64, torch.float16, requires_grad=False)
    out, lse = OP(q, k, v, None, None, None, 0.125, 0.0, None)
    torch.library.opcheck(BWD, (torch.randn_like(out), q, k, v, out, lse, None, None, None, 0.125, 0.0, None))


def test_compile_fullgraph_forward_backward():
    q, k, v = make_qkv(2, 4, 100, 150, 64, 64, torch.bfloat16)
    kpm = torch.rand(2, 150, device="cuda") < 0.3

    def f(q, k, v):
        return mmkernels.cross_modal_attention(q, k, v, key_padding_mask=kpm, dropout_p=0.0).float().square().sum()

    # aot_eager: traces through dynamo (fullgraph: no graph break), the fake kernels and the
    # registered autograd, like inductor, without inductor's minutes of codegen in the GPU check.
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = cf(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grads[1], grads_e[1], rtol=0, atol=0)  # dk: deterministic kernel
    torch.testing.assert_close(grads[0], grads_e[0], rtol=2e-2, atol=2e-2)


def test_dropout_seed_on_the_gpu_reads_the_same_seed():
    q, k, v = make_qkv(2, 2, 40, 64, 64, 64, torch.float16, requires_grad=False)
    a = OP(q, k, v, None, None, None, 0.125, 0.5, torch.tensor(1234))[0]
    b = OP(q, k, v, None, None, None, 0.125, 0.5, torch.tensor(1234, device="cuda"))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
