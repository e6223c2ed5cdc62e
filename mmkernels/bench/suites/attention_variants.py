"""cross_modal_attention's variants (issue 13) against F.scaled_dot_product_attention: causal
self-attention (our own call with the causal mask as a tensor as a second baseline: the skipped
blocks), grouped-query attention (SDPA with enable_gqa=True), decoding steps (Lq = 1, many keys,
forward; also with grouped-query heads), and packed variable-length batches
(cross_modal_attention_varlen against our dense op and SDPA on the same batch padded to its longest
sequence, with the padded keys masked).
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
# (B, H, H_kv, Lk, E) grouped-query decoding steps (Lq = 1), forward.
GQA_DECODE_SHAPES = [(1, 32, 8, 8192, 128), (2, 8, 2, 4096, 64)]
# (B, H, E, spread, Lmin, Lmax) packed self-attention batches, fwd and fwd+bwd: lengths uniform in
# [Lmin, Lmax], or long-tailed (most sequences short, a few long: Lmax * u^4, at least Lmin).
# The first is the target: 16 sequences of 32..1024.
VARLEN_SHAPES = [(16, 8, 64, "uniform", 32, 1024), (32, 8, 64, "uniform", 1, 256), (8, 8, 64, "uniform", 1, 512),
                 (32, 8, 64, "longtail", 1, 1024)]


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


def _build_gqa(B, H, Hkv, Lq, Lk, E, mode, dtype, device) -> Built:
    grad = mode != "fwd"
    q = randn(B, H, Lq, E, dtype=dtype, device=device, requires_grad=grad)
    k, v = (randn(B, Hkv, Lk, E, dtype=dtype, device=device, requires_grad=grad) for _ in range(2))
    g = randn(B, H, Lq, E, dtype=dtype, device=device) if grad else None
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


def varlen_lengths(B, spread, Lmin, Lmax) -> list[int]:
    """B sequence lengths in [Lmin, Lmax] (torch's generator: the runner seeds it per case); the
    longest is Lmax, so that the padded batch is as long as the spread says."""
    if spread == "uniform":
        lens = torch.randint(Lmin, Lmax + 1, (B,))
    else:
        lens = (Lmax * torch.rand(B) ** 4).ceil().long().clamp(Lmin, Lmax)
    lens[torch.randint(0, B, ())] = Lmax
    return lens.tolist()


def _build_varlen(B, H, E, spread, Lmin, Lmax, mode, dtype, device) -> Built:
    grad = mode != "fwd"
    lens = varlen_lengths(B, spread, Lmin, Lmax)
    total, L = sum(lens), max(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    # Packed (total, H, E) and the same values padded into (B, H, L, E) (zeros in the padding).
    valid = torch.arange(L, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]  # (B, L)
    pad = ~valid  # key_padding_mask: True = ignore

    def padded_from(x):
        out = x.new_zeros(B, L, H, E)
        out[valid] = x
        return out.transpose(1, 2).contiguous()

    def packed_from(y):  # (B, H, L, E) -> (total, H, E)
        return y.transpose(1, 2)[valid]

    qp, kp, vp = (randn(total, H, E, dtype=dtype, device=device) for _ in range(3))
    gp = randn(total, H, E, dtype=dtype, device=device) if grad else None
    q, k, v = (t.clone().requires_grad_(grad) for t in (qp, kp, vp))
    qd, kd, vd = (padded_from(t).requires_grad_(grad) for t in (qp, kp, vp))
    gd = padded_from(gp) if grad else None
    keep = ~pad[:, None, None, :]  # SDPA's bool mask: True = may attend

    def to_packed(out):  # a padded contender's (out, grads...) in the packed layout of ours
        return tuple(packed_from(t) for t in out) if isinstance(out, tuple) else packed_from(out)

    return Built([
        Contender(OURS, make_step(
            lambda: mmkernels.cross_modal_attention_varlen(q, k, v, cu, cu, L, L), mode, [q, k, v], gp)),
        Contender("ours_padded", make_step(
            lambda: mmkernels.cross_modal_attention(qd, kd, vd, key_padding_mask=pad), mode, [qd, kd, vd], gd)),
        Contender("sdpa_padded", make_step(
            lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=keep), mode, [qd, kd, vd], gd)),
    ], oracle="sdpa_padded", tol=tol_for(dtype), check_layout={"ours_padded": to_packed, "sdpa_padded": to_packed})


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
            build=lambda device, s=(B, H, Hkv, L, L, E): _build_gqa(*s, "fwd+bwd", dt, device),
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
    for B, H, Hkv, Lk, E in GQA_DECODE_SHAPES:
        cases.append(Case(
            suite="attention_variants", shape=f"gqa decode B{B} H{H} Hkv{Hkv} Lq1 Lk{Lk} E{E}", mode="fwd", dtype=dt,
            build=lambda device, s=(B, H, Hkv, 1, Lk, E): _build_gqa(*s, "fwd", dt, device),
            params={"variant": "gqa_decode", "B": B, "H": H, "H_kv": Hkv, "Lq": 1, "Lk": Lk, "E": E},
            baselines=("sdpa",), flops=4.0 * B * H * Lk * E,
        ))
    for B, H, E, spread, Lmin, Lmax in VARLEN_SHAPES:  # none in the default run
        for mode in ("fwd", "fwd+bwd"):
            cases.append(Case(
                suite="attention_variants", shape=f"varlen {spread} B{B} H{H} L{Lmin}..{Lmax} E{E}", mode=mode,
                dtype=dt, build=lambda device, s=(B, H, E, spread, Lmin, Lmax), m=mode: _build_varlen(*s, m, dt, device),
                params={"variant": "varlen", "B": B, "H": H, "E": E, "spread": spread, "Lmin": Lmin, "Lmax": Lmax},
                baselines=("ours_padded", "sdpa_padded"),
            ))
    return cases


SUITE = Suite(
    "attention_variants",
    "cross_modal_attention's causal, grouped-query and decoding calls vs SDPA; cross_modal_attention_varlen vs "
    "padded batches", _cases,
    contenders={
        OURS: "mmkernels.cross_modal_attention with is_causal=True / enable_gqa=True, or a decoding step (Lq = 1); "
              "varlen cases: mmkernels.cross_modal_attention_varlen on the packed batch",
        "sdpa": "F.scaled_dot_product_attention with the same flags",
        "ours_mask": "mmkernels.cross_modal_attention with the causal mask as a bool attn_mask (no block skipping)",
        "ours_padded": "varlen cases: mmkernels.cross_modal_attention on the batch padded to its longest sequence, "
                       "key_padding_mask",
        "sdpa_padded": "varlen cases: F.scaled_dot_product_attention on the padded batch, the padding as a bool mask",
    }, unavailable=_missing)
