"""cross_modal_attention's variants (issue 13) against F.scaled_dot_product_attention: causal
self-attention (our own call with the causal mask as a tensor as a second baseline: the skipped
blocks), grouped-query
attention (SDPA with enable_gqa=True), and decoding steps (Lq = 1, many keys, forward).

The varlen cases of issue 13 wait for cross_modal_attention_varlen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkernels

from ..core import OURS, Built, Case, Contender, Suite, make_step, randn, tol_for

# (B, H, L, E) causal self-attention, fwd+bwd.
CAUSAL_SHAPES = [(4, 8, 2048, 64), (2, 16, 4096, 128), (8, 12, 1024, 64)]
# (B, H, H_kv, L, E) grouped-query self-attention, fwd+bwd.
GQA_SHAPES = [(2, 16, 4, 1024, 64), (1, 16, 2, 2048, 64), (1, 16, 1, 4096, 64)]
# (B, H, Lq, Lk, E) decoding steps, forward.
DECODE_SHAPES = [(1, 8, 1, 8192, 128), (2, 4, 1, 32768, 64), (1, 1, 1, 65536, 128)]


def _missing() -> str | None:
    import inspect

    if "is_causal" not in inspect.signature(mmkernels.cross_modal_attention).parameters:
        return "mmkernels.cross_modal_attention has no is_causal / enable_gqa in this build"
    return None


def _build_causal(B, H, L, E, mode, dtype, device) -> Built:
    grad = mode != "fwd"
    q, k, v = (randn(B, H, L, E, dtype=dtype, device=device, requires_grad=grad) for _ in range(3))
    g = randn(B, H, L, E, dtype=dtype, device=device) if grad else None
    leaves = [q, k, v]
    tri = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    return Built([
        Contender(OURS, make_step(lambda: mmkernels.cross_modal_attention(q, k, v, is_causal=True), mode, leaves, g)),
        Contender("sdpa", make_step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), mode, leaves, g)),
        # Our own call with the causal mask as a bool tensor: the same result with every block computed
        # (the cost of our non-causal call plus the mask), the baseline of what the flag skips.
        Contender("ours_mask",
                  make_step(lambda: mmkernels.cross_modal_attention(q, k, v, attn_mask=tri), mode, leaves, g)),
    ], oracle="sdpa", tol=tol_for(dtype))


def _build_gqa(B, H, Hkv, L, E, mode, dtype, device) -> Built:
    grad = mode != "fwd"
    q = randn(B, H, L, E, dtype=dtype, device=device, requires_grad=grad)
    k, v = (randn(B, Hkv, L, E, dtype=dtype, device=device, requires_grad=grad) for _ in range(2))
    g = randn(B, H, L, E, dtype=dtype, device=device) if grad else None
    leaves = [q, k, v]
    return Built([
        Contender(OURS, make_step(lambda: mmkernels.cross_modal_attention(q, k, v, enable_gqa=True), mode, leaves, g)),
        Contender("sdpa", make_step(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), mode, leaves, g)),
    ], oracle="sdpa", tol=tol_for(dtype))


def _build_decode(B, H, Lq, Lk, E, mode, dtype, device) -> Built:
    q = randn(B, H, Lq, E, dtype=dtype, device=device)
    k, v = (randn(B, H, Lk, E, dtype=dtype, device=device) for _ in range(2))
    return Built([
        Contender(OURS, make_step(lambda: mmkernels.cross_modal_attention(q, k, v), mode, [], None)),
        Contender("sdpa", make_step(lambda: F.scaled_dot_product_attention(q, k, v), mode, [], None)),
    ], oracle="sdpa", tol=tol_for(dtype))


def _cases() -> list[Case]:
    # The default run: the first causal and the first decoding shape (float32).
    dt = torch.float32
    cases = []
    for i, (B, H, L, E) in enumerate(CAUSAL_SHAPES):
        cases.append(Case(
            suite="attention_variants", shape=f"causal B{B} H{H} L{L} E{E}", mode="fwd+bwd", dtype=dt,
            build=lambda device, s=(B, H, L, E): _build_causal(*s, "fwd+bwd", dt, device),
            params={"variant": "causal", "B": B, "H": H, "L": L, "E": E}, baselines=("sdpa", "ours_mask"),
            flops=4.0 * B * H * L * L * E * 2.5 / 2, default=i == 0,
        ))
    for B, H, Hkv, L, E in GQA_SHAPES:
        cases.append(Case(
            suite="attention_variants", shape=f"gqa B{B} H{H} Hkv{Hkv} L{L} E{E}", mode="fwd+bwd", dtype=dt,
            build=lambda device, s=(B, H, Hkv, L, E): _build_gqa(*s, "fwd+bwd", dt, device),
            params={"variant": "gqa", "B": B, "H": H, "H_kv": Hkv, "L": L, "E": E}, baselines=("sdpa",),
            flops=4.0 * B * H * L * L * E * 2.5,
        ))
    for i, (B, H, Lq, Lk, E) in enumerate(DECODE_SHAPES):
        cases.append(Case(
            suite="attention_variants", shape=f"decode B{B} H{H} Lq{Lq} Lk{Lk} E{E}", mode="fwd", dtype=dt,
            build=lambda device, s=(B, H, Lq, Lk, E): _build_decode(*s, "fwd", dt, device),
            params={"variant": "decode", "B": B, "H": H, "Lq": Lq, "Lk": Lk, "E": E}, baselines=("sdpa",),
            flops=4.0 * B * H * Lq * Lk * E, default=i == 0,
        ))
    return cases


SUITE = Suite(
    "attention_variants", "cross_modal_attention's causal, grouped-query and decoding calls vs SDPA", _cases,
    contenders={
        OURS: "mmkernels.cross_modal_attention with is_causal=True / enable_gqa=True, or a decoding step (Lq = 1)",
        "sdpa": "F.scaled_dot_product_attention with the same flags",
        "ours_mask": "mmkernels.cross_modal_attention with the causal mask as a bool attn_mask (no block skipping)",
    }, unavailable=_missing)
