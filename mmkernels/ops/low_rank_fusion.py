"""low_rank_fusion (LMF's product of projections). Checks, the public function, fakes, autograd."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import reference
from .._errors import ArgumentError
from ._common import KERNELS, check_same_leading_dims, differentiable_backward, fake_check_same_device, warn_once


def _check_low_rank_fusion(inputs, factors, rank_weight, bias) -> None:
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ArgumentError("mmkernels: argument 'inputs': expected a non-empty list or tuple of tensors")
    if not isinstance(factors, (list, tuple)) or len(factors) != len(inputs):
        raise ArgumentError(f"mmkernels: argument 'factors': expected a list of {len(inputs)} tensors (one per input)")
    if not isinstance(rank_weight, torch.Tensor) or rank_weight.dim() != 1:
        raise ArgumentError("mmkernels: argument 'rank_weight': expected a 1-D (rank,) tensor")
    dtype, device, rank = rank_weight.dtype, rank_weight.device, rank_weight.shape[0]
    if not isinstance(factors[0], torch.Tensor) or factors[0].dim() != 3:
        raise ArgumentError(
            "mmkernels: argument 'factors[0]': expected a 3-D (rank, in_features + 1, out_features) tensor"
        )
    n = factors[0].shape[2]
    for i, (x, f) in enumerate(zip(inputs, factors)):
        for name, t in ((f"inputs[{i}]", x), (f"factors[{i}]", f)):
            if not isinstance(t, torch.Tensor) or t.dim() < 1:
                raise ArgumentError(f"mmkernels: argument '{name}': expected a tensor, got {type(t).__name__}")
            if t.dtype != dtype or t.device != device:
                raise ArgumentError(
                    f"mmkernels: argument '{name}': expected {dtype} on {device} (as rank_weight), got {t.dtype} on {t.device}"
                )
        if f.shape != (rank, x.shape[-1] + 1, n):
            raise ArgumentError(
                f"mmkernels: argument 'factors[{i}]': expected shape ({rank}, {x.shape[-1] + 1}, {n}) = "
                f"(rank, inputs[{i}].size(-1) + 1, out_features), got {tuple(f.shape)}"
            )
    check_same_leading_dims(inputs)
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ArgumentError(f"mmkernels: argument 'bias': expected a tensor or None, got {type(bias).__name__}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != dtype or bias.device != device):
        raise ArgumentError(
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
    # CPU and CUDA have kernels; only a device the build has none for (a CPU-only build with CUDA
    # tensors, or another backend) takes the reference, with a warning.
    if key not in KERNELS["mmkernels::low_rank_fusion"]:
        warn_once(
            f"lrf-{key}",
            f"mmkernels: no low_rank_fusion kernel for {key} in this build; using the PyTorch reference instead.",
        )
        return reference.low_rank_fusion(inputs, factors, rank_weight, bias)
    return torch.ops.mmkernels.low_rank_fusion.default(list(inputs), list(factors), rank_weight, bias)


@torch.library.register_fake("mmkernels::low_rank_fusion")
def _low_rank_fusion_fake(inputs, factors, rank_weight, bias):
    fake_check_same_device(rank_weight, **{f"inputs[{i}]": x for i, x in enumerate(inputs)},
                            **{f"factors[{i}]": f for i, f in enumerate(factors)}, bias=bias)
    return rank_weight.new_empty((*inputs[0].shape[:-1], factors[0].shape[2]))


@torch.library.register_fake("mmkernels::low_rank_fusion_backward")
def _low_rank_fusion_backward_fake(
    grad_out, inputs, factors, rank_weight, inputs_need_grad, factors_need_grad, rank_weight_needs_grad, bias_needs_grad
):
    fake_check_same_device(rank_weight, grad_out=grad_out, **{f"inputs[{i}]": x for i, x in enumerate(inputs)},
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
    # Only the inputs and parameters: backward recomputes the projections (bias: for a double backward).
    ctx.save_for_backward(*xs, *factors, rank_weight, bias)


def _low_rank_fusion_backward(ctx, grad_out):
    saved = ctx.saved_tensors
    m = ctx.num_inputs
    xs, factors, rank_weight, bias = saved[:m], saved[m : 2 * m], saved[2 * m], saved[2 * m + 1]
    if torch.is_grad_enabled():
        # create_graph=True or torch.func: the backward op has no derivative, so differentiate the
        # reference's operations (which materialise every (..., rank, N) projection) instead.
        grads = differentiable_backward(
            lambda w, b, *tensors: reference.low_rank_fusion(tensors[:m], tensors[m:], w, b),
            grad_out, [rank_weight, bias, *xs, *factors],
            [ctx.rank_weight_needs_grad, ctx.bias_needs_grad, *ctx.inputs_need_grad, *ctx.factors_need_grad],
        )
        return grads[2 : 2 + m], grads[2 + m :], grads[0], grads[1]
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
