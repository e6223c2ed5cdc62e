"""The tensor-core attention kernels (csrc/cuda/attention/) executed from their own source on the
emulation harness, forward and backward, against mmkernels/reference.py in float64: every head dim,
both 16-bit dtypes, every mask kind, sizes that are not multiples of the 64-row tiles, fully masked
rows, dropout (the same keep mask in backward), the causal flag in both alignments, grouped-query
heads (H_kv in {1, 2, H}). Tolerances: those of tests/test_cuda_cross_modal_attention.py."""
from __future__ import annotations

import os
import random

import pytest
import torch

import attention_support
from attention_emu import DTYPES, HEAD_DIMS, TOL, Problem, assert_close, keep_mask, with_causal
from attention_support import run_reference
from harness import harness

pytestmark = pytest.mark.emu

MASK_KINDS = ["none", "kpm", "len32", "bool2d", "bool4d", "float3d", "float4d", "kpm+len32+bool2d", "holes"]


def run_case(B, H, Lq, Lk, E, dtype, masks, grads=True, dropout_p=0.0, seed=0, gen_seed=0, layout="bhsd", causal=0,
             H_kv=None):
    """The kernels on fresh random inputs against the float64 reference. causal: the op's flag (0, 1
    upper-left, 2 lower-right); H_kv: kv heads (grouped-query attention when < H)."""
    g = torch.Generator().manual_seed(gen_seed)
    H_kv = H if H_kv is None else H_kv
    q, k, v = attention_support.make_qkv(B, H, Lq, Lk, E, E, dtype, requires_grad=False, gen=g)
    k, v = k[:, :H_kv].contiguous(), v[:, :H_kv].contiguous()
    scale = E**-0.5
    prob = Problem(harness(), q, k, v, masks, scale, dropout_p, seed, layout, causal=causal)
    out, lse = prob.forward()
    kw = {}
    if dropout_p > 0:
        kw = dict(dropout_p=dropout_p, dropout_mask=keep_mask(B, H, Lq, Lk, dropout_p, seed))
    ref_masks = with_causal(masks, causal, Lq, Lk)
    ref, leaves = run_reference(q, k, v, ref_masks, scale=scale, enable_gqa=H_kv != H, **kw)
    assert_close(out, ref, TOL[dtype][0], "out")
    # lse: logsumexp of the visible scaled scores, +inf for a row that sees nothing.
    k_per_head = k.repeat_interleave(H // H_kv, dim=1)
    s = (q.double() @ k_per_head.double().transpose(-1, -2)) * scale
    vis = attention_support.reference.visible_keys(q, k, **{n: t for n, t in ref_masks.items()})
    if "attn_mask" in ref_masks and ref_masks["attn_mask"].dtype != torch.bool:
        s = s + ref_masks["attn_mask"].double()
    s = s.masked_fill(~vis, float("-inf"))
    want_lse = torch.logsumexp(s, -1)
    want_lse = torch.where(torch.isneginf(want_lse), torch.inf, want_lse)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-2, rtol=1e-3, msg=lambda m: f"lse: {m}")
    if not grads:
        return
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dq, dk, dv = prob.backward(out, lse, dout)
    want = torch.autograd.grad(ref, leaves, dout.double())
    for name, a, b in zip("qkv", (dq, dk, dv), want):
        assert_close(a, b, TOL[dtype][1], f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", HEAD_DIMS)
def test_forward_and_backward_odd_sizes(E, dtype):
    # Lq and Lk not multiples of the 64-row tiles (nor of 16, the backward's query tile at E = 128).
    run_case(2, 2, 70, 83, E, dtype, {})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks(kind, E, dtype):
    B, H, Lq, Lk = 2, 2, 37, 150
    masks = attention_support.make_masks(kind, B, H, Lq, Lk, torch.float32)
    run_case(B, H, Lq, Lk, E, dtype, masks, grads=E == 64 or kind in ("kpm+len32+bool2d", "holes"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", HEAD_DIMS)
def test_fully_masked_rows_give_zeros_and_zero_gradients(E, dtype):
    B, H, Lq, Lk = 3, 1, 20, 70
    attn_mask = torch.rand(Lq, Lk) < 0.5
    attn_mask[[0, 7, 19]] = False  # rows that see no key under the mask
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    kpm[1] = True  # batch 1 sees no key at all (an empty key range: no tile is loaded)
    lengths = torch.tensor([Lk, Lk, 0], dtype=torch.int32)  # batch 2 likewise, through kv_lengths
    masks = {"attn_mask": attn_mask, "key_padding_mask": kpm, "kv_lengths": lengths}
    run_case(B, H, Lq, Lk, E, dtype, masks)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", HEAD_DIMS)
def test_dropout_same_mask_forward_and_backward(E, dtype):
    B, H, Lq, Lk = 1, 2, 33, 90
    masks = attention_support.make_masks("kpm+bool2d", B, H, Lq, Lk)
    run_case(B, H, Lq, Lk, E, dtype, masks, dropout_p=0.3, seed=99)


def test_dropout_factors_kernel_matches_the_cpu_keep_mask():
    B, H, Lq, Lk, p, seed = 2, 3, 17, 45, 0.4, 1234
    q = torch.zeros(B, H, Lq, 32, dtype=torch.float16)
    k = torch.zeros(B, H, Lk, 32, dtype=torch.float16)
    z = Problem(harness(), q, k, k, {}, 1.0, p, seed).dropout_factors(torch.float64)
    assert torch.equal(z.bool(), keep_mask(B, H, Lq, Lk, p, seed))
    assert 0.4 < z.mean().item() < 0.8  # a keep rate near 1 - p


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", HEAD_DIMS)
def test_strided_layout_and_single_query_and_key(E, dtype):
    # q, k, v with the sequence stride H * E (a (B, S, H, E) buffer): the kernels read any row stride.
    run_case(2, 3, 45, 66, E, dtype, attention_support.make_masks("kpm", 2, 3, 45, 66), layout="bshd")
    run_case(1, 1, 1, 1, E, dtype, {})


def test_key_ranges_kernel():
    B, Lk = 5, 150
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    kpm[0, :10] = True
    kpm[0, 140:] = True
    kpm[1, 30:100] = True  # a hole: the range keeps it (per-element masking inside)
    kpm[2] = True  # nothing visible
    lengths = torch.tensor([Lk, 120, Lk, 0, 7], dtype=torch.int32)
    q = torch.zeros(B, 1, 4, 32, dtype=torch.float16)
    k = torch.zeros(B, 1, Lk, 32, dtype=torch.float16)
    prob = Problem(harness(), q, k, k, {"key_padding_mask": kpm, "kv_lengths": lengths}, 1.0)
    want = []
    for b in range(B):
        vis = (~kpm[b]) & (torch.arange(Lk) < lengths[b])
        idx = vis.nonzero().flatten().tolist()
        want.append([idx[0], idx[-1] + 1] if idx else [0, 0])
    assert prob.kv_range.tolist() == want


# ------------------------------------------------------------------ causal flag and grouped-query heads
# The kernels skip key tiles past the diagonal (forward) and query tiles before it (backward) and mask
# only the tiles that cross it; Lq != Lk both ways, both alignments (lower-right with Lq > Lk leaves
# the first Lq - Lk rows seeing no key: zeros, lse = +inf, zero gradients).
CAUSAL_SHAPES = [(70, 70), (37, 150), (150, 37), (130, 200), (1, 90), (90, 1)]


@pytest.mark.parametrize("Lq,Lk", CAUSAL_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [1, 2])
def test_causal_both_alignments(causal, Lq, Lk):
    run_case(2, 2, Lq, Lk, 64, torch.float16, {}, causal=causal, gen_seed=Lq * 1000 + Lk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("causal", [1, 2])
def test_causal_every_head_dim(causal, E, dtype):
    # 130 x 200 and 200 x 130: several tiles on each side of the diagonal; E = 128's backward takes
    # query tiles of 16 rows, so its first visible query tile is not the forward's.
    run_case(1, 2, 130, 200, E, dtype, {}, causal=causal)
    run_case(1, 2, 200, 130, E, dtype, {}, causal=causal, gen_seed=1)


@pytest.mark.parametrize("kind", ["kpm", "len32", "bool2d", "float3d", "kpm+len32+bool2d", "holes"])
@pytest.mark.parametrize("causal", [1, 2])
def test_causal_with_masks(causal, kind):
    B, H, Lq, Lk = 2, 2, 90, 150
    masks = attention_support.make_masks(kind, B, H, Lq, Lk, torch.float32)
    run_case(B, H, Lq, Lk, 64, torch.bfloat16, masks, causal=causal)
    run_case(B, H, Lk, Lq, 32, torch.float16, attention_support.make_masks(kind.replace("holes", "kpm"), B, H, Lk, Lq),
             causal=causal, gen_seed=1)


@pytest.mark.parametrize("E", HEAD_DIMS)
def test_causal_fully_masked_rows(E):
    # Lower-right with Lq > Lk: rows 0 .. Lq - Lk - 1 see no key; with kv_lengths 0 a batch sees none;
    # an upper-left row 0 whose only key is padded sees none.
    B, H, Lq, Lk = 3, 2, 100, 40
    lengths = torch.tensor([Lk, 0, 25], dtype=torch.int32)
    run_case(B, H, Lq, Lk, E, torch.float16, {"kv_lengths": lengths}, causal=2)
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    kpm[:, 0] = True
    run_case(B, H, 30, Lk, E, torch.bfloat16, {"key_padding_mask": kpm}, causal=1, gen_seed=2)


def test_causal_dropout_same_mask_forward_and_backward():
    run_case(1, 2, 77, 120, 64, torch.float16, {}, causal=2, dropout_p=0.25, seed=7)


@pytest.mark.parametrize("H_kv", [1, 2, 4])
@pytest.mark.parametrize("E", HEAD_DIMS)
def test_grouped_query_heads(E, H_kv):
    # H = 4 query heads over H_kv kv heads (1: multi-query; 4: plain); dK / dV sum over the group.
    run_case(2, 4, 70, 83, E, torch.float16 if E != 64 else torch.bfloat16, {}, H_kv=H_kv)


@pytest.mark.parametrize("H_kv", [1, 2])
@pytest.mark.parametrize("kind", ["kpm+len32+bool2d", "float3d", "holes"])
def test_grouped_query_heads_with_masks_and_causal(kind, H_kv):
    B, H, Lq, Lk = 2, 4, 45, 150
    masks = attention_support.make_masks(kind, B, H, Lq, Lk, torch.float32)
    run_case(B, H, Lq, Lk, 64, torch.float16, masks, H_kv=H_kv)
    run_case(B, H, Lq, Lk, 32, torch.bfloat16, masks, H_kv=H_kv, causal=2, gen_seed=3)


def test_grouped_query_heads_dropout_and_strided_layout():
    # Dropout rows are keyed by the query head; (B, S, H, E) memory for q and (B, S, H_kv, E) for k, v.
    run_case(2, 6, 50, 70, 32, torch.float16, attention_support.make_masks("kpm", 2, 6, 50, 70), H_kv=2,
             dropout_p=0.3, seed=11, layout="bshd", causal=1)


# Random shapes, masks, dropout and layouts: a few in the default run, many with MMK_EMU_LONG=1
# (the CI step .ci/steps/25-emu.sh).
RANDOM_CASES = int(os.environ.get("MMK_EMU_RANDOM_CASES", "60" if os.environ.get("MMK_EMU_LONG") else "4"))


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_random_cases(case):
    rnd = random.Random(1000 + case)
    B, H = rnd.randint(1, 2), rnd.randint(1, 3)
    Lq, Lk = rnd.randint(1, 140), rnd.randint(1, 200)
    E = rnd.choice(HEAD_DIMS)
    dtype = rnd.choice(DTYPES)
    kind = rnd.choice(MASK_KINDS + ["len64", "bool4d+kpm"])
    if kind == "holes" and Lk < 100:
        kind = "kpm"
    masks = attention_support.make_masks(kind, B, H, Lq, Lk, torch.float32)
    dropout_p = rnd.choice([0.0, 0.0, 0.2])
    H_kv = rnd.choice([d for d in range(1, H + 1) if H % d == 0])
    run_case(B, H, Lq, Lk, E, dtype, masks, dropout_p=dropout_p, seed=case, gen_seed=case,
             layout=rnd.choice(["bhsd", "bshd"]), causal=rnd.choice([0, 0, 1, 2]), H_kv=H_kv)


@pytest.mark.parametrize("dtype,E", [(torch.float16, 64), (torch.bfloat16, 128)], ids=str)
def test_nan_query_row_gives_nan_and_nan_gradients(dtype, E):
    # Issue 19 part 3 on the tensor-core kernels themselves (tests/test_cuda_cross_modal_attention.py
    # has the same case for a GPU): a row whose visible scores are NaN gives NaN output, lse and
    # gradients; a row that sees no key gives zeros and lse = +inf, whatever its query holds.
    B, H, Lq, Lk = 2, 2, 70, 83
    g = torch.Generator().manual_seed(5)
    q, k, v = attention_support.make_qkv(B, H, Lq, Lk, E, E, dtype, requires_grad=False, gen=g)
    attn = torch.zeros(Lq, Lk, dtype=torch.float32)
    attn[3] = float("-inf")  # query row 3 of every head sees no key
    q[0, 0, 1, 0] = float("nan")
    q[1, 1, 3, 0] = float("nan")  # a NaN query in a row that sees nothing
    prob = Problem(harness(), q, k, v, {"attn_mask": attn}, E**-0.5)
    out, lse = prob.forward()
    assert torch.isnan(out[0, 0, 1]).all() and torch.isnan(lse[0, 0, 1])
    assert (out[:, :, 3] == 0).all() and torch.isposinf(lse[:, :, 3]).all()
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dq, dk, dv = prob.backward(out, lse, dout)
    assert torch.isnan(dq[0, 0, 1]).all()
    assert torch.isnan(dk[0, 0]).all() and torch.isnan(dv[0, 0]).all()  # the NaN row sees every key
    assert (dq[1, 1, 3] == 0).all()
    # Every other row: the reference on the same inputs with the NaNs zeroed (rows are independent).
    ref, leaves = run_reference(q.nan_to_num(0.0), k, v, {"attn_mask": attn}, scale=E**-0.5)
    want = torch.autograd.grad(ref, leaves, dout.double())
    row_ok = torch.ones(B, H, Lq, 1, dtype=torch.bool)
    row_ok[0, 0, 1] = False
    head_ok = torch.ones(B, H, 1, 1, dtype=torch.bool)
    head_ok[0, 0] = False
    assert_close(out.where(row_ok, 0), ref.where(row_ok, 0), TOL[dtype][0], "out")
    assert_close(dq.where(row_ok, 0), want[0].where(row_ok, 0), TOL[dtype][1], "grad q")
    assert_close(dv.where(head_ok, 0), want[2].where(head_ok, 0), TOL[dtype][1], "grad v")
    head_ok[1, 1] = False  # dK = dS^T Q: row 3's zero dS times its NaN query (as in the reference)
    assert_close(dk.where(head_ok, 0), want[1].where(head_ok, 0), TOL[dtype][1], "grad k")
