"""cross_modal_attention_varlen: attention over packed variable-length sequences (FlashAttention-2's
varlen layout). Checks, the public function, fakes, autograd."""
from __future__ import annotations

import torch

from .. import reference
from ._common import KERNELS, differentiable_backward, fake_check_same_device, warn_once
from .cross_modal_attention import _lse_dtype, check_heads, check_qkv

_OP = "mmkernels::cross_modal_attention_varlen"


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p) -> None:
    """Shape/dtype checks with errors that name the argument (the kernel checks again in C++)."""
    check_qkv(q, k, v, ("(total_q, H, E)", "(total_k, H_kv, E)", "(total_k, H_kv, Ev)"))
    check_heads(q, k, v, enable_gqa=True)  # grouped-query heads need no flag here, as in FlashAttention
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"mmkernels: argument 'k': expected head dim {q.shape[2]} (that of q), got {k.shape[2]}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"mmkernels: argument 'v': expected {k.shape[0]} rows (total_k of k), got {v.shape[0]}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            got = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise ValueError(f"mmkernels: argument '{name}': expected a 1-D int32 (batch + 1,) tensor, got {got}")
        if cu.device != q.device:
            raise ValueError(f"mmkernels: argument '{name}': expected a tensor on {q.device} (as q), got {cu.device}")
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"mmkernels: argument 'cu_seqlens_k': expected {cu_seqlens_q.numel()} entries (those of cu_seqlens_q), "
            f"got {cu_seqlens_k.numel()}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, int) or m < 0:
            raise ValueError(f"mmkernels: argument '{name}': expected a non-negative int, got {m!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"mmkernels: argument 'dropout_p': expected a probability in [0, 1], got {dropout_p}")


def _check_varlen_values(cu, name, total, max_len, max_name) -> None:
    # Values are data: checked eagerly on plain tensors only (the kernel checks them again at run time,
    # also where a tensor subclass such as a DTensor hands it the local values).
    if torch.compiler.is_compiling() or type(cu) is not torch.Tensor:
        return
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"mmkernels: argument '{name}': expected prefix sums starting at 0, got {c[0]}")
    lengths = [b - a for a, b in zip(c, c[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"mmkernels: argument '{name}': expected non-decreasing prefix sums, got {c}")
    if c[-1] != total:
        raise ValueError(
            f"mmkernels: argument '{name}': expected its last value to be {total} (the packed length of the "
            f"tensors), got {c[-1]}"
        )
    if lengths and max(lengths) > max_len:
        raise ValueError(f"mmkernels: argument '{max_name}': a sequence has length {max(lengths)} > {max_len}")


def cross_modal_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention over packed sequences: sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q
    (total_q, H, E) attending to rows cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k / v (total_k, H_kv,
    E|Ev); returns (total_q, H, Ev). cu_seqlens_*: int32 (batch + 1,) prefix sums from 0; sequences of
    length 0 and 1 are valid. H_kv divides H (grouped-query attention: query head h reads kv head
    h // (H // H_kv)). is_causal: query i of a sequence sees its keys j <= i (upper-left, as the dense
    op). A query that sees no key (an empty key sequence) returns zeros. No padding is computed: each
    sequence runs the dense kernel on views of its rows."""
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p)
    _check_varlen_values(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_varlen_values(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    dropout_p = float(dropout_p)
    key = q.device.type.upper()
    if key not in KERNELS[_OP]:
        warn_once(
            f"cmav-{key}",
            f"mmkernels: no cross_modal_attention_varlen kernel for {key} in this build; using the PyTorch "
            "reference (one materialised attention per sequence) instead.",
        )
        return reference.cross_modal_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal=is_causal, scale=scale, dropout_p=dropout_p
        )
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0.0 else None
    out, _ = torch.ops.mmkernels.cross_modal_attention_varlen.default(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, seed, 1 if is_causal else 0
    )
    return out


@torch.library.register_fake(_OP)
def _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, dropout_seed,
                 causal=0):
    fake_check_same_device(q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake(_OP + "_backward")
def _varlen_backward_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                          dropout_p, dropout_seed, causal=0):
    fake_check_same_device(q, grad_out=grad_out, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k)
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format), torch.empty_like(v, memory_format=torch.contiguous_format)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout_p, dropout_seed, causal = inputs
    out, lse = output
    ctx.args = (max_q, max_k, scale, dropout_p)
    ctx.causal = causal
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, dropout_seed)


def _varlen_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, dropout_seed = ctx.saved_tensors
    max_q, max_k, scale, dropout_p = ctx.args
    if torch.is_grad_enabled():  # create_graph=True or torch.func: as the dense op's _double_backward
        if dropout_p > 0.0:
            raise NotImplementedError(
                "mmkernels: cross_modal_attention_varlen has no double backward (backward with create_graph=True, "
                "torch.func transforms) with dropout_p > 0: its dropout mask cannot be replayed"
            )
        grads = differentiable_backward(
            lambda q, k, v: reference.cross_modal_attention_varlen(
                q, k, v, cu_q, cu_k, max_q, max_k, is_causal=ctx.causal == 1, scale=scale),
            grad_out, [q, k, v], ctx.needs_input_grad[:3],
        )
        return (*grads, None, None, None, None, None, None, None, None)
    dq, dk, dv = torch.ops.mmkernels.cross_modal_attention_varlen_backward.default(
        grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, dropout_p, dropout_seed, ctx.causal
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd(_OP, _varlen_backward, setup_context=_varlen_setup)
