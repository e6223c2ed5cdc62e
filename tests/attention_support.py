"""Inputs and the float64 oracle shared by the CPU and CUDA tests of cross_modal_attention."""
from __future__ import annotations

import torch

from mmkernels import reference


def make_qkv(B, H, Lq, Lk, E, Ev, dtype, requires_grad=True, device="cpu", gen=None):
    shapes = ((B, H, Lq, E), (B, H, Lk, E), (B, H, Lk, Ev))
    return [torch.randn(s, generator=gen, device=device).to(dtype).requires_grad_(requires_grad) for s in shapes]


def make_masks(kind, B, H, Lq, Lk, dtype=torch.float32, device="cpu", float4d_dtype=None):
    """Masks by name; several names joined with '+' combine. Float masks in ``dtype`` (float4d in
    ``float4d_dtype`` if given: a mask dtype other than q's)."""
    masks = {}
    for part in kind.split("+"):
        if part == "none":
            continue
        if part == "kpm":  # random holes, plus half the batches padded on the right
            m = torch.rand(B, Lk, device=device) < 0.2
            m[: B // 2, Lk // 2 :] = True
            masks["key_padding_mask"] = m
        elif part == "holes":  # a padded block in the middle (whole key tiles skipped per element)
            m = torch.zeros(B, Lk, dtype=torch.bool, device=device)
            m[:, Lk // 4 : Lk // 4 + 70] = True
            masks["key_padding_mask"] = m
        elif part == "ends":  # padding at the ends only (batch 0 on the right): ranges, no per-score bias
            m = torch.zeros(B, Lk, dtype=torch.bool, device=device)
            for b in range(B):
                lo = 0 if b == 0 else int(torch.randint(0, Lk // 2 + 1, ()))
                m[b, :lo] = True
                m[b, int(torch.randint(lo, Lk + 1, ())) :] = True
            masks["key_padding_mask"] = m
        elif part == "len32":
            masks["kv_lengths"] = torch.randint(0, Lk + 1, (B,), dtype=torch.int32, device=device)
        elif part == "len64":
            masks["kv_lengths"] = torch.randint(1, Lk + 1, (B,), dtype=torch.int64, device=device)
        elif part == "bool2d":
            masks["attn_mask"] = torch.rand(Lq, Lk, device=device) < 0.7
        elif part == "bool4d":  # broadcast over heads and queries: (B, 1, 1, Lk)
            masks["attn_mask"] = torch.rand(B, 1, 1, Lk, device=device) < 0.7
        elif part == "float3d":  # (H, Lq, Lk), broadcast over batch, with some -inf
            m = torch.randn(H, Lq, Lk, device=device).to(dtype)
            masks["attn_mask"] = m.masked_fill(torch.rand(H, Lq, Lk, device=device) < 0.2, float("-inf"))
        elif part == "float4d":
            masks["attn_mask"] = torch.randn(B, H, Lq, Lk, device=device).to(float4d_dtype or dtype)
        else:
            raise ValueError(part)
    return masks


def run_reference(q, k, v, masks, **kw):
    """The float64 reference on upcast copies, so that the only rounding measured is ours."""
    up = [t.detach().double().requires_grad_() for t in (q, k, v)]
    m = {n: (t.double() if t.is_floating_point() else t) for n, t in masks.items()}
    return reference.cross_modal_attention(*up, **m, **kw), up
