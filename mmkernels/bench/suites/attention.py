"""cross_modal_attention (core op) vs F.scaled_dot_product_attention and the math composition, and
mmkernels.nn.CrossModalAttention vs nn.MultiheadAttention (issue 3).

Both suites are skipped, with a note, while the attention API is not in this build.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

import mmkernels

from ..core import OURS, Built, Case, Contender, Suite, compiled_contender, make_step, randn, tol_for

# (B, Lq, Lk, embed, heads) from issue 3.
SHAPES = [
    (8, 256, 64, 512, 8),
    (4, 1024, 256, 512, 8),
    (2, 4096, 512, 256, 4),
    (16, 64, 1024, 768, 12),
    (1, 16384, 256, 512, 8),
]
# The default run's cases per suite: (shape, padded, mode).
DEFAULTS = {
    "attention": [(SHAPES[1], True, "fwd"), (SHAPES[0], True, "fwd+bwd")],
    "attention_module": [(SHAPES[0], True, "fwd+bwd")],
    "attention_module_default": [(SHAPES[0], True, "fwd")],
}


def _op_missing() -> str | None:
    if not hasattr(mmkernels, "cross_modal_attention"):
        return "mmkernels.cross_modal_attention is not in this build yet"
    return None


def _module_missing() -> str | None:
    if not hasattr(mmkernels.nn, "CrossModalAttention"):
        return "mmkernels.nn.CrossModalAttention is not in this build yet"
    return None


def padding_mask(B: int, Lk: int, padded: bool, device) -> torch.Tensor | None:
    """True = ignore this key. About half the keys padded: each sequence keeps between 1/4 and 3/4
    of its keys (a fixed draw), so no query row is fully masked."""
    if not padded:
        return None
    gen = torch.Generator().manual_seed(B * 1000003 + Lk)
    keep = torch.randint(max(1, Lk // 4), max(2, 3 * Lk // 4 + 1), (B,), generator=gen)
    return (torch.arange(Lk)[None, :] >= keep[:, None]).to(device)


def math_attention(q, k, v, pad):
    """softmax(q k^T / sqrt(E) with padded keys at -inf) v: materialises the (Lq, Lk) scores."""
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if pad is not None:
        s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def sdpa(q, k, v, pad):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if pad is None else ~pad[:, None, None, :])


def _shape_name(B, Lq, Lk, E, H, padded):
    return f"B{B} Lq{Lq} Lk{Lk} E{E} H{H}" + (" pad~50%" if padded else "")


def _build_op(B, Lq, Lk, E, H, padded, mode, dtype, device) -> Built:
    grad = mode != "fwd"
    d = E // H
    q = randn(B, H, Lq, d, dtype=dtype, device=device, requires_grad=grad)
    k = randn(B, H, Lk, d, dtype=dtype, device=device, requires_grad=grad)
    v = randn(B, H, Lk, d, dtype=dtype, device=device, requires_grad=grad)
    pad = padding_mask(B, Lk, padded, device)
    g = randn(B, H, Lq, d, dtype=dtype, device=device) if grad else None
    leaves = [q, k, v]
    return Built([
        Contender(OURS, make_step(lambda: mmkernels.cross_modal_attention(q, k, v, key_padding_mask=pad), mode, leaves, g)),
        Contender("sdpa", make_step(lambda: sdpa(q, k, v, pad), mode, leaves, g)),
        Contender("math", make_step(lambda: math_attention(q, k, v, pad), mode, leaves, g)),
        compiled_contender("compile", math_attention, lambda f: make_step(lambda: f(q, k, v, pad), mode, leaves, g)),
    ], oracle="math", tol=tol_for(dtype))


def _build_module(B, Lq, Lk, E, H, padded, mode, dtype, device, need_weights=False) -> Built:
    grad = mode != "fwd"
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True, device=device, dtype=dtype)
    ours = mmkernels.nn.CrossModalAttention.from_module(mha)
    for m in (mha, ours):
        m.train(grad)  # inference: eval (MHA may take its fast path); training: train, dropout 0
        m.requires_grad_(grad)
    query = randn(B, Lq, E, dtype=dtype, device=device, requires_grad=grad)
    memory = randn(B, Lk, E, dtype=dtype, device=device, requires_grad=grad)  # keys and values share it
    pad = padding_mask(B, Lk, padded, device)
    g = randn(B, Lq, E, dtype=dtype, device=device) if grad else None

    def run(m):  # the output only: with need_weights=True the weights are computed, then dropped
        return lambda: m(query, memory, memory, key_padding_mask=pad, need_weights=need_weights)[0]

    leaves = lambda m: [query, memory, *m.parameters()]  # noqa: E731
    return Built([
        Contender(OURS, make_step(run(ours), mode, leaves(ours), g)),
        Contender("mha", make_step(run(mha), mode, leaves(mha), g)),
        compiled_contender("compile", mha, lambda m: make_step(run(m), mode, leaves(mha), g)),
    ], oracle="mha", tol=tol_for(dtype))


def _cases(suite, build, baselines):
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for padded in (False, True):
            for B, Lq, Lk, E, H in SHAPES:
                cases.append(Case(
                    suite=suite,
                    shape=_shape_name(B, Lq, Lk, E, H, padded),
                    mode=mode,
                    dtype=torch.float32,
                    build=lambda device, s=(B, Lq, Lk, E, H, padded), mode=mode: build(*s, mode, torch.float32, device),
                    params={"B": B, "Lq": Lq, "Lk": Lk, "embed": E, "heads": H, "padded": padded},
                    baselines=baselines,
                    flops=4.0 * B * Lq * Lk * E * (1 if mode == "fwd" else 2.5),
                    default=((B, Lq, Lk, E, H), padded, mode) in DEFAULTS[suite],
                ))
    return cases


_MODULE_CONTENDERS = {
    OURS: "mmkernels.nn.CrossModalAttention.from_module(mha): same weights, the fused attention op",
    "mha": "torch.nn.MultiheadAttention(batch_first=True); eval() for fwd (its fast path may apply)",
    "compile": "torch.compile of that nn.MultiheadAttention",
}

OP_SUITE = Suite(
    "attention", "mmkernels.cross_modal_attention vs SDPA and the written-out softmax(q k^T) v",
    lambda: _cases("attention", _build_op, ("sdpa", "math", "compile")),
    contenders={
        OURS: "mmkernels.cross_modal_attention(q, k, v, key_padding_mask=pad): blocked, no Lq x Lk scores",
        "sdpa": "F.scaled_dot_product_attention with the padding as a boolean attn_mask",
        "math": "softmax(q k^T / sqrt(E), padded keys at -inf) v in eager PyTorch: materialises the scores",
        "compile": "torch.compile of math",
    }, unavailable=_op_missing)
MODULE_SUITE = Suite(
    "attention_module", "CrossModalAttention vs nn.MultiheadAttention, need_weights=False (cross-attention)",
    lambda: _cases("attention_module", _build_module, ("mha", "compile")),
    contenders=_MODULE_CONTENDERS, unavailable=_module_missing)
# nn.MultiheadAttention's default call, `out, _ = mha(q, k, v, key_padding_mask=m)`: need_weights=True
# on both sides, the weights computed and dropped (MHA then takes its materialising path).
MODULE_DEFAULT_SUITE = Suite(
    "attention_module_default", "as attention_module, but MHA's default call: need_weights=True, weights dropped",
    lambda: _cases("attention_module_default", partial(_build_module, need_weights=True), ("mha", "compile")),
    contenders=_MODULE_CONTENDERS, unavailable=_module_missing)
