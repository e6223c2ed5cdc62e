"""FusedConcatLinear: a drop-in for nn.Linear(sum(in_features), out) applied to torch.cat(inputs, -1)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from .. import ops
from .._C import concat_linear_small
from .._errors import ArgumentError
from ..ops.fused_concat_linear import ONEDNN_MIN_MACS


class FusedConcatLinear(nn.Module):
    """``act(Linear(cat(inputs, -1)))`` without building the concatenation.

    Parameters are named and shaped as in ``nn.Linear(sum(in_features), out_features)``
    (``weight (N, K)``, ``bias (N,)``), so state dicts load both ways.

    ``forward(*inputs)``, ``forward([inputs])`` and ``forward({name: input})`` all work; a dict is
    concatenated in sorted key order.
    """

    def __init__(
        self,
        in_features: Sequence[int],
        out_features: int,
        bias: bool = True,
        activation: str = "none",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        in_features = tuple(int(d) for d in in_features)
        if not in_features or any(d <= 0 for d in in_features):
            raise ArgumentError(
                f"FusedConcatLinear: argument 'in_features': expected positive sizes, got {in_features}"
            )
        if activation not in ops.ACTIVATIONS:
            raise ArgumentError(
                f"FusedConcatLinear: argument 'activation': expected one of {ops.ACTIVATIONS}, got {activation!r}"
            )
        if int(out_features) < 0:
            raise ArgumentError(f"FusedConcatLinear: argument 'out_features': expected a size >= 0, got {out_features}")
        self.in_features = in_features
        self.out_features = int(out_features)
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_features, sum(in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The initialisation of nn.Linear, so a fresh module is distributed like the one it replaces.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1]) if self.weight.shape[1] > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, *inputs) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            # Small shapes, plain eager: the op's shape rule and this module's size check in one C++ call
            # (csrc/small_calls.cpp); None for anything else (a list or dict of inputs included), checked
            # below. The parameters straight from _parameters: nn.Module.__getattr__ costs ~1 us each.
            params = self._parameters
            weight = params["weight"] if "weight" in params else self.weight
            bias = params["bias"] if "bias" in params else self.bias
            out = concat_linear_small(inputs, weight, bias, self.activation, ONEDNN_MIN_MACS, self.in_features)
            if out is not None:
                return out
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            inputs = tuple(inputs[0][k] for k in sorted(inputs[0]))
        elif len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        sizes = tuple(x.shape[-1] for x in inputs)
        if sizes != self.in_features:
            raise ArgumentError(
                f"FusedConcatLinear: expected inputs with feature sizes {self.in_features}, got {sizes}"
            )
        return ops.fused_concat_linear(inputs, self.weight, self.bias, self.activation)

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_features: Sequence[int], activation: str = "none") -> "FusedConcatLinear":
        """A FusedConcatLinear that shares ``linear``'s parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FusedConcatLinear.from_linear: argument 'linear': expected nn.Linear, got {type(linear).__name__}")
        if sum(in_features) != linear.in_features:
            raise ArgumentError(
                f"FusedConcatLinear.from_linear: argument 'in_features': sizes {tuple(in_features)} sum to "
                f"{sum(in_features)}, but the linear layer takes {linear.in_features}"
            )
        module = cls(in_features, linear.out_features, bias=linear.bias is not None, activation=activation,
                     device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.activation!r}"
        )
