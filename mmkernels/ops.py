"""Thin Python wrappers over torch.ops.mmkernels.*, with their fake (meta) kernels and autograd."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

from . import _build, reference

_build.load_library()
_KERNELS = _build.kernel_table()

ACTIVATIONS = tuple(reference.ACTIVATIONS)
# Activations whose backward needs the pre-activation (the others' derivative is a function of the output).
_NEEDS_PREACT = ("gelu", "gelu_tanh", "silu")
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- fused_concat_linear


def _check_concat_linear(inputs, weight, bias, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"mmkernels: argument 'activation': expected one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ValueError("mmkernels: argument 'inputs': expected a non-empty list or tuple of tensors")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("mmkernels: argument 'weight': expected a 2-D (out_features, in_features) tensor")
    lead = None
    total = 0
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"mmkernels: argument 'inputs[{i}]': expected a tensor of shape (..., features)")
        if x.dtype != weight.dtype:
            raise ValueError(f"mmkernels: argument 'inputs[{i}]': expected dtype {weight.dtype}, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"mmkernels: argument 'inputs[{i}]': expected device {weight.device}, got {x.device}")
        if lead is None:
            lead = x.shape[:-1]
        elif x.shape[:-1] != lead:
            raise ValueError(
                f"mmkernels: argument 'inputs[{i}]': expected leading dims {tuple(lead)} (those of inputs[0]), "
                f"got {tuple(x.shape[:-1])}"
            )
        total += x.shape[-1]
    if weight.shape[1] != total:
        raise ValueError(
            f"mmkernels: argument 'weight': expected {total} columns (the sum of the inputs' feature sizes), "
            f"got shape {tuple(weight.shape)}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"mmkernels: argument 'bias': expected a tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"mmkernels: argument 'bias': expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"mmkernels: argument 'bias': expected {weight.dtype} on {weight.device}, got {bias.dtype} on {bias.device}"
            )


def fused_concat_linear(
    inputs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """``act(torch.cat(inputs, -1) @ weight.T + bias)`` without materialising the concatenation.

    inputs: tensors ``(..., D_i)`` with identical leading dims; weight ``(N, sum D_i)``; bias ``(N,)``.
    activation: one of ``none, relu, gelu, gelu_tanh, silu, tanh, sigmoid``.
    """
    _check_concat_linear(inputs, weight, bias, activation)
    key = weight.device.type.upper()
    if key not in _KERNELS["mmkernels::fused_concat_linear"]:
        _warn_once(
            f"fcl-{key}",
            f"mmkernels: no fused_concat_linear kernel for {key} in this build; using the PyTorch reference "
            "(torch.cat + F.linear) instead.",
        )
        return reference.fused_concat_linear(inputs, weight, bias, activation)
    if key == "CPU" and _few_rows(inputs, weight):
        # Shape rule (issue 2, measured in benchmarks/RESULTS.md): with M * 8 <= N rows the
        # concatenation is small next to W, so there is nothing to fuse away, and PyTorch's own
        # cat + linear + activation beats any call into an op by its fixed cost. torch.ops callers
        # still get the op, whose kernel takes the same concatenate-then-one-GEMM path.
        return reference.fused_concat_linear(inputs, weight, bias, activation)
    if _plain_eager(*inputs, weight, bias):
        if torch.is_grad_enabled() and (
            weight.requires_grad or (bias is not None and bias.requires_grad) or any(x.requires_grad for x in inputs)
        ):
            return _FusedConcatLinearEager.apply(weight, bias, activation, *inputs)
        with torch._C._AutoDispatchBelowAutograd():
            return _FCL(list(inputs), weight, bias, activation)[0]
    out, _ = _FCL(list(inputs), weight, bias, activation)
    return out


_FCL = torch.ops.mmkernels.fused_concat_linear.default
_FCL_BACKWARD = torch.ops.mmkernels.fused_concat_linear_backward.default
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _few_rows(inputs, weight) -> bool:
    """The kernels' concat_is_cheaper rule (csrc/cpu/fused_concat_linear.cpp): several inputs and M * 8 <= N."""
    return len(inputs) > 1 and math.prod(inputs[0].shape[:-1]) * 8 <= weight.shape[0]


def _plain_eager(*tensors) -> bool:
    """True for a plain eager call on `tensors` (None allowed): plain tensors, no torch.compile/export
    tracing, no torch-function or dispatch mode, no functorch transform. Only then does
    fused_concat_linear take its direct route (see _FusedConcatLinearEager), or CrossModalAttention
    its recomputing weights; anything else goes through registered ops and formulas, which every
    tracer and transform understands."""
    return (
        not torch.compiler.is_compiling()
        and all(t is None or type(t) in _TENSOR_TYPES for t in tensors)
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def _fake_check_same_device(ref: torch.Tensor, **named) -> None:
    # The fake (Meta) kernel is also what the dispatcher picks when a meta tensor is mixed with real
    # ones, so it must refuse mixed devices itself, or the raw op would return a meta tensor silently.
    for name, t in named.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"mmkernels: argument '{name}': expected device {ref.device}, got {t.device}")


@torch.library.register_fake("mmkernels::fused_concat_linear")
def _fused_concat_linear_fake(inputs, weight, bias, activation):
    _fake_check_same_device(weight, **{f"inputs[{i}]": x for i, x in enumerate(inputs)}, bias=bias)
    shape = (*inputs[0].shape[:-1], weight.shape[0])
    preact = weight.new_empty(shape) if activation in _NEEDS_PREACT else weight.new_empty(0)
    return weight.new_empty(shape), preact


@torch.library.register_fake("mmkernels::fused_concat_linear_backward")
def _fused_concat_linear_backward_fake(
    grad_out, inputs, weight, out, preact, activation, inputs_need_grad, weight_needs_grad, bias_needs_grad
):
    _fake_check_same_device(weight, grad_out=grad_out, **{f"inputs[{i}]": x for i, x in enumerate(inputs)},
                            out=out, preact=preact)
    empty = weight.new_empty(0)
    grad_inputs = [x.new_empty(x.shape) if need else empty for x, need in zip(inputs, inputs_need_grad)]
    grad_weight = weight.new_empty(weight.shape) if weight_needs_grad else empty
    grad_bias = weight.new_empty(weight.shape[0]) if bias_needs_grad else empty
    return grad_inputs, grad_weight, grad_bias


def _fused_concat_linear_setup(ctx, inputs, output):
    xs, weight, bias, activation = inputs
    out, preact = output
    ctx.activation = activation
    ctx.inputs_need_grad = [x.requires_grad for x in xs]
    ctx.weight_needs_grad = weight.requires_grad
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    # preact's gradient is never used: don't let autograd allocate zeros for it.
    ctx.set_materialize_grads(False)
    # Keep the output only where the activation's derivative is read from it (relu, tanh, sigmoid),
    # so that otherwise it can be freed before backward, as with eager F.linear.
    keep_out = activation not in _NEEDS_PREACT and activation != "none"
    ctx.save_for_backward(*xs, weight, out if keep_out else weight.new_empty(0), preact)


def _fused_concat_linear_backward(ctx, grad_out, _grad_preact):
    if grad_out is None:  # only the (internal) pre-activation output was used
        return [None] * len(ctx.inputs_need_grad), None, None, None
    *xs, weight, out, preact = ctx.saved_tensors
    grad_inputs, grad_weight, grad_bias = torch.ops.mmkernels.fused_concat_linear_backward.default(
        grad_out.contiguous(),
        xs,
        weight,
        out,
        preact,
        ctx.activation,
        ctx.inputs_need_grad,
        ctx.weight_needs_grad,
        ctx.bias_needs_grad,
    )
    grad_inputs = [g if need else None for g, need in zip(grad_inputs, ctx.inputs_need_grad)]
    return (
        grad_inputs,
        grad_weight if ctx.weight_needs_grad else None,
        grad_bias if ctx.bias_needs_grad else None,
        None,
    )


torch.library.register_autograd(
    "mmkernels::fused_concat_linear", _fused_concat_linear_backward, setup_context=_fused_concat_linear_setup
)


class _FusedConcatLinearEager(torch.autograd.Function):
    """The same forward, saved tensors and backward op as the register_autograd formula above, for plain
    eager calls. The formula registered on the op takes the generic route for an op with a Tensor[]
    argument (pytree flattening of the arguments and outputs, per-call dataclasses, the Python autograd
    kernel in front of the forward even without grad), which costs about 0.15 ms per forward+backward:
    5% of the whole step where few rows make the op short (issue 2, 32x(2048,1024)->512). This class takes
    flat arguments (weight, bias, activation, *inputs) and calls the op below autograd directly."""

    @staticmethod
    def forward(ctx, weight, bias, activation, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            out, preact = _FCL(list(inputs), weight, bias, activation)
        ctx.activation = activation
        keep_out = activation not in _NEEDS_PREACT and activation != "none"
        ctx.save_for_backward(*inputs, weight, out if keep_out else weight.new_empty(0), preact)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: the backward op has no derivative itself
            raise RuntimeError("mmkernels: fused_concat_linear has no double backward (backward with create_graph=True)")
        *xs, weight, out, preact = ctx.saved_tensors
        need = ctx.needs_input_grad
        inputs_need_grad = list(need[3:])
        grad_inputs, grad_weight, grad_bias = _FCL_BACKWARD(
            grad_out.contiguous(), xs, weight, out, preact, ctx.activation, inputs_need_grad, need[0], need[1]
        )
        return (
            grad_weight if need[0] else None,
            grad_bias if need[1] else None,
            None,
            *[g if n else None for g, n in zip(grad_inputs, inputs_need_grad)],
        )


# --------------------------------------------------------------------------- low_rank_fusion (LMF)


def _check_low_rank_fusion(inputs, factors, rank_weight, bias) -> None:
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ValueError("mmkernels: argument 'inputs': expected a non-empty list or tuple of tensors")
    if not isinstance(factors, (list, tuple)) or len(factors) != len(inputs):
        raise ValueError(f"mmkernels: argument 'factors': expected a list of {len(inputs)} tensors (one per input)")
    if not isinstance(rank_weight, torch.Tensor) or rank_weight.dim() != 1:
        raise ValueError("mmkernels: argument 'rank_weight': expected a 1-D (rank,) tensor")
    dtype, device, rank = rank_weight.dtype, rank_weight.device, rank_weight.shape[0]
    if not isinstance(factors[0], torch.Tensor) or factors[0].dim() != 3:
        raise ValueError("mmkernels: argument 'factors[0]': expected a 3-D (rank, in_features + 1, out_features) tensor")
    n = factors[0].shape[2]
    lead = None
    for i, (x, f) in enumerate(zip(inputs, factors)):
        for name, t in ((f"inputs[{i}]", x), (f"factors[{i}]", f)):
            if not isinstance(t, torch.Tensor) or t.dim() < 1:
                raise ValueError(f"mmkernels: argument '{name}': expected a tensor, got {type(t).__name__}")
            if t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"mmkernels: argument '{name}': expected {dtype} on {device} (as rank_weight), got {t.dtype} on {t.device}"
                )
        if lead is None:
            lead = x.shape[:-1]
        elif x.shape[:-1] != lead:
            raise ValueError(
                f"mmkernels: argument 'inputs[{i}]': expected leading dims {tuple(lead)} (those of inputs[0]), "
                f"got {tuple(x.shape[:-1])}"
            )
        if f.shape != (rank, x.shape[-1] + 1, n):
            raise ValueError(
                f"mmkernels: argument 'factors[{i}]': expected shape ({rank}, {x.shape[-1] + 1}, {n}) = "
                f"(rank, inputs[{i}].size(-1) + 1, out_features), got {tuple(f.shape)}"
            )
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"mmkernels: argument 'bias': expected a tensor or None, got {type(bias).__name__}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != dtype or bias.device != device):
        raise ValueError(
            f"mmkernels: argument 'bias': expected shape ({n},), {dtype} on {device}; "
            f"got {tuple(bias.shape)}, {bias.dtype} on {bias.device}"
        )


def low_rank_fusion(
    inputs: Sequence[torch.Tensor],
    factors: Sequence[torch.Tensor],
    rank_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LMF's product of projections: ``bias + sum_k rank_weight[k] * prod_m ([inputs[m], 1] @ factors[m][k])``.

    inputs: ``(..., D_m)`` with identical leading dims; factors[m]: ``(rank, D_m + 1, N)`` (the last row
    multiplies the appended 1); rank_weight ``(rank,)``; bias ``(N,)``. Returns ``(..., N)`` without
    keeping every modality's ``(..., rank, N)`` projection.
    """
    _check_low_rank_fusion(inputs, factors, rank_weight, bias)
    key = rank_weight.device.type.upper()
    if key not in _KERNELS["mmkernels::low_rank_fusion"]:
        _warn_once(
            f"lrf-{key}",
            f"mmkernels: no low_rank_fusion kernel for {key} in this build; using the PyTorch reference instead.",
        )
        return reference.low_rank_fusion(inputs, factors, rank_weight, bias)
    return torch.ops.mmkernels.low_rank_fusion.default(list(inputs), list(factors), rank_weight, bias)


@torch.library.register_fake("mmkernels::low_rank_fusion")
def _low_rank_fusion_fake(inputs, factors, rank_weight, bias):
    _fake_check_same_device(rank_weight, **{f"inputs[{i}]": x for i, x in enumerate(inputs)},
                            **{f"factors[{i}]": f for i, f in enumerate(factors)}, bias=bias)
    return rank_weight.new_empty((*inputs[0].shape[:-1], factors[0].shape[2]))


@torch.library.register_fake("mmkernels::low_rank_fusion_backward")
def _low_rank_fusion_backward_fake(
    grad_out, inputs, factors, rank_weight, inputs_need_grad, factors_need_grad, rank_weight_needs_grad, bias_needs_grad
):
    _fake_check_same_device(rank_weight, grad_out=grad_out, **{f"inputs[{i}]": x for i, x in enumerate(inputs)},
                            **{f"factors[{i}]": f for i, f in enumerate(factors)})
    empty = rank_weight.new_empty(0)
    grad_inputs = [x.new_empty(x.shape) if need else empty for x, need in zip(inputs, inputs_need_grad)]
    grad_factors = [f.new_empty(f.shape) if need else empty for f, need in zip(factors, factors_need_grad)]
    grad_w = rank_weight.new_empty(rank_weight.shape) if rank_weight_needs_grad else empty
    grad_b = rank_weight.new_empty(factors[0].shape[2]) if bias_needs_grad else empty
    return grad_inputs, grad_factors, grad_w, grad_b


def _low_rank_fusion_setup(ctx, inputs, output):
    xs, factors, rank_weight, bias = inputs
    ctx.inputs_need_grad = [x.requires_grad for x in xs]
    ctx.factors_need_grad = [f.requires_grad for f in factors]
    ctx.rank_weight_needs_grad = rank_weight.requires_grad
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    ctx.num_inputs = len(xs)
    # Only the inputs and parameters: backward recomputes the projections.
    ctx.save_for_backward(*xs, *factors, rank_weight)


def _low_rank_fusion_backward(ctx, grad_out):
    saved = ctx.saved_tensors
    m = ctx.num_inputs
    xs, factors, rank_weight = saved[:m], saved[m : 2 * m], saved[2 * m]
    grad_inputs, grad_factors, grad_w, grad_b = torch.ops.mmkernels.low_rank_fusion_backward.default(
        grad_out.contiguous(),
        xs,
        factors,
        rank_weight,
        ctx.inputs_need_grad,
        ctx.factors_need_grad,
        ctx.rank_weight_needs_grad,
        ctx.bias_needs_grad,
    )
    return (
        [g if need else None for g, need in zip(grad_inputs, ctx.inputs_need_grad)],
        [g if need else None for g, need in zip(grad_factors, ctx.factors_need_grad)],
        grad_w if ctx.rank_weight_needs_grad else None,
        grad_b if ctx.bias_needs_grad else None,
    )


torch.library.register_autograd(
    "mmkernels::low_rank_fusion", _low_rank_fusion_backward, setup_context=_low_rank_fusion_setup
)


# --------------------------------------------------------------------------- cross_modal_attention

_ATTN_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_attention(q, k, v, key_padding_mask, kv_lengths, attn_mask, dropout_p) -> None:
    """Shape/dtype checks with errors that name the argument (the kernels check again in C++)."""
    for name, t, dims in (("q", q, "(B, H, Lq, E)"), ("k", k, "(B, H, Lk, E)"), ("v", v, "(B, H, Lk, Ev)")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"mmkernels: argument '{name}': expected a 4-D {dims} tensor, got {shape}")
    if q.dtype not in _ATTN_DTYPES:
        raise ValueError(f"mmkernels: argument 'q': expected a floating dtype {_ATTN_DTYPES}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"mmkernels: argument '{name}': expected {q.dtype} on {q.device} (as q), got {t.dtype} on {t.device}"
            )
    B, H, Lq, E = q.shape
    Lk = k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != B:
            raise ValueError(f"mmkernels: argument '{name}': expected batch size {B} (that of q), got {t.shape[0]}")
        if t.shape[1] != H:
            raise ValueError(f"mmkernels: argument '{name}': expected {H} heads (those of q), got {t.shape[1]}")
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
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of q over (k, v) in the SDPA layout, without materialising the score matrix.

    q (B, H, Lq, E), k (B, H, Lk, E), v (B, H, Lk, Ev) -> (B, H, Lq, Ev), stored as (B, Lq, H, Ev)
    (``out.transpose(1, 2)`` is contiguous: merging the heads is a view). Gradients take the layout
    of q, k, v where it keeps the last dim contiguous.
    key_padding_mask: bool (B, Lk), True = ignore that key. kv_lengths: int (B,), keys >= length ignored.
    attn_mask: bool (True = may attend) or float (added to the scores), broadcastable to (B, H, Lq, Lk).
    scale: defaults to 1/sqrt(E). dropout_p: dropout on the attention probabilities (pass 0.0 in eval);
    its mask derives from a seed drawn from torch's default generator (torch.manual_seed reproduces it).
    A query row that sees no key returns zeros and passes zero gradient.

    A float attn_mask that requires grad takes the PyTorch reference path (which materialises the
    scores) so that its gradient is exact; the fused kernel treats masks as constants.
    """
    _check_attention(q, k, v, key_padding_mask, kv_lengths, attn_mask, dropout_p)
    _check_kv_lengths_values(kv_lengths, k.shape[2])
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    dropout_p = float(dropout_p)
    key = q.device.type.upper()
    mask_needs_grad = (
        attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad and torch.is_grad_enabled()
    )
    if mask_needs_grad or key not in _KERNELS["mmkernels::cross_modal_attention"]:
        if not mask_needs_grad:
            _warn_once(
                f"cma-{key}",
                f"mmkernels: no cross_modal_attention kernel for {key} in this build; using the PyTorch "
                "reference (which materialises the score matrix) instead.",
            )
        return reference.cross_modal_attention(
            q, k, v, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths, attn_mask=attn_mask,
            scale=scale, dropout_p=dropout_p,
        )
    # The seed comes from torch's default generator as a tensor op, so it is reproducible under
    # torch.manual_seed and traceable by torch.compile / torch.export with no graph break.
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0.0 else None
    out, _ = torch.ops.mmkernels.cross_modal_attention.default(
        q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, seed
    )
    return out


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("mmkernels::cross_modal_attention")
def _cross_modal_attention_fake(q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed):
    _fake_check_same_device(q, k=k, v=v, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths, attn_mask=attn_mask)
    B, H, Lq, _ = q.shape
    # The kernels' layouts (csrc/include/attention_layout.h): out is stored as (B, Lq, H, Ev).
    out = q.new_empty((B, Lq, H, v.shape[-1])).permute(0, 2, 1, 3)
    lse = q.new_empty((B, H, Lq), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("mmkernels::cross_modal_attention_backward")
def _cross_modal_attention_backward_fake(
    grad_out, q, k, v, out, lse, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed
):
    _fake_check_same_device(q, grad_out=grad_out, k=k, v=v, out=out, lse=lse, key_padding_mask=key_padding_mask,
                            kv_lengths=kv_lengths, attn_mask=attn_mask)
    return _empty_grad_like(q), _empty_grad_like(k), _empty_grad_like(v)


def _empty_grad_like(x: torch.Tensor) -> torch.Tensor:
    """The kernels' gradient layout (csrc/include/attention_layout.h): x's, if its last dim stays contiguous."""
    t = torch.empty_like(x)
    return t if t.stride(-1) == 1 else x.new_empty(x.shape)


def _cross_modal_attention_setup(ctx, inputs, output):
    q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(lse)  # a by-product for backward, not a result to differentiate
    # Masks and the seed are saved as inputs (never as gradients' targets): the op treats them as
    # constants; a float attn_mask that needs its gradient never reaches this op (see the wrapper).
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, kv_lengths, attn_mask, dropout_seed)


def _cross_modal_attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask, kv_lengths, attn_mask, dropout_seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.mmkernels.cross_modal_attention_backward.default(
        grad_out, q, k, v, out, lse, key_padding_mask, kv_lengths, attn_mask, ctx.scale, ctx.dropout_p, dropout_seed
    )
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd(
    "mmkernels::cross_modal_attention", _cross_modal_attention_backward, setup_context=_cross_modal_attention_setup
)
