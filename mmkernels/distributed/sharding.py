"""DTensor sharding rules of every mmkernels op, forward and backward.

fused_concat_linear        batch (any leading dim of the inputs); weight by output rows (inputs
                           replicated, output sharded on its last dim); weight by input columns (one
                           input sharded on its features, output Partial; activation "none" only, as
                           an activation of a partial sum is not the sum of activations).
low_rank_fusion            batch; factors by output columns. Not by input features: the modalities'
                           projections multiply, so partial sums per rank do not add up to the result.
cross_modal_attention      batch or heads, for q, k, v, masks, lse and gradients alike; see
                           ATTENTION_OPS for how each named tensor is placed.
Every op can also run replicated. Rules are one mesh dimension's worth; DTensor combines them over
the mesh and redistributes inputs to the cheapest.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from ._strategy import Rule, register, replicate_everything

_ops = torch.ops.mmkernels
# Activations whose backward reads the pre-activation (the op returns it; else it is an empty tensor).
_NEEDS_PREACT = ("gelu", "gelu_tanh", "silu")


def _shape(spec: DTensorSpec) -> tuple[int, ...]:
    return tuple(spec.tensor_meta.shape)


def _is_placeholder(spec) -> bool:
    """The ops pass 'no tensor' as an empty 1-D tensor (preact, unused out, skipped gradients):
    replicated whatever the sharding, as there is nothing to split."""
    return spec is None or _shape(spec) == (0,)


def _or_replicate(spec, placement):
    return Replicate() if _is_placeholder(spec) else placement


# ------------------------------------------------------------------ fused_concat_linear
# Rule inputs follow the schema: inputs..., weight, bias (if given) / grad_out, inputs..., weight,
# out, preact. R is Replicate().

R = Replicate()


def _fcl_forward(inputs, weight, bias, activation):
    n, last = len(inputs), len(_shape(inputs[0])) - 1
    with_preact = activation in _NEEDS_PREACT

    def rule(out, xs, w, b):
        outputs = [out, out if with_preact else R]
        return Rule(outputs, [xs] * n + [w] + ([] if bias is None else [b]))

    rules = [rule(Shard(d), Shard(d), R, R) for d in range(last)]  # batch: any leading dim
    rules.append(rule(Shard(last), R, Shard(0), Shard(0)))  # weight by output rows
    if n == 1 and activation == "none":
        # Weight by input columns: each rank's product is a partial sum; the bias is split (Partial)
        # so that the reduction adds it once.
        rules.append(rule(Partial(), Shard(last), Shard(1), Partial()))
    rules.append(replicate_everything((inputs, weight, bias)))
    return rules


def _fcl_backward(grad_out, inputs, weight, out, preact, activation, inputs_need_grad, weight_needs_grad,
                  bias_needs_grad):
    n, last = len(inputs), len(_shape(grad_out)) - 1

    def rule(g_in, g_w, g_b, go, xs, w):
        # Skipped gradients come back as placeholders, replicated; out and preact go as grad_out
        # does, unless they are placeholders.
        grads = [[g_in if need else R for need in inputs_need_grad],
                 g_w if weight_needs_grad else R, g_b if bias_needs_grad else R]
        return Rule(grads, [go] + [xs] * n + [w, _or_replicate(out, go), _or_replicate(preact, go)])

    rules = [rule(Shard(d), Partial(), Partial(), Shard(d), Shard(d), R) for d in range(last)]
    rules.append(rule(Partial(), Shard(0), Shard(0), Shard(last), R, Shard(0)))
    if n == 1 and activation == "none":
        rules.append(rule(Shard(last), Shard(1), R, R, Shard(last), Shard(1)))
    rules.append(replicate_everything((grad_out, inputs, weight, out, preact)))
    return rules


# ------------------------------------------------------------------ low_rank_fusion
# Rule inputs: inputs..., factors..., rank_weight, bias (if given) / grad_out, inputs..., factors...,
# rank_weight.


def _lrf_forward(inputs, factors, rank_weight, bias):
    n, last = len(inputs), len(_shape(inputs[0])) - 1

    def rule(out, xs, fs, b):
        return Rule([out], [xs] * n + [fs] * n + [R] + ([] if bias is None else [b]))

    rules = [rule(Shard(d), Shard(d), R, R) for d in range(last)]
    # factors (rank, D_m + 1, N) by output columns: every output column is a product of its own.
    rules.append(rule(Shard(last), R, Shard(2), Shard(0)))
    rules.append(replicate_everything((inputs, factors, rank_weight, bias)))
    return rules


def _lrf_backward(grad_out, inputs, factors, rank_weight, inputs_need_grad, factors_need_grad,
                  rank_weight_needs_grad, bias_needs_grad):
    n, last = len(inputs), len(_shape(grad_out)) - 1

    def rule(g_in, g_f, g_w, g_b, go, xs, fs):
        grads = [[g_in if need else R for need in inputs_need_grad],
                 [g_f if need else R for need in factors_need_grad],
                 g_w if rank_weight_needs_grad else R, g_b if bias_needs_grad else R]
        return Rule(grads, [go] + [xs] * n + [fs] * n + [R])

    rules = [rule(Shard(d), Partial(), Partial(), Partial(), Shard(d), Shard(d), R) for d in range(last)]
    rules.append(rule(Partial(), Shard(2), Partial(), Shard(0), Shard(last), R, Shard(2)))
    rules.append(replicate_everything((grad_out, inputs, factors, rank_weight)))
    return rules


# ------------------------------------------------------------------ cross_modal_attention

# How each named tensor of an attention op, argument or output, is placed when the problem is
# split by batch or by heads: the dim it is sharded on, or None for whole on every rank. Dense
# layouts: q, k, v, out, grad_out and their gradients (B, H, L, E); lse (B, H, Lq);
# key_padding_mask (B, Lk); kv_lengths (B,). attn_mask broadcasts to (B, H, Lq, Lk), so its
# placement follows its shape (_attn_mask_placement). The dropout seed is one number, whole
# everywhere. Non-tensor arguments (scale, dropout_p, a later schema's flags) pass through as they
# are. A tensor argument not named here (a later schema's) makes the op run replicated only, which
# is always correct, until it is given a role.
_DENSE = {"q": 0, "k": 0, "v": 0, "out": 0, "grad_out": 0, "lse": 0, "dq": 0, "dk": 0, "dv": 0}
_DENSE_SPLITS = {
    "batch": {**_DENSE, "key_padding_mask": 0, "kv_lengths": 0, "dropout_seed": None},
    "heads": {**{name: 1 for name in _DENSE}, "key_padding_mask": None, "kv_lengths": None, "dropout_seed": None},
}
# The varlen ops pack every sequence along dim 0 ((total, H, E), cu_seqlens_* (batch + 1,) offsets,
# lse (H, total_q)), so they split by heads only.
_VARLEN = {"q": 1, "k": 1, "v": 1, "out": 1, "grad_out": 1, "dq": 1, "dk": 1, "dv": 1, "lse": 0}
_VARLEN_SPLITS = {"heads": {**_VARLEN, "cu_seqlens_q": None, "cu_seqlens_k": None, "dropout_seed": None}}
# Each attention op: its splits and its outputs in return order; ops not in this build are skipped
# at registration.
ATTENTION_OPS = {
    "cross_modal_attention": (_DENSE_SPLITS, ("out", "lse")),
    "cross_modal_attention_backward": (_DENSE_SPLITS, ("dq", "dk", "dv")),
    "cross_modal_attention_varlen": (_VARLEN_SPLITS, ("out", "lse")),
    "cross_modal_attention_varlen_backward": (_VARLEN_SPLITS, ("dq", "dk", "dv")),
}


def _attn_mask_placement(spec: DTensorSpec, split: str):
    """attn_mask broadcasts to (B, H, Lq, Lk) from 2-D to 4-D: split it where it has the split dim
    (more than one entry along it), else every rank reads it whole."""
    shape = _shape(spec)
    full_dim = 0 if split == "batch" else 1
    dim = full_dim - (4 - len(shape))
    return Shard(dim) if dim >= 0 and shape[dim] > 1 else Replicate()


def _heads_split_ok(q: DTensorSpec, k: DTensorSpec) -> bool:
    """Heads may be split when every mesh dimension splits H_kv evenly (then query head h and its kv
    head h // (H / H_kv) land on the same rank: grouped-query attention stays grouped). With
    H_kv == H any split is consistent, even an uneven one."""
    h, h_kv = _shape(q)[1], _shape(k)[1]
    if h == h_kv:
        return True
    return all(h_kv % q.mesh.size(d) == 0 for d in range(q.mesh.ndim))


def attention_rules(op_name: str):
    """The rule function of an attention op, from its schema's argument names. Non-tensor arguments
    (scale, dropout_p, max_seqlen_*, flags a later schema adds) pass through untouched."""
    op = getattr(_ops, op_name).default
    names = [a.name for a in op._schema.arguments]
    splits, outputs = ATTENTION_OPS[op_name]

    def rules(*args, **kwargs):
        named = {**dict(zip(names, args)), **kwargs}  # tensors in DTensor's order: args, then kwargs
        tensors = [(name, a) for name, a in named.items() if isinstance(a, DTensorSpec)]
        result = []
        for split, roles in splits.items():
            if split == "heads" and not _heads_split_ok(named["q"], named["k"]):
                _refuse_heads_if_sharded(named)
                continue
            placements = []
            for name, spec in tensors:
                if name == "attn_mask":
                    placements.append(_attn_mask_placement(spec, split))
                elif name in roles:
                    dim = roles[name]
                    placements.append(Replicate() if dim is None else Shard(dim))
                else:
                    placements = None  # an argument with no role: no split is known to be safe
                    break
            if placements is not None:
                result.append(Rule([Shard(roles[name]) for name in outputs], placements))
        result.append(replicate_everything((args, kwargs)))
        result[-1].outputs = [Replicate()] * len(outputs)
        return result

    return rules


def _refuse_heads_if_sharded(named) -> None:
    """Asked to run head-sharded q/k/v whose kv heads do not split evenly: refuse rather than
    quietly gather them (a wrong grouping would be silently wrong, a gather silently slow)."""
    q, k = named["q"], named["k"]
    if any(isinstance(p, Shard) and p.dim == 1 for spec in (q, k) for p in spec.placements):
        raise ValueError(
            f"mmkernels.distributed: cannot split attention by heads: k/v have {_shape(k)[1]} heads "
            f"(q has {_shape(q)[1]}), which the device mesh {tuple(q.mesh.shape)} does not split evenly, so "
            "query heads would land on another rank than their key/value group. Shard by batch, or choose "
            "a number of key/value heads divisible by the mesh size."
        )


def register_all() -> None:
    """Register every rule above with DTensor (idempotent: a second call replaces the first)."""
    register(_ops.fused_concat_linear.default, _fcl_forward)
    register(_ops.fused_concat_linear_backward.default, _fcl_backward)
    register(_ops.low_rank_fusion.default, _lrf_forward)
    register(_ops.low_rank_fusion_backward.default, _lrf_backward)
    for name in ATTENTION_OPS:
        if hasattr(_ops, name):
            register(getattr(_ops, name).default, attention_rules(name))
