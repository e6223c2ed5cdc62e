"""convert(): a training step of an nn.TransformerDecoderLayer before and after mmkernels.convert.

The layer's self-attention and cross-attention become CrossModalAttention with the same weights
(issue 6's target case: d_model 512, 8 heads, target length 256, memory length 1024). The decoder
layer calls its attentions with need_weights=False, so the converted layer runs the fused op.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import mmkernels

from ..core import OURS, Built, Case, Contender, Suite, make_step, randn, tol_for

# (batch, target length, memory length, d_model, heads)
DECODER_SHAPES = [(4, 256, 1024, 512, 8), (16, 64, 256, 512, 8)]


def _build_decoder(B, T, S, d, heads, padded, dtype, device) -> Built:
    original = nn.TransformerDecoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True,
                                          device=device, dtype=dtype)
    converted = mmkernels.convert(copy.deepcopy(original))
    tgt = randn(B, T, d, dtype=dtype, device=device, requires_grad=True)
    memory = randn(B, S, d, dtype=dtype, device=device, requires_grad=True)
    # About half of the memory keys padded (True = ignore), every sample keeping at least one key.
    pad = None
    if padded:
        keep = torch.randint(S // 4, 3 * S // 4 + 1, (B,), generator=torch.Generator().manual_seed(0))
        pad = (torch.arange(S)[None] >= keep[:, None]).to(device)
    g = randn(B, T, d, dtype=dtype, device=device)
    leaves = lambda m: [tgt, memory, *m.parameters()]  # noqa: E731
    run = lambda m: lambda: m(tgt, memory, memory_key_padding_mask=pad)  # noqa: E731
    return Built([
        Contender(OURS, make_step(run(converted), "fwd+bwd", leaves(converted), g)),
        Contender("eager", make_step(run(original), "fwd+bwd", leaves(original), g)),
    ], oracle="eager", tol=tol_for(dtype))


def _cases() -> list[Case]:
    cases = []
    for B, T, S, d, heads in DECODER_SHAPES:
        for padded in (False, True):
            cases.append(Case(
                suite="convert_train", shape=f"TransformerDecoderLayer B{B} T{T} S{S} d{d} H{heads}"
                + (" pad" if padded else ""), mode="fwd+bwd", dtype=torch.float32,
                build=lambda device, s=(B, T, S, d, heads, padded): _build_decoder(*s, torch.float32, device),
                params={"model": "TransformerDecoderLayer", "B": B, "T": T, "S": S, "d_model": d, "heads": heads,
                        "padded": padded},
                baselines=("eager",),
                default=(B, T, S, d, heads) == DECODER_SHAPES[1] and padded,  # the smaller one: ~1/10 the time
            ))
    return cases


SUITE = Suite(
    "convert_train", "a training step of nn.TransformerDecoderLayer before and after mmkernels.convert", _cases,
    contenders={
        OURS: "mmkernels.convert(layer): its two attentions become CrossModalAttention, same weights",
        "eager": "the original nn.TransformerDecoderLayer",
    })
