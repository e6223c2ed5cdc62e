"""Pure-PyTorch references of every mmkernels op: the test oracle, and the fallback path.

These are written for clarity, not speed: they materialise what the kernels avoid (the
concatenation, the score matrix).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "none": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def fused_concat_linear(
    inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"
) -> torch.Tensor:
    """act(cat(inputs, -1) @ weight.T + bias)."""
    return ACTIVATIONS[activation](F.linear(torch.cat(list(inputs), dim=-1), weight, bias))
