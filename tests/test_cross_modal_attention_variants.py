"""cross_modal_attention's causal flag (is_causal, CausalBias), grouped-query attention and NaN
propagation: against the reference, SDPA's math backend in float64, gradcheck, opcheck, compile, export."""
import pytest
import torch
import torch.nn.functional as F
from attention_support import make_masks, run_reference
from conftest import TOLERANCES
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import mmkernels
from mmkernels import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OP = torch.ops.mmkernels.cross_modal_attention.default
OP_BWD = torch.ops.mmkernels.cross_modal_attention_backward.default
CAUSAL = ["is_causal", "upper_left", "lower_right"]
# Absolute tolerance on outputs of size ~1 where the test has no scale of its own: the dtype's rounding.
LOOSE_ATOL = {torch.bfloat16: 3e-2, torch.float16: 3e-3}


def causal_kwargs(kind, Lq, Lk):
    if kind == "is_causal":
        return {"is_causal": True}
    if kind == "upper_left":
        return {"attn_mask": causal_upper_left(Lq, Lk)}
    return {"attn_mask": causal_lower_right(Lq, Lk)}


def make_gqa(B, H, Hkv, Lq, Lk, E, Ev, dtype, requires_grad=True):
    shapes = ((B, H, Lq, E), (B, Hkv, Lk, E), (B, Hkv, Lk, Ev))
    return [torch.randn(s).to(dtype).requires_grad_(requires_grad) for s in shapes]


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOLERANCES[dtype]
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected, atol=atol * max(scale, 1.0), rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(q, k, v, dtype, **kw):
    out = mmkernels.cross_modal_attention(q, k, v, enable_gqa=True, **kw)
    masks = {n: t for n, t in kw.items() if n in ("key_padding_mask", "kv_lengths") or
             (n == "attn_mask" and not isinstance(t, CausalBias))}
    rest = {n: t for n, t in kw.items() if n not in masks}
    ref, leaves = run_reference(q, k, v, masks, enable_gqa=True, **rest)
    assert not torch.isnan(out).any()
    assert_close(out, ref, dtype, "out")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.shape == b.shape, name
        assert_close(a, b, dtype, f"grad {name}")


# (B, H, Lq, Lk, E, Ev): Lq == Lk over several blocks, Lq < Lk and Lq > Lk (lower-right then hides
# whole rows), odd sizes.
CAUSAL_SHAPES = [(2, 2, 300, 300, 16, 8), (1, 2, 130, 700, 8, 5), (2, 1, 200, 77, 8, 8), (1, 3, 1, 9, 4, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", CAUSAL)
@pytest.mark.parametrize("shape", CAUSAL_SHAPES, ids=str)
def test_causal_matches_reference(shape, kind, dtype):
    B, H, Lq, Lk, E, Ev = shape
    q, k, v = make_gqa(B, H, H, Lq, Lk, E, Ev, dtype)
    check_against_reference(q, k, v, dtype, **causal_kwargs(kind, Lq, Lk))


@pytest.mark.parametrize("masks", ["kpm", "len32", "bool2d", "float3d", "kpm+len64+bool4d"])
@pytest.mark.parametrize("kind", CAUSAL)
def test_causal_combines_with_every_mask(kind, masks):
    for B, H, Lq, Lk, E, Ev in ((2, 2, 150, 600, 8, 8), (2, 2, 600, 150, 8, 4)):
        q, k, v = make_gqa(B, H, H, Lq, Lk, E, Ev, torch.float32)
        kw = make_masks(masks, B, H, Lq, Lk)
        kw.update(causal_kwargs(kind, Lq, Lk))
        if kind != "is_causal" and "attn_mask" in make_masks(masks, 1, 1, 1, 1):
            # A CausalBias takes the attn_mask slot: combine the mask through is_causal instead.
            kw = {**make_masks(masks, B, H, Lq, Lk), "is_causal": True}
        check_against_reference(q, k, v, torch.float32, **kw)


def test_is_causal_with_a_causal_bias_sees_the_intersection():
    for Lq, Lk in ((40, 90), (90, 40)):
        q, k, v = make_gqa(1, 2, 2, Lq, Lk, 8, 8, torch.float64)
        got = mmkernels.cross_modal_attention(q, k, v, is_causal=True, attn_mask=causal_lower_right(Lq, Lk))
        both = torch.ones(Lq, Lk, dtype=torch.bool).tril() & torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
        want = reference.cross_modal_attention(q, k, v, attn_mask=both)
        torch.testing.assert_close(got, want)


def test_lower_right_rows_that_see_nothing_are_zero_with_zero_gradient():
    q, k, v = make_gqa(2, 2, 2, 9, 4, 8, 8, torch.float64)
    out = mmkernels.cross_modal_attention(q, k, v, attn_mask=causal_lower_right(9, 4))
    assert (out[:, :, :5] == 0).all() and (out[:, :, 5:] != 0).all()
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert (dq[:, :, :5] == 0).all()


@pytest.mark.parametrize("Hkv", [1, 2, 6])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_matches_reference(dtype, Hkv):
    q, k, v = make_gqa(2, 6, Hkv, 70, 600, 16, 8, dtype)
    check_against_reference(q, k, v, dtype)


@pytest.mark.parametrize("masks", ["kpm", "len32", "bool4d", "float3d"])
@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_combines_with_masks_and_causal(Hkv, masks):
    B, H, Lq, Lk = 2, 4, 140, 530
    q, k, v = make_gqa(B, H, Hkv, Lq, Lk, 8, 4, torch.float32)
    check_against_reference(q, k, v, torch.float32, is_causal=True, **make_masks(masks, B, H, Lq, Lk))
    check_against_reference(q, k, v, torch.float32, **make_masks(masks, B, H, Lq, Lk))


def test_gqa_dropout_is_the_expanded_calls_dropout():
    # The keep mask is drawn per query head: GQA with dropout is exactly the call on K / V repeated.
    q, k, v = make_gqa(2, 4, 2, 33, 70, 8, 8, torch.float64)
    kx, vx = (t.detach().repeat_interleave(2, dim=1).requires_grad_() for t in (k, v))
    seed = torch.tensor(99)
    out, lse = OP(q, k, v, None, None, None, 0.4, 0.3, seed, 1)
    outx, lsex = OP(q, kx, vx, None, None, None, 0.4, 0.3, seed, 1)
    torch.testing.assert_close(out, outx)
    g = torch.randn_like(out)
    dq, dk, dv = OP_BWD(g, q, k, v, out, lse, None, None, None, 0.4, 0.3, seed, 1)
    dqx, dkx, dvx = OP_BWD(g, q, kx, vx, outx, lsex, None, None, None, 0.4, 0.3, seed, 1)
    torch.testing.assert_close(dq, dqx)
    torch.testing.assert_close(dk, dkx.unflatten(1, (2, 2)).sum(2))
    torch.testing.assert_close(dv, dvx.unflatten(1, (2, 2)).sum(2))


def test_causal_dropout_keep_rate():
    # Uniform scores (q = k = 0): each visible probability is 1 / (i + 1) times keep / (1 - p).
    Lq = Lk = 300
    q = torch.zeros(1, 2, Lq, 1, dtype=torch.float64)
    k = torch.zeros(1, 2, Lk, 1, dtype=torch.float64)
    v = torch.eye(Lk, dtype=torch.float64).expand(1, 2, Lk, Lk)
    out = OP(q, k, v, None, None, None, 1.0, 0.5, torch.tensor(5), 1)[0]
    assert (out.triu(1) == 0).all()
    kept = (out > 0).tril()
    rate = kept.sum().item() / (2 * Lq * (Lq + 1) / 2)
    assert abs(rate - 0.5) < 0.01, rate


# --------------------------------------------------------------------------- SDPA's math backend


@pytest.mark.parametrize("Hkv", [1, 2, 4])
@pytest.mark.parametrize("kind", CAUSAL + ["none"])
def test_matches_sdpa_math(kind, Hkv):
    for Lq, Lk in ((100, 260), (260, 100), (130, 130)):
        q, k, v = make_gqa(2, 4, Hkv, Lq, Lk, 16, 16, torch.float64)
        kw = {} if kind == "none" else causal_kwargs(kind, Lq, Lk)
        out = mmkernels.cross_modal_attention(q, k, v, enable_gqa=True, **kw)
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != 4, **kw)
        # SDPA gives NaN for a row that sees no key (lower-right, Lq > Lk); we give zeros.
        seen = ~want.isnan().any(-1, keepdim=True)
        assert (out[~seen.expand_as(out)] == 0).all()
        torch.testing.assert_close(out * seen, want.nan_to_num() * seen)
        if seen.all():
            g = torch.randn_like(out)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
                torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize("causal", [0, 1, 2])
@pytest.mark.parametrize("Hkv", [1, 2])
def test_gradcheck(Hkv, causal):
    for Lq, Lk in ((5, 7), (7, 5)):
        q, k, v = make_gqa(2, 2, Hkv, Lq, Lk, 3, 4, torch.float64)
        lengths = torch.tensor([6, 3]) if Lk == 7 else None
        fn = lambda q, k, v: OP(q, k, v, None, lengths, None, 0.5, 0.0, None, causal)[0]
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_through_the_public_function():
    q, k, v = make_gqa(1, 4, 2, 6, 6, 3, 3, torch.float64)
    fn = lambda q, k, v: mmkernels.cross_modal_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.7)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def _opcheck_args():
    cases = []
    for dtype in (torch.float32, torch.float64):
        q, k, v = make_gqa(2, 4, 2, 9, 13, 8, 5, dtype)
        m = make_masks("kpm+len32+bool4d", 2, 4, 9, 13, dtype)
        cases.append((q, k, v, None, None, None, 0.35, 0.0, None, 1))
        cases.append((q, k, v, m["key_padding_mask"], m["kv_lengths"], m["attn_mask"], 0.35, 0.0, None, 2))
        cases.append((q, k, v, None, None, torch.randn(9, 13, dtype=dtype), 0.35, 0.25, torch.tensor(7), 1))
    return cases


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    args = _opcheck_args()[case]
    torch.library.opcheck(OP, args)
    q, k, v = (t.detach() for t in args[:3])
    out, lse = OP(q, k, v, *args[3:])
    torch.library.opcheck(OP_BWD, (torch.randn_like(out), q, k, v, out, lse, *args[3:]))


def test_compile_fullgraph_and_export():
    q, k, v = make_gqa(2, 4, 2, 9, 21, 8, 8, torch.float32)

    bias = causal_lower_right(9, 21)  # (Dynamo cannot build a CausalBias inside the graph)

    def f(q, k, v, bias):
        a = mmkernels.cross_modal_attention(q, k, v, is_causal=True, enable_gqa=True)
        b = mmkernels.cross_modal_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        return a, b

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v, bias), f(q, k, v, bias)):
        torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(sum(t.sum() for t in compiled(q, k, v, bias)), (q, k, v))
    want_grads = torch.autograd.grad(sum(t.sum() for t in f(q, k, v, bias)), (q, k, v))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return mmkernels.cross_modal_attention(q, k, v, is_causal=True, enable_gqa=True)

    args = tuple(t.detach() for t in (q, k, v))
    ep = torch.export.export(M(), args)
    torch.testing.assert_close(ep.module()(*args), M()(*args))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name,kwargs,shapes",
    [
        ("k", {}, (4, 2)),  # enable_gqa missing
        ("k", {"enable_gqa": True}, (4, 3)),  # H not divisible by H_kv
        ("attn_mask", {"attn_mask": causal_upper_left(5, 8)}, (4, 4)),  # wrong (Lq, Lk)
    ],
)
def test_bad_input_names_the_argument(name, kwargs, shapes):
    H, Hkv = shapes
    q, k, v = make_gqa(2, H, Hkv, 5, 7, 4, 4, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        mmkernels.cross_modal_attention(q, k, v, **kwargs)


def test_bad_input_v_heads_differ_from_k():
    q, k, _ = make_gqa(2, 4, 2, 5, 7, 4, 4, torch.float32, requires_grad=False)
    v = torch.randn(2, 1, 7, 4)
    with pytest.raises(ValueError, match="argument 'v'"):
        mmkernels.cross_modal_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("name,k_heads,causal", [("causal", 2, 3), ("causal", 2, -1), ("k", 3, 0), ("v", 2, 0)])
def test_op_checks_in_cpp(name, k_heads, causal):
    q = torch.randn(2, 4, 5, 4)
    k = torch.randn(2, k_heads, 7, 4)
    v = torch.randn(2, 1 if name == "v" else k_heads, 7, 4)
    with pytest.raises(RuntimeError, match=f"argument '{name}'"):
        OP(q, k, v, None, None, None, 0.5, 0.0, None, causal)


# --------------------------------------------------------------------------- NaN propagation


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_in_a_visible_input_makes_its_row_nan(where, dtype):
    # issue 19: a NaN query used to give a zero row (treated as "sees no key"); it must give NaN.
    q, k, v = make_gqa(1, 2, 2, 6, 600, 8, 8, dtype, requires_grad=False)
    {"q": q, "k": k, "v": v}[where][0, 0, 1, 0] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = mmkernels.cross_modal_attention(q, k, v)
    expected_nan = torch.zeros(out.shape, dtype=torch.bool)
    if where == "q":
        expected_nan[0, 0, 1] = True  # that query's row
    elif where == "k":
        expected_nan[0, 0] = True  # every query sees key 1: every row of head 0
    else:
        expected_nan[0, 0, :, 0] = True  # value feature 0 of key 1 reaches feature 0 of every row
    assert out.isnan().eq(expected_nan).all()
    want = reference.cross_modal_attention(q, k, v)
    torch.testing.assert_close(out, want, equal_nan=True, atol=LOOSE_ATOL.get(dtype, 1e-5), rtol=2e-2)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for name, a, b in zip("qkv", grads, want_grads):
        assert a.isnan().eq(b.isnan()).all(), f"grad {name}: NaN positions differ from the reference"
    assert grads[0].isnan().any() and grads[1].isnan().any(), "the gradients hide the NaN"
    if where == "q":
        assert grads[0][0, 0, 1].isnan().all() and not grads[0][0, 1].isnan().any()


def test_row_of_nan_query_that_sees_no_key_is_zero():
    # Only a row that sees no key gives zeros, NaN or not: the hidden keys are never read.
    q, k, v = make_gqa(2, 1, 1, 4, 9, 8, 8, torch.float64, requires_grad=False)
    q[:, :, 2] = float("nan")
    v[:, :, 5:] = float("nan")  # hidden by kv_lengths: never read
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    lengths = torch.tensor([0, 5])
    out = mmkernels.cross_modal_attention(q, k, v, kv_lengths=lengths)
    assert (out[0] == 0).all()
    assert out[1, 0, 2].isnan().all() and not out[1, 0, [0, 1, 3]].isnan().any()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (dk[1, :, 5:] == 0).all() and (dv[1, :, 5:] == 0).all()
    assert dq[1, 0, 2].isnan().all() and not dq[1, 0, [0, 1, 3]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_value_behind_a_minus_inf_score_makes_the_row_gradient_nan(dtype):
    # CI's long fuzz, 2026-12-02: an infinite key gives query 1 a -inf score (probability 0) and its
    # value is NaN, so out[1] = 0 * NaN + ... is NaN. The kernels' backward then forms D = rowsum(dO O)
    # = NaN and a NaN grad_q row, as PyTorch's SDPA does; the reference used to block that key's
    # gradient and give zeros.
    q = torch.tensor([[0.66, 0.27, 0.06, 0.62, -0.45], [-0.17, -1.52, 0.38, -1.03, -0.56]], dtype=dtype)
    k = torch.randn(2, 5, dtype=dtype)
    k[0, 0] = float("inf")  # scores: [+inf, finite] for query 0, [-inf, finite] for query 1
    v = torch.tensor([[float("nan")], [0.23]], dtype=dtype)
    q = q[None, None].requires_grad_()
    k, v = k[None, None], v[None, None]
    g = torch.ones(1, 1, 2, 1, dtype=dtype)
    out = mmkernels.cross_modal_attention(q, k, v)
    want = reference.cross_modal_attention(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.isnan().all() and want.isnan().all()
    (dq,), (rq,), (sq,) = (torch.autograd.grad(o, (q,), g) for o in (out, want, sdpa))
    assert dq[0, 0, 1].isnan().all()
    assert dq.isnan().eq(rq.isnan()).all() and dq.isnan().eq(sq.isnan()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_key_with_underflowed_probability_passes_no_gradient_in_a_nan_row(dtype):
    # Local long fuzz, seed 7: logits of scale 1000 give key 1 a probability of exactly 0, and key 0's
    # value is NaN, so the row is NaN. Key 1 had no influence: its dS is 0 (the flash backward's rule,
    # now the reference's too), where the materialised softmax forms 0 * NaN.
    q = torch.full((1, 1, 1, 1), 1000.0, dtype=dtype, requires_grad=True)
    k = torch.tensor([0.5, -0.5, 0.4], dtype=dtype).view(1, 1, 3, 1).requires_grad_()
    v = torch.tensor([float("nan"), 1.0, 2.0], dtype=dtype).view(1, 1, 3, 1)
    out = mmkernels.cross_modal_attention(q, k, v)
    want = reference.cross_modal_attention(q, k, v)
    assert out.isnan().all() and want.isnan().all()
    (dk,), (rk,) = (torch.autograd.grad(o, (k,), torch.ones_like(o)) for o in (out, want))
    assert dk[0, 0, 1] == 0 and rk[0, 0, 1] == 0
    assert dk.isnan().eq(rk.isnan()).all() and dk[0, 0, [0, 2]].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_hidden_by_any_mask_are_never_read_by_a_nan_row(dtype):
    # A NaN query row with a bool / -inf float / causal mask: the hidden keys get no gradient.
    q, k, v = make_gqa(1, 1, 1, 3, 6, 4, 4, dtype, requires_grad=False)
    q[0, 0, 2] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    bool_mask = torch.tensor([True, True, False, True, False, False]).expand(3, 6)
    float_mask = torch.zeros(3, 6).masked_fill(~bool_mask, float("-inf")).to(dtype)
    for kw in ({"attn_mask": bool_mask}, {"attn_mask": float_mask}, {"is_causal": True}):
        out = mmkernels.cross_modal_attention(q, k, v, **kw)
        want = reference.cross_modal_attention(q, k, v, **kw)
        assert out[0, 0, 2].isnan().all() and not out[0, 0, :2].isnan().any()
        g = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
        rq, rk, rv = torch.autograd.grad(want, (q, k, v), g)
        hidden = ~bool_mask[0] if "attn_mask" in kw else torch.arange(6) > 2
        assert not dv[0, 0, hidden].isnan().any()
        for a, b in ((dq, rq), (dv, rv)):
            assert a.isnan().eq(b.isnan()).all()
        # dK of a hidden key is dS^T Q with dS = 0 there: the reference (and the kernel, within a key
        # block it computes) forms 0 * NaN; the causal flag skips those keys, leaving an exact 0.
        if "attn_mask" in kw:
            assert dk.isnan().eq(rk.isnan()).all()
        else:
            assert (dk[0, 0, hidden] == 0).all() and dk[0, 0, ~hidden].isnan().eq(rk[0, 0, ~hidden].isnan()).all()


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq", [1, 4])
def test_decoding_splits_keys_and_matches_reference(Lq, dtype):
    # One (batch, kv head) and many key blocks: the forward splits the keys across threads and merges
    # the chunks by their log-sum-exps; rows with no key, NaN rows and masks must survive the merge.
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # B * H_kv = 1 and 2 query heads: 2 tasks unsplit, fewer than 2 per thread, so the keys split.
        q, k, v = make_gqa(1, 2, 1, Lq, 2300, 16, 8, dtype)
        lengths = torch.tensor([1900])
        for kw in ({}, {"is_causal": True}, {"kv_lengths": lengths, "attn_mask": torch.rand(Lq, 2300) < 0.9},
                   {"attn_mask": causal_lower_right(Lq, 2300)}):
            check_against_reference(q, k, v, dtype, **kw)
        qn = q.detach().clone()
        qn[0, 1, 0] = float("nan")
        out = mmkernels.cross_modal_attention(qn, k, v, kv_lengths=lengths, enable_gqa=True)
        assert out[0, 1, 0].isnan().all() and not out[0, 0].isnan().any()
        out = mmkernels.cross_modal_attention(qn, k, v, kv_lengths=torch.tensor([0]), enable_gqa=True)
        assert (out == 0).all()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("layout", ["BHLE", "BLHE"])
@pytest.mark.parametrize("H, Hkv", [(8, 1), (8, 2), (16, 4)])
def test_grouped_query_decoding_matches_reference(H, Hkv, layout):
    # One query per head (float32): the forward reads each K / V row once for the whole group of query
    # heads (one item of G rows); backward recomputes the scores one head at a time. Every per-head
    # input (a float mask per head, dropout's per-head draw) and transformers' (B, L, H, E) layout.
    B, Lk, E, Ev = 2, 1100, 16, 8
    q, k, v = make_gqa(B, H, Hkv, 1, Lk, E, Ev, torch.float32)
    if layout == "BLHE":  # (B, H, L, E) views of (B, L, H, E) storage: Q's rows across heads are E apart
        q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    pad = torch.rand(B, Lk) < 0.2
    for kw in ({}, {"key_padding_mask": pad}, {"attn_mask": torch.randn(B, H, 1, Lk)},
               {"kv_lengths": torch.tensor([700, 3]), "is_causal": True}, {"attn_mask": causal_lower_right(1, Lk)}):
        check_against_reference(q, k, v, torch.float32, **kw)
    # One visible key: P = 1 in the forward and, recomputed per head, exactly 1 in backward too.
    out = mmkernels.cross_modal_attention(q, k, v, kv_lengths=torch.tensor([1, 1]), enable_gqa=True)
    assert torch.equal(out, v[:, :, :1].repeat_interleave(H // Hkv, 1))
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
    assert (dq == 0).all()
    # Dropout draws per (head, query, key), as the call with K and V repeated per head does.
    kr, vr = (t.detach().repeat_interleave(H // Hkv, 1) for t in (k, v))
    torch.manual_seed(3)
    a = mmkernels.cross_modal_attention(q, k, v, dropout_p=0.3, enable_gqa=True)
    torch.manual_seed(3)
    b = mmkernels.cross_modal_attention(q, kr, vr, dropout_p=0.3)
    torch.testing.assert_close(a, b)
