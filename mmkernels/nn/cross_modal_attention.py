"""CrossModalAttention: a drop-in for nn.MultiheadAttention whose attention core is the fused op.

Differences from nn.MultiheadAttention, all deliberate:
- A query row that can see no key (every key padded or masked out) returns zeros and passes zero
  gradient; nn.MultiheadAttention returns NaN there (and, with need_weights=True, NaN weights).
- ``need_weights=True`` (nn.MultiheadAttention's default) still computes the output with the fused
  op and computes the weights beside it (averaged a few heads at a time, and recomputed so in their
  backward: see _AveragedWeights), so a caller that drops them keeps nothing of them for backward.
  With dropout in training the output is made from materialised, dropped weights, as
  nn.MultiheadAttention does (so that the returned weights are the ones that made it): that is the
  slow path. A training step with few scores (see _FEW_SCORES) takes that order too (no dropout
  needed): there it is the faster one.
- ``is_causal`` is a hint, as in nn.MultiheadAttention: ``attn_mask`` must be given with it. Where the
  hint is taken (square self-attention, no ``add_bias_kv`` / ``add_zero_attn``, the output path) the
  op's causal flag replaces the mask, trusting the hint as nn.MultiheadAttention's fast path does, so
  the key blocks above the diagonal are skipped; the ``need_weights`` weights still use ``attn_mask``.
- A NaN in a query, or in a key or value a row sees, makes that row NaN (as in
  nn.MultiheadAttention); only a row that sees no key at all gives zeros.
- Dropout masks come from the op's own generator draw, so they differ from nn.MultiheadAttention's
  for the same seed when ``need_weights=False`` (same distribution; the same seed reproduces ours).
- With a bool ``key_padding_mask`` that hides at least 1/8 of the keys (except on the slow path),
  the padded key/value rows are not projected at all (the K/V projections run on the visible rows
  only, forward and backward; eager mode, see ``_attention_masks._visible_key_rows``). The numbers are the same, but
  what padded rows hold is then never read: a NaN there does not reach the output, while
  nn.MultiheadAttention returns NaN for every query.
- On the CPU in float32, where oneDNN runs the op's GEMMs, the projections are one-input
  ``fused_concat_linear`` calls (csrc/cpu/matmul.cpp): the same numbers up to GEMM rounding, not bitwise
  nn.MultiheadAttention's (MKL's). Elsewhere they are F.linear, as in nn.MultiheadAttention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import ops
from .._C import attention_small, cpu_float32_gemm
from ..ops.fused_concat_linear import ONEDNN_MIN_MACS
from .._errors import ArgumentError
from ._attention_masks import normalise

_NAME = "CrossModalAttention"


class CrossModalAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s constructor, parameters, state_dict,
    forward signature and return value, computed by ``mmkernels.cross_modal_attention``.

    See the module docstring for the (few, deliberate) differences.
    """

    __constants__ = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if embed_dim <= 0:
            raise ArgumentError(f"{_NAME}: argument 'embed_dim': expected a positive int, got {embed_dim}")
        if num_heads <= 0:
            raise ArgumentError(f"{_NAME}: argument 'num_heads': expected a positive int, got {num_heads}")
        if embed_dim % num_heads != 0:
            raise ArgumentError(
                f"{_NAME}: argument 'embed_dim': expected a multiple of num_heads={num_heads}, got {embed_dim}"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ArgumentError(f"{_NAME}: argument 'dropout': expected a probability in [0, 1], got {dropout}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        # Attribute names and registration order follow nn.MultiheadAttention, so state_dicts,
        # named_parameters() order (optimizer state) and code reading these attributes carry over.
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation, call for call: under the same seed both modules
        # start from identical weights.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    def __setstate__(self, state):
        # Pickles of nn.MultiheadAttention from torch 1.1 lack this flag; accept them too.
        state.setdefault("_qkv_same_embed_dim", True)
        super().__setstate__(state)

    # ------------------------------------------------------------------ projections

    def _project(self, query, key, value, key_rows=None):
        """Input projections, each (batch/seq leading dims as given, embed_dim).

        One GEMM serves several projections where they share a source tensor and the packed weight
        (self-attention: all three; cross-attention with key is value: K and V), as in
        nn.MultiheadAttention; its result is split into column views, not copied. Packed
        parameters are cut with split(), whose backward is one cat: slicing would give each piece
        a zero-filled full-size gradient to add up.

        ``key_rows`` (AttentionInputs.key_rows): project only these rows of the flattened key/value
        and leave the others zero; the op masks them, so they are never read.
        """
        e = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias

        def cut(t, sizes):
            return (None,) * len(sizes) if t is None else t.split(sizes)

        def kv_linear(x, weight, bias):
            if key_rows is None:
                return _linear(x, weight, bias)
            rows = _linear(x.reshape(-1, x.shape[-1]).index_select(0, key_rows), weight, bias)
            full = rows.new_zeros(x.shape[:-1].numel(), rows.shape[-1]).index_copy(0, key_rows, rows)
            return full.view(*x.shape[:-1], rows.shape[-1])

        if not self._qkv_same_embed_dim:
            bq, bk, bv = cut(b, [e, e, e])
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        elif key is value and query is key and key_rows is None:
            q, k, v = _linear(query, w, b).split(e, dim=-1)
            return q, k, v
        elif key is value:
            (wq, wkv), (bq, bkv) = w.split([e, 2 * e]), cut(b, [e, 2 * e])
            k, v = kv_linear(key, wkv, bkv).split(e, dim=-1)
            return _linear(query, wq, bq), k, v
        else:
            (wq, wk, wv), (bq, bk, bv) = w.split(e), cut(b, [e, e, e])
        return _linear(query, wq, bq), kv_linear(key, wk, bk), kv_linear(value, wv, bv)

    def _extend_keys(self, k, v, seq_dim: int):
        """Append the learned bias key/value, then the zero key/value, along the sequence dim
        (nn.MultiheadAttention's order; AttentionInputs.added counts them)."""
        batch = k.shape[1 - seq_dim]
        if self.bias_k is not None:
            shape = (1, batch, self.embed_dim) if seq_dim == 0 else (batch, 1, self.embed_dim)
            k = torch.cat([k, self.bias_k.reshape(1, 1, -1).expand(shape)], dim=seq_dim)
            v = torch.cat([v, self.bias_v.reshape(1, 1, -1).expand(shape)], dim=seq_dim)
        if self.add_zero_attn:
            # A zero vector in the projected space is zero in every head.
            pad = (0, 0, 0, 0, 0, 1) if seq_dim == 0 else (0, 0, 0, 1)
            k, v = F.pad(k, pad), F.pad(v, pad)
        return k, v

    def _split_heads(self, x, seq_dim: int):
        """(L, B, H*D) or (B, L, H*D) -> a (B, H, L, D) view: no copy; the op takes these strides."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        return x.permute(1, 2, 0, 3) if seq_dim == 0 else x.permute(0, 2, 1, 3)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same arguments, shapes and return value as ``nn.MultiheadAttention.forward``."""
        if (
            attn_mask is None and not is_causal and self.in_proj_weight is not None and self.bias_k is None
            and not self.add_zero_attn and (self.dropout == 0.0 or not self.training)
            and not torch.compiler.is_compiling()
        ):
            # A small call (a decoding step, a small training step): this whole forward in one C++ call
            # (csrc/small_calls.cpp: the same ops in the same order), where the projections are ATen's
            # GEMMs. None otherwise: tensor subclasses or modes, autocast, larger shapes, anything to
            # check below.
            result = attention_small(
                query, key, value, key_padding_mask, need_weights, average_attn_weights, self.in_proj_weight,
                self.in_proj_bias, self.out_proj.weight, self.out_proj.bias, self.num_heads, self.batch_first,
                _WEIGHTS_CHUNK_SCORES, ONEDNN_MIN_MACS,
            )
            if result is not None:
                return result
        if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
            return self._forward_nested(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        dropout_p = self.dropout if self.training else 0.0
        # With dropout, need_weights=True returns the dropped weights that made the output, so the
        # output must come from them (every key projected, as nn.MultiheadAttention does).
        slow = need_weights and dropout_p > 0.0
        inputs = normalise(self, query, key, value, key_padding_mask, attn_mask, is_causal, project_all=slow)
        seq_dim = inputs.seq_dim
        q, k, v = self._project(inputs.query, inputs.key, inputs.value, inputs.key_rows)
        k, v = self._extend_keys(k, v, seq_dim)
        q, k, v = (self._split_heads(t, seq_dim) for t in (q, k, v))

        weights = None
        # A training step with need_weights and few scores takes nn.MultiheadAttention's own order: the
        # weights made once and the output from them, rather than the fused op, the weights beside it and
        # their recomputation in backward (three passes over the scores instead of one).
        few_scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= _FEW_SCORES
        if slow or (need_weights and few_scores and torch.is_grad_enabled()
                    and any(t.requires_grad for t in (q, k, v))):
            out, weights = self._attention_with_weights(q, k, v, inputs.additive, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = ops.cross_modal_attention(
                q, k, v, key_padding_mask=inputs.key_padding_mask, attn_mask=inputs.op_attn_mask,
                is_causal=inputs.causal, dropout_p=dropout_p,
            )
            if need_weights:
                # Computed beside the output, not under it: if the caller drops them (`out, _ = mha(...)`),
                # nothing of theirs is kept for backward.
                weights = self._weights(q, k, inputs.additive, average_attn_weights)

        # (B, H, Lq, D) -> the caller's layout with heads merged. The op stores its output as
        # (B, Lq, H, D), so with batch_first this is a view; seq-first, out_proj's input is strided.
        if seq_dim == 0:
            out = out.permute(2, 0, 1, 3).reshape(inputs.len_q, inputs.batch, self.embed_dim)
        else:
            out = out.transpose(1, 2).reshape(inputs.batch, inputs.len_q, self.embed_dim)
        out = _linear(out, self.out_proj.weight, self.out_proj.bias)

        if not inputs.batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        """Jagged nested (B, j, E) query / key / value (batch_first): the sequences' lengths are the
        padding. The projections run on the packed values, attention on cross_modal_attention_varlen
        (no padding work; is_causal: causal within each sequence, as there is no attn_mask to hint at),
        and the output comes back nested; training included."""
        if not self.batch_first:
            raise ArgumentError(f"{_NAME}: argument 'query': nested tensors need batch_first=True")
        for arg, t in (("query", query), ("key", key), ("value", value)):
            if not (isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged and t.dim() == 3):
                raise ArgumentError(f"{_NAME}: argument '{arg}': expected a (B, j, E) jagged-layout nested tensor "
                                 "(as the other inputs)")
        for arg, t in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if t is not None:
                raise ArgumentError(f"{_NAME}: argument '{arg}': not supported with nested inputs (their lengths are "
                                 "the padding)")
        if need_weights:
            raise ArgumentError(f"{_NAME}: argument 'need_weights': attention weights are not returned for nested "
                             "inputs; pass need_weights=False")
        if self.bias_k is not None or self.add_zero_attn:
            raise ArgumentError(f"{_NAME}: argument 'key': nested inputs with add_bias_kv / add_zero_attn are not "
                             "supported")
        # values() once per distinct tensor, so _project still sees self-attention as one GEMM.
        packed = {}
        q_in, k_in, v_in = (packed.setdefault(id(t), t.values()) for t in (query, key, value))
        q_off, k_off = query.offsets(), key.offsets()
        if not torch.equal(k_off, value.offsets()):
            raise ArgumentError(f"{_NAME}: argument 'value': expected the sequence lengths of key")
        q, k, v = self._project(q_in, k_in, v_in)
        heads = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim))  # noqa: E731
        max_q = int(q_off.diff().max()) if q_off.numel() > 1 else 0
        max_k = int(k_off.diff().max()) if k_off.numel() > 1 else 0
        out = ops.cross_modal_attention_varlen(
            heads(q), heads(k), heads(v), q_off.to(torch.int32), k_off.to(torch.int32), max_q, max_k,
            is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
        )
        out = _linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)
        return torch.nested.nested_tensor_from_jagged(out, q_off), None

    def _weights_scale(self) -> float:
        return math.sqrt(1.0 / float(self.head_dim))  # MHA's exact expression, for bitwise-equal scores

    def _scores_to_weights(self, q, k, additive):
        return _scores_to_weights(q, k, additive, self._weights_scale())

    def _attention_with_weights(self, q, k, v, additive, dropout_p):
        """need_weights=True with dropout, or in a training step with few scores: materialises the
        (B, H, Lq, Lk) weights as nn.MultiheadAttention does, in the same order (so dropout draws the
        same mask for the same seed); the output is made from the (dropped) weights, which are returned."""
        weights = self._scores_to_weights(q, k, additive)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return torch.matmul(weights, v), weights

    def _weights(self, q, k, additive, average):
        """The (B, H, Lq, Lk) attention weights, or their mean over heads computed a few heads at a
        time (see _AveragedWeights)."""
        if not average:
            return self._scores_to_weights(q, k, additive)
        scale = self._weights_scale()
        if ops.plain_eager(q, k, additive) and not (additive is not None and additive.requires_grad):
            if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
                return _averaged_weights(q, k, additive, scale)  # inference: no autograd.Function call
            return _AveragedWeights.apply(q, k, additive, scale)
        # Traced or transformed: plain autograd over the same chunks, which every tracer and transform
        # understands (it keeps every chunk's probabilities for backward).
        return sum(_scores_to_weights(q[:, h], k[:, h], m, scale).sum(dim=1)
                   for h, m in _head_chunks(q, k, additive)) / q.shape[1]

    # ------------------------------------------------------------------ interop

    def merge_masks(self, attn_mask, key_padding_mask, query):
        """nn.MultiheadAttention.merge_masks, which nn.TransformerEncoderLayer's inference fast path
        calls on its ``self_attn`` before running PyTorch's fused encoder kernel."""
        return nn.MultiheadAttention.merge_masks(self, attn_mask, key_padding_mask, query)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> "CrossModalAttention":
        """A CrossModalAttention with ``mha``'s configuration that shares its parameters (no copy)
        and its train/eval mode."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"{_NAME}.from_module: argument 'mha': expected nn.MultiheadAttention, got {type(mha)}")
        module = _shell(cls, mha)
        _share_parameters(mha, module)
        return module

    def to_module(self) -> nn.MultiheadAttention:
        """The inverse of from_module: an nn.MultiheadAttention sharing this module's parameters."""
        mha = _shell(nn.MultiheadAttention, self)
        _share_parameters(self, mha)
        return mha

    def extra_repr(self) -> str:
        extras = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if not self._qkv_same_embed_dim:
            extras += [f"kdim={self.kdim}", f"vdim={self.vdim}"]
        if self.dropout:
            extras.append(f"dropout={self.dropout}")
        if self.bias_k is not None:
            extras.append("add_bias_kv=True")
        if self.add_zero_attn:
            extras.append("add_zero_attn=True")
        extras.append(f"batch_first={self.batch_first}")
        return ", ".join(extras)


def _linear(x, weight, bias):
    """F.linear; on the CPU in float32 through fused_concat_linear with one input where its GEMMs run on
    oneDNN (csrc/cpu/matmul.cpp: 1.2-1.5x MKL's on the AMD CPUs measured), with F.linear's autograd
    semantics. Not for small GEMMs (decoding steps): there the op's GEMM is ATen's too, and the op would
    only add its fixed cost per call (issue 19). Nor where the op's GEMMs are MKL's (AVX2-only CPUs):
    there its row blocks of single-threaded GEMMs lose to F.linear's one threaded GEMM (1.1-1.4x on Zen 3,
    benchmarks/RESULTS.md, "Session 12")."""
    # Below ONEDNN_MIN_MACS the op's GEMM is ATen's, as F.linear's is.
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
            # (torch.compile cannot trace the C call: compiled graphs keep the op, as before.)
            and (torch.compiler.is_compiling() or cpu_float32_gemm() == "oneDNN")):
        return ops.fused_concat_linear([x], weight, bias)
    return F.linear(x, weight, bias)


def _scores_to_weights(q, k, additive, scale):
    """softmax(q k^T scale + additive) in nn.MultiheadAttention's order of operations (`scale` is its
    exact expression, for bitwise-equal scores), except that rows with no visible key give zero
    weights instead of NaN. K is made contiguous first (its rows are strided views of the projection):
    matmul would otherwise copy K^T element by element, and its gradient would come back transposed."""
    scores = torch.matmul(q * scale, k.contiguous().transpose(-2, -1))
    if additive is not None:
        scores = scores + additive
    dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


# Scores alive at once while the head-averaged weights are computed (16 MB of float32).
_WEIGHTS_CHUNK_SCORES = 1 << 22
# At most this many scores (B * H * Lq * Lk: 512 KB of float32), a training step with need_weights=True
# materialises the weights once and makes the output from them (see forward).
_FEW_SCORES = 1 << 17


def _head_chunks(q, k, additive):
    """(head slice, its additive mask) covering q's heads a few at a time, at most
    _WEIGHTS_CHUNK_SCORES scores each (or one head)."""
    B, H, Lq, _ = q.shape
    step = max(1, _WEIGHTS_CHUNK_SCORES // max(1, B * Lq * k.shape[2]))
    for h0 in range(0, H, step):
        heads = slice(h0, h0 + step)
        mask = additive  # None, (Lq, Lk), or 4-D with a head dim of H or 1
        if additive is not None and additive.dim() == 4 and additive.shape[1] > 1:
            mask = additive[:, heads]
        yield heads, mask


def _averaged_weights(q, k, additive, scale):
    """The head-averaged weights, a chunk of heads at a time, summed in place (no graph)."""
    total = None
    for heads, mask in _head_chunks(q, k, additive):
        part = _scores_to_weights(q[:, heads], k[:, heads], mask, scale).sum(dim=1)
        total = part if total is None else total.add_(part)
    return total.div_(q.shape[1])


class _AveragedWeights(torch.autograd.Function):
    """The head-averaged attention weights (B, Lq, Lk), a few heads at a time, keeping nothing of
    the per-head probabilities: backward recomputes each chunk's (activation checkpointing). So at
    most one chunk's scores are alive at once, in forward and in backward, and a caller that drops
    the weights (`out, _ = mha(...)`, `mha(...)[0]`) pays neither memory nor backward time for them;
    differentiating autograd's own chunks would keep every chunk's probabilities until then."""

    @staticmethod
    def forward(ctx, q, k, additive, scale):
        ctx.scale = scale
        ctx.save_for_backward(q, k, additive)
        return _averaged_weights(q, k, additive, scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, additive = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the chunks over the saved q, k themselves (not detached
            # copies), so the gradients have a derivative (this keeps every chunk, as autograd would).
            wrt = [t for t, need in zip((q, k), (need_q, need_k)) if need]
            weights = sum(_scores_to_weights(q[:, h], k[:, h], m, ctx.scale).sum(dim=1)
                          for h, m in _head_chunks(q, k, additive)) / q.shape[1]
            grads = iter(torch.autograd.grad(weights, wrt, grad, create_graph=True))
            return next(grads) if need_q else None, next(grads) if need_k else None, None, None
        dq = torch.zeros_like(q) if need_q else None
        dk = torch.zeros_like(k) if need_k else None
        grad = grad / q.shape[1]
        for heads, mask in _head_chunks(q, k, additive):
            with torch.enable_grad():
                qh = q[:, heads].detach().requires_grad_(need_q)
                kh = k[:, heads].detach().requires_grad_(need_k)
                part = _scores_to_weights(qh, kh, mask, ctx.scale).sum(dim=1)
                wrt = [t for t in (qh, kh) if t.requires_grad]
                grads = iter(torch.autograd.grad(part, wrt, grad))
            if need_q:
                dq[:, heads] = next(grads)
            if need_k:
                dk[:, heads] = next(grads)
        return dq, dk, None, None


def _shell(cls, src):
    """An instance of ``cls`` configured like ``src``, built on the meta device (no allocation,
    no initialisation work) because its parameters are about to be replaced."""
    module = cls(
        src.embed_dim,
        src.num_heads,
        dropout=src.dropout,
        bias=src.in_proj_bias is not None,
        add_bias_kv=src.bias_k is not None,
        add_zero_attn=src.add_zero_attn,
        kdim=src.kdim,
        vdim=src.vdim,
        batch_first=src.batch_first,
        device="meta",
    )
    module.train(src.training)
    return module


def _share_parameters(src, dst) -> None:
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
        param = getattr(src, name)
        if param is not None:
            setattr(dst, name, param)
    # out_proj is a module of its own (NonDynamicallyQuantizableLinear in both): share it whole,
    # so hooks or quantisation settings on it carry over too.
    dst.out_proj = src.out_proj
    if src.bias_k is not None:
        dst.bias_k, dst.bias_v = src.bias_k, src.bias_v
