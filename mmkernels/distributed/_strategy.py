"""Registering a DTensor sharding strategy for an mmkernels op from a list of placement rules.

torch's experimental `register_sharding` cannot describe ops that return a `Tensor[]` (the backward
ops of fused_concat_linear and low_rank_fusion do), so this is the same idea, written against the
op-strategy API: a rule function sees the op's arguments (each tensor as its DTensorSpec, lists as
tuples of specs, everything else as passed) and returns the acceptable shardings for one mesh
dimension; DTensor expands them over every mesh dimension, prices each against the inputs'
current placements and redistributes the inputs to the cheapest. Outputs are given nested like the
op's returns (a list for a `Tensor[]` return); their shapes come from the op's fake kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy, RuntimeSchemaInfo, TupleStrategy
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy
from torch.distributed.tensor._sharding_prop import _select_min_cost_strategy
from torch.utils import _pytree as pytree


@dataclass
class Rule:
    """One acceptable sharding on one mesh dimension. `outputs` is nested like the op's returns;
    `inputs` has one placement per tensor argument present in the call, in argument order
    (list arguments flattened; absent optional tensors skipped)."""

    outputs: list
    inputs: list


def spec_of(arg):
    """The runtime spec of an argument as the strategy function receives it."""
    if isinstance(arg, OpStrategy):
        return arg.strategies[0].output_spec
    if isinstance(arg, TupleStrategy):
        return tuple(spec_of(child) for child in arg.children)
    return arg


def replicate_everything(args) -> Rule:
    """The rule that is always valid: every tensor, in and out, whole on every rank (outputs=None:
    `register` fills them in, nested like the other rules' outputs)."""
    n_in = sum(isinstance(leaf, DTensorSpec) for leaf in pytree.tree_leaves(args))
    return Rule(outputs=None, inputs=[Replicate()] * n_in)


def _output_metas(op, args, kwargs) -> list[TensorMeta]:
    # The fake kernels registered with torch.library double as meta kernels: running the op on meta
    # tensors of the global shapes gives the global output shapes, strides and dtypes.
    def meta(spec):
        tm = spec.tensor_meta
        return torch.empty_strided(tm.shape, tm.stride, dtype=tm.dtype, device="meta")

    is_spec = lambda x: isinstance(x, DTensorSpec)  # noqa: E731
    out = op(*pytree.tree_map_only(DTensorSpec, meta, args, is_leaf=is_spec),
             **pytree.tree_map_only(DTensorSpec, meta, kwargs, is_leaf=is_spec))
    return [TensorMeta(t.shape, t.stride(), t.dtype) for t in pytree.tree_leaves(out)]


def _nest(flat: list, like) -> object:
    """Put the flat output specs back into the nesting of `like` (a rule's outputs)."""
    it = iter(flat)
    nested = [tuple(next(it) for _ in item) if isinstance(item, (list, tuple)) else next(it) for item in like]
    return tuple(nested)


def register(op: torch._ops.OpOverload, rules_fn: Callable[..., Sequence[Rule]]) -> None:
    """Register `rules_fn(*args)` as op's sharding strategy (replacing any earlier registration)."""
    # Non-tensor arguments (activation, scale, flags, and any trailing ones a later schema adds)
    # change which rules apply, so from the first of them on every argument is part of the cache key.
    first_static = next(
        (i for i, a in enumerate(op._schema.arguments) if not _is_tensor_type(a.type)), len(op._schema.arguments)
    )

    def strategy(op_schema: OpSchema) -> OpStrategy:
        mesh = op_schema.get_mesh_from_args()
        args = tuple(spec_of(a) for a in op_schema.args_schema)
        kwargs = {k: spec_of(v) for k, v in op_schema.kwargs_schema.items()}
        rules = list(rules_fn(*args, **kwargs))
        like = next(r.outputs for r in rules if r.outputs is not None)
        metas = _output_metas(op, args, kwargs)
        for rule in rules:
            if rule.outputs is None:  # replicate_everything: outputs nested like the first real rule
                rule.outputs = [[Replicate()] * len(o) if isinstance(o, (list, tuple)) else Replicate() for o in like]
        flat_rules = [list(pytree.tree_leaves(r.outputs)) + list(r.inputs) for r in rules]
        n_out = len(flat_rules[0]) - len(rules[0].inputs)
        expanded = expand_to_full_mesh_op_strategy(mesh, op_schema, flat_rules, input_index=n_out)
        specs = []
        for choice in expanded.strategies:
            outs = choice.output_specs if isinstance(choice.output_specs, tuple) else (choice.output_specs,)
            outs = [DTensorSpec(s.mesh, s.placements, tensor_meta=m) for s, m in zip(outs, metas)]
            nested = _nest(outs, like) if len(like) > 1 else outs[0]
            specs.append(OpSpec(nested, choice.input_specs, redistribute_cost=choice.redistribute_cost))
        return OpStrategy(specs)

    schema_info = RuntimeSchemaInfo(first_static, needs_pytree=True)
    DTensor._op_dispatcher.sharding_propagator.register_op_strategy(op, strategy, schema_info)
    if _returns_list_among_others(op):
        # DTensor's dispatcher wraps outputs of a single Tensor, a Tensor tuple or a Tensor list, but
        # drops the specs of (Tensor[], Tensor, ...) returns (the backward ops'): such ops go through
        # a handler that applies the same strategy itself.
        DTensor._op_dispatcher._custom_op_handlers[op] = partial(_run_sharded, strategy, schema_info)


def _returns_list_among_others(op) -> bool:
    returns = op._schema.returns
    return len(returns) > 1 and any(isinstance(r.type, torch.ListType) for r in returns)


_CHOSEN: dict[OpSchema, OpSpec] = {}


def _run_sharded(strategy, schema_info, op, args, kwargs):
    """What DTensor's dispatcher does for an op, for the ops it cannot wrap: pick the cheapest
    sharding, redistribute the DTensor arguments to it, run the op on the local shards, wrap them."""
    flat, tree = pytree.tree_flatten((args, kwargs))
    is_dt = [isinstance(a, DTensor) for a in flat]
    mesh = next(a.device_mesh for a, d in zip(flat, is_dt) if d)
    # Plain one-element tensors among DTensors (the ops' seed): replicated, as DTensor itself treats
    # them; any other plain tensor is refused, as DTensor does.
    for a, d in zip(flat, is_dt):
        if not d and isinstance(a, torch.Tensor) and a.numel() != 1:
            raise RuntimeError(f"{op}: got mixed torch.Tensor and DTensor; convert every tensor to a DTensor first")
    flat = [
        a if d or not isinstance(a, torch.Tensor)
        else DTensor.from_local(a, mesh, [Replicate()] * mesh.ndim, run_check=False)
        for a, d in zip(flat, is_dt)
    ]
    spec_args, spec_kwargs = pytree.tree_unflatten([a._spec if isinstance(a, DTensor) else a for a in flat], tree)
    schema = OpSchema(op, tuple(spec_args), spec_kwargs, schema_info=schema_info)
    chosen = _CHOSEN.get(schema)
    if chosen is None:  # as DTensor's own propagation, cached on (op, specs, non-tensor arguments)
        propagator = DTensor._op_dispatcher.sharding_propagator
        chosen = _select_min_cost_strategy(strategy(propagator._wrap_with_op_strategy(schema)), schema)
        if len(_CHOSEN) >= 1024:
            _CHOSEN.clear()
        _CHOSEN[schema] = chosen
    wanted = iter(chosen.input_specs)
    local = []
    for a in flat:
        if isinstance(a, DTensor):
            a = a.redistribute(a.device_mesh, next(wanted).placements).to_local()
        local.append(a)
    local_args, local_kwargs = pytree.tree_unflatten(local, tree)
    return DTensor._op_dispatcher.wrap(op(*local_args, **local_kwargs), chosen.output_specs)


def _is_tensor_type(t) -> bool:
    if isinstance(t, torch.OptionalType):
        t = t.getElementType()
    if isinstance(t, torch.ListType):
        t = t.getElementType()
    return isinstance(t, torch.TensorType)
