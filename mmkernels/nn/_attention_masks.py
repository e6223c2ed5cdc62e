"""Input checks and mask translation for CrossModalAttention.

nn.MultiheadAttention's conventions (what callers pass):
  key_padding_mask  (B, Lk) / (Lk,)      bool True = ignore this key, or float additive
  attn_mask         (Lq, Lk) or (B*H, Lq, Lk) / (H, Lq, Lk)   bool True = NOT allowed, or float additive
The op's conventions (what mmkernels.cross_modal_attention takes):
  key_padding_mask  (B, Lk)              bool True = ignore this key
  attn_mask         broadcastable to (B, H, Lq, Lk)   bool True = may attend, or float additive
Masks are translated without expanding them to (B, H, Lq, Lk): a 2-D mask stays 2-D and broadcasts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._errors import ArgumentError

_NAME = "CrossModalAttention"


def _fail(arg: str, message: str):
    raise ArgumentError(f"{_NAME}: argument '{arg}': {message}")


def _check_mask_dtype(arg: str, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        _fail(arg, f"expected a bool or floating-point tensor, got dtype {mask.dtype}")


def check_inputs(module, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
    """Validate shapes and dtypes as nn.MultiheadAttention does, but with errors naming the argument.
    Returns whether the inputs are batched (3-D)."""
    if query.dim() not in (2, 3):
        _fail("query", f"expected a 2-D (unbatched) or 3-D (batched) tensor, got {query.dim()}-D")
    batched = query.dim() == 3
    for arg, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            _fail(arg, f"expected a {query.dim()}-D tensor like query, got {t.dim()}-D")
    ref = module.out_proj.weight
    # Under autocast other dtypes are legitimate (the projections cast them).
    autocast = query.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(query.device.type)
    if not autocast:
        for arg, t in (("query", query), ("key", key), ("value", value)):
            if t.dtype != ref.dtype or t.device != ref.device:
                _fail(arg, f"expected {ref.dtype} on {ref.device} (the module's parameters), got {t.dtype} on {t.device}")
    for arg, t, dim in (("query", query, module.embed_dim), ("key", key, module.kdim), ("value", value, module.vdim)):
        if t.shape[-1] != dim:
            _fail(arg, f"expected last dimension {dim}, got shape {tuple(t.shape)}")
    if batched:
        b_dim = 0 if module.batch_first else 1
        s_dim = 1 - b_dim
        batch, len_q = query.shape[b_dim], query.shape[s_dim]
        for arg, t in (("key", key), ("value", value)):
            if t.shape[b_dim] != batch:
                _fail(arg, f"expected batch size {batch} (that of query), got shape {tuple(t.shape)}")
        len_k = key.shape[s_dim]
        if value.shape[s_dim] != len_k:
            _fail("value", f"expected sequence length {len_k} (that of key), got shape {tuple(value.shape)}")
    else:
        batch, len_q, len_k = 1, query.shape[0], key.shape[0]
        if value.shape[0] != len_k:
            _fail("value", f"expected sequence length {len_k} (that of key), got shape {tuple(value.shape)}")

    if key_padding_mask is not None:
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        expected = (batch, len_k) if batched else (len_k,)
        if tuple(key_padding_mask.shape) != expected:
            _fail("key_padding_mask", f"expected shape {expected} (batch, key length), got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        _check_mask_dtype("attn_mask", attn_mask)
        heads = batch * module.num_heads
        allowed = ((len_q, len_k), (heads, len_q, len_k))
        if tuple(attn_mask.shape) not in allowed:
            _fail(
                "attn_mask",
                f"expected shape {allowed[0]} or {allowed[1]} ((batch*num_heads, query length, key length)), "
                f"got {tuple(attn_mask.shape)}",
            )
    elif is_causal:
        # As nn.MultiheadAttention: is_causal is only a hint about attn_mask, never a mask by itself.
        _fail("is_causal", "is_causal=True is a hint that attn_mask is causal; attn_mask must be given with it")
    return batched


def op_masks(key_padding_mask, attn_mask, batch: int, heads: int, added: int, dtype):
    """Translate MHA-convention masks (already checked, batched) to the op's convention.

    ``added`` keys (bias_k, zero attention) were appended after the caller's keys; every query
    may attend to them, as in nn.MultiheadAttention. Returns (key_padding_mask, attn_mask).
    """
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = F.pad(attn_mask.logical_not(), (0, added), value=True) if added else attn_mask.logical_not()
        else:
            mask = F.pad(attn_mask.to(dtype), (0, added)) if added else attn_mask.to(dtype)
        if mask.dim() == 3:
            mask = mask.view(batch, heads, mask.shape[-2], mask.shape[-1])

    kpm = None
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            kpm = F.pad(key_padding_mask, (0, added), value=False) if added else key_padding_mask
        else:
            # A float padding mask is additive: fold it into attn_mask as a (B, 1, 1, Lk) term.
            extra = key_padding_mask.to(dtype)
            extra = (F.pad(extra, (0, added)) if added else extra).view(batch, 1, 1, -1)
            if mask is None:
                mask = extra
            elif mask.dtype == torch.bool:
                mask = _additive(mask, dtype) + extra
            else:
                mask = mask + extra
    return kpm, mask


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """bool 'may attend' -> float 0 / -inf."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(allowed.logical_not(), float("-inf"))


def weights_path_mask(key_padding_mask, attn_mask, batch: int, heads: int, added: int, dtype):
    """One additive float mask broadcastable to (B, H, Lq, Lk) for the need_weights path, or None."""
    kpm, mask = op_masks(key_padding_mask, attn_mask, batch, heads, added, dtype)
    if mask is not None and mask.dtype == torch.bool:
        mask = _additive(mask, dtype)
    if kpm is not None:
        extra = _additive(kpm.logical_not(), dtype).view(batch, 1, 1, -1)
        mask = extra if mask is None else mask + extra
    return mask
