"""Split-key decoding (flash-decoding) on the emulation harness: the forward kernel with its keys
split over several blocks per query tile (FwdParams::num_splits, float32 partials) and the combine
kernel, for every split count from 1 to more splits than key tiles, against the unsplit kernel and
the float64 reference: masks, kv_lengths, causal lower-right, fully masked rows (zeros, lse = +inf),
grouped-query heads, dropout; and the host's choice of the split count (attn::choose_key_splits)."""
from __future__ import annotations

import pytest
import torch

import attention_support
from attention_emu import TOL, Problem, assert_close, keep_mask, with_causal
from attention_support import run_reference
from harness import harness

pytestmark = pytest.mark.emu


def check_every_split(B, H, Lq, Lk, E, dtype, masks, causal=0, H_kv=None, dropout_p=0.0, seed=0, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    H_kv = H if H_kv is None else H_kv
    q, k, v = attention_support.make_qkv(B, H, Lq, Lk, E, E, dtype, requires_grad=False, gen=g)
    k, v = k[:, :H_kv].contiguous(), v[:, :H_kv].contiguous()
    scale = E**-0.5
    prob = Problem(harness(), q, k, v, masks, scale, dropout_p, seed, causal=causal)
    kw = dict(dropout_p=dropout_p, dropout_mask=keep_mask(B, H, Lq, Lk, dropout_p, seed)) if dropout_p > 0 else {}
    ref, _ = run_reference(q, k, v, with_causal(masks, causal, Lq, Lk), scale=scale, enable_gqa=H_kv != H, **kw)
    whole_out, whole_lse = prob.forward()
    tiles = -(-Lk // (32 if E == 128 else 64))
    for n in range(2, tiles + 3):  # up to two more splits than key tiles: empty splits
        out, lse = prob.forward(num_splits=n)
        assert_close(out, ref, TOL[dtype][0], f"out with {n} splits against the reference")
        assert_close(out, whole_out.double(), TOL[dtype][0], f"out with {n} splits against no split")
        torch.testing.assert_close(lse, whole_lse, atol=1e-4, rtol=1e-5, msg=lambda m: f"lse, {n} splits: {m}")
    return whole_out, whole_lse


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("E", [32, 64, 128])
def test_every_split_count(E, dtype):
    check_every_split(2, 2, 3, 300, E, dtype, {}, gen_seed=E)


@pytest.mark.parametrize("kind", ["kpm", "len32", "bool2d", "float3d", "kpm+len32+bool2d", "holes"])
def test_every_split_count_with_masks(kind):
    B, H, Lq, Lk = 2, 2, 4, 330
    check_every_split(B, H, Lq, Lk, 64, torch.float16, attention_support.make_masks(kind, B, H, Lq, Lk))


def test_causal_lower_right_and_kv_lengths():
    # Decoding with a cache: the last Lq of Lk positions, kv_lengths cutting batches short (one to 0:
    # every split sees nothing, zeros and lse = +inf) and lower-right's rows.
    lengths = torch.tensor([300, 0, 97], dtype=torch.int32)
    out, lse = check_every_split(3, 2, 4, 300, 64, torch.bfloat16, {"kv_lengths": lengths}, causal=2)
    assert (out[1] == 0).all() and torch.isposinf(lse[1]).all()


def test_fully_masked_rows_give_zeros_and_infinite_lse():
    B, H, Lq, Lk = 2, 1, 4, 260
    attn_mask = torch.rand(Lq, Lk) < 0.5
    attn_mask[2] = False  # row 2 sees nothing, in every split
    attn_mask[3, :200] = False  # row 3 only the last keys: the first splits see nothing of it
    out, lse = check_every_split(B, H, Lq, Lk, 32, torch.float16, {"attn_mask": attn_mask})
    assert (out[:, :, 2] == 0).all() and torch.isposinf(lse[:, :, 2]).all()


@pytest.mark.parametrize("H_kv", [1, 2])
def test_grouped_query_heads_and_dropout(H_kv):
    check_every_split(1, 4, 2, 280, 64, torch.float16, {}, H_kv=H_kv, causal=2)
    check_every_split(1, 4, 1, 200, 32, torch.bfloat16, {}, H_kv=H_kv, dropout_p=0.3, seed=3, gen_seed=1)


def test_split_count_choice():
    choose = harness().lib.emu_choose_key_splits
    assert choose(4, 4096, 132) == 32  # decoding: B H = 4 blocks, long keys: split to fill the SMs (capped)
    assert choose(16, 4096, 132) == 9  # enough splits to give every SM a block
    assert choose(4, 300, 132) == 2  # at least two 64-key tiles per split
    assert choose(4, 200, 132) == 1  # too short to split
    assert choose(100, 1 << 16, 132) == 1  # the grid fills the device already
