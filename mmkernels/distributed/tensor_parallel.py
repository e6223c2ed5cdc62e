"""Tensor-parallel styles for mmkernels modules, for `torch.distributed.tensor.parallel.parallelize_module`.

    plan = {"attn": CrossModalAttentionHeadParallel(), "head.up": FusedConcatLinearColwise(),
            "head.down": FusedConcatLinearRowwise()}
    parallelize_module(model, mesh, plan)

CrossModalAttentionHeadParallel  each rank owns num_heads / world heads: the rows of each q/k/v block
    of the packed in_proj_weight (a _StridedShard with split_factor 3, so the state_dict and the
    optimizer still see the packed parameter), the matching out_proj columns (out_proj runs
    row-wise: one all-reduce of the output per call). Inputs and output are plain replicated tensors.
FusedConcatLinearColwise / FusedConcatLinearRowwise  torch's Colwise/RowwiseParallel for a
    FusedConcatLinear (torch's accept nn.Linear only): weight rows (outputs) or columns (inputs) split;
    the op runs on DTensors through the sharding rules in sharding.py. Row-wise takes one input only
    (the columns of several inputs' concatenation do not split along each input).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils import _pytree as pytree

from .. import ops
from ..nn import CrossModalAttention, FusedConcatLinear
from ..nn._attention_masks import normalise
from ..nn.cross_modal_attention import _linear

_STYLE = "CrossModalAttentionHeadParallel"


# ------------------------------------------------------------------ FusedConcatLinear


def _to_dtensors(input_layout, desired_layout, mod, inputs, device_mesh):
    """Every input tensor (positional, or in the list / dict FusedConcatLinear also takes) to a DTensor
    in the layout the style wants; they arrive in `input_layout`."""

    def convert(x):
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, device_mesh, (input_layout,), run_check=False)
        if x.placements != (desired_layout,):
            x = x.redistribute(placements=(desired_layout,), async_op=False)
        return x

    return pytree.tree_map_only(torch.Tensor, convert, inputs)


class FusedConcatLinearColwise(ColwiseParallel):
    """ColwiseParallel for FusedConcatLinear (any number of inputs): weight and bias split by output
    rows; inputs replicated; output sharded on its last dim (as `output_layouts` says)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, FusedConcatLinear):
            raise TypeError(f"FusedConcatLinearColwise: expected a FusedConcatLinear, got {type(module).__name__}")
        return distribute_module(
            module,
            device_mesh,
            self._partition_linear_fn,
            partial(_to_dtensors, self.input_layouts[0], self.desired_input_layouts[0]),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class FusedConcatLinearRowwise(RowwiseParallel):
    """RowwiseParallel for a single-input FusedConcatLinear: weight split by input columns, bias
    replicated (added once, in the reduction); input sharded on its last dim; output replicated
    after one all-reduce (or as `output_layouts` says)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, FusedConcatLinear):
            raise TypeError(f"FusedConcatLinearRowwise: expected a FusedConcatLinear, got {type(module).__name__}")
        if len(module.in_features) != 1:
            raise ValueError(
                f"FusedConcatLinearRowwise: expected a FusedConcatLinear with one input, got in_features="
                f"{list(module.in_features)}: the columns of a concatenation do not split along each input; "
                "use FusedConcatLinearColwise, or shard the inputs' producers instead"
            )
        if module.activation != "none":
            raise ValueError(
                f"FusedConcatLinearRowwise: expected activation 'none', got {module.activation!r}: each rank "
                "computes a partial sum, and an activation of a partial sum is not the activation of the sum"
            )
        return distribute_module(
            module,
            device_mesh,
            self._partition_linear_fn,
            partial(_to_dtensors, self.input_layouts[0], Shard(-1)),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


# ------------------------------------------------------------------ CrossModalAttention


class CrossModalAttentionHeadParallel(ParallelStyle):
    """Shard a CrossModalAttention by heads over a 1-D mesh (see the module docstring).

    Limits, each refused with an error: num_heads must split evenly; add_bias_kv / add_zero_attn are
    not supported; forward needs need_weights=False (the weights would need every head). With
    dropout, each rank draws its heads' masks from one draw of the default generator plus its rank
    (seed every rank alike): every head gets its own mask, reproducible and replayed exactly by
    activation checkpointing, but not the mask a single process would draw.
    """

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, CrossModalAttention):
            raise TypeError(f"{_STYLE}: expected a CrossModalAttention, got {type(module).__name__}")
        if device_mesh.ndim != 1:
            raise ValueError(f"{_STYLE}: expected a 1-D device mesh, got shape {tuple(device_mesh.shape)}")
        world = device_mesh.size()
        if module.num_heads % world != 0:
            raise ValueError(
                f"{_STYLE}: expected num_heads divisible by the mesh size {world}, got num_heads={module.num_heads}"
            )
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"{_STYLE}: add_bias_kv and add_zero_attn are not supported under head parallelism")
        packed = _StridedShard(0, split_factor=3)  # rows of each of the q, k, v blocks
        plan = {
            "in_proj_weight": packed,
            "in_proj_bias": packed,
            "q_proj_weight": Shard(0),
            "k_proj_weight": Shard(0),
            "v_proj_weight": Shard(0),
        }
        for name, placement in plan.items():
            param = getattr(module, name)
            if param is not None:
                sharded = distribute_tensor(param.detach(), device_mesh, [placement])
                module.register_parameter(name, nn.Parameter(sharded))
        for name, placement in (("weight", Shard(1)), ("bias", Replicate())):
            param = getattr(module.out_proj, name)
            if param is not None:
                module.out_proj.register_parameter(
                    name, nn.Parameter(distribute_tensor(param.detach(), device_mesh, [placement]))
                )
        module._tp_mesh = device_mesh
        module.__class__ = _HeadParallelCrossModalAttention
        return module


def _enter(x: torch.Tensor, mesh) -> torch.Tensor:
    """Identity forward; in backward, sums the gradient over the ranks (each saw only its heads)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _sum_over_ranks(x: torch.Tensor, mesh) -> torch.Tensor:
    """All-reduce of per-rank partial sums; in backward, every rank gets the whole gradient."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


def _attention_with_rank_seed(attention, dropout_p, rank):
    """The op with dropout, its mask seed drawn per rank: the kernel hashes (seed, local head), so
    with one seed on every rank (torch.manual_seed alike everywhere) rank r's head h would drop what
    rank 0's head h drops. One draw from the default generator (the same on every rank, and replayed
    by activation checkpointing, which restores the generator) plus the rank seeds a forked generator."""
    base = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(base + rank)  # the CPU generator only: fork_rng restores it
        return attention(dropout_p=dropout_p)


class _HeadParallelCrossModalAttention(CrossModalAttention):
    """A CrossModalAttention after CrossModalAttentionHeadParallel: same parameters (as DTensors),
    forward on this rank's heads."""

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights: bool = True,
        attn_mask=None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if need_weights:
            raise ValueError(
                f"{_STYLE}: argument 'need_weights': expected False (each rank holds only some heads, "
                "so there are no whole attention weights to return)"
            )
        inputs = normalise(self, query, key, value, key_padding_mask, attn_mask, is_causal)
        query, key, value, seq_dim = inputs.query, inputs.key, inputs.value, inputs.seq_dim
        batch, len_q = inputs.batch, inputs.len_q
        mesh = self._tp_mesh
        world, rank = mesh.size(), mesh.get_local_rank()
        heads, e = self.num_heads // world, self.embed_dim // world

        entered: dict[int, torch.Tensor] = {}  # keeps `query is key` visible after _enter
        for t in (query, key, value):
            if id(t) not in entered:
                entered[id(t)] = _enter(t, mesh)
        query, key, value = entered[id(query)], entered[id(key)], entered[id(value)]
        bias = None if self.in_proj_bias is None else self.in_proj_bias.to_local()
        bq, bk, bv = (None,) * 3 if bias is None else bias.split(e)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight.to_local()
            if query is key and key is value:
                q, k, v = _linear(query, w, bias).split(e, dim=-1)
            else:
                wq, wk, wv = w.split(e)
                q, k, v = _linear(query, wq, bq), _linear(key, wk, bk), _linear(value, wv, bv)
        else:
            q = _linear(query, self.q_proj_weight.to_local(), bq)
            k = _linear(key, self.k_proj_weight.to_local(), bk)
            v = _linear(value, self.v_proj_weight.to_local(), bv)

        def split_heads(x):
            x = x.unflatten(-1, (heads, self.head_dim))
            return x.permute(1, 2, 0, 3) if seq_dim == 0 else x.permute(0, 2, 1, 3)

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        kpm, mask = inputs.key_padding_mask, inputs.op_attn_mask
        if mask is not None and mask.dim() == 4 and mask.shape[1] == self.num_heads > heads:  # this rank's heads
            mask = mask[:, rank * heads : (rank + 1) * heads]
        dropout_p = self.dropout if self.training else 0.0
        attention = partial(ops.cross_modal_attention, q, k, v, key_padding_mask=kpm, attn_mask=mask,
                            is_causal=inputs.causal)
        out = _attention_with_rank_seed(attention, dropout_p, rank) if dropout_p > 0.0 else attention()
        if seq_dim == 0:
            out = out.permute(2, 0, 1, 3).reshape(len_q, batch, e)
        else:
            out = out.transpose(1, 2).reshape(batch, len_q, e)
        # out_proj row-wise: this rank's columns give a partial sum; the bias is added once, after.
        out = _sum_over_ranks(F.linear(out, self.out_proj.weight.to_local()), mesh)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias.to_local()
        return (out if inputs.batched else out.squeeze(0)), None
