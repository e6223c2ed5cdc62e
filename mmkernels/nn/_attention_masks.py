"""CrossModalAttention's inputs checked and normalised once per forward (``normalise``), into one
frozen ``AttentionInputs`` that every path reads.

nn.MultiheadAttention's conventions (what callers pass):
  key_padding_mask  (B, Lk) / (Lk,)      bool True = ignore this key, or float additive
  attn_mask         (Lq, Lk) or (B*H, Lq, Lk) / (H, Lq, Lk)   bool True = NOT allowed, or float additive
The op's conventions (what mmkernels.cross_modal_attention takes):
  key_padding_mask  (B, Lk)              bool True = ignore this key
  attn_mask         broadcastable to (B, H, Lq, Lk)   bool True = may attend, or float additive
Masks are translated without expanding them to (B, H, Lq, Lk): a 2-D mask stays 2-D and broadcasts;
the bool / float decision is taken here, once.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    """Validate shapes and dtypes as nn.MultiheadAttention does, with errors naming the argument.
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


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """One forward's inputs, checked and put in the op's convention once (by ``normalise``) and read by
    every path: the op call, the weights, the key projections.

    query / key / value are batched: (L, B, E) with seq_dim 0, (B, L, E) with seq_dim 1. Keys counted
    here include the ``added`` ones (bias_k, zero attention) that the module appends after the caller's;
    every query may attend to those, as in nn.MultiheadAttention.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    batched: bool  # whether the caller's inputs were (the output is squeezed back if not)
    seq_dim: int
    batch: int
    len_q: int
    heads: int
    added: int
    dtype: torch.dtype  # of the projected q / k / v: float masks are added in it
    # The is_causal hint taken (square self-attention, no added keys): the op's causal flag replaces
    # attn_mask on the output path, so the masked key blocks are skipped.
    causal: bool
    key_padding_mask: torch.Tensor | None  # bool (B, Lk), True = ignore
    padding_bias: torch.Tensor | None  # a float key_padding_mask as a (B, 1, 1, Lk) additive term
    attn_mask: torch.Tensor | None  # bool (True = may attend) or float, broadcastable to (B, H, Lq, Lk)
    # Rows of the flattened caller's key (B*Lk or Lk*B) worth projecting, or None for all of them.
    key_rows: torch.Tensor | None

    # Properties, not cached: each path reads them once (and functools.cached_property's lock stops
    # torch.compile).
    @property
    def op_attn_mask(self) -> torch.Tensor | None:
        """The op's attn_mask beside key_padding_mask and the causal flag."""
        return _combine(None if self.causal else self.attn_mask, self.padding_bias, self.dtype)

    @property
    def additive(self) -> torch.Tensor | None:
        """Every mask as one float term broadcastable to (B, H, Lq, Lk), for the materialised weights."""
        mask = _combine(self.attn_mask, self.padding_bias, self.dtype)
        if mask is not None and mask.dtype == torch.bool:
            mask = _additive(mask, self.dtype)
        if self.key_padding_mask is not None:
            mask = _combine(mask, _additive(self.key_padding_mask.logical_not(), self.dtype).view(self.batch, 1, 1, -1),
                            self.dtype)
        return mask


def normalise(module, query, key, value, key_padding_mask, attn_mask, is_causal, project_all=True) -> AttentionInputs:
    """Check the inputs as nn.MultiheadAttention does (errors name the argument) and translate its mask
    conventions to the op's, without expanding any mask to (B, H, Lq, Lk). ``project_all=False`` lets
    the bundle name the key rows worth projecting (see ``_visible_key_rows``)."""
    batched = check_inputs(module, query, key, value, key_padding_mask, attn_mask, is_causal)
    if not batched:
        # Unbatched (L, E) inputs become a batch of one; batch_first is ignored, as in MHA.
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    seq_dim = 1 if module.batch_first or not batched else 0
    batch, len_q, len_k = query.shape[1 - seq_dim], query.shape[seq_dim], key.shape[seq_dim]
    heads = module.num_heads
    added = int(getattr(module, "bias_k", None) is not None) + int(bool(getattr(module, "add_zero_attn", False)))
    dtype = _projected_dtype(query)

    mask = None
    if attn_mask is not None:
        mask = attn_mask.logical_not() if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
        if added:
            mask = F.pad(mask, (0, added), value=True if mask.dtype == torch.bool else 0.0)
        if mask.dim() == 3:
            mask = mask.view(batch, heads, mask.shape[-2], mask.shape[-1])
    kpm = bias = rows = None
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            kpm = F.pad(key_padding_mask, (0, added), value=False) if added else key_padding_mask
            if not project_all:
                rows = _visible_key_rows(key_padding_mask, seq_dim)
        else:
            bias = key_padding_mask.to(dtype)
            bias = (F.pad(bias, (0, added)) if added else bias).view(batch, 1, 1, -1)
    return AttentionInputs(
        query, key, value, batched, seq_dim, batch, len_q, heads, added, dtype,
        causal=is_causal and added == 0 and len_q == len_k, key_padding_mask=kpm, padding_bias=bias,
        attn_mask=mask, key_rows=rows,
    )


def _projected_dtype(query) -> torch.dtype:
    """The dtype the input projections give: the query's, or autocast's for its device."""
    device = query.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and query.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return query.dtype


def _visible_key_rows(key_padding_mask, seq_dim: int):
    """Indices of the visible rows of the flattened (B*Lk or Lk*B) key, or None where skipping
    the padded rows would not pay: a bool mask hiding at least 1/8 of the keys. Not under
    torch.compile / export or CUDA graph capture, whose graphs cannot hold the data-dependent
    row count (they project every row, as nn.MultiheadAttention does)."""
    if torch.compiler.is_compiling():
        return None
    if key_padding_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    visible = key_padding_mask.logical_not()
    rows = (visible if seq_dim == 1 else visible.t()).reshape(-1).nonzero().squeeze(1)
    return rows if rows.numel() * 8 <= visible.numel() * 7 else None


def _combine(mask, bias, dtype):
    """mask (bool may-attend, float or None) plus a float bias (or None)."""
    if bias is None or mask is None:
        return bias if mask is None else mask
    return (_additive(mask, dtype) if mask.dtype == torch.bool else mask) + bias


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """bool 'may attend' -> float 0 / -inf."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(allowed.logical_not(), float("-inf"))
