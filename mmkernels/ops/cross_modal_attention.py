"""cross_modal_attention: flash-style attention in the SDPA layout. Checks, the public function, fakes,
autograd."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

from .. import reference
from .._C import attention_call
from ._common import KERNELS, differentiable_backward, fake_check_same_device, plain_eager, warn_once


_ATTN_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_heads(q, k, v, enable_gqa) -> None:
    """Heads are dim 1 in both layouts: H_kv == H, or with enable_gqa H_kv divides H."""
    H, Hk = q.shape[1], k.shape[1]
    if Hk != H:
        if not enable_gqa:
            raise ValueError(
                f"mmkernels: argument 'k': expected {H} heads (those of q), got {Hk}; pass enable_gqa=True for "
                "grouped-query attention"
            )
        if Hk == 0 or H % Hk != 0:
            raise ValueError(
                f"mmkernels: argument 'k': expected a head count dividing {H} (the heads of q) for grouped-query "
                f"attention, got {Hk}"
            )
    if v.shape[1] != Hk:
        raise ValueError(f"mmkernels: argument 'v': expected {Hk} heads (those of k), got {v.shape[1]}")


def check_qkv(q, k, v, layouts) -> None:
    """Rank, dtype and device of q, k, v (the dense and the varlen op); layouts: their shapes in words."""
    for name, t, dims in zip("qkv", (q, k, v), layouts):
        rank = dims.count(",") + 1
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"mmkernels: argument '{name}': expected a {rank}-D {dims} tensor, got {shape}")
    if q.dtype not in _ATTN_DTYPES:
        raise ValueError(f"mmkernels: argument 'q': expected a floating dtype {_ATTN_DTYPES}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"mmkernels: argument '{name}': expected {q.dtype} on {q.device} (as q), got {t.dtype} on {t.device}"
            )


def _check_attention(q, k, v, key_padding_mask, kv_lengths, attn_mask, dropout_p, enable_gqa=False) -> None:
    """Shape/dtype checks with errors that name the argument (the kernels check again in C++)."""
    check_qkv(q, k, v, ("(B, H, Lq, E)", "(B, H, Lk, E)", "(B, H, Lk, Ev)"))
    B, H, Lq, E = q.shape
    Lk = k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != B:
            raise ValueError(f"mmkernels: argument '{name}': expected batch size {B} (that of q), got {t.shape[0]}")
    check_heads(q, k, v, enable_gqa)
    if k.shape[3] != E:
        raise ValueError(f"mmkernels: argument 'k': expected head dim {E} (that of q), got {k.shape[3]}")
    if v.shape[2] != Lk:
        raise ValueError(f"mmkernels: argument 'v': expected {Lk} keys (Lk of k), got {v.shape[2]}")
    for name, t in (("key_padding_mask", key_padding_mask), ("kv_lengths", kv_lengths), ("attn_mask", attn_mask)):
        # Before any look at their values: a mask on another device would otherwise send the raw op
        # to another backend (meta: a silent meta result) or fail with a message naming nothing.
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(f"mmkernels: argument '{name}': expected a tensor on {q.device} (as q), got {t.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask)
            raise ValueError(
                f"mmkernels: argument 'key_padding_mask': expected a bool tensor (True = ignore), got {got}"
            )
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"mmkernels: argument 'key_padding_mask': expected shape ({B}, {Lk}), got {tuple(key_padding_mask.shape)}"
            )
    if kv_lengths is not None:
        if not isinstance(kv_lengths, torch.Tensor) or kv_lengths.dtype not in (torch.int32, torch.int64):
            got = kv_lengths.dtype if isinstance(kv_lengths, torch.Tensor) else type(kv_lengths)
            raise ValueError(f"mmkernels: argument 'kv_lengths': expected an int32 or int64 tensor, got {got}")
        if tuple(kv_lengths.shape) != (B,):
            raise ValueError(f"mmkernels: argument 'kv_lengths': expected shape ({B},), got {tuple(kv_lengths.shape)}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or not (
            attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point
        ):
            got = attn_mask.dtype if isinstance(attn_mask, torch.Tensor) else type(attn_mask)
            raise ValueError(
                f"mmkernels: argument 'attn_mask': expected a bool (True = may attend) or float (additive) tensor, "
                f"got {got}"
            )
        full = (B, H, Lq, Lk)
        ok = 2 <= attn_mask.dim() <= 4 and all(
            s in (1, f) for s, f in zip(attn_mask.shape, full[4 - attn_mask.dim() :])
        )
        if not ok:
            raise ValueError(
                f"mmkernels: argument 'attn_mask': expected a 2-D to 4-D shape broadcastable to {full}, "
                f"got {tuple(attn_mask.shape)}"
            )
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"mmkernels: argument 'dropout_p': expected a probability in [0, 1], got {dropout_p}")


def _check_kv_lengths_values(kv_lengths, Lk) -> None:
    # Values are data: checked eagerly only (the kernel checks them again at run time).
    if kv_lengths is None or torch.compiler.is_compiling() or kv_lengths.numel() == 0:
        return
    lo, hi = int(kv_lengths.min()), int(kv_lengths.max())
    if lo < 0 or hi > Lk:
        raise ValueError(f"mmkernels: argument 'kv_lengths': expected values in [0, {Lk}] (Lk), got [{lo}, {hi}]")


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
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention of q over (k, v) in the SDPA layout, without materialising the score matrix.

    q (B, H, Lq, E), k (B, H_kv, Lk, E), v (B, H_kv, Lk, Ev) -> (B, H, Lq, Ev), stored as (B, Lq, H, Ev)
    (``out.transpose(1, 2)`` is contiguous: merging the heads is a view). Gradients take the layout
    of q, k, v where it keeps the last dim contiguous.
    key_padding_mask: bool (B, Lk), True = ignore that key. kv_lengths: int (B,), keys >= length ignored.
    attn_mask: bool (True = may attend) or float (added to the scores), broadcastable to (B, H, Lq, Lk),
    or a torch.nn.attention.bias.CausalBias (upper-left or lower-right), applied as a flag.
    is_causal: query i sees keys j <= i (SDPA's upper-left alignment), combined with every other mask;
    the kernel skips the key blocks above the diagonal.
    enable_gqa: k and v may have H_kv heads dividing H; query head h reads kv head h // (H // H_kv),
    without copying K or V (SDPA's rule).
    scale: defaults to 1/sqrt(E). dropout_p: dropout on the attention probabilities (pass 0.0 in eval);
    its mask derives from a seed drawn from torch's default generator (torch.manual_seed reproduces it).
    A query row that sees no key returns zeros and passes zero gradient; a NaN among a row's visible
    scores makes that row's output (and its gradients) NaN.

    A float attn_mask that requires grad takes the PyTorch reference path (which materialises the
    scores) so that its gradient is exact; the fused kernel treats masks as constants.
    """
    if not torch.compiler.is_compiling():
        # A plain eager CPU call, checked and run in one C++ crossing (csrc/attention_call.cpp: the op
        # below autograd, and its formula as a C++ node where a gradient is needed); None otherwise.
        out = attention_call(q, k, v, key_padding_mask, kv_lengths, attn_mask, is_causal, scale, dropout_p,
                             enable_gqa)
        if out is not None:
            return out
    if isinstance(q, torch.Tensor) and q.is_nested:
        return _nested_attention(q, k, v, key_padding_mask, kv_lengths, attn_mask, is_causal, scale, dropout_p,
                                 enable_gqa)
    causal, op_mask = 0, attn_mask
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() >= 2 and k.dim() >= 2:
        causal, op_mask = reference.causal_mode(is_causal, attn_mask, q.shape[-2], k.shape[-2])
    _check_attention(q, k, v, key_padding_mask, kv_lengths, op_mask, dropout_p, enable_gqa)
    _check_kv_lengths_values(kv_lengths, k.shape[2])
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    dropout_p = float(dropout_p)
    key = q.device.type.upper()
    mask_needs_grad = (
        op_mask is not None and op_mask.dtype != torch.bool and op_mask.requires_grad and torch.is_grad_enabled()
    )
    # The causal flag and grouped-query heads reach every backend's kernels (CPU and CUDA alike).
    if mask_needs_grad or key not in KERNELS["mmkernels::cross_modal_attention"]:
        if not mask_needs_grad:
            warn_once(
                f"cma-{key}",
                f"mmkernels: no cross_modal_attention kernel for {key} in this build; using the PyTorch "
                "reference (which materialises the score matrix) instead.",
            )
        return reference.cross_modal_attention(
            q, k, v, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths, attn_mask=attn_mask,
            is_causal=is_causal, scale=scale, dropout_p=dropout_p, enable_gqa=enable_gqa,
        )
    # The seed comes from torch's default generator as a tensor op, so it is reproducible under
    # torch.manual_seed and traceable by torch.compile / torch.export with no graph break.
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0.0 else None
    args = (q, k, v, key_padding_mask, kv_lengths, op_mask, scale, dropout_p, seed, causal)
    if plain_eager(q, k, v, key_padding_mask, kv_lengths, op_mask):
        # Plain eager calls skip torch.library's generic autograd kernel (argument defaults, pytree of
        # the outputs: about as long as a small call's kernel, issue 19), with or without grad.
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _CrossModalAttentionEager.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return _ATTENTION(*args)[0]
    out, _ = _ATTENTION(*args)
    return out


_ATTENTION = torch.ops.mmkernels.cross_modal_attention.default


def _to_packed(x: torch.Tensor, name: str):
    """A (B, H, j, D) jagged view of a (B, j, H, D) nested tensor -> (values (total, H, D), offsets)."""
    if not (isinstance(x, torch.Tensor) and x.is_nested and x.layout == torch.jagged and x.dim() == 4
            and x._ragged_idx == 2):
        if not isinstance(x, torch.Tensor):
            got = type(x).__name__
        elif x.is_nested:
            got = f"a {x.layout} nested tensor of {x.dim()} dims"
        else:
            got = f"a dense tensor of shape {tuple(x.shape)}"
        raise ValueError(
            f"mmkernels: argument '{name}': expected (as q) a (B, H, j, D) view of a (B, j, H, D) jagged-layout "
            f"nested tensor (torch.jagged), got {got}"
        )
    xt = x.transpose(1, 2)
    return xt.values(), xt.offsets()


def _nested_attention(q, k, v, key_padding_mask, kv_lengths, attn_mask, is_causal, scale, dropout_p, enable_gqa):
    """Jagged nested q, k, v (SDPA's layout): the sequences' own lengths are the padding, so the packed
    values go to cross_modal_attention_varlen (no padding work) and come back nested."""
    from .cross_modal_attention_varlen import cross_modal_attention_varlen

    for name, t in (("key_padding_mask", key_padding_mask), ("kv_lengths", kv_lengths), ("attn_mask", attn_mask)):
        if t is not None:
            raise ValueError(
                f"mmkernels: argument '{name}': not supported with nested tensors (their lengths are the padding)"
            )
    (qv, q_off), (kv, k_off), (vv, v_off) = _to_packed(q, "q"), _to_packed(k, "k"), _to_packed(v, "v")
    if qv.shape[1] != kv.shape[1] and not enable_gqa:
        raise ValueError(
            f"mmkernels: argument 'k': expected {qv.shape[1]} heads (those of q), got {kv.shape[1]}; pass "
            "enable_gqa=True for grouped-query attention"
        )
    if k_off.shape != v_off.shape or (k_off != v_off).any():
        raise ValueError("mmkernels: argument 'v': expected the sequence lengths of k")
    if q_off.shape != k_off.shape:
        raise ValueError(f"mmkernels: argument 'k': expected batch size {q_off.numel() - 1} (that of q), "
                         f"got {k_off.numel() - 1}")
    max_q = int(q_off.diff().max()) if q_off.numel() > 1 else 0
    max_k = int(k_off.diff().max()) if k_off.numel() > 1 else 0
    out = cross_modal_attention_varlen(qv, kv, vv, q_off.to(torch.int32), k_off.to(torch.int32), max_q, max_k,
                                       is_causal=is_causal, scale=scale, dropout_p=dropout_p)
    return torch.nested.nested_tensor_from_jagged(out, q_off).transpose(1, 2)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("mmkernels::cross_modal_attention")
def _cross_modal_attention_fake(
    q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed, causal=0
):
    fake_check_same_device(q, k=k, v=v, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths, attn_mask=attn_mask)
    B, H, Lq, _ = q.shape
    # The kernels' layouts (csrc/include/attention_layout.h): out is stored as (B, Lq, H, Ev).
    out = q.new_empty((B, Lq, H, v.shape[-1])).permute(0, 2, 1, 3)
    lse = q.new_empty((B, H, Lq), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("mmkernels::cross_modal_attention_backward")
def _cross_modal_attention_backward_fake(
    grad_out, q, k, v, out, lse, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed, causal=0
):
    fake_check_same_device(q, grad_out=grad_out, k=k, v=v, out=out, lse=lse, key_padding_mask=key_padding_mask,
                            kv_lengths=kv_lengths, attn_mask=attn_mask)
    return _empty_grad_like(q), _empty_grad_like(k), _empty_grad_like(v)


def _empty_grad_like(x: torch.Tensor) -> torch.Tensor:
    """The kernels' gradient layout (csrc/include/attention_layout.h): x's, if its last dim stays contiguous."""
    t = torch.empty_like(x)
    return t if t.stride(-1) == 1 else x.new_empty(x.shape)


def _cross_modal_attention_setup(ctx, inputs, output):
    q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed, causal = inputs
    out, lse = output
    ctx.causal = causal
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(lse)  # a by-product for backward, not a result to differentiate
    # Masks and the seed are saved as inputs (never as gradients' targets): the op treats them as
    # constants; a float attn_mask that needs its gradient never reaches this op (see the wrapper).
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, kv_lengths, attn_mask, dropout_seed)


def _cross_modal_attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask, kv_lengths, attn_mask, dropout_seed = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True or torch.func: see _double_backward
        return _double_backward(
            ctx.needs_input_grad, grad_out, q, k, v, key_padding_mask, kv_lengths, attn_mask, ctx.scale,
            ctx.dropout_p, dropout_seed, ctx.causal,
        )
    dq, dk, dv = torch.ops.mmkernels.cross_modal_attention_backward.default(
        grad_out, q, k, v, out, lse, key_padding_mask, kv_lengths, attn_mask, ctx.scale, ctx.dropout_p, dropout_seed,
        ctx.causal,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd(
    "mmkernels::cross_modal_attention", _cross_modal_attention_backward, setup_context=_cross_modal_attention_setup
)


# The op's argument names, in order: _double_backward hands them to the reference by name, so an
# argument added to the op reaches it with no edit here.
_OP_ARGUMENTS = tuple(a.name for a in torch.ops.mmkernels.cross_modal_attention.default._schema.arguments)


def _double_backward(needs_input_grad, grad_out, *op_args):
    """Gradients for every argument of the op (op_args: the op's arguments, in its order), from the
    reference's differentiable operations (which materialise the scores), for a backward that is
    itself differentiated: the backward op has no derivative, and differentiating through it would
    give zeros silently. Dropout cannot be replayed (the reference cannot redraw the kernel's mask)."""
    if len(op_args) != len(_OP_ARGUMENTS):
        raise RuntimeError(f"mmkernels: cross_modal_attention double backward: expected the op's {_OP_ARGUMENTS}, "
                           f"got {len(op_args)} arguments")
    named = dict(zip(_OP_ARGUMENTS, op_args))
    named.pop("dropout_seed", None)
    if named.get("dropout_p", 0.0) > 0.0:
        raise NotImplementedError(
            "mmkernels: cross_modal_attention has no double backward (backward with create_graph=True, "
            "torch.func transforms) with dropout_p > 0: its dropout mask cannot be replayed"
        )
    q, k, v = named.pop("q"), named.pop("k"), named.pop("v")
    # The op's causal mode (0 none, 1 upper-left, 2 lower-right) joins the attention mask as the keys it
    # hides (-inf in a float mask); grouped-query heads are the reference's enable_gqa.
    visible = reference.causal_visible(named.pop("causal"), q.shape[-2], k.shape[-2], q.device)
    mask = named["attn_mask"]
    if visible is not None:
        named["attn_mask"] = (visible if mask is None else mask & visible if mask.dtype == torch.bool
                              else torch.where(visible, mask, float("-inf")))
    named["enable_gqa"] = k.shape[1] != q.shape[1]
    grads = differentiable_backward(
        lambda q, k, v: reference.cross_modal_attention(q, k, v, **named), grad_out, [q, k, v],
        needs_input_grad[:3],
    )
    return (*grads, *[None] * (len(op_args) - 3))


class _CrossModalAttentionEager(torch.autograd.Function):
    """The registered formula above (same saved tensors, backward op and double backward) for plain eager
    calls that need a gradient: flat arguments in the op's order, the op called below autograd."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed, causal):
        with torch._C._AutoDispatchBelowAutograd():
            out, lse = _ATTENTION(q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed,
                                  causal)
        ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, kv_lengths, attn_mask, dropout_seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _cross_modal_attention_backward(ctx, grad_out, None)
