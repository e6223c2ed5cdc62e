"""transformers' attention backend: ``attn_implementation="mmkernels"``.

``register()`` adds ``"mmkernels"`` to transformers' ``AttentionInterface`` (the attention function
below) and ``AttentionMaskInterface`` (transformers' own SDPA mask builder: 4-D bool masks, True =
may attend, or None where ``is_causal`` says it all, which is the op's convention). From then on
``from_config(..., attn_implementation="mmkernels")``, ``from_pretrained(...)`` and
``model.set_attn_implementation("mmkernels")`` run every attention of a model through
``mmkernels.cross_modal_attention``.

What the attention function does with what transformers passes:

* q (B, H, Lq, D), k/v (B, H_kv, Lk, D): self- and cross-attention, KV caches, one-query decoding.
* masks: a 4-D bool or additive float mask goes to the op as ``attn_mask`` (broadcast, not copied);
  no mask plus ``is_causal`` is SDPA's upper-left causal attention, which the op takes as a flag
  where it has ``is_causal`` (see "Two routes").
* grouped-query heads (H_kv < H): the op's ``enable_gqa`` where it has it; see "Two routes".
* ``scaling``, ``dropout``; a ``position_bias`` (additive, e.g. relative positions) is folded into the
  mask as transformers' SDPA path does, and gets its gradient (the op takes its exact reference
  path for a float mask that requires grad).
* the output is returned as (B, Lq, H, D), a transpose *view* of the op's result: the op stores its
  output that way, so the model's head-merging reshape copies nothing.
* ``output_attentions=True`` (the weights must exist) or an option the kernel does not have (a
  logit soft-cap, attention sinks, a head mask): the model's own eager attention runs instead, with
  a warning once per process and reason. Never a wrong answer.

Two routes. The op gains ``is_causal`` and ``enable_gqa`` in a parallel change; this module looks
once, at import, at the op's signature (``NATIVE_CAUSAL``, ``NATIVE_GQA``). Without them it uses
exact equivalents -- a materialised upper-left causal bool mask, and K/V heads repeated as
transformers' ``repeat_kv`` does -- and ``register()`` says so once. For one query (decoding) the
query heads of a group are stacked as that kv head's queries on both routes: no copy, and each K/V
block read once per group.
"""
from __future__ import annotations

import inspect
import sys

import torch

from .. import ops
from ..ops import warn_once

__all__ = ["NAME", "register", "attention_forward", "is_registered", "TESTED_VERSIONS"]

NAME = "mmkernels"
TESTED_VERSIONS = ">=5.24,<6"  # the range in setup.py's extras_require; CI runs 5.24.0

_params = inspect.signature(ops.cross_modal_attention).parameters
NATIVE_CAUSAL = "is_causal" in _params  # upper-left is_causal as a flag, never a materialised mask
NATIVE_GQA = "enable_gqa" in _params  # k/v with fewer heads read in place
del _params

# kwargs transformers may pass that the kernel has no equivalent for: (key, reason) -> eager path.
_EAGER_ONLY = {
    "softcap": "a logit soft-cap",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "head_mask": "a head mask",
}
# --------------------------------------------------------------------------- registration


def _import_transformers():
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:
        raise ImportError(
            "mmkernels.integrations.transformers needs transformers with AttentionInterface and "
            f"AttentionMaskInterface: pip install 'mmkernels[transformers]' (tested: transformers{TESTED_VERSIONS}); "
            f"import failed with: {err}"
        ) from err
    return transformers, AttentionInterface, AttentionMaskInterface, sdpa_mask


def register() -> str:
    """Registers ``"mmkernels"`` with transformers' attention and mask interfaces; returns the name
    to pass as ``attn_implementation``. Calling it again changes nothing."""
    _, attention_interface, mask_interface, sdpa_mask = _import_transformers()
    if not is_registered():
        attention_interface.register(NAME, attention_forward)
        # transformers builds a mask only for implementations its mask interface knows (else none
        # at all, padding lost): its SDPA builder gives exactly the op's convention.
        mask_interface.register(NAME, sdpa_mask)
    missing = [name for name, have in (("is_causal", NATIVE_CAUSAL), ("enable_gqa", NATIVE_GQA)) if not have]
    if missing:
        warn_once(
            "route",
            f"mmkernels: this build's cross_modal_attention has no {' / '.join(missing)}; the transformers backend "
            "materialises causal masks and/or repeats grouped K/V heads (exact, slower) until it has them.",
        )
    return NAME


def is_registered() -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return (
        AttentionInterface._global_mapping.get(NAME) is attention_forward
        and NAME in AttentionMaskInterface._global_mapping
    )


# --------------------------------------------------------------------------- the attention function


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: returns (output (B, Lq, H, Dv), None)."""
    reason = _eager_reason(module, kwargs)
    if reason is not None:
        warn_once(f"eager-{reason}", f"mmkernels: {reason} needs the eager attention; {type(module).__name__} "
                                      "and every attention like it run eager attention instead.")
        extra = {"position_bias": position_bias} if position_bias is not None else {}
        mask = _eager_mask(module, query, key, attention_mask, is_causal)
        return _eager_function(module)(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                       **extra, **kwargs)

    if query.shape[0] != key.shape[0]:  # SDPA broadcasts a batch of 1 (e.g. learned queries)
        batch = max(query.shape[0], key.shape[0])
        query, key, value = (t.expand(batch, *t.shape[1:]) for t in (query, key, value))
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: the mask builder returns None only where causal-or-nothing is
    # exact, and one query sees every key.
    causal = q_len > 1 and attention_mask is None and bool(is_causal)
    if causal and key.shape[2] > q_len:
        # Upper-left causal: keys past Lq are invisible to every query (a static cache's empty tail).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    mask = attention_mask
    if mask is not None and mask.shape[-1] > key.shape[2]:
        mask = mask[..., : key.shape[2]]  # as eager functions do: a mask built for a longer cache
    if position_bias is not None:
        mask = _with_position_bias(position_bias, mask, causal, q_len, key.shape[2])
        causal = False

    op_kwargs = {}
    heads, kv_heads = query.shape[1], key.shape[1]
    grouped = heads != kv_heads
    packed = False
    if grouped:
        if heads % kv_heads:
            raise ValueError(f"mmkernels: argument 'key': {kv_heads} key/value heads do not divide {heads} query heads")
        if q_len == 1 and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1)):
            # One query (decoding): the query heads of a group become that kv head's queries, a view,
            # so each K/V block is read once for the whole group (also with enable_gqa, which reads
            # it once per query head). The mask (B, 1, 1, Lk) broadcasts over them unchanged.
            query = query.reshape(query.shape[0], kv_heads, heads // kv_heads, query.shape[3])
            packed = True
        elif NATIVE_GQA:
            op_kwargs["enable_gqa"] = True
        else:
            key, value = _repeat_kv(key, heads // kv_heads), _repeat_kv(value, heads // kv_heads)
    if causal:
        if NATIVE_CAUSAL:
            op_kwargs["is_causal"] = True
        else:
            mask = torch.ones(q_len, key.shape[2], dtype=torch.bool, device=query.device).tril()

    out = ops.cross_modal_attention(query, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout, **op_kwargs)
    if packed:  # (B, H_kv, group, Dv) -> (B, 1, H, Dv): tiny, one query
        return out.reshape(out.shape[0], 1, heads, out.shape[-1]), None
    return out.transpose(1, 2), None  # (B, Lq, H, Dv): the op's storage, a view


def _eager_reason(module, kwargs) -> str | None:
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
        return "output_attentions=True"
    for key, what in _EAGER_ONLY.items():
        if kwargs.get(key) is not None:
            return what
    return None


def _eager_mask(module, query, key, mask, is_causal):
    """The mask transformers' eager functions expect: additive float, causal included. (Our mask
    builder gives SDPA's bool masks, or None where is_causal is meant.)"""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if mask is None and query.shape[2] > 1 and is_causal:
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()[None, None]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    return mask


def _eager_function(module):
    """The model's own eager attention (what attn_implementation="eager" runs), else ours."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return own if callable(own) else _generic_eager


def _generic_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_bias=None,
                   softcap=None, **kwargs):
    """Plain attention with the weights, for models whose module defines no eager function; the mask
    is additive (see _eager_mask)."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, L, D) -> (B, H_kv * groups, L, D), head j repeated groups times in a row."""
    if groups == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, groups, length, d).reshape(b, h * groups, length, d)


def _with_position_bias(bias, mask, causal, q_len, kv_len):
    """One additive mask from a position bias and the mask (bool, float or causal), as transformers'
    SDPA path builds it. Keeps bias's autograd graph."""
    if mask is None and causal:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=bias.device).tril()
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    return bias + mask


# --------------------------------------------------------------------------- convert() / revert()

_SAVED = "_mmkernels_attn_implementation"  # on each switched PreTrainedModel: what revert restores


def _implementations(config) -> dict:
    """The attention implementation of a config and of its sub-configs, in the nested-dict form
    that ``set_attn_implementation`` accepts."""
    tree = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            tree[key] = _implementations(sub)
    return tree


def _describe(tree: dict, prefix: str = "") -> list:
    out = [f"{prefix or 'model'}: {tree['']}"]
    for key, sub in tree.items():
        if key:
            out += _describe(sub, f"{prefix}.{key}" if prefix else key)
    return out


def switch_models(model: torch.nn.Module, report) -> None:
    """convert()'s step on transformers models: every outermost PreTrainedModel inside ``model``
    (the model itself, or towers inside a user's module) gets ``attn_implementation="mmkernels"``;
    what it had is kept on it for ``restore_models``."""
    from transformers import PreTrainedModel

    register()
    inside = []
    for path, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel) or any(path.startswith(p + ".") or p == "" for p in inside):
            continue
        inside.append(path)
        before = _implementations(sub.config)
        sub.set_attn_implementation(NAME)
        after = _implementations(sub.config)
        if after == before:
            report.skipped.append((path, f"{type(sub).__name__}: attention implementation unchanged ({before['']})"))
            continue
        setattr(sub, _SAVED, before)
        changed = [f"{a} -> {b.split(': ')[1]}" for a, b in zip(_describe(before), _describe(after)) if a != b]
        report.replaced.append((path, f"{type(sub).__name__} attn_implementation " + ", ".join(changed)))


def restore_models(model: torch.nn.Module) -> None:
    """revert()'s step: each PreTrainedModel that switch_models changed gets its implementations back."""
    for sub in model.modules():
        saved = sub.__dict__.pop(_SAVED, None)
        if saved is not None:
            sub.set_attn_implementation(saved)
