"""Packed (varlen) attention problems shared by the emulator and GPU tests of the CUDA varlen kernels:
random packed inputs, the float64 reference with its gradients and lse, and the CPU kernel's dropout
keep mask."""
from __future__ import annotations

import torch

from mmkernels import reference


def prefix_sums(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def make_packed(lens_q, lens_k, H, H_kv, E, dtype, gen, layout="packed", device="cpu"):
    """q (total_q, H, E), k / v (total_k, H_kv, E) and the int32 prefix sums; layout "projection":
    head slices of fused projections (row strides (H + 1) E and (2 H_kv + 1) E, not H * E)."""
    tq, tk = sum(lens_q), sum(lens_k)
    if layout == "packed":
        q = torch.randn(tq, H, E, generator=gen).to(device, dtype)
        k = torch.randn(tk, H_kv, E, generator=gen).to(device, dtype)
        v = torch.randn(tk, H_kv, E, generator=gen).to(device, dtype)
    else:
        q = torch.randn(tq, H + 1, E, generator=gen).to(device, dtype)[:, 1:]
        kv = torch.randn(tk, 2 * H_kv + 1, E, generator=gen).to(device, dtype)
        k, v = kv[:, :H_kv], kv[:, H_kv + 1:]
    return q, k, v, prefix_sums(lens_q).to(device), prefix_sums(lens_k).to(device)


def sequences(cu_q, cu_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def reference_varlen(q, k, v, cu_q, cu_k, scale, causal=0, keep=None, dropout_p=0.0):
    """out (total_q, H, E) in float64 and the float64 leaves: reference.cross_modal_attention_varlen
    where it covers the case (no dropout, causal 0 or upper-left), else reference.cross_modal_attention
    per sequence with the causal band as attn_mask and the sequence's keep mask."""
    up = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    cu_q, cu_k = cu_q.cpu(), cu_k.cpu()
    if keep is None and causal in (0, 1):
        return reference.cross_modal_attention_varlen(*up, cu_q, cu_k, is_causal=causal == 1, scale=scale), up
    outs = []
    for b, (q0, q1, k0, k1) in enumerate(sequences(cu_q, cu_k)):
        qb, kb, vb = (t[a:e].transpose(0, 1).unsqueeze(0) for t, a, e in ((up[0], q0, q1), (up[1], k0, k1),
                                                                          (up[2], k0, k1)))
        kw = {}
        band = reference.causal_visible(causal, q1 - q0, k1 - k0)
        if band is not None:
            kw["attn_mask"] = band
        if keep is not None:
            kw.update(dropout_p=dropout_p, dropout_mask=keep[b])
        o = reference.cross_modal_attention(qb, kb, vb, scale=scale, enable_gqa=True, **kw)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0), up


def reference_lse(q, k, cu_q, cu_k, scale, causal=0):
    """(H, total_q) logsumexp of each row's visible scaled scores, +inf where a row sees none."""
    H, G = q.shape[1], q.shape[1] // k.shape[1]
    q, k, cu_q, cu_k = q.cpu(), k.cpu(), cu_q.cpu(), cu_k.cpu()
    lse = torch.full((H, q.shape[0]), torch.inf, dtype=torch.float64)
    for q0, q1, k0, k1 in sequences(cu_q, cu_k):
        if q1 == q0 or k1 == k0:
            continue
        qb = q[q0:q1].double().transpose(0, 1)
        kb = k[k0:k1].double().transpose(0, 1).repeat_interleave(G, 0)
        s = qb @ kb.transpose(-1, -2) * scale
        band = reference.causal_visible(causal, q1 - q0, k1 - k0)
        if band is not None:
            s = s.masked_fill(~band, float("-inf"))
        row = torch.logsumexp(s, -1)
        lse[:, q0:q1] = torch.where(torch.isneginf(row), torch.inf, row)
    return lse


def cpu_keep_masks(H, H_kv, cu_q, cu_k, p, seed):
    """The CPU varlen kernel's keep mask per sequence, (1, H, Lq_b, Lk_b) bool: uniform attention
    (q = k = 0) over one-hot values keeps exactly the kept elements positive."""
    cu_q, cu_k = cu_q.cpu(), cu_k.cpu()
    seqs = sequences(cu_q, cu_k)
    width = max([k1 - k0 for _, _, k0, k1 in seqs] + [1])
    q = torch.zeros(int(cu_q[-1]), H, 1, dtype=torch.float64)
    k = torch.zeros(int(cu_k[-1]), H_kv, 1, dtype=torch.float64)
    v = torch.zeros(int(cu_k[-1]), H_kv, width, dtype=torch.float64)
    for _, _, k0, k1 in seqs:
        v[k0:k1, :, : k1 - k0] = torch.eye(k1 - k0, dtype=torch.float64).unsqueeze(1)
    max_q = max([q1 - q0 for q0, q1, _, _ in seqs] + [0])
    out = torch.ops.mmkernels.cross_modal_attention_varlen.default(q, k, v, cu_q, cu_k, max_q, width, 1.0, p,
                                                                   torch.tensor(seed), 0)[0]
    return [(out[q0:q1, :, : k1 - k0] > 0).transpose(0, 1).unsqueeze(0) for q0, q1, k0, k1 in seqs]
