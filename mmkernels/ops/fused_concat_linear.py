"""fused_concat_linear: act(cat(inputs, -1) @ weight.T + bias) without the concatenation. Checks, the
public function, fakes, autograd."""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from .. import reference
from .._errors import ArgumentError
from ._common import (KERNELS, check_same_leading_dims, differentiable_backward, fake_check_same_device, plain_eager,
                      warn_once)
from .._C import concat_linear_small

ACTIVATIONS = tuple(reference.ACTIVATIONS)
# Activations whose backward needs the pre-activation (the others' derivative is a function of the output).
_NEEDS_PREACT = ("gelu", "gelu_tanh", "silu")


def _check_concat_linear(inputs, weight, bias, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ArgumentError(f"mmkernels: argument 'activation': expected one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ArgumentError("mmkernels: argument 'inputs': expected a non-empty list or tuple of tensors")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ArgumentError("mmkernels: argument 'weight': expected a 2-D (out_features, in_features) tensor")
    total = 0
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ArgumentError(f"mmkernels: argument 'inputs[{i}]': expected a tensor of shape (..., features)")
        if x.dtype != weight.dtype:
            raise ArgumentError(f"mmkernels: argument 'inputs[{i}]': expected dtype {weight.dtype}, got {x.dtype}")
        if x.device != weight.device:
            raise ArgumentError(f"mmkernels: argument 'inputs[{i}]': expected device {weight.device}, got {x.device}")
        total += x.shape[-1]
    check_same_leading_dims(inputs)
    if weight.shape[1] != total:
        raise ArgumentError(
            f"mmkernels: argument 'weight': expected {total} columns (the sum of the inputs' feature sizes), "
            f"got shape {tuple(weight.shape)}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ArgumentError(f"mmkernels: argument 'bias': expected a tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ArgumentError(
                f"mmkernels: argument 'bias': expected shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ArgumentError(
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
    if not torch.compiler.is_compiling():
        # The shape rules below, whole, in one C++ call for a plain eager call on the CPU; None otherwise
        # (and for any wrong argument, which the checks below then name).
        out = concat_linear_small(inputs, weight, bias, activation, ONEDNN_MIN_MACS, None)
        if out is not None:
            return out
    _check_concat_linear(inputs, weight, bias, activation)
    key = weight.device.type.upper()
    if key not in KERNELS["mmkernels::fused_concat_linear"]:
        warn_once(
            f"fcl-{key}",
            f"mmkernels: no fused_concat_linear kernel for {key} in this build; using the PyTorch reference "
            "(torch.cat + F.linear) instead.",
        )
        return reference.fused_concat_linear(inputs, weight, bias, activation)
    if key == "CPU" and (_few_rows(inputs, weight) or _small(inputs, weight)):
        # Shape rules (issue 2, measured in benchmarks/RESULTS.md): with M * 8 <= N rows the
        # concatenation is small next to W, so there is nothing to fuse away, and PyTorch's own
        # cat + linear + activation beats any call into an op by its fixed cost. torch.ops callers
        # still get the op, whose kernel takes the same concatenate-then-one-GEMM path. The same for
        # a GEMM below oneDNN's size (issue 19): the kernel would run ATen's GEMM, as F.linear does.
        # (csrc/small_calls.cpp takes the same rule first for plain eager calls; this is the route of
        # the others: tensor subclasses, modes, functorch.)
        return reference.fused_concat_linear(inputs, weight, bias, activation)
    if plain_eager(*inputs, weight, bias):
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


def _few_rows(inputs, weight) -> bool:
    """The kernels' concat_is_cheaper rule (csrc/cpu/fused_concat_linear.cpp): several inputs and M * 8 <= N."""
    return len(inputs) > 1 and math.prod(inputs[0].shape[:-1]) * 8 <= weight.shape[0]


# csrc/cpu/matmul.cpp's kOneDnnMinMacs and its override (the tests set 0, so that the kernel serves their
# small shapes): below it every GEMM of the kernel is ATen's mm.
ONEDNN_MIN_MACS = max(0, int(os.environ.get("MMKERNELS_ONEDNN_MIN_MACS", 1 << 24)))


def _small(inputs, weight) -> bool:
    return math.prod(inputs[0].shape[:-1]) * weight.shape[0] * weight.shape[1] < ONEDNN_MIN_MACS


@torch.library.register_fake("mmkernels::fused_concat_linear")
def _fused_concat_linear_fake(inputs, weight, bias, activation):
    fake_check_same_device(weight, **{f"inputs[{i}]": x for i, x in enumerate(inputs)}, bias=bias)
    shape = (*inputs[0].shape[:-1], weight.shape[0])
    preact = weight.new_empty(shape) if activation in _NEEDS_PREACT else weight.new_empty(0)
    return weight.new_empty(shape), preact


@torch.library.register_fake("mmkernels::fused_concat_linear_backward")
def _fused_concat_linear_backward_fake(
    grad_out, inputs, weight, out, preact, activation, inputs_need_grad, weight_needs_grad, bias_needs_grad
):
    fake_check_same_device(weight, grad_out=grad_out, **{f"inputs[{i}]": x for i, x in enumerate(inputs)},
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
    # bias only for a double backward, which recomputes the pre-activation (a view: no copy).
    ctx.save_for_backward(*xs, weight, bias, out if keep_out else weight.new_empty(0), preact)


def _fused_concat_linear_backward(ctx, grad_out, _grad_preact):
    if grad_out is None:  # only the (internal) pre-activation output was used
        return [None] * len(ctx.inputs_need_grad), None, None, None
    *xs, weight, bias, out, preact = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True or torch.func: see _double_backward
        grad_weight, grad_bias, *grad_inputs = _double_backward(
            grad_out, xs, weight, bias, ctx.activation,
            [ctx.weight_needs_grad, ctx.bias_needs_grad, *ctx.inputs_need_grad],
        )
        return grad_inputs, grad_weight, grad_bias, None
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


def _double_backward(grad_out, xs, weight, bias, activation, needs_grad):
    """[grad_weight, grad_bias, *grad_inputs] from the reference's differentiable operations (which
    materialise the concatenation), for a backward that is itself differentiated."""
    return differentiable_backward(
        lambda w, b, *inputs: reference.fused_concat_linear(inputs, w, b, activation),
        grad_out, [weight, bias, *xs], needs_grad,
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
        ctx.save_for_backward(*inputs, weight, bias, out if keep_out else weight.new_empty(0), preact)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *xs, weight, bias, out, preact = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: see _double_backward
            grad_weight, grad_bias, *grad_inputs = _double_backward(
                grad_out, xs, weight, bias, ctx.activation, [need[0], need[1], *need[3:]]
            )
            return grad_weight, grad_bias, None, *grad_inputs
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
