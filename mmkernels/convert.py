"""convert(model): swap the standard fusion layers of an existing model for the fused ones.

Two rewrites, each optional:

* attention: every ``nn.MultiheadAttention`` (exactly that class, wherever it sits: user modules,
  ``nn.TransformerEncoderLayer.self_attn``, ``nn.TransformerDecoderLayer.multihead_attn``, ...)
  becomes a ``CrossModalAttention`` sharing its parameters, under the same attribute name.
* concat_linear: in each user-defined module whose ``forward`` traces with ``torch.fx`` (child
  modules kept opaque, ``nn.Sequential`` containers looked into; an ``fx.GraphModule``'s own graph), ``linear(torch.cat([...], dim))``
  -- ``nn.Linear`` called on a cat, or ``F.linear(cat, w, b)`` -- becomes ``fused_concat_linear``
  on the Linear's own parameters, fusing a directly following activation where the op has it.
  With ``attention`` too, in the same traced code, a swapped attention call whose weights are
  never read (``attn(q, k, v)[0]`` under MHA's default ``need_weights=True``) gets
  ``need_weights=False``: the fused path instead of materialised weights.
  A rewritten ``forward`` is installed on that module instance only; the module keeps its
  class, children, parameters and buffers, so ``state_dict`` keys and values are unchanged and
  ``load_state_dict`` works both ways with the unconverted class.

* transformers models (``PreTrainedModel``: the model, or the outermost ones inside it) switch to
  ``attn_implementation="mmkernels"`` (mmkernels/integrations/transformers.py), which runs every
  attention of the model through ``cross_modal_attention``; transformers' own module classes are
  not traced for the concat_linear rewrite (their attention is reached through the backend).

What was replaced, and what was left alone and why, is returned as a ``ConversionReport``
attached to the returned model as ``model.mmkernels_report`` (``print`` it). ``revert(model)``
restores the standard modules and the original ``forward`` methods.

Notes:
* A whole-object pickle (``torch.save(model)``) keeps the CrossModalAttention modules but
  comes back with the original, unfused ``forward`` of concat-linear modules (same numbers).
  Save the ``state_dict`` and call ``convert`` again after loading.
* ``nn.TransformerEncoderLayer`` in eval mode under ``torch.no_grad()`` (batch_first, even
  heads, ...) runs PyTorch's own fused inference kernel, which reads the attention weights
  directly and never calls ``self_attn``; results are the same either way.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
import sys
import types
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import ops
from .nn.cross_modal_attention import CrossModalAttention
from .nn.fused_concat_linear import FusedConcatLinear

__all__ = ["convert", "revert", "ConversionReport"]

_REWRITTEN = "__mmkernels_rewritten__"  # marks the forward functions installed by convert


# --------------------------------------------------------------------------- the report


@dataclasses.dataclass
class ConversionReport:
    """What convert() did. ``replaced`` and ``skipped`` hold (module path, description) pairs."""

    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"mmkernels.convert: replaced {len(self.replaced)}, left alone {len(self.skipped)}"]
        lines += [f"  replaced  {path or '<root>'}: {what}" for path, what in self.replaced]
        lines += [f"  left alone {path or '<root>'}: {why}" for path, why in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        if not self.replaced and not self.skipped:
            lines.append("  nothing to convert")
        return "\n".join(lines)


# --------------------------------------------------------------------------- entry points


def convert(model: nn.Module, *, attention: bool = True, concat_linear: bool = True, inplace: bool = False) -> nn.Module:
    """Swap ``nn.MultiheadAttention`` for ``CrossModalAttention`` and ``linear(cat(...))`` for
    ``fused_concat_linear`` (see the module docstring). Returns the model (a deep copy unless
    ``inplace``) with the report as ``model.mmkernels_report``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mmkernels.convert: argument 'model': expected an nn.Module, got {type(model)}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    if attention:
        _swap_attention(model, report)
        _switch_transformers_attention(model, report)
    if attention or concat_linear:
        _rewrite_forwards(model, report, attention=attention, concat_linear=concat_linear)
    model.mmkernels_report = report
    return model


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undo convert(): CrossModalAttention back to nn.MultiheadAttention (same parameters), and
    the original forward of every rewritten module."""
    if not inplace:
        model = copy.deepcopy(model)
    _swap_modules(model, lambda m: type(m) is CrossModalAttention, lambda m: m.to_module())
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if forward is not None and getattr(forward, _REWRITTEN, False):
            del module.__dict__["forward"]
    _restore_transformers_attention(model)
    model.__dict__.pop("mmkernels_report", None)
    return model


# --------------------------------------------------------------------------- attention


def _swap_modules(model: nn.Module, match, make) -> list:
    """Replace every child for which match(child) holds by make(child); a module reachable from
    several places is replaced once and stays shared. Returns the replaced paths."""
    done: dict[int, nn.Module] = {}
    paths = []
    for parent_path, parent in list(model.named_modules(remove_duplicate=False)):
        for name, child in list(parent._modules.items()):
            if child is None or not match(child):
                continue
            if id(child) not in done:
                done[id(child)] = make(child)
            parent._modules[name] = done[id(child)]
            paths.append(f"{parent_path}.{name}" if parent_path else name)
    return paths


def _swap_attention(model: nn.Module, report: ConversionReport) -> None:
    if type(model) is nn.MultiheadAttention:
        report.skipped.append(("", "the model itself is an nn.MultiheadAttention: use CrossModalAttention.from_module"))
        return
    for path in _swap_modules(model, lambda m: type(m) is nn.MultiheadAttention, CrossModalAttention.from_module):
        report.replaced.append((path, "nn.MultiheadAttention -> CrossModalAttention"))
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and type(module) is not nn.MultiheadAttention:
            report.skipped.append((path, f"{type(module).__name__} subclasses nn.MultiheadAttention; its forward may differ"))
        if isinstance(module, nn.TransformerEncoderLayer) and type(module.self_attn) is CrossModalAttention:
            note = ("nn.TransformerEncoderLayer in eval under no_grad may take PyTorch's native fast path, "
                    "which bypasses self_attn (same results)")
            if note not in report.notes:
                report.notes.append(note)


def _switch_transformers_attention(model: nn.Module, report: ConversionReport) -> None:
    """transformers models (the model, or towers inside it): attn_implementation="mmkernels", so every
    attention runs cross_modal_attention (integrations/transformers.py). A model holding one has
    transformers imported already; nothing is imported otherwise."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not any(isinstance(m, transformers.PreTrainedModel) for m in model.modules()):
        return
    from .integrations import transformers as backend

    backend.switch_models(model, report)


def _restore_transformers_attention(model: nn.Module) -> None:
    if "transformers" in sys.modules:
        from .integrations import transformers as backend

        backend.restore_models(model)


# --------------------------------------------------------------------------- concat + linear

_CAT = (torch.cat, torch.concat, torch.concatenate)
_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)
# Activations the fused op applies itself: (module class or function) -> op activation name.
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", torch.tanh: "tanh",
                         torch.sigmoid: "sigmoid", F.gelu: "gelu"}
_ACTIVATION_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_warned_fallback = False


def _cat_linear(tensors, dim: int, weight, bias, activation: str = "none"):
    """What a rewritten graph calls in place of act(linear(cat(tensors, dim), weight, bias)).

    The concatenation dim is only known to be the last one once ranks are known, at run time;
    the check is on static shapes, so it costs nothing under torch.compile. A cat over another
    dim, or inputs the op does not take (mixed dtypes that cat would promote), run the original
    composition, with a warning the first time."""
    tensors = list(tensors)
    last = tensors[0].dim() - 1
    if (dim == -1 or dim == last) and all(t.dtype == weight.dtype and t.device == weight.device for t in tensors):
        return ops.fused_concat_linear(tensors, weight, bias, activation)
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn("mmkernels.convert: a rewritten linear(cat(...)) met a cat over a non-last dim or mixed "
                      "dtypes at run time; it runs the unfused composition", RuntimeWarning, stacklevel=2)
    out = F.linear(torch.cat(tensors, dim), weight, bias)
    return _apply_activation(out, activation)


def _apply_activation(x, activation):
    if activation == "none":
        return x
    return {"relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
            "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation](x)


class _OwnCodeTracer(fx.Tracer):
    """Traces one module's own forward: every child is opaque except nn.Sequential containers,
    which are looked into so that Sequential(Linear, ReLU) applied to a cat is found."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self._root and type(m) is not nn.Sequential


class _ModeDependent(Exception):
    pass


def _trace(module: nn.Module) -> fx.Graph:
    """The graph of module's own forward. fx bakes Python values into the graph, self.training
    among them, so a forward that branches on it (F.dropout(x, p, self.training), ...) would be
    frozen in one mode: trace in both modes and refuse when the graphs differ. A GraphModule
    already is a graph: rewrite a copy of it, so that revert can go back to the original."""
    if isinstance(module, fx.GraphModule):
        return copy.deepcopy(module.graph)
    mode = module.training
    try:
        graphs = []
        for training in (True, False):
            module.training = training  # this module only: its children are opaque to the trace
            graphs.append(_OwnCodeTracer(module).trace(module))
    finally:
        module.training = mode
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise _ModeDependent("reads self.training, which a torch.fx graph would freeze in one mode")
    return graphs[0]


def _is_candidate(module: nn.Module) -> bool:
    """User-defined modules only: torch's and transformers' own modules hold no linear(cat) and mostly
    do not trace."""
    cls = type(module)
    if not isinstance(module, fx.GraphModule) and (
        cls.__module__.startswith(("torch.", "mmkernels.", "transformers.")) or cls in (CrossModalAttention, FusedConcatLinear)
    ):
        return False
    forward = module.__dict__.get("forward")
    return not (forward is not None and getattr(forward, _REWRITTEN, False))  # already converted


def _rewrite_forwards(model: nn.Module, report: ConversionReport, *, attention: bool, concat_linear: bool) -> None:
    """Trace each user module's own forward and rewrite what it can; install the result on the
    instance only where something changed."""
    seen = set()
    for path, module in model.named_modules():
        if id(module) in seen or not _is_candidate(module):
            continue
        seen.add(id(module))
        try:
            graph = _trace(module)
        except _ModeDependent as err:
            report.skipped.append((path, f"{type(module).__name__}.forward {err}"))
            continue
        except Exception as err:  # fx raises many kinds; any of them means "leave it alone"
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            report.skipped.append((path, f"{type(module).__name__}.forward does not trace with torch.fx ({reason})"))
            continue
        found = _fuse_in_graph(module, graph, report, path) if concat_linear else 0
        found += _skip_unused_weights(module, graph, report, path) if attention else 0
        if not found:
            continue
        graph.lint()
        gm = fx.GraphModule(module, graph, class_name=f"{type(module).__name__}Fused")
        forward = types.MethodType(_mark(type(gm).forward), module)
        # The generated code reads children and parameters through `self`, which is now the
        # original module itself: nothing is copied, and later parameter swaps are seen.
        module.forward = forward


def _mark(fn):
    setattr(fn, _REWRITTEN, True)
    return fn


def _fuse_in_graph(module, graph: fx.Graph, report: ConversionReport, path: str) -> int:
    count = 0
    for node in list(graph.nodes):
        match = _match_linear(module, node)
        if match is None:
            continue
        cat, weight_ref, bias_ref, what = match
        if len(cat.users) != 1:
            report.skipped.append((path, f"{what} on torch.cat: the cat is also used elsewhere, so it must be built anyway"))
            continue
        tensors, dim = _cat_args(cat)
        if tensors is None:
            report.skipped.append((path, f"{what} on torch.cat: the cat's inputs are not a literal list"))
            continue
        activation, act_node = _following_activation(module, node)
        with graph.inserting_before(node):
            weight, bias = (_as_node(graph, ref) for ref in (weight_ref, bias_ref))
        last = act_node or node
        with graph.inserting_after(last):
            fused = graph.call_function(_cat_linear, (list(tensors), dim, weight, bias, activation))
        last.replace_all_uses_with(fused)
        for dead in (act_node, node, cat):
            if dead is not None:
                graph.erase_node(dead)
        act = f" + {activation}" if activation != "none" else ""
        report.replaced.append((path, f"{what}(torch.cat([{len(tensors)} inputs])){act} -> fused_concat_linear"))
        count += 1
    return count


def _skip_unused_weights(module, graph: fx.Graph, report: ConversionReport, path: str) -> int:
    """attn(q, k, v)[0] with MHA's default need_weights=True materialises weights nobody reads;
    pass need_weights=False instead, which is the fused path. (Code written for MHA does this a
    lot: MulT's blocks, most cross-attention layers.)"""
    count = 0
    for node in graph.nodes:
        if node.op != "call_module" or type(module.get_submodule(node.target)) is not CrossModalAttention:
            continue
        if not node.users or not all(_reads_output_only(user) for user in node.users):
            continue
        if len(node.args) > 4:  # need_weights passed positionally
            if node.args[4] is not True:
                continue
            node.args = (*node.args[:4], False, *node.args[5:])
        else:
            if node.kwargs.get("need_weights", True) is not True:
                continue
            node.kwargs = {**node.kwargs, "need_weights": False}
        report.replaced.append((path, f"{node.target}(...)[0]: weights never read, so need_weights=False (the fused path)"))
        count += 1
    return count


def _reads_output_only(user: fx.Node) -> bool:
    """user is result[0], or an unused result[1] (what `out, _ = attn(...)` traces to)."""
    if user.op != "call_function" or user.target is not operator.getitem:
        return False
    index = user.args[1]
    return isinstance(index, int) and (index == 0 or (index == 1 and not user.users))


def _match_linear(module, node):
    """(cat node, weight ref, bias ref, description) if node is a linear applied to a cat."""
    if node.op == "call_module":
        sub = module.get_submodule(node.target)
        if type(sub) is nn.Linear and len(node.args) == 1 and not node.kwargs and _is_cat(node.args[0]):
            bias = f"{node.target}.bias" if sub.bias is not None else None
            return node.args[0], f"{node.target}.weight", bias, f"nn.Linear {node.target}"
    elif node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
        args = list(node.args) + [None] * (3 - len(node.args))
        x, weight, bias = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        if _is_cat(x) and isinstance(weight, fx.Node):
            return x, weight, bias, "F.linear"
    return None


def _is_cat(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CAT


def _cat_args(cat: fx.Node):
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or not all(isinstance(t, fx.Node) for t in tensors):
        return None, None
    if not isinstance(dim, int):
        return None, None
    return tensors, dim


def _as_node(graph, ref):
    """A get_attr node for a parameter path, or the node / None as given."""
    return graph.get_attr(ref) if isinstance(ref, str) else ref


def _following_activation(module, linear: fx.Node):
    """("relu", node) if the linear's only user is an activation the fused op has, else ("none", None)."""
    if len(linear.users) != 1:
        return "none", None
    (user,) = linear.users
    if not user.args or user.args[0] is not linear or len(user.args) > 1:
        return "none", None
    kwargs = dict(user.kwargs)
    kwargs.pop("inplace", None)  # the fused op writes a fresh tensor; in-place is moot
    if user.op == "call_module":
        sub = module.get_submodule(user.target)
        if type(sub) in _ACTIVATION_MODULES and not kwargs:
            return _ACTIVATION_MODULES[type(sub)], user
        if type(sub) is nn.GELU and not kwargs:
            return ("gelu" if sub.approximate == "none" else "gelu_tanh"), user
    elif user.op == "call_function" and user.target in _ACTIVATION_FUNCTIONS:
        if user.target is F.gelu:
            approximate = kwargs.pop("approximate", "none")
            if kwargs or approximate not in ("none", "tanh"):
                return "none", None
            return ("gelu" if approximate == "none" else "gelu_tanh"), user
        if not kwargs:
            return _ACTIVATION_FUNCTIONS[user.target], user
    elif user.op == "call_method" and user.target in _ACTIVATION_METHODS and not kwargs:
        return _ACTIVATION_METHODS[user.target], user
    return "none", None
