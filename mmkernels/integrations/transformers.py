"""transformers' attention backend: ``attn_implementation="mmkernels"``.

``register()`` adds ``"mmkernels"`` to transformers' ``AttentionInterface`` (the attention function
below) and ``AttentionMaskInterface`` (``build_mask``: transformers' own SDPA masks, 4-D bool, True =
may attend, or None where ``is_causal`` says it all, which is the op's convention). From then on
``from_config(..., attn_implementation="mmkernels")``, ``from_pretrained(...)`` and
``model.set_attn_implementation("mmkernels")`` run every attention of a model through
``mmkernels.cross_modal_attention``.

What the attention function does with what transformers passes:

* q (B, H, Lq, D), k/v (B, H_kv, Lk, D): self- and cross-attention, KV caches, one-query decoding.
* masks, worked out once per forward: where the model's mask is plain causal or bidirectional
  attention over a 2-D padding mask (the usual case), ``build_mask`` attaches its structure
  (``MaskLayout``: a causal flag, upper-left or lower-right, and ``kv_lengths`` for right padding or
  ``key_padding_mask``), and every layer passes that to the op instead of the 4-D mask: the kernel
  skips masked key blocks and the blocks above the diagonal. Any other mask (sliding windows, packed
  sequences, custom masks, masks made under torch.compile, or by the user) goes to the op as
  ``attn_mask``, bool or additive float (broadcast, not copied); no mask plus ``is_causal`` is
  SDPA's upper-left causal attention, which the op takes as its ``is_causal`` flag.
* grouped-query heads (H_kv < H): the op's ``enable_gqa``.
* ``scaling``, ``dropout``; a ``position_bias`` (additive, e.g. relative positions) is folded into the
  mask as transformers' SDPA path does, and gets its gradient (the op takes its exact reference
  path for a float mask that requires grad).
* the output is returned as (B, Lq, H, D), a transpose *view* of the op's result: the op stores its
  output that way, so the model's head-merging reshape copies nothing.
* ``output_attentions=True`` (the weights must exist) or an option the kernel does not have (a
  logit soft-cap, attention sinks, a head mask): the model's own eager attention runs instead, with
  a warning once per process and reason. Never a wrong answer.

Causal masks reach the op as its ``is_causal`` flag (or a lower-right ``CausalBias``) and grouped K/V
heads through ``enable_gqa``: never a materialised causal mask, never a ``repeat_kv`` copy. For one
query (decoding) the query heads of a group are stacked as that kv head's queries: no copy, and each
K/V block read once per group.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from .. import ops
from ..ops import warn_once

__all__ = ["NAME", "register", "attention_forward", "is_registered", "TESTED_VERSIONS"]

NAME = "mmkernels"
TESTED_VERSIONS = ">=5.24,<6"  # the range in setup.py's extras_require; CI runs 5.24.0

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
    _, attention_interface, mask_interface, _ = _import_transformers()
    if not is_registered():
        attention_interface.register(NAME, attention_forward)
        # transformers builds a mask only for implementations its mask interface knows (else none
        # at all, padding lost): ours is its SDPA builder's mask plus the structure the op takes
        # natively (see build_mask).
        mask_interface.register(NAME, build_mask)
    return NAME


def is_registered() -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return (
        AttentionInterface._global_mapping.get(NAME) is attention_forward
        and AttentionMaskInterface._global_mapping.get(NAME) is build_mask
    )


# --------------------------------------------------------------------------- masks, once per forward

_LAYOUT = "_mmkernels_layout"  # attribute of the masks build_mask returns: their structure for the op


@dataclasses.dataclass(frozen=True)
class MaskLayout:
    """What a plain causal or bidirectional transformers mask is, in the op's own arguments: a causal
    flag (0 none, 1 upper-left, 2 lower-right) and the padding as kv_lengths (right padding only) or
    key_padding_mask (True = ignore). Built once per model forward by build_mask; every layer then
    passes these instead of the 4-D mask, so the kernel skips the key blocks above the diagonal and
    the padded ones, and builds no per-row bias from a (B, 1, Lq, Lk) tensor."""

    q_len: int
    kv_len: int
    causal: int
    kv_lengths: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """The (B or 1, 1, Lq, Lk) bool mask (True = may attend) this layout stands for: what the
        tests hold it against."""
        keep = torch.ones(1, self.kv_len, dtype=torch.bool)
        if self.kv_lengths is not None:
            keep = torch.arange(self.kv_len, device=self.kv_lengths.device)[None] < self.kv_lengths[:, None]
        if self.key_padding_mask is not None:
            keep = ~self.key_padding_mask
        mask = keep[:, None, None, :].expand(-1, 1, self.q_len, -1)
        if self.causal:
            offset = 0 if self.causal == 1 else self.kv_len - self.q_len
            mask = mask & torch.ones(self.q_len, self.kv_len, dtype=torch.bool, device=mask.device).tril(offset)
        return mask


def build_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
               attention_mask=None, local_size=None, use_vmap=False, **kwargs):
    """The mask function registered for "mmkernels" in transformers' AttentionMaskInterface.

    Returns exactly what transformers' SDPA builder returns (a 4-D bool mask, True = may attend, or
    None where is_causal says it all), so that model code and the eager fallback see an ordinary
    mask; where that mask is plain causal or bidirectional attention over a 2-D padding mask, it
    also carries its MaskLayout (attribute ``_mmkernels_layout``), which attention_forward passes to
    the op instead of the tensor. Anything else (sliding windows, packed sequences, custom mask
    functions, a traced offset, torch.compile) carries none and goes to the op as the 4-D tensor."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, use_vmap=use_vmap, **kwargs)
    if mask is None or use_vmap or local_size is not None or torch.compiler.is_compiling():
        return mask
    layout = _layout(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)
    if layout is not None:
        setattr(mask, _LAYOUT, layout)
    return mask


def _layout(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask):
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                            prepare_padding_mask)

    if mask_function is causal_mask_function:
        # transformers' causal rule: key j is visible to query i iff j + kv_offset <= i + q_offset.
        if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
            return None
        shift = q_offset - kv_offset
        if shift >= kv_length - 1:
            causal = 0  # every query sees every key (one query at the end of its cache)
        elif shift == 0:
            causal = 1
        elif shift == kv_length - q_length:
            causal = 2
        else:
            return None
    elif mask_function is bidirectional_mask_function:
        causal = 0
    else:
        return None
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return MaskLayout(q_length, kv_length, causal)
    keep = padding[:, kv_offset: kv_offset + kv_length].to(torch.bool).expand(batch_size, kv_length)
    if keep.all():
        return MaskLayout(q_length, kv_length, causal)
    lengths = keep.sum(-1)
    if torch.equal(keep, torch.arange(kv_length, device=keep.device)[None] < lengths[:, None]):
        return MaskLayout(q_length, kv_length, causal, kv_lengths=lengths)  # right padding only
    return MaskLayout(q_length, kv_length, causal, key_padding_mask=~keep)


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
    op_kwargs = {}
    layout = _usable_layout(attention_mask, query, key, position_bias)
    if layout is not None:
        # The mask's structure, worked out once per forward by build_mask: padding and the causal
        # flag instead of the 4-D mask.
        mask, causal = None, layout.causal
        if layout.kv_lengths is not None:
            op_kwargs["kv_lengths"] = layout.kv_lengths
        if layout.key_padding_mask is not None:
            op_kwargs["key_padding_mask"] = layout.key_padding_mask
    else:
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # As transformers' SDPA path: the mask builder returns None only where causal-or-nothing is
        # exact, and one query sees every key.
        causal = 1 if q_len > 1 and attention_mask is None and bool(is_causal) else 0
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
            causal = 0

    heads, kv_heads = query.shape[1], key.shape[1]
    grouped = heads != kv_heads
    packed = False
    if grouped:
        if heads % kv_heads:
            raise ValueError(f"mmkernels: argument 'key': {kv_heads} key/value heads do not divide {heads} query heads")
        if q_len == 1 and not causal and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1)):
            # One query (decoding): the query heads of a group become that kv head's queries, a view,
            # so each K/V block is read once for the whole group (also with enable_gqa, which reads
            # it once per query head). A mask (B, 1, 1, Lk) or the padding broadcasts over them.
            query = query.reshape(query.shape[0], kv_heads, heads // kv_heads, query.shape[3])
            packed = True
        else:
            op_kwargs["enable_gqa"] = True
    if causal == 1:
        op_kwargs["is_causal"] = True
    elif causal == 2:  # only from a layout: queries after a cache
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, key.shape[2])

    out = ops.cross_modal_attention(query, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout, **op_kwargs)
    if packed:  # (B, H_kv, group, Dv) -> (B, 1, H, Dv): tiny, one query
        return out.reshape(out.shape[0], 1, heads, out.shape[-1]), None
    return out.transpose(1, 2), None  # (B, Lq, H, Dv): the op's storage, a view


def _usable_layout(mask, query, key, position_bias) -> MaskLayout | None:
    """The MaskLayout build_mask attached to this mask, where it describes this call's q and k."""
    layout = getattr(mask, _LAYOUT, None) if isinstance(mask, torch.Tensor) else None
    if layout is None or position_bias is not None:
        return None
    if (layout.q_len, layout.kv_len) != (query.shape[2], key.shape[2]):
        return None  # e.g. a layer that crops its keys
    padding = layout.kv_lengths if layout.kv_lengths is not None else layout.key_padding_mask
    if padding is not None and padding.shape[0] != query.shape[0]:
        return None
    return layout


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
