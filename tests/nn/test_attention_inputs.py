"""CrossModalAttention's inputs normalised once (nn/_attention_masks.normalise): the op's masks, the
weights' additive mask, the causal decision and the key rows, against masks built by hand in
nn.MultiheadAttention's conventions."""
from __future__ import annotations

import pytest
import torch

from mmkernels.nn import CrossModalAttention
from mmkernels.nn._attention_masks import normalise

E, H, B, LQ, LK = 8, 2, 3, 4, 6


def full_additive(kpm, attn_mask, added, dtype=torch.float64):
    """Every mask as one (B, H, LQ, LK + added) float tensor: MHA's meaning spelled out element by element."""
    out = torch.zeros(B, H, LQ, LK + added, dtype=dtype)
    if attn_mask is not None:
        m = attn_mask.view(-1, LQ, LK) if attn_mask.dim() == 3 else attn_mask.expand(B * H, LQ, LK)
        m = m.reshape(B, H, LQ, LK)
        out[..., :LK] += torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m
    if kpm is not None:
        k = kpm.view(B, 1, 1, LK)
        out[..., :LK] += torch.zeros_like(k, dtype=dtype).masked_fill(k, float("-inf")) if k.dtype == torch.bool else k
    return out


def masks(kpm_kind, mask_kind, mask_dims):
    kpm = None if kpm_kind is None else torch.rand(B, LK) < 0.3
    if kpm_kind == "float":
        kpm = torch.randn(B, LK, dtype=torch.float64)
    mask = None
    if mask_kind is not None:
        shape = (LQ, LK) if mask_dims == 2 else (B * H, LQ, LK)
        mask = torch.rand(shape) < 0.3 if mask_kind == "bool" else torch.randn(shape, dtype=torch.float64)
    return kpm, mask


@pytest.mark.parametrize("kpm_kind", [None, "bool", "float"])
@pytest.mark.parametrize("mask_kind,mask_dims", [(None, 2), ("bool", 2), ("bool", 3), ("float", 2), ("float", 3)])
@pytest.mark.parametrize("extra", [{}, {"add_bias_kv": True}, {"add_bias_kv": True, "add_zero_attn": True}])
def test_additive_and_op_masks_match_mha_meaning(kpm_kind, mask_kind, mask_dims, extra):
    torch.manual_seed(0)
    module = CrossModalAttention(E, H, batch_first=True, dtype=torch.float64, **extra)
    q, k = torch.randn(B, LQ, E, dtype=torch.float64), torch.randn(B, LK, E, dtype=torch.float64)
    kpm, mask = masks(kpm_kind, mask_kind, mask_dims)
    inputs = normalise(module, q, k, k, kpm, mask, False)
    added = len(extra)
    assert inputs.added == added and not inputs.causal and inputs.batched
    expected = full_additive(kpm, mask, added)
    got = inputs.additive
    if got is None:
        assert kpm_kind is None and mask_kind is None
    else:
        assert torch.equal(got.expand_as(expected), expected)
    # The op's masks say the same: its bool key_padding_mask (True = ignore) and attn_mask (bool True =
    # may attend, or float) together give the same additive mask.
    op = torch.zeros_like(expected)
    if inputs.key_padding_mask is not None:
        op = op.masked_fill(inputs.key_padding_mask.view(B, 1, 1, -1), float("-inf"))
    m = inputs.op_attn_mask
    if m is not None:
        op = op.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else op + m
    assert torch.equal(op, expected)


@pytest.mark.parametrize("kpm_kind", [None, "bool", "float"])
def test_causal_hint_replaces_the_mask_but_not_the_padding(kpm_kind):
    module = CrossModalAttention(E, H, batch_first=True, dtype=torch.float64)
    x = torch.randn(B, LK, E, dtype=torch.float64)
    causal = torch.ones(LK, LK, dtype=torch.bool).triu(1)
    kpm = None if kpm_kind is None else (torch.rand(B, LK) < 0.3 if kpm_kind == "bool" else torch.randn(B, LK))
    inputs = normalise(module, x, x, x, kpm, causal, True)
    assert inputs.causal
    if kpm_kind == "float":
        assert torch.equal(inputs.op_attn_mask, kpm.view(B, 1, 1, LK).double())
    else:
        assert inputs.op_attn_mask is None
    # The weights still see the mask itself.
    assert torch.isinf(inputs.additive.expand(B, H, LK, LK)[:, :, 0, 1:]).all()
    # Not taken where it cannot be: added keys, or Lq != Lk.
    assert not normalise(CrossModalAttention(E, H, batch_first=True, add_zero_attn=True, dtype=torch.float64),
                         x, x, x, None, causal, True).causal
    assert not normalise(module, x[:, :3], x, x, None, causal[:3], True).causal


def test_unbatched_inputs_become_a_batch_of_one():
    module = CrossModalAttention(E, H, dtype=torch.float64)  # seq-first, ignored for unbatched inputs
    q, k = torch.randn(LQ, E, dtype=torch.float64), torch.randn(LK, E, dtype=torch.float64)
    kpm = torch.tensor([False, True, False, True, True, False])
    inputs = normalise(module, q, k, k, kpm, None, False, project_all=False)
    assert not inputs.batched and inputs.seq_dim == 1 and (inputs.batch, inputs.len_q) == (1, LQ)
    assert inputs.query.shape == (1, LQ, E) and inputs.key_padding_mask.shape == (1, LK)
    assert inputs.key_rows.tolist() == [0, 2, 5]


@pytest.mark.parametrize("batch_first", [True, False])
def test_key_rows_follow_the_layout_and_the_size_rule(batch_first):
    module = CrossModalAttention(E, H, batch_first=batch_first, dtype=torch.float64)
    q = torch.randn((B, LQ, E) if batch_first else (LQ, B, E), dtype=torch.float64)
    k = torch.randn((B, LK, E) if batch_first else (LK, B, E), dtype=torch.float64)
    kpm = torch.zeros(B, LK, dtype=torch.bool)
    kpm[:, 4:] = True  # 1/3 of the keys hidden
    rows = normalise(module, q, k, k, kpm, None, False, project_all=False).key_rows
    flat = (~kpm if batch_first else (~kpm).t()).reshape(-1)
    assert torch.equal(rows, flat.nonzero().squeeze(1))
    assert normalise(module, q, k, k, kpm, None, False).key_rows is None  # project_all
    kpm[:, 4:] = False
    kpm[0, 5] = True  # 1 key in 18 hidden: not worth skipping
    assert normalise(module, q, k, k, kpm, None, False, project_all=False).key_rows is None
