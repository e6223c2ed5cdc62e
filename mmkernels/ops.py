"""Thin Python wrappers over torch.ops.mmkernels.*, with their fake (meta) kernels and autograd."""
from __future__ import annotations

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
    out, _ = torch.ops.mmkernels.fused_concat_linear.default(list(inputs), weight, bias, activation)
    return out


@torch.library.register_fake("mmkernels::fused_concat_linear")
def _fused_concat_linear_fake(inputs, weight, bias, activation):
    shape = (*inputs[0].shape[:-1], weight.shape[0])
    preact = weight.new_empty(shape) if activation in _NEEDS_PREACT else weight.new_empty(0)
    return weight.new_empty(shape), preact


@torch.library.register_fake("mmkernels::fused_concat_linear_backward")
def _fused_concat_linear_backward_fake(
    grad_out, inputs, weight, out, preact, activation, inputs_need_grad, weight_needs_grad, bias_needs_grad
):
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
    ctx.num_inputs = len(xs)
    ctx.save_for_backward(*xs, weight, out, preact)


def _fused_concat_linear_backward(ctx, grad_out, _grad_preact):
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
    return rank_weight.new_empty((*inputs[0].shape[:-1], factors[0].shape[2]))


@torch.library.register_fake("mmkernels::low_rank_fusion_backward")
def _low_rank_fusion_backward_fake(
    grad_out, inputs, factors, rank_weight, inputs_need_grad, factors_need_grad, rank_weight_needs_grad, bias_needs_grad
):
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
