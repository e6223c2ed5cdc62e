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
