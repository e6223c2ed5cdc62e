"""CrossModalAttention against nn.MultiheadAttention: same weights, same outputs and gradients."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels import ops
from mmkernels.nn import CrossModalAttention

E, H = 12, 3  # embed_dim, num_heads (head_dim 4)
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-8), torch.float32: dict(atol=2e-5, rtol=2e-4)}


# --------------------------------------------------------------------------- helpers


def make_pair(dtype=torch.float64, via="from_module", seed=0, **cfg):
    """An nn.MultiheadAttention and a CrossModalAttention holding the same weights."""
    torch.manual_seed(seed)
    cfg.setdefault("embed_dim", E)
    cfg.setdefault("num_heads", H)
    mha = nn.MultiheadAttention(**cfg, dtype=dtype)
    # Non-zero biases, so that a wrong bias slice cannot hide behind the zero initialisation.
    with torch.no_grad():
        for p in mha.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if via == "from_module":
        cma = CrossModalAttention.from_module(copy.deepcopy(mha))
    else:
        cma = CrossModalAttention(**cfg, dtype=dtype)
        cma.load_state_dict(mha.state_dict())
    return mha, cma


def make_inputs(mha, B, Lq, Lk, sharing="distinct", dtype=torch.float64, batched=True):
    """(query, key, value), leaves with requires_grad; sharing: self | kv | distinct."""
    def t(L, D):
        shape = (L, D) if not batched else ((B, L, D) if mha.batch_first else (L, B, D))
        return torch.randn(shape, dtype=dtype, requires_grad=True)

    if sharing == "self":
        q = t(Lq, mha.embed_dim)
        return q, q, q
    q = t(Lq, mha.embed_dim)
    k = t(Lk, mha.kdim)
    v = k if sharing == "kv" else t(Lk, mha.vdim)
    return q, k, v


def make_kpm(kind, B, Lk, dtype=torch.float64, batched=True):
    """A key padding mask that leaves key 0 visible (no fully masked rows)."""
    if kind is None:
        return None
    ignore = torch.rand(B, Lk) < 0.4
    ignore[:, 0] = False
    if kind == "float":
        m = torch.randn(B, Lk, dtype=dtype).masked_fill(ignore, float("-inf"))
    else:
        m = ignore
    return m if batched else m[0]


def make_attn_mask(kind, B, Lq, Lk, heads=H, dtype=torch.float64):
    """kind: None | bool2 | float2 | bool3 | float3 (MHA convention: bool True = not allowed)."""
    if kind is None:
        return None
    shape = (Lq, Lk) if kind.endswith("2") else (B * heads, Lq, Lk)
    blocked = torch.rand(shape) < 0.4
    blocked[..., 0] = False
    if kind.startswith("float"):
        return torch.randn(shape, dtype=dtype).masked_fill(blocked, float("-inf"))
    return blocked


def run(module, inputs, **kwargs):
    """Forward + backward of a fixed random projection of both outputs; returns out, weights and the
    gradient of every input and parameter."""
    for x in inputs:
        x.grad = None
    module.zero_grad(set_to_none=True)
    out, weights = module(*inputs, **kwargs)
    gen = torch.Generator().manual_seed(123)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen, dtype=weights.dtype).to(weights.device)).sum()
    loss.backward()
    grads = {f"input{i}": x.grad.clone() for i, x in enumerate(inputs) if x.grad is not None}
    grads.update({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    return out.detach(), None if weights is None else weights.detach(), grads


def assert_same(mha, cma, inputs, tol=None, **kwargs):
    tol = tol or TOL[inputs[0].dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MHA's deprecation warning for mixed mask dtypes
        ref = run(mha, inputs, **kwargs)
    ours = run(cma, inputs, **kwargs)
    torch.testing.assert_close(ours[0], ref[0], **tol)
    if kwargs.get("need_weights", True):
        torch.testing.assert_close(ours[1], ref[1], **tol)
    else:
        assert ours[1] is None and ref[1] is None
    assert ours[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(ours[2][name], ref[2][name], **tol, msg=lambda m: f"grad {name}: {m}")


# --------------------------------------------------------------------------- construction and state


@pytest.mark.parametrize("cfg", [{}, dict(kdim=7, vdim=5), dict(bias=False), dict(add_bias_kv=True), dict(kdim=7)])
def test_same_initialisation_and_state_dict(cfg):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(E, H, **cfg)
    torch.manual_seed(3)
    cma = CrossModalAttention(E, H, **cfg)
    assert [n for n, _ in cma.named_parameters()] == [n for n, _ in mha.named_parameters()]
    ref, ours = mha.state_dict(), cma.state_dict()
    assert list(ours) == list(ref)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], atol=0, rtol=0)
    assert type(cma.out_proj) is type(mha.out_proj)
    # Both directions load strictly.
    mha.load_state_dict(cma.state_dict())
    cma.load_state_dict(mha.state_dict())


def test_from_module_shares_parameters_and_to_module_round_trips():
    mha = nn.MultiheadAttention(E, H, kdim=7, vdim=5, add_bias_kv=True, batch_first=True).eval()
    cma = CrossModalAttention.from_module(mha)
    assert not cma.training and cma.batch_first and cma.kdim == 7 and cma.vdim == 5
    assert cma.q_proj_weight is mha.q_proj_weight and cma.bias_k is mha.bias_k
    assert cma.out_proj is mha.out_proj
    back = cma.to_module()
    assert type(back) is nn.MultiheadAttention and back.k_proj_weight is mha.k_proj_weight
    with pytest.raises(TypeError, match="mha"):
        CrossModalAttention.from_module(nn.Linear(3, 3))


def test_pickles_and_repr():
    cma = CrossModalAttention(E, H, dropout=0.1, kdim=7)
    buf = io.BytesIO()
    torch.save(cma, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.state_dict().keys() == cma.state_dict().keys()
    assert "num_heads=3" in repr(cma) and "kdim=7" in repr(cma)


# --------------------------------------------------------------------------- numerics vs MHA

MASKS = [
    (None, None),
    ("bool", None),
    ("float", None),
    (None, "bool2"),
    (None, "float2"),
    (None, "bool3"),
    (None, "float3"),
    ("bool", "bool2"),
    ("bool", "float3"),
    ("float", "bool3"),
    ("float", "float2"),
]


@pytest.mark.parametrize("kpm_kind,mask_kind", MASKS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_masks_match_mha(kpm_kind, mask_kind, batch_first, need_weights):
    mha, cma = make_pair(batch_first=batch_first)
    B, Lq, Lk = 3, 5, 6
    inputs = make_inputs(mha, B, Lq, Lk, sharing="kv")
    assert_same(
        mha, cma, inputs,
        key_padding_mask=make_kpm(kpm_kind, B, Lk),
        attn_mask=make_attn_mask(mask_kind, B, Lq, Lk),
        need_weights=need_weights,
    )


PROJECTIONS = [  # (sharing of query/key/value, kdim/vdim)
    ("self", {}),
    ("kv", {}),
    ("distinct", {}),
    ("kv", dict(kdim=7, vdim=7)),
    ("distinct", dict(kdim=7, vdim=7)),
    ("distinct", dict(kdim=7, vdim=5)),
]


@pytest.mark.parametrize("sharing,dims", PROJECTIONS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("via", ["from_module", "load_state_dict"])
def test_projections_match_mha(sharing, dims, batch_first, via):
    mha, cma = make_pair(batch_first=batch_first, via=via, **dims)
    B, Lq, Lk = 2, 4, 4 if sharing == "self" else 7
    inputs = make_inputs(mha, B, Lq, Lk, sharing=sharing)
    kpm = make_kpm("bool", B, Lk)
    for need_weights in (False, True):
        assert_same(mha, cma, inputs, key_padding_mask=kpm, need_weights=need_weights)


@pytest.mark.parametrize("bias_kv,zero_attn", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kpm_kind,mask_kind", [(None, None), ("bool", "bool3"), ("float", "float2"), ("bool", "float2")])
@pytest.mark.parametrize("batch_first", [False, True])
def test_bias_kv_and_zero_attn_match_mha(bias_kv, zero_attn, kpm_kind, mask_kind, batch_first):
    mha, cma = make_pair(batch_first=batch_first, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=7, vdim=7)
    B, Lq, Lk = 2, 3, 5
    inputs = make_inputs(mha, B, Lq, Lk, sharing="kv")
    masks = dict(key_padding_mask=make_kpm(kpm_kind, B, Lk), attn_mask=make_attn_mask(mask_kind, B, Lq, Lk))
    for need_weights in (False, True):
        assert_same(mha, cma, inputs, need_weights=need_weights, **masks)


@pytest.mark.parametrize(
    "B,Lq,Lk,embed,heads",
    [(1, 1, 1, 4, 1), (2, 1, 9, 12, 3), (3, 17, 1, 12, 4), (2, 3, 123, 6, 2), (5, 17, 3, 15, 5)],
)
def test_odd_sizes_match_mha(B, Lq, Lk, embed, heads):
    mha, cma = make_pair(embed_dim=embed, num_heads=heads)
    inputs = make_inputs(mha, B, Lq, Lk)
    masks = dict(key_padding_mask=make_kpm("bool", B, Lk), attn_mask=make_attn_mask("bool3", B, Lq, Lk, heads=heads))
    for need_weights, average in ((False, True), (True, True), (True, False)):
        assert_same(mha, cma, inputs, need_weights=need_weights, average_attn_weights=average, **masks)


@pytest.mark.parametrize("mask_kind", [None, "bool2", "float2", "bool3"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_matches_mha(mask_kind, batch_first):
    mha, cma = make_pair(batch_first=batch_first)
    Lq, Lk = 4, 6
    inputs = make_inputs(mha, 1, Lq, Lk, batched=False)
    masks = dict(key_padding_mask=make_kpm("bool", 1, Lk, batched=False), attn_mask=make_attn_mask(mask_kind, 1, Lq, Lk))
    for need_weights, average in ((False, True), (True, True), (True, False)):
        assert_same(mha, cma, inputs, need_weights=need_weights, average_attn_weights=average, **masks)


@pytest.mark.parametrize("train", [False, True])
def test_train_and_eval_modes_match_mha(train):
    # dropout=0 in both: training mode must not change anything else.
    mha, cma = make_pair(batch_first=True)
    mha.train(train)
    cma.train(train)
    inputs = make_inputs(mha, 2, 5, 5, sharing="self")
    assert_same(mha, cma, inputs, key_padding_mask=make_kpm("bool", 2, 5), need_weights=False)


def test_eval_fast_path_conditions_match_mha():
    # Under no_grad in eval with batch_first self-attention, MHA takes its native fused path;
    # our module must agree with it too.
    mha, cma = make_pair(batch_first=True, dtype=torch.float32)
    mha.eval(), cma.eval()
    x = torch.randn(2, 5, E)
    kpm = make_kpm("bool", 2, 5)
    with torch.no_grad():
        ref, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
        ours, _ = cma(x, x, x, key_padding_mask=kpm, need_weights=False)
    # The native path returns zeros at padded query positions of nested-tensor inputs only; with a
    # dense input every row is a real row.
    torch.testing.assert_close(ours, ref, **TOL[torch.float32])


def test_is_causal_hint_matches_mha():
    mha, cma = make_pair(batch_first=True)
    L = 6
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    inputs = make_inputs(mha, 2, L, L, sharing="self")
    for need_weights in (False, True):
        assert_same(mha, cma, inputs, attn_mask=causal, is_causal=True, need_weights=need_weights)
    with pytest.raises(ValueError, match="is_causal"):
        cma(*inputs, is_causal=True)


def test_is_causal_hint_uses_the_ops_causal_flag(monkeypatch):
    # issue 13: with the hint on square self-attention the op gets is_causal=True and no mask tensor
    # (so it skips the blocks above the diagonal), and the result still matches MHA.
    calls = []
    real = ops.cross_modal_attention

    def spy(q, k, v, **kwargs):
        calls.append(kwargs)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(ops, "cross_modal_attention", spy)
    mha, cma = make_pair(batch_first=True)
    L = 9
    inputs = make_inputs(mha, 2, L, L, sharing="self")
    kpm = make_kpm("bool", 2, L)
    for mask in (nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64),
                 torch.ones(L, L, dtype=torch.bool).triu(1)):
        calls.clear()
        assert_same(mha, cma, inputs, attn_mask=mask, is_causal=True, need_weights=False, key_padding_mask=kpm)
        assert calls and all(c["is_causal"] and c["attn_mask"] is None for c in calls)
    # With added keys the mask is what is used (MHA itself then drops the mask for SDPA's upper-left
    # is_causal on (L, L + 1), which hides the bias key: compared with MHA given the mask alone).
    mha2, cma2 = make_pair(batch_first=True, add_bias_kv=True)
    calls.clear()
    mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    inputs2 = make_inputs(mha2, 2, L, L, sharing="self")
    ours = cma2(*inputs2, attn_mask=mask, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(ours, mha2(*inputs2, attn_mask=mask, need_weights=False)[0], **TOL[torch.float64])
    assert calls and not any(c["is_causal"] for c in calls)


def test_converted_decoder_layer_with_tgt_is_causal_matches():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True,
                                       dtype=torch.float64).eval()
    converted = mmkernels.convert(layer)
    tgt, memory = torch.randn(2, 11, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(11, dtype=torch.float64)
    want = layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
    got = converted(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


# --------------------------------------------------------------------------- fully masked rows


def _dead_row_case(how, B=2, Lq=4, Lk=5):
    """Masks under which some query rows see no key, and those rows as a (B, Lq) bool."""
    dead = torch.zeros(B, Lq, dtype=torch.bool)
    if how == "kpm":
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        kpm[1] = True  # batch 1 sees nothing at all
        dead[1] = True
        return dict(key_padding_mask=kpm), dead
    blocked = torch.zeros(Lq, Lk, dtype=torch.bool)
    blocked[2] = True  # query 2 sees nothing, in every batch
    dead[:, 2] = True
    if how == "float":
        return dict(attn_mask=torch.zeros(Lq, Lk, dtype=torch.float64).masked_fill(blocked, float("-inf"))), dead
    return dict(attn_mask=blocked), dead


@pytest.mark.parametrize("how", ["kpm", "attn_mask", "float"])
def test_fully_masked_rows_without_weights_match_mha(how):
    # MHA's need_weights=False path (SDPA) already gives a zero attention result on such rows in
    # this torch; ours must agree, gradients included.
    mha, cma = make_pair(batch_first=True)
    masks, dead = _dead_row_case(how)
    inputs = make_inputs(mha, 2, 4, 5)
    assert_same(mha, cma, inputs, need_weights=False, **masks)


@pytest.mark.parametrize("how", ["kpm", "attn_mask", "float"])
def test_fully_masked_rows_with_weights_give_zeros_where_mha_gives_nan(how):
    mha, cma = make_pair(batch_first=True)
    masks, dead = _dead_row_case(how)
    inputs = make_inputs(mha, 2, 4, 5)
    with torch.no_grad():
        ref, ref_w = mha(*inputs, **masks)
    assert torch.isnan(ref[dead]).all(), "nn.MultiheadAttention's weights path gives NaN on a row that sees no key"

    out, weights = cma(*inputs, average_attn_weights=False, **masks)
    # The attention result of a dead row is zero, so the module output there is out_proj's bias.
    torch.testing.assert_close(out[dead], cma.out_proj.bias.detach().expand(int(dead.sum()), E))
    torch.testing.assert_close(out[~dead], ref[~dead], **TOL[torch.float64])
    assert (weights.permute(0, 2, 1, 3)[dead] == 0).all()
    torch.testing.assert_close(weights.mean(1)[~dead], ref_w[~dead], **TOL[torch.float64])
    (out.sum() + weights.sum()).backward()
    for x in inputs:
        assert torch.isfinite(x.grad).all()
    for name, p in cma.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    # A query that sees no key gets no gradient.
    assert (inputs[0].grad[dead] == 0).all()


def test_need_weights_output_does_not_depend_on_the_weights_graph(monkeypatch):
    # MHA's default need_weights=True: the output comes from the fused op and the weights are
    # computed beside it, so a caller that drops the weights keeps no (Lq, Lk) tensor for backward;
    # the weights themselves keep none either (their backward recomputes them). Above _FEW_SCORES
    # scores, that is: below it a training step materialises them (see the next test).
    from mmkernels.nn import cross_modal_attention as cma_module

    monkeypatch.setattr(cma_module, "_FEW_SCORES", 0)
    monkeypatch.setattr(cma_module, "attention_small", lambda *a: None)  # the small-call route: ATen's graph
    mha, cma = make_pair(batch_first=True)
    inputs = make_inputs(mha, 2, 5, 7)
    kpm = make_kpm("bool", 2, 7)
    out, weights = cma(*inputs, key_padding_mask=kpm)
    ref_out, ref_weights = mha(*inputs, key_padding_mask=kpm)
    torch.testing.assert_close(weights, ref_weights, **TOL[torch.float64])
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])

    def graph_nodes(fn, seen):
        if fn is not None and fn not in seen:
            seen.add(fn)
            for nxt, _ in fn.next_functions:
                graph_nodes(nxt, seen)
        return seen

    names = {type(n).__name__ for n in graph_nodes(out.grad_fn, set())}
    assert not any("Softmax" in n for n in names), names
    assert type(weights.grad_fn).__name__ == "_AveragedWeightsBackward"
    saved = [t for t in weights.grad_fn.saved_tensors if t is not None]
    assert saved and not any(t.shape[-2:] == (5, 7) for t in saved), [t.shape for t in saved]



def test_need_weights_training_step_with_few_scores_materialises_them():
    # Few scores (B * H * Lq * Lk <= _FEW_SCORES) in a training step: MHA's own order, the weights made
    # once and the output from them (or, on the small-call route, ATen's graph of the weights beside the
    # op): values and gradients as nn.MultiheadAttention's.
    mha, cma = make_pair(batch_first=True)
    inputs = make_inputs(mha, 2, 5, 7)
    kpm = make_kpm("bool", 2, 7)
    out, weights = cma(*inputs, key_padding_mask=kpm)
    ref_out, ref_weights = mha(*inputs, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])
    torch.testing.assert_close(weights, ref_weights, **TOL[torch.float64])
    loss = lambda o, w: o.square().sum() + (w * torch.arange(w.numel(), dtype=w.dtype).view_as(w)).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(out, weights), inputs)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_weights), inputs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    torch.autograd.gradcheck(lambda q, k: cma(q, k, inputs[2], key_padding_mask=kpm)[1], inputs[:2])


@pytest.mark.parametrize("kind", ["none", "kpm", "float-3d"])
def test_averaged_weights_gradcheck_one_head_per_chunk(kind, monkeypatch):
    # The head-averaged weights recompute their probabilities chunk by chunk in backward; one head
    # per chunk here, so the chunking is exercised on small shapes.
    from mmkernels.nn import cross_modal_attention as cma_module

    monkeypatch.setattr(cma_module, "_WEIGHTS_CHUNK_SCORES", 1)
    monkeypatch.setattr(cma_module, "_FEW_SCORES", 0)  # the weights beside the op, not materialised
    monkeypatch.setattr(cma_module, "attention_small", lambda *a: None)
    mha, cma = make_pair(batch_first=True)
    inputs = make_inputs(mha, 2, 5, 7)
    masks = {"none": {}, "kpm": {"key_padding_mask": make_kpm("bool", 2, 7)},
             "float-3d": {"attn_mask": torch.randn(2 * mha.num_heads, 5, 7, dtype=torch.float64)}}[kind]
    weights = cma(*inputs, **masks)[1]
    assert type(weights.grad_fn).__name__ == "_AveragedWeightsBackward"
    torch.testing.assert_close(weights, mha(*inputs, **masks)[1], **TOL[torch.float64])
    torch.autograd.gradcheck(lambda q, k: cma(q, k, inputs[2], **masks)[1], inputs[:2])

# --------------------------------------------------------------------------- padded keys skipped


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cfg,sharing", [({}, "kv"), ({}, "self"), ({}, "distinct"), (dict(kdim=7, vdim=5), "distinct")])
def test_padded_key_rows_are_never_projected(batch_first, cfg, sharing):
    # Every other key padded (not a suffix, so the op's key-range trimming cannot hide it): the K/V
    # projections run on the visible rows only. NaN in the padded rows must not reach anything, and
    # everything else must equal nn.MultiheadAttention on the same input with those rows zeroed.
    mha, cma = make_pair(batch_first=batch_first, **cfg)
    B, L = 3, 10
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[:, 1::2] = True
    clean = make_inputs(mha, B, L, L, sharing=sharing)
    pad = kpm if batch_first else kpm.t()  # True where a row of key/value is padding
    dirty = []
    for t in clean:
        d = t.detach().clone()
        if t is not clean[0] or sharing == "self":
            d[pad] = float("nan")
        dirty.append(d.requires_grad_())
    dirty = dirty[:1] * 3 if sharing == "self" else ([dirty[0], dirty[1], dirty[1]] if sharing == "kv" else dirty)
    out, _ = cma(*dirty, key_padding_mask=kpm, need_weights=False)
    if sharing == "self":
        # Padded positions are also queries here: their rows are NaN, as their input is; the rest must be clean.
        out = out.masked_fill(pad.unsqueeze(-1), 0.0)
    assert torch.isfinite(out).all()
    zeroed = [t.detach().masked_fill(pad.unsqueeze(-1), 0.0).requires_grad_() if t is not clean[0] or sharing == "self"
              else t.detach().clone().requires_grad_() for t in clean]
    zeroed = zeroed[:1] * 3 if sharing == "self" else ([zeroed[0], zeroed[1], zeroed[1]] if sharing == "kv" else zeroed)
    ref, _ = mha(*zeroed, key_padding_mask=kpm, need_weights=False)
    if sharing == "self":
        ref = ref.masked_fill(pad.unsqueeze(-1), 0.0)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    if sharing != "self":
        out.sum().backward()
        for t in dirty[1:]:
            assert torch.isfinite(t.grad).all() and (t.grad[pad] == 0).all()


# --------------------------------------------------------------------------- dropout


def test_dropout_same_seed_same_result_forward_and_backward():
    _, cma = make_pair(batch_first=True, dropout=0.3, dtype=torch.float32)
    cma.train()
    inputs = make_inputs(cma, 2, 6, 7, dtype=torch.float32)
    results = []
    for _ in range(2):
        torch.manual_seed(42)
        results.append(run(cma, inputs, need_weights=False))
    # Same dropout mask; values to rounding (MKL's GEMM path depends on scratch alignment).
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for name in results[0][2]:
        torch.testing.assert_close(results[0][2][name], results[1][2][name], atol=1e-6, rtol=1e-6)
    torch.manual_seed(43)
    other = run(cma, inputs, need_weights=False)
    assert not torch.equal(other[0], results[0][0])
    # Eval turns dropout off: deterministic, and equal to MHA.
    cma.eval()
    torch.testing.assert_close(cma(*inputs, need_weights=False)[0], cma(*inputs, need_weights=False)[0],
                               atol=1e-6, rtol=1e-6)


def test_dropout_is_unbiased():
    # E[dropout(P)] = P (kept weights are scaled by 1/(1-p)), so the mean over many independent
    # draws approaches the eval output. The draws are the rows of one big batch of copies.
    _, cma = make_pair(batch_first=True, dropout=0.5, dtype=torch.float64)
    q, k, v = (x.detach() for x in make_inputs(cma, 1, 3, 4))
    n = 4000
    with torch.no_grad():
        cma.eval()
        expected = cma(q, k, v, need_weights=False)[0][0]
        cma.train()
        torch.manual_seed(0)
        samples = cma(q.expand(n, -1, -1), k.expand(n, -1, -1), v.expand(n, -1, -1), need_weights=False)[0]
    spread = samples.std(0)
    assert (spread > 0).all(), "every draw was the same: dropout did nothing"
    # Within 5 standard errors of the mean, everywhere.
    assert ((samples.mean(0) - expected).abs() <= 5 * spread / n**0.5).all()


def test_dropout_need_weights_matches_mha_bitwise_seeded():
    # The need_weights path does MHA's operations in MHA's order, so the same seed draws the same
    # dropout mask: outputs and returned (dropped-out) weights agree.
    mha, cma = make_pair(dropout=0.4)
    mha.train(), cma.train()
    inputs = make_inputs(mha, 2, 4, 5)
    torch.manual_seed(7)
    ref = run(mha, inputs, average_attn_weights=False)
    torch.manual_seed(7)
    ours = run(cma, inputs, average_attn_weights=False)
    torch.testing.assert_close(ours[0], ref[0], **TOL[torch.float64])
    torch.testing.assert_close(ours[1], ref[1], **TOL[torch.float64])


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("need_weights", [False, True])
def test_float32_matches_mha(need_weights):
    mha, cma = make_pair(dtype=torch.float32, batch_first=True, kdim=7, vdim=7)
    B, Lq, Lk = 2, 9, 11
    inputs = make_inputs(mha, B, Lq, Lk, sharing="kv", dtype=torch.float32)
    assert_same(mha, cma, inputs, key_padding_mask=make_kpm("bool", B, Lk),
                attn_mask=make_attn_mask("float2", B, Lq, Lk, dtype=torch.float32), need_weights=need_weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("need_weights", [False, True])
def test_half_precision_error_is_no_worse_than_mha(need_weights, dtype):
    # Both run in bfloat16 / float16 against a float64 oracle with the same (rounded) weights: our
    # output and gradients (inputs and parameters) err by at most twice what MHA's do.
    mha, cma = make_pair(dtype=dtype, batch_first=True)
    oracle = copy.deepcopy(mha).double()
    B, Lq, Lk = 2, 16, 24
    q, k, v = (x.detach().requires_grad_() for x in make_inputs(mha, B, Lq, Lk, dtype=dtype))
    kpm = make_kpm("bool", B, Lk)
    slack = 1e-2 if dtype == torch.bfloat16 else 1e-3

    def run(module, inputs, nw):
        out = module(*inputs, key_padding_mask=kpm, need_weights=nw)[0]
        grads = torch.autograd.grad(out, [*inputs, *module.parameters()], g.to(out.dtype))
        return [out.detach(), *grads]

    g = torch.randn(B, Lq, mha.embed_dim, dtype=torch.float64)
    exact = run(oracle, [x.detach().double().requires_grad_() for x in (q, k, v)], False)
    ref = run(mha, (q, k, v), need_weights)
    ours = run(cma, (q, k, v), need_weights)
    assert ours[0].dtype == dtype
    for i, (a, r, e) in enumerate(zip(ours, ref, exact)):
        assert a.dtype == dtype
        err_ours = (a.double() - e).abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        assert err_ours <= 2 * err_ref + slack * max(e.abs().max().item(), 1.0), (i, err_ours, err_ref)


@pytest.mark.cuda
def test_cuda_float32_matches_mha():
    mha, cma = make_pair(dtype=torch.float32, batch_first=True, kdim=7, vdim=7)
    mha, cma = mha.cuda(), cma.cuda()
    B, Lq, Lk = 3, 33, 70
    inputs = [x.detach().cuda().requires_grad_() for x in make_inputs(mha, B, Lq, Lk, sharing="kv", dtype=torch.float32)]
    inputs[2] = inputs[1]  # keep key is value
    masks = dict(key_padding_mask=make_kpm("bool", B, Lk).cuda(), attn_mask=make_attn_mask("bool2", B, Lq, Lk).cuda())
    # Loose: the CUDA kernels may use TF32 tensor cores.
    assert_same(mha, cma, inputs, tol=dict(atol=2e-3, rtol=2e-3), need_weights=False, **masks)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_error_is_no_worse_than_mha(dtype):
    mha, cma = make_pair(dtype=dtype, batch_first=True)
    mha, cma = mha.cuda(), cma.cuda()
    oracle = copy.deepcopy(mha).double()
    B, Lq, Lk = 2, 40, 64
    q, k, v = (x.detach().cuda() for x in make_inputs(mha, B, Lq, Lk, dtype=dtype))
    kpm = make_kpm("bool", B, Lk).cuda()
    with torch.no_grad():
        exact = oracle(q.double(), k.double(), v.double(), key_padding_mask=kpm, need_weights=False)[0]
        ref = mha(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
        ours = cma(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
    err_ours = (ours.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    assert err_ours <= 2 * err_ref + 1e-2, (err_ours, err_ref)


# --------------------------------------------------------------------------- the op is what runs


def test_attention_core_is_the_op_fed_views_of_one_projection(monkeypatch):
    calls = []
    real = ops.cross_modal_attention

    def spy(q, k, v, **kwargs):
        calls.append((q, k, v, kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(ops, "cross_modal_attention", spy)
    _, cma = make_pair(batch_first=True, dtype=torch.float32)
    x = torch.randn(2, 5, E)
    kpm = make_kpm("bool", 2, 5)
    cma(x, x, x, key_padding_mask=kpm, need_weights=False)
    (q, k, v, kwargs), = calls
    # Self-attention: one GEMM; q, k, v are strided views of its output (no copies).
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert q.shape == (2, H, 5, E // H) and not q.is_contiguous()
    assert kwargs["key_padding_mask"] is kpm and kwargs["attn_mask"] is None
    # Cross-attention with key is value: K and V from one GEMM.
    calls.clear()
    mem = torch.randn(2, 7, E)
    cma(x, mem, mem, need_weights=False)
    (q, k, v, _), = calls
    assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()


def test_2d_attn_mask_is_not_expanded(monkeypatch):
    seen = {}
    real = ops.cross_modal_attention

    def spy(q, k, v, **kwargs):
        seen.update(kwargs)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(ops, "cross_modal_attention", spy)
    _, cma = make_pair(batch_first=True, dtype=torch.float32)
    x = torch.randn(4, 5, E)
    mask = make_attn_mask("bool2", 4, 5, 5)
    cma(x, x, x, attn_mask=mask, need_weights=False)
    assert seen["attn_mask"].shape == (5, 5) and seen["attn_mask"].dtype == torch.bool
    assert torch.equal(seen["attn_mask"], ~mask)  # the op's convention: True = may attend


# --------------------------------------------------------------------------- compile and export


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    _, cma = make_pair(batch_first=True, dtype=torch.float32, kdim=7, vdim=7)
    B, Lq, Lk = 2, 5, 6
    inputs = make_inputs(cma, B, Lq, Lk, sharing="kv", dtype=torch.float32)
    kpm = make_kpm("bool", B, Lk)
    mask = make_attn_mask("bool2", B, Lq, Lk)
    eager = run(cma, inputs, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
    compiled = torch.compile(cma, fullgraph=True)
    got = run(compiled, inputs, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(got[0], eager[0])
    for name in eager[2]:
        key = name if name in got[2] else f"_orig_mod.{name}"
        torch.testing.assert_close(got[2][key], eager[2][name])


def test_torch_export():
    _, cma = make_pair(batch_first=True, dtype=torch.float32)
    cma.eval()
    q, k = torch.randn(2, 5, E), torch.randn(2, 7, E)
    kpm = make_kpm("bool", 2, 7)

    class Wrapper(nn.Module):  # export wants positional tensors and a tensor output
        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, q, k, kpm):
            return self.attn(q, k, k, key_padding_mask=kpm, need_weights=False)[0]

    model = Wrapper(cma)
    exported = torch.export.export(model, (q, k, kpm))
    torch.testing.assert_close(exported.module()(q, k, kpm), model(q, k, kpm))
    assert any("mmkernels" in str(n.target) for n in exported.graph.nodes if n.op == "call_function")


# --------------------------------------------------------------------------- bad input


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="embed_dim"):
        CrossModalAttention(10, 3)
    with pytest.raises(ValueError, match="num_heads"):
        CrossModalAttention(12, 0)
    with pytest.raises(ValueError, match="dropout"):
        CrossModalAttention(12, 3, dropout=1.5)


@pytest.mark.parametrize(
    "change,arg",
    [
        (dict(query=torch.randn(2, 5, E + 1)), "query"),
        (dict(query=torch.randn(2, 5, 3, E)), "query"),
        (dict(key=torch.randn(2, 6, E + 2)), "key"),
        (dict(value=torch.randn(2, 6, E + 2)), "value"),
        (dict(key=torch.randn(3, 6, E), value=torch.randn(3, 6, E)), "key"),
        (dict(value=torch.randn(2, 4, E)), "value"),
        (dict(key=torch.randn(6, E)), "key"),
        (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), "key_padding_mask"),
        (dict(key_padding_mask=torch.zeros(6, dtype=torch.bool)), "key_padding_mask"),
        (dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.int64)), "key_padding_mask"),
        (dict(attn_mask=torch.zeros(5, 5, dtype=torch.bool)), "attn_mask"),
        (dict(attn_mask=torch.zeros(2, 5, 6, dtype=torch.bool)), "attn_mask"),
        (dict(attn_mask=torch.zeros(1, 2 * H, 5, 6, dtype=torch.bool)), "attn_mask"),
        (dict(attn_mask=torch.zeros(5, 6, dtype=torch.int32)), "attn_mask"),
    ],
)
def test_forward_errors_name_the_argument(change, arg):
    cma = CrossModalAttention(E, H, batch_first=True)
    args = dict(query=torch.randn(2, 5, E), key=torch.randn(2, 6, E), value=torch.randn(2, 6, E))
    args.update(change)
    with pytest.raises(ValueError, match=f"'{arg}'"):
        cma(**args, need_weights=False)


def test_public_exports():
    assert mmkernels.nn.CrossModalAttention is CrossModalAttention


# --------------------------------------------------------------------------- nested tensors


@pytest.mark.parametrize("sharing", ["self", "distinct"])
@pytest.mark.parametrize("train", [False, True])
def test_nested_inputs_match_mha_per_sequence(sharing, train):
    # issue 13: jagged nested inputs (B, j, E) run through cross_modal_attention_varlen; each sequence
    # must get what nn.MultiheadAttention gives it alone, gradients included.
    mha, cma = make_pair(batch_first=True)
    mha.train(train)
    cma.train(train)
    q_lens, k_lens = [3, 6, 1], [4, 6, 2]
    qs = [torch.randn(n, E, dtype=torch.float64) for n in q_lens]
    ks = qs if sharing == "self" else [torch.randn(n, E, dtype=torch.float64) for n in k_lens]
    query = torch.nested.nested_tensor(qs, layout=torch.jagged, requires_grad=True)
    key = query if sharing == "self" else torch.nested.nested_tensor(ks, layout=torch.jagged, requires_grad=True)
    out, weights = cma(query, key, key, need_weights=False)
    assert out.is_nested and weights is None
    want = [mha(a[None], b[None], b[None], need_weights=False)[0][0] for a, b in zip(qs, ks)]
    torch.testing.assert_close(out.values(), torch.cat(want), **TOL[torch.float64])
    g = torch.randn_like(out.values())
    got = torch.autograd.grad(out.values(), [query, *cma.parameters()], g)
    ref_inputs = [t.requires_grad_() for t in qs]
    if sharing != "self":
        ref_inputs += [t.requires_grad_() for t in ks]
    ref_out = torch.cat([mha(a[None], b[None], b[None], need_weights=False)[0][0] for a, b in zip(qs, ks)])
    ref = torch.autograd.grad(ref_out, [*qs, *mha.parameters()], g)
    torch.testing.assert_close(got[0].values(), torch.cat(ref[:len(qs)]), **TOL[torch.float64])
    for a, b in zip(got[1:], ref[len(qs):]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_nested_inputs_bad_input_names_the_argument():
    _, cma = make_pair(batch_first=True)
    x = torch.nested.nested_tensor([torch.randn(3, E, dtype=torch.float64)], layout=torch.jagged)
    with pytest.raises(ValueError, match="argument 'need_weights'"):
        cma(x, x, x)
    with pytest.raises(ValueError, match="argument 'attn_mask'"):
        cma(x, x, x, need_weights=False, attn_mask=torch.zeros(3, 3))
    with pytest.raises(AssertionError, match="argument 'need_weights'"):  # mmkernels.ArgumentError
        cma(x, x, x)


def test_nested_inputs_is_causal_is_causal_within_each_sequence():
    # The hint had been dropped on the nested route (non-causal attention came back).
    mha, cma = make_pair(batch_first=True)
    qs = [torch.randn(n, E, dtype=torch.float64) for n in (4, 1, 6)]
    x = torch.nested.nested_tensor(qs, layout=torch.jagged)
    out, _ = cma(x, x, x, need_weights=False, is_causal=True)
    want = [mha(a[None], a[None], a[None], need_weights=False,
                attn_mask=torch.ones(len(a), len(a), dtype=torch.bool).triu(1))[0][0] for a in qs]
    torch.testing.assert_close(out.values(), torch.cat(want), **TOL[torch.float64])


def test_malformed_shapes_raise_what_multihead_attention_raises():
    """nn.MultiheadAttention asserts on malformed shapes (a wrong attn_mask shape is its RuntimeError);
    code that catches AssertionError from it must catch ours too, and ValueError still works
    (mmkernels.ArgumentError is both)."""
    from mmkernels import ArgumentError

    mha = torch.nn.MultiheadAttention(8, 2)
    ours = CrossModalAttention.from_module(mha)
    q, kv = torch.randn(4, 2, 8), torch.randn(5, 2, 8)
    bad_calls = {
        "key": lambda m: m(q, kv[:, :1], kv),
        "value": lambda m: m(q, kv, kv[:4]),
        "key_padding_mask": lambda m: m(q, kv, kv, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
        "query": lambda m: m(q[..., :6], kv, kv),
    }
    for name, call in bad_calls.items():
        with pytest.raises(AssertionError):
            call(mha)
        with pytest.raises(AssertionError, match=name) as info:
            call(ours)
        assert isinstance(info.value, ValueError) and type(info.value) is ArgumentError
    with pytest.raises(AssertionError, match="num_heads"):
        CrossModalAttention(8, 3)
