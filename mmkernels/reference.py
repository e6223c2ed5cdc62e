"""Pure-PyTorch references of every mmkernels op: the test oracle, and the fallback path.

These are written for clarity, not speed: they materialise what the kernels avoid (the
concatenation, the score matrix).
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

ACTIVATIONS = {
    "none": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def fused_concat_linear(
    inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"
) -> torch.Tensor:
    """act(cat(inputs, -1) @ weight.T + bias)."""
    return ACTIVATIONS[activation](F.linear(torch.cat(list(inputs), dim=-1), weight, bias))


# --------------------------------------------------------------------------- fusion layers


def low_rank_fusion(
    inputs: Sequence[torch.Tensor],
    factors: Sequence[torch.Tensor],
    rank_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LMF (Liu et al. 2018): bias + sum_k rank_weight[k] * prod_m ([x_m, 1] @ factors[m][k]).

    inputs: (..., D_m) with identical leading dims; factors[m]: (rank, D_m + 1, N); rank_weight: (rank,).
    Builds every modality's (..., rank, N) projection, as the paper's code does.
    """
    prod = None
    for x, f in zip(inputs, factors):
        z = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        proj = torch.einsum("...d,rdn->...rn", z, f)
        prod = proj if prod is None else prod * proj
    out = torch.einsum("...rn,r->...n", prod, rank_weight)
    return out if bias is None else out + bias


def gated_multimodal_unit(
    inputs: Sequence[torch.Tensor],
    proj_weights: Sequence[torch.Tensor],
    proj_biases: Sequence[torch.Tensor | None],
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """GMU (Arevalo et al. 2017) for k modalities: h_i = tanh(W_i x_i + b_i), gate from cat(inputs).

    k = 2: z = sigmoid(gate), h = z * h_0 + (1 - z) * h_1 (the paper's form; gate_weight (N, sum D)).
    k > 2: z = softmax over modalities of gate viewed as (..., k, N) (gate_weight (k * N, sum D)).
    """
    hs = [torch.tanh(F.linear(x, w, b)) for x, w, b in zip(inputs, proj_weights, proj_biases)]
    gate = F.linear(torch.cat(list(inputs), dim=-1), gate_weight, gate_bias)
    if len(hs) == 1:
        return hs[0]
    if len(hs) == 2:
        z = torch.sigmoid(gate)
        return z * hs[0] + (1 - z) * hs[1]
    z = torch.softmax(gate.unflatten(-1, (len(hs), -1)), dim=-2)
    return (z * torch.stack(hs, dim=-2)).sum(-2)


def film(x: torch.Tensor, cond: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dim: int = -1):
    """FiLM (Perez et al. 2018): gamma, beta = chunk(Linear(cond), 2); gamma * x + beta.

    x's feature axis is `dim`; cond (*batch, C) with *batch a prefix of x's other dims; gamma and beta
    broadcast over the rest (sequence or spatial dims).
    """
    gamma, beta = F.linear(cond, weight, bias).chunk(2, dim=-1)
    xt = x.movedim(dim, -1)
    extra = xt.dim() - cond.dim()
    shape = (*cond.shape[:-1], *([1] * extra), gamma.shape[-1])
    return (gamma.reshape(shape) * xt + beta.reshape(shape)).movedim(-1, dim)


def causal_mode(is_causal: bool, attn_mask, Lq: int, Lk: int):
    """The op's causal flag (0 none, 1 upper-left, 2 lower-right) and the attn_mask left as a tensor
    (or None): a CausalBias attn_mask becomes the flag; is_causal=True is upper-left. Both together
    see the intersection of the two, which is upper-left where Lk >= Lq, else lower-right."""
    mode = 1 if is_causal else 0
    # torch.nn.attention.bias is imported lazily (it pulls in torch._dynamo and DTensor, ~1 s): a
    # CausalBias argument means its module is loaded already.
    bias_module = sys.modules.get("torch.nn.attention.bias")
    if bias_module is not None and isinstance(attn_mask, bias_module.CausalBias):
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (Lq, Lk):
            raise ValueError(
                f"mmkernels: argument 'attn_mask': a CausalBias for (Lq, Lk) = ({attn_mask.seq_len_q}, "
                f"{attn_mask.seq_len_kv}), expected ({Lq}, {Lk}) (those of q and k)"
            )
        bias_mode = 1 if attn_mask.variant == bias_module.CausalVariant.UPPER_LEFT else 2
        mode = bias_mode if mode in (0, bias_mode) else (1 if Lk >= Lq else 2)
        attn_mask = None
    return mode, attn_mask


def causal_visible(mode: int, Lq: int, Lk: int, device=None) -> torch.Tensor | None:
    """The (Lq, Lk) bool mask of the causal flag (True = may attend), or None for mode 0."""
    if mode == 0:
        return None
    offset = 0 if mode == 1 else Lk - Lq
    return torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril(offset)


def visible_keys(q, k, key_padding_mask=None, kv_lengths=None, attn_mask=None) -> torch.Tensor:
    """Which keys each query may see under the bool masks (a float attn_mask hides nothing here):
    bool, broadcastable to (B, H, Lq, Lk)."""
    B, Lk = k.shape[0], k.shape[-2]
    visible = torch.ones(B, 1, 1, Lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask.view(B, 1, 1, Lk)
    if kv_lengths is not None:
        keys = torch.arange(Lk, device=q.device)
        visible = visible & (keys.view(1, 1, 1, Lk) < kv_lengths.view(B, 1, 1, 1))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    return visible


def cross_modal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    kv_lengths: torch.Tensor | None = None,
    attn_mask: torch.Tensor | CausalBias | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """softmax(q @ k.T * scale + masks) @ v, with the score matrix materialised.

    q (B, H, Lq, E), k (B, H_kv, Lk, E), v (B, H_kv, Lk, Ev); H_kv < H (dividing it) with enable_gqa:
    query head h reads kv head h // (H // H_kv) (K and V repeated here). key_padding_mask: bool (B, Lk),
    True = ignore; kv_lengths: int (B,); attn_mask: bool (True = may attend) or additive float,
    broadcastable to (B, H, Lq, Lk), or a CausalBias; is_causal: query i sees keys j <= i.
    A key is hidden by a bool mask, padding, the causal flag or a -inf float mask, whatever its score
    (NaN included); a row whose scores are all hidden (or -inf) gives zeros (and zero gradient); a NaN
    among a row's other scores makes the row NaN. Dropout: with dropout_mask (a bool keep-mask
    broadcastable to (B, H, Lq, Lk)) the kept probabilities are scaled by 1 / (1 - dropout_p); without
    it, dropout_p > 0 samples a mask with torch's generator.
    Computed in float32 (float64 for float64 inputs) and returned in q's dtype.
    """
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    causal, attn_mask = causal_mode(is_causal, attn_mask, q.shape[-2], k.shape[-2])
    if k.shape[1] != q.shape[1]:
        if not enable_gqa:
            raise ValueError(f"mmkernels: argument 'k': expected {q.shape[1]} heads (those of q), got {k.shape[1]}")
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    visible = visible_keys(q, k, key_padding_mask, kv_lengths, attn_mask)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask.to(ct)
        visible = visible & (attn_mask != float("-inf"))
    if causal:
        visible = visible & causal_visible(causal, q.shape[-2], k.shape[-2], q.device)
    # A score of -inf (an infinite query or key) hides its key as a -inf mask does: probability 0 even
    # in a row made NaN by another key (inf - inf), as the kernels compute it.
    s = s.masked_fill(~(visible & (s != float("-inf"))), float("-inf"))
    z = None  # dropout's factors: 0 or 1 / (1 - p)
    if dropout_mask is not None:
        z = dropout_mask.to(ct).expand(s.shape) / (1.0 - dropout_p) if dropout_p < 1.0 else torch.zeros_like(s)
    elif dropout_p > 0.0:
        z = F.dropout(torch.ones_like(s), dropout_p)
    return _SoftmaxTimesValues.apply(s, z, v.to(ct)).to(q.dtype)


def _softmax_probs(s: torch.Tensor):
    """softmax over the keys whose score is not -inf (NaN counts as visible, so that it propagates),
    0 at the others even in a NaN row; a row with none gets all 0 (a finite stand-in keeps NaN out of
    the gradient). Returns the probabilities and which rows see a key."""
    visible = s != float("-inf")
    any_visible = visible.any(-1, keepdim=True)
    p = torch.softmax(torch.where(any_visible, s, 0.0), dim=-1)
    return torch.where(any_visible & visible, p, 0.0), any_visible


class _SoftmaxTimesValues(torch.autograd.Function):
    """(softmax(s) * z) @ v, zeros for a row that sees no key, with the backward every flash kernel
    (ours, SDPA's) forms: D = rowsum(dO * out), dS = P * (z * dO v^T - D), and dS = 0 where P is 0. So
    a NaN value behind a zero probability (a hidden or underflowed key), which makes the output row
    NaN (0 * NaN), makes that row's D and its other score gradients NaN too, while the key whose
    probability is 0 passes none. The backward recomputes from the inputs with differentiable
    operations, so it can itself be differentiated (double backward)."""

    generate_vmap_rule = True  # torch.func.vmap / grad / jacrev work through it

    @staticmethod
    def forward(s, z, v):
        return _SoftmaxTimesValues._out(s, z, v)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def _out(s, z, v):
        p, any_visible = _softmax_probs(s)
        pz = p if z is None else p * z
        # A row that sees no key is zeros whatever the values hold (0 * NaN would be NaN).
        return torch.matmul(pz, v).masked_fill(~any_visible, 0.0), p, pz

    @staticmethod
    def backward(ctx, dout):
        s, z, v = ctx.saved_tensors
        out, p, pz = _SoftmaxTimesValues._out(s, z, v)
        dp = torch.matmul(dout, v.transpose(-1, -2))
        if z is not None:
            dp = dp * z
        ds = torch.where(p == 0, 0.0, p * (dp - (dout * out).sum(-1, keepdim=True)))
        return ds, None, torch.matmul(pz.transpose(-1, -2), dout)


def cross_modal_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Packed variable-length attention: cross_modal_attention on each sequence's rows of q
    (total_q, H, E) and k / v (total_k, H_kv, E|Ev), concatenated back to (total_q, H, Ev)."""
    outs = []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        o = cross_modal_attention(qb, kb, vb, is_causal=is_causal, scale=scale, dropout_p=dropout_p, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(0, q.shape[1], v.shape[-1])
    return torch.cat(outs, 0)
