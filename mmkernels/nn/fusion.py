"""Fusion layers built on the fused ops: ConcatFusion, GatedMultimodalUnit, LowRankFusion, FiLM.

Multi-input layers take their modalities as ``forward(a, b, c)``, ``forward([a, b, c])`` or
``forward({"name": tensor})``; a dict is read in sorted key order (the TorchMultimodal convention),
and when the layer was built from a ``{name: features}`` mapping the keys must match it.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

import torch
from torch import nn

from .. import ops
from .._errors import ArgumentError
from .fused_concat_linear import FusedConcatLinear

Features = Union[Sequence[int], Mapping[str, int]]


def _feature_spec(owner: str, in_features: Features, min_inputs: int = 1):
    """(names or None, sizes) from a list of sizes or a {name: size} mapping (sorted by name)."""
    if isinstance(in_features, Mapping):
        names = tuple(sorted(in_features))
        sizes = tuple(int(in_features[k]) for k in names)
    else:
        names, sizes = None, tuple(int(d) for d in in_features)
    if len(sizes) < min_inputs or any(d <= 0 for d in sizes):
        raise ArgumentError(
            f"{owner}: argument 'in_features': expected at least {min_inputs} positive sizes, got {in_features!r}"
        )
    return names, sizes


def _gather(owner: str, names, sizes, inputs: tuple, arg: str = "inputs") -> list:
    """The modality tensors in the layer's order, checked against the expected feature sizes."""
    if len(inputs) == 1 and isinstance(inputs[0], Mapping):
        given = tuple(sorted(inputs[0]))
        if names is not None and given != names:
            raise ArgumentError(f"{owner}: argument '{arg}': expected modalities {list(names)}, got {list(given)}")
        xs = [inputs[0][k] for k in given]
    elif len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
        xs = list(inputs[0])
    else:
        xs = list(inputs)
    if len(xs) != len(sizes):
        raise ArgumentError(f"{owner}: argument '{arg}': expected {len(sizes)} modalities, got {len(xs)}")
    for i, (x, d) in enumerate(zip(xs, sizes)):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != d:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            label = names[i] if names is not None else i
            raise ArgumentError(f"{owner}: argument '{arg}[{label!r}]': expected a tensor (..., {d}), got {got}")
    return xs


class ConcatFusion(nn.Module):
    """Concatenation fusion: ``act(Linear(cat(inputs, -1)))`` through ``fused_concat_linear``.

    With ``out_features=None`` it only concatenates (in sorted key order for a dict).
    """

    def __init__(self, in_features: Features, out_features: int | None = None, activation: str = "none",
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.names, self.in_features = _feature_spec("ConcatFusion", in_features)
        self.out_features = out_features
        self.proj = None
        if out_features is not None:
            self.proj = FusedConcatLinear(self.in_features, out_features, bias=bias, activation=activation,
                                          device=device, dtype=dtype)
        elif activation != "none":
            raise ArgumentError("ConcatFusion: argument 'activation': needs out_features (there is no projection)")

    def forward(self, *inputs) -> torch.Tensor:
        xs = _gather("ConcatFusion", self.names, self.in_features, inputs)
        return torch.cat(xs, dim=-1) if self.proj is None else self.proj(xs)


class GatedMultimodalUnit(nn.Module):
    """GMU (Arevalo et al. 2017) generalised to k >= 2 modalities.

    ``h_i = tanh(W_i x_i + b_i)`` (plain nn.Linear: one input, nothing to fuse); the gate reads every
    input through one ``fused_concat_linear`` (no concatenation). k = 2 keeps the paper's form: ``z = sigmoid(.)`` (N gate
    units, the sigmoid fused into the kernel), ``h = z * h_0 + (1 - z) * h_1``. k > 2 uses a softmax over
    the modalities of a ``(k, N)`` gate, so the weights stay a convex combination as with k = 2.
    """

    def __init__(self, in_features: Features, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.names, self.in_features = _feature_spec("GatedMultimodalUnit", in_features, min_inputs=2)
        self.out_features = int(out_features)
        k = len(self.in_features)
        factory = {"device": device, "dtype": dtype}
        self.projections = nn.ModuleList(nn.Linear(d, self.out_features, bias=bias, **factory) for d in self.in_features)
        gate_out = self.out_features if k == 2 else k * self.out_features
        self.gate = FusedConcatLinear(self.in_features, gate_out, bias=bias,
                                      activation="sigmoid" if k == 2 else "none", **factory)

    def forward(self, *inputs) -> torch.Tensor:
        xs = _gather("GatedMultimodalUnit", self.names, self.in_features, inputs)
        hs = [torch.tanh(proj(x)) for proj, x in zip(self.projections, xs)]
        z = self.gate(xs)
        if len(hs) == 2:
            return torch.lerp(hs[1], hs[0], z)  # z * h_0 + (1 - z) * h_1
        z = torch.softmax(z.unflatten(-1, (len(hs), self.out_features)), dim=-2)
        return (z * torch.stack(hs, dim=-2)).sum(-2)


class LowRankFusion(nn.Module):
    """LMF (Liu et al. 2018): low-rank multimodal fusion through the fused ``low_rank_fusion`` op.

    ``out = bias + sum_k rank_weight[k] * prod_m ([x_m, 1] @ factors[m][k])`` with ``factors[m]`` of
    shape ``(rank, D_m + 1, out_features)``: the outer product of the ``[x_m, 1]`` tensor product
    never appears, and the fused op does not keep the per-modality ``(B, rank, N)`` projections.
    """

    def __init__(self, in_features: Features, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.names, self.in_features = _feature_spec("LowRankFusion", in_features)
        if int(rank) <= 0:
            raise ArgumentError(f"LowRankFusion: argument 'rank': expected a positive int, got {rank!r}")
        if int(out_features) <= 0:
            raise ArgumentError(
                f"LowRankFusion: argument 'out_features': expected a positive int, got {out_features!r}"
            )
        self.out_features, self.rank = int(out_features), int(rank)
        factory = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(self.rank, d + 1, self.out_features, **factory)) for d in self.in_features
        )
        self.rank_weight = nn.Parameter(torch.empty(self.rank, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The paper's code: xavier-normal factors and rank weights (as a (1, rank) matrix), zero bias.
        for f in self.factors:
            nn.init.xavier_normal_(f)
        nn.init.normal_(self.rank_weight, std=math.sqrt(2.0 / (1 + self.rank)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, *inputs) -> torch.Tensor:
        xs = _gather("LowRankFusion", self.names, self.in_features, inputs)
        return ops.low_rank_fusion(xs, list(self.factors), self.rank_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class FiLM(nn.Module):
    """FiLM (Perez et al. 2018): ``gamma, beta = Linear(cond)``; ``out = gamma * x + beta``.

    ``x`` has ``num_features`` along ``dim`` (last by default; ``dim=1`` for (B, C, H, W) feature maps).
    ``cond`` is one tensor ``(*batch, C)`` or several (list/dict, read through ``fused_concat_linear``)
    whose leading dims ``*batch`` are a prefix of x's other dims; gamma and beta broadcast over the
    remaining (sequence or spatial) dims.
    """

    def __init__(self, num_features: int, cond_features: Union[int, Features], dim: int = -1, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(cond_features, int):
            cond_features = (cond_features,)
        self.names, self.cond_features = _feature_spec("FiLM", cond_features)
        if int(num_features) <= 0:
            raise ArgumentError(f"FiLM: argument 'num_features': expected a positive int, got {num_features!r}")
        self.num_features, self.dim = int(num_features), int(dim)
        self.proj = FusedConcatLinear(self.cond_features, 2 * self.num_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cond) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not -x.dim() <= self.dim < x.dim():
            raise ArgumentError(f"FiLM: argument 'x': expected a tensor with a feature axis at dim {self.dim}")
        if x.shape[self.dim] != self.num_features:
            raise ArgumentError(
                f"FiLM: argument 'x': expected {self.num_features} features along dim {self.dim}, got shape {tuple(x.shape)}"
            )
        conds = _gather("FiLM", self.names, self.cond_features, (cond,),
                        arg="cond")
        xt = x.movedim(self.dim, -1)
        batch = conds[0].shape[:-1]
        if len(batch) > xt.dim() - 1 or xt.shape[: len(batch)] != batch:
            raise ArgumentError(
                f"FiLM: argument 'cond': leading dims {tuple(batch)} must be a prefix of x's non-feature dims "
                f"{tuple(xt.shape[:-1])}"
            )
        gamma, beta = self.proj(conds).chunk(2, dim=-1)
        shape = (*batch, *([1] * (xt.dim() - 1 - len(batch))), self.num_features)
        return torch.addcmul(beta.reshape(shape), gamma.reshape(shape), xt).movedim(-1, self.dim)
