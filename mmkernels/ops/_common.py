"""What the op files share: the loaded library and its kernel table, warn-once, the plain-eager test,
the inputs' leading-dims check and the fake kernels' device check."""
from __future__ import annotations

import warnings

import torch

from .. import _build
from .._errors import ArgumentError

_build.load_library()
KERNELS = _build.kernel_table()
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors) -> bool:
    """True for a plain eager call on `tensors` (None allowed): plain tensors, no torch.compile/export
    tracing, no torch-function or dispatch mode, no functorch transform. Only then does
    fused_concat_linear take its direct route (see _FusedConcatLinearEager), or CrossModalAttention
    its recomputing weights; anything else goes through registered ops and formulas, which every
    tracer and transform understands."""
    return (
        not torch.compiler.is_compiling()
        and all(t is None or type(t) in TENSOR_TYPES for t in tensors)
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def check_same_leading_dims(inputs) -> None:
    """Every ``inputs[i]`` (a tensor of shape (..., features)) has the leading dims of inputs[0]."""
    lead = inputs[0].shape[:-1]
    for i, x in enumerate(inputs):
        if x.shape[:-1] != lead:
            raise ArgumentError(
                f"mmkernels: argument 'inputs[{i}]': expected leading dims {tuple(lead)} (those of inputs[0]), "
                f"got {tuple(x.shape[:-1])}"
            )


def fake_check_same_device(ref: torch.Tensor, **named) -> None:
    # The fake (Meta) kernel is also what the dispatcher picks when a meta tensor is mixed with real
    # ones, so it must refuse mixed devices itself, or the raw op would return a meta tensor silently.
    for name, t in named.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"mmkernels: argument '{name}': expected device {ref.device}, got {t.device}")


def differentiable_backward(reference_fn, grad_out, inputs, needs_grad) -> list:
    """The gradients of ``reference_fn(*inputs)`` for the inputs flagged in ``needs_grad`` (None for the
    others), built from differentiable PyTorch operations so that they have a derivative themselves.

    The backward ops have none, so a formula that finds grad mode on inside backward (backward with
    create_graph=True, torch.func transforms) computes its gradients here instead: a second derivative
    through the backward op would come back as zeros, silently."""
    wrt = [t for t, need in zip(inputs, needs_grad) if need]
    if not wrt:
        return [None] * len(inputs)
    with torch.enable_grad():
        out = reference_fn(*inputs)
    grads = iter(torch.autograd.grad(out, wrt, grad_out, create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in needs_grad]
