"""Double backward (backward with create_graph=True, torch.func) through every op and module: gradgradcheck
in float64, second-order gradients against the PyTorch code each op or module replaces, and the case that
used to come back as zeros silently (issue 19, part 2)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels import reference
from mmkernels.nn import CrossModalAttention, FusedConcatLinear
from mmkernels.nn.fusion import ConcatFusion, FiLM, GatedMultimodalUnit, LowRankFusion
from mmkernels.nn.fusion_attention import GatedCrossAttention, ModalityGraphAttention

F64 = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


def penalty_grads(fn, args, wrt):
    """d/d(wrt) of |d sum(fn(args)^2) / d args[0]|^2: a gradient penalty (WGAN-GP, R1), the second-order
    use this file is about. Every warning is an error: PyTorch's 'autograd kernel was not registered'
    warning came with the silent zeros."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(*args)
        (g,) = torch.autograd.grad(out.square().sum(), args[0], create_graph=True)
        return torch.autograd.grad(g.square().sum(), wrt)


def assert_same_penalty(fn, ref, args, wrt):
    got = penalty_grads(fn, args, wrt)
    expected = penalty_grads(ref, args, wrt)
    for a, e in zip(got, expected):
        assert e.norm() > 0  # the comparison below means something only if the answer is not zero
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------- fused_concat_linear


@pytest.mark.parametrize("activation", mmkernels.ops.ACTIVATIONS)
@pytest.mark.parametrize("route", ["public", "raw-op", "few-rows"])
def test_fused_concat_linear_gradgradcheck(activation, route):
    rows, n = (2, 17) if route == "few-rows" else (3, 5)  # few rows: M * 8 <= N takes cat + F.linear
    xs = [rand(rows, 4), rand(rows, 1), rand(rows, 3)]
    w, b = rand(n, 8), rand(n)
    if route == "raw-op":
        fn = lambda w, b, *xs: torch.ops.mmkernels.fused_concat_linear(list(xs), w, b, activation)[0]
    else:
        fn = lambda w, b, *xs: mmkernels.fused_concat_linear(xs, w, b, activation)
    assert torch.autograd.gradgradcheck(fn, (w, b, *xs))


@pytest.mark.parametrize("activation", ["gelu", "tanh", "none"])
def test_fused_concat_linear_penalty_matches_cat_linear(activation):
    xs = [rand(2, 3, 4), rand(2, 3, 5)]
    w, b = rand(6, 9), rand(6)
    fn = lambda x0, x1: mmkernels.fused_concat_linear([x0, x1], w, b, activation)
    ref = lambda x0, x1: reference.ACTIVATIONS[activation](F.linear(torch.cat([x0, x1], -1), w, b))
    assert_same_penalty(fn, ref, xs, [xs[1], w, b])


def test_fused_concat_linear_some_inputs_constant():
    xs = [rand(3, 4), torch.randn(3, 2, dtype=F64)]  # the second input needs no gradient
    w, b = rand(5, 6), torch.randn(5, dtype=F64)
    assert torch.autograd.gradgradcheck(lambda x0, w: mmkernels.fused_concat_linear([x0, xs[1]], w, b, "silu"),
                                        (xs[0], w))


# --------------------------------------------------------------------------- low_rank_fusion


def test_low_rank_fusion_gradgradcheck():
    xs = [rand(3, 4), rand(3, 2)]
    factors = [rand(2, 5, 3), rand(2, 3, 3)]
    w, b = rand(2), rand(3)
    fn = lambda w, b, x0, x1, f0, f1: mmkernels.low_rank_fusion([x0, x1], [f0, f1], w, b)
    assert torch.autograd.gradgradcheck(fn, (w, b, *xs, *factors))


def test_low_rank_fusion_penalty_matches_reference():
    xs = [rand(4, 3), rand(4, 2), rand(4, 2)]
    factors = [rand(3, 4, 5), rand(3, 3, 5), rand(3, 3, 5)]
    w, b = rand(3), rand(5)
    fn = lambda *xs: mmkernels.low_rank_fusion(xs, factors, w, b)
    ref = lambda *xs: reference.low_rank_fusion(xs, factors, w, b)
    assert_same_penalty(fn, ref, xs, [xs[2], factors[0], w])


# --------------------------------------------------------------------------- cross_modal_attention


def qkv(B=2, H=2, Lq=5, Lk=7, E=4, Ev=3):
    return rand(B, H, Lq, E), rand(B, H, Lk, E), rand(B, H, Lk, Ev)


def masks(kind, B=2, H=2, Lq=5, Lk=7):
    if kind == "kpm+len+bool":
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        kpm[0, 2] = True
        allowed = torch.rand(Lq, Lk) > 0.3
        allowed[:, 0] = True
        return {"key_padding_mask": kpm, "kv_lengths": torch.tensor([Lk, 4]), "attn_mask": allowed}
    if kind == "float4d":
        return {"attn_mask": torch.randn(B, 1, Lq, Lk, dtype=F64)}
    if kind == "masked-rows":
        return {"kv_lengths": torch.tensor([0, 4])}  # batch 0 sees no key: zero output, zero gradient
    return {}


@pytest.mark.parametrize("kind", ["none", "kpm+len+bool", "float4d", "masked-rows"])
def test_cross_modal_attention_gradgradcheck(kind):
    q, k, v = qkv(B=2, H=1, Lq=3, Lk=5, E=3, Ev=2)  # small: the full check is quadratic in the sizes
    m = masks(kind, B=2, H=1, Lq=3, Lk=5)
    fn = lambda q, k, v: mmkernels.cross_modal_attention(q, k, v, scale=0.6, **m)
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_cross_modal_attention_raw_op_gradgradcheck():
    q, k, v = qkv(B=2, H=1, Lq=3, Lk=4, E=3, Ev=2)
    kpm = torch.tensor([[False] * 3 + [True], [False] * 4])
    fn = lambda q, k, v: torch.ops.mmkernels.cross_modal_attention(q, k, v, kpm, None, None, 0.5, 0.0, None)[0]
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_cross_modal_attention_second_order_is_not_zero():
    """The issue's case: the gradient of |dL/dq|^2 with respect to k and v came back with norm 0.0,
    against 15.3 from SDPA's math path."""
    torch.manual_seed(0)
    q, k, v = qkv(B=1, H=2, Lq=5, Lk=7, E=8, Ev=8)
    gk, gv = penalty_grads(mmkernels.cross_modal_attention, (q, k, v), (k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ek, ev = penalty_grads(F.scaled_dot_product_attention, (q, k, v), (k, v))
    assert ek.norm() > 1.0 and ev.norm() > 1.0
    torch.testing.assert_close(gk, ek, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gv, ev, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", ["is_causal", "lower-right+lengths", "upper-left+lengths", "gqa", "gqa+causal"])
def test_cross_modal_attention_causal_and_gqa_penalty_matches_sdpa_math(variant):
    """The causal flag (both alignments, also beside kv_lengths) and grouped-query heads reach the
    double backward: the penalty's gradients match SDPA's math path with the same mask materialised."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    torch.manual_seed(1)
    H_kv = 1 if variant.startswith("gqa") else 2
    Lq, Lk = 4, 6  # every row sees a key under both alignments (SDPA's math path is NaN where none)
    q, k, v = rand(2, 2, Lq, 4), rand(2, H_kv, Lk, 4), rand(2, H_kv, Lk, 3)
    dense = torch.ones(Lq, Lk, dtype=torch.bool)
    kw = {"enable_gqa": True} if H_kv != 2 else {}
    if variant in ("is_causal", "gqa+causal"):
        kw["is_causal"] = True
        dense = dense.tril()
    elif variant == "lower-right+lengths":
        kw["attn_mask"] = causal_lower_right(Lq, Lk)
        dense = dense.tril(Lk - Lq)
    elif variant == "upper-left+lengths":
        kw["attn_mask"] = causal_upper_left(Lq, Lk)
        dense = dense.tril()
    if variant.endswith("+lengths"):
        lengths = torch.tensor([Lk, Lk - 1])
        kw["kv_lengths"] = lengths
        dense = dense & (torch.arange(Lk) < lengths.view(2, 1, 1, 1))
    ours = lambda q, k, v: mmkernels.cross_modal_attention(q, k, v, **kw)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=H_kv != 2)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert_same_penalty(ours, sdpa, (q, k, v), (q, k, v))


def test_cross_modal_attention_hessian_vector_product():
    q, k, v = qkv(B=1, H=1, Lq=3, Lk=4, E=2, Ev=2)
    loss = lambda fn: (lambda k: fn(q.detach(), k, v.detach()).sin().sum())
    tangent = torch.randn_like(k)
    got = torch.autograd.functional.hvp(loss(mmkernels.cross_modal_attention), k.detach(), tangent)[1]
    expected = torch.autograd.functional.hvp(loss(reference.cross_modal_attention), k.detach(), tangent)[1]
    assert expected.norm() > 0
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_cross_modal_attention_double_backward_with_dropout_is_a_clear_error():
    q, k, v = qkv()
    out = mmkernels.cross_modal_attention(q, k, v, dropout_p=0.3)
    with pytest.raises(NotImplementedError, match="dropout_p > 0"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    # first order with dropout is unaffected
    assert torch.autograd.grad(mmkernels.cross_modal_attention(q, k, v, dropout_p=0.3).sum(), q)[0].norm() > 0


# --------------------------------------------------------------------------- modules


def test_fused_concat_linear_module_penalty_matches_linear():
    module = FusedConcatLinear((3, 4), 5, activation="sigmoid").double()
    linear = nn.Linear(7, 5).double()
    linear.load_state_dict(module.state_dict())
    xs = [rand(2, 3), rand(2, 4)]
    assert_same_penalty(module, lambda a, b: torch.sigmoid(linear(torch.cat([a, b], -1))), xs, [xs[1]])
    got = penalty_grads(module, xs, [module.weight, module.bias])
    expected = penalty_grads(lambda a, b: torch.sigmoid(linear(torch.cat([a, b], -1))), xs,
                             [linear.weight, linear.bias])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_cross_modal_attention_module_penalty_matches_mha(need_weights, padding):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=5).double()
    module = CrossModalAttention.from_module(mha)
    query, key, value = rand(2, 3, 8), rand(2, 9, 6), rand(2, 9, 5)
    kpm = None
    if padding:  # hides over 1/8 of the keys: the module projects only the visible rows
        kpm = torch.zeros(2, 9, dtype=torch.bool)
        kpm[0, 5:] = True
    def call(m):
        # the output plus the returned weights, so both paths' second derivatives are checked
        def fn(query, key, value):
            out, weights = m(query, key, value, key_padding_mask=kpm, need_weights=need_weights)
            return out if weights is None else torch.cat([out.flatten(), weights.flatten()])
        return fn
    wrt = [key, value, mha.in_proj_bias, mha.out_proj.weight]
    got = penalty_grads(call(module), (query, key, value), wrt)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # the CPU flash kernel has none
        expected = penalty_grads(call(mha), (query, key, value), wrt)
    for a, e in zip(got, expected):
        assert e.norm() > 0
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("need_weights", [False, True])
def test_cross_modal_attention_module_gradgradcheck(need_weights):
    torch.manual_seed(2)
    module = CrossModalAttention(4, 2, add_bias_kv=True).double()
    attn_mask = torch.rand(3, 5) > 0.8  # MHA convention: True = not allowed
    def fn(query, key, weight):
        params = {"in_proj_weight": weight}
        out, w = torch.func.functional_call(module, params, (query, key, key),
                                            {"attn_mask": attn_mask, "need_weights": need_weights})
        return out if w is None else (out, w)
    weight = module.in_proj_weight.detach().clone().requires_grad_()
    # fast mode (random projections of the Jacobians): the full check of a module takes minutes here
    assert torch.autograd.gradgradcheck(fn, (rand(3, 2, 4), rand(5, 2, 4), weight), fast_mode=True)


def module_cases():
    torch.manual_seed(3)
    gmu = GatedMultimodalUnit((3, 2), 4).double()
    film = FiLM(3, (2, 2)).double()
    cat = ConcatFusion((3, 2), 4, activation="gelu").double()
    lrf = LowRankFusion((3, 2), 4, rank=2).double()
    gca = GatedCrossAttention(4, 2, media_dim=3, ff_mult=1).double()
    with torch.no_grad():  # its gates start at zero (tanh(0) = 0): open them so every branch counts
        for name, p in gca.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
    mga = ModalityGraphAttention(4, 2, 3).double()
    return [
        ("GatedMultimodalUnit", gmu, (rand(2, 3), rand(2, 2))),
        ("FiLM", lambda x, c0, c1: film(x, [c0, c1]), (rand(2, 3), rand(2, 2), rand(2, 2))),
        ("ConcatFusion", cat, (rand(2, 3), rand(2, 2))),
        ("LowRankFusion", lrf, (rand(2, 3), rand(2, 2))),
        ("GatedCrossAttention", gca, (rand(1, 2, 4), rand(1, 3, 3))),
        ("ModalityGraphAttention", mga, (rand(2, 3, 4),)),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in module_cases()])
def test_fusion_layer_gradgradcheck(case):
    _, module, args = module_cases()[case]
    assert torch.autograd.gradgradcheck(module, args, fast_mode=True)


@pytest.mark.parametrize("is_causal", [False, True])
def test_cross_modal_attention_varlen_gradgradcheck(is_causal):
    """The varlen op's backward had no double-backward branch: second derivatives came back as zeros."""
    cu_q, cu_k = torch.tensor([0, 2, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 4, 7], dtype=torch.int32)
    q, k, v = rand(5, 2, 3), rand(7, 1, 3), rand(7, 1, 2)  # grouped-query heads, an empty query sequence
    fn = lambda q, k, v: mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, 3, 3, is_causal=is_causal)
    assert torch.autograd.gradgradcheck(fn, (q, k, v))
    ref = lambda q, k, v: reference.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, 3, 3, is_causal=is_causal)
    assert_same_penalty(fn, ref, (q, k, v), (q, k, v))
