"""cross_modal_attention_varlen (packed variable-length sequences) against the reference, SDPA's math
backend in float64 per sequence, gradcheck, opcheck, compile, export and bad input."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from torch.nn.attention import SDPBackend, sdpa_kernel

import mmkernels
from mmkernels import reference

OP = torch.ops.mmkernels.cross_modal_attention_varlen.default
OP_BWD = torch.ops.mmkernels.cross_modal_attention_varlen_backward.default


def packed(lens_q, lens_k, H, Hkv, E, Ev, dtype, requires_grad=True):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), H, E).to(dtype).requires_grad_(requires_grad)
    k = torch.randn(int(cu_k[-1]), Hkv, E).to(dtype).requires_grad_(requires_grad)
    v = torch.randn(int(cu_k[-1]), Hkv, Ev).to(dtype).requires_grad_(requires_grad)
    return q, k, v, cu_q, cu_k, max(lens_q, default=0), max(lens_k, default=0)


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOLERANCES[dtype]
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=atol * max(scale, 1.0), rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


# Empty, length-1 and long sequences, in both directions.
LENGTHS = [
    ([5, 0, 1, 300, 17], [7, 4, 0, 260, 17]),
    ([1, 1, 1], [600, 1, 33]),
    ([130], [130]),
    ([], []),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("Hkv", [1, 2, 4])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_matches_reference(lengths, Hkv, is_causal, dtype):
    q, k, v, cu_q, cu_k, mq, mk = packed(*lengths, 4, Hkv, 8, 6, dtype)
    out = mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, is_causal=is_causal)
    assert out.shape == (q.shape[0], 4, 6) and out.dtype == dtype
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.cross_modal_attention_varlen(*leaves, cu_q, cu_k, is_causal=is_causal)
    assert_close(out, ref, dtype, "out")
    if out.numel() == 0:
        return
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, leaves, g.double())):
        assert_close(a, b, dtype, f"grad {name}")


def test_matches_sdpa_math_per_sequence():
    q, k, v, cu_q, cu_k, mq, mk = packed([3, 40, 1], [9, 40, 70], 4, 2, 16, 16, torch.float64)
    out = mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, is_causal=True)
    for b in range(3):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(
                q[rq].transpose(0, 1), k[rk].transpose(0, 1), v[rk].transpose(0, 1), is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out[rq], want.transpose(0, 1))


def test_same_as_the_dense_op_on_each_sequence():
    # The per-sequence dense call, on the sequences' rows: the packed layout adds nothing.
    q, k, v, cu_q, cu_k, mq, mk = packed([20, 7], [33, 5], 2, 2, 8, 8, torch.float32, requires_grad=False)
    out = mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, mq, mk)
    dense = mmkernels.cross_modal_attention(q[:20].transpose(0, 1)[None], k[:33].transpose(0, 1)[None],
                                            v[:33].transpose(0, 1)[None])
    torch.testing.assert_close(out[:20], dense[0].transpose(0, 1), rtol=0, atol=0)


def test_dropout_statistics_and_independent_sequences():
    # Uniform scores and v = I: each output element is keep / ((1 - p) Lk); two equal sequences must
    # not draw the same mask.
    Lk, p = 200, 0.4
    q = torch.zeros(2 * 64, 2, 1, dtype=torch.float64)
    k = torch.zeros(2 * Lk, 2, 1, dtype=torch.float64)
    v = torch.eye(Lk, dtype=torch.float64).repeat(2, 1)[:, None, :].expand(2 * Lk, 2, Lk).contiguous()
    cu_q = torch.tensor([0, 64, 128], dtype=torch.int32)
    cu_k = torch.tensor([0, Lk, 2 * Lk], dtype=torch.int32)
    torch.manual_seed(3)
    out = mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, 64, Lk, dropout_p=p)
    keep = out > 0
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 0.01, rate
    assert (keep[:64] != keep[64:]).any()


@pytest.mark.parametrize("causal", [0, 1])
def test_gradcheck(causal):
    q, k, v, cu_q, cu_k, mq, mk = packed([3, 0, 2], [2, 3, 4], 2, 1, 3, 4, torch.float64)
    fn = lambda q, k, v: OP(q, k, v, cu_q, cu_k, mq, mk, 0.5, 0.0, None, causal)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("case", range(3))
def test_opcheck(case):
    q, k, v, cu_q, cu_k, mq, mk = packed([5, 0, 9], [4, 6, 9], 4, 2, 8, 5, torch.float32)
    args = [
        (q, k, v, cu_q, cu_k, mq, mk, 0.3, 0.0, None, 0),
        (q, k, v, cu_q, cu_k, mq, mk, 0.3, 0.0, None, 1),
        (q, k, v, cu_q, cu_k, mq, mk, 0.3, 0.2, torch.tensor(5), 1),
    ][case]
    torch.library.opcheck(OP, args)
    qd, kd, vd = (t.detach() for t in args[:3])
    out, lse = OP(qd, kd, vd, *args[3:])
    torch.library.opcheck(OP_BWD, (torch.randn_like(out), qd, kd, vd, out, lse, *args[3:]))


def test_compile_fullgraph_and_export():
    q, k, v, cu_q, cu_k, mq, mk = packed([5, 11], [9, 4], 4, 2, 8, 8, torch.float32)

    def f(q, k, v, cu_q, cu_k):
        return mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, is_causal=True)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, cu_q, cu_k)
    want = f(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, b)

    class M(torch.nn.Module):
        def forward(self, q, k, v, cu_q, cu_k):
            return f(q, k, v, cu_q, cu_k)

    args = tuple(t.detach() for t in (q, k, v)) + (cu_q, cu_k)
    ep = torch.export.export(M(), args)
    torch.testing.assert_close(ep.module()(*args), M()(*args))


def _bad(change):
    q, k, v, cu_q, cu_k, mq, mk = packed([3, 4], [5, 2], 4, 2, 8, 8, torch.float32, requires_grad=False)
    a = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)
    change(a)
    return a


@pytest.mark.parametrize("name,change", [
    ("cu_seqlens_q", lambda a: a.update(cu_seqlens_q=torch.tensor([0, 4, 3], dtype=torch.int32))),  # decreasing
    ("cu_seqlens_q", lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long())),  # dtype
    ("cu_seqlens_k", lambda a: a.update(cu_seqlens_k=torch.tensor([0, 5, 6], dtype=torch.int32))),  # last value
    ("cu_seqlens_q", lambda a: a.update(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32))),  # not from 0
    ("cu_seqlens_k", lambda a: a.update(cu_seqlens_k=torch.tensor([0, 2, 5, 7], dtype=torch.int32))),  # batch
    ("max_seqlen_q", lambda a: a.update(max_seqlen_q=3)),  # too small
    ("max_seqlen_k", lambda a: a.update(max_seqlen_k=4)),
    ("k", lambda a: a.update(k=a["k"][:, :1].repeat(1, 3, 1), v=a["v"][:, :1].repeat(1, 3, 1))),  # 3 heads for 4
    ("v", lambda a: a.update(v=a["v"][:5])),  # inconsistent with k's rows
    ("q", lambda a: a.update(q=a["q"][None])),
])
def test_bad_input_names_the_argument(name, change):
    a = _bad(change)
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        mmkernels.cross_modal_attention_varlen(**a)
    # The C++ kernel checks again (the op can be called without the wrapper).
    if name not in ("q",):
        with pytest.raises(RuntimeError, match=f"argument '{name}'"):
            OP(*a.values(), 0.5, 0.0, None, 0)


# --------------------------------------------------------------------------- the batch schedule
# The kernel runs a sequence worth >= 1/(2 threads) of the batch alone over every thread and the
# others side by side, one per thread; with 2 threads these batches take both paths.


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


MIXED = [
    ([1, 3, 2, 5, 1, 4, 2, 1] * 6 + [300], [4, 1, 2, 6, 1, 9, 3, 2] * 6 + [270]),  # many short, one long
    ([0, 7, 0, 1, 200, 0, 3], [5, 0, 0, 1, 180, 2, 3]),  # empty q, empty k, both empty
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("Hkv", [1, 4])
@pytest.mark.parametrize("lengths", MIXED, ids=["short+long", "empty"])
def test_mixed_batch_matches_reference(two_threads, lengths, Hkv, is_causal, dtype):
    q, k, v, cu_q, cu_k, mq, mk = packed(*lengths, 4, Hkv, 16, 8, dtype)
    out = mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, is_causal=is_causal)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.cross_modal_attention_varlen(*leaves, cu_q, cu_k, is_causal=is_causal)
    assert_close(out, ref, dtype, "out")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for name, a, b in zip("qkv", grads, torch.autograd.grad(ref, leaves, g.double())):
        assert_close(a, b, dtype, f"grad {name}")
    # A query with no key: zeros and zero gradient; keys no query reads: zero gradient.
    lq, lk = lengths
    for b in range(len(lq)):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lk[b] == 0:
            assert (out[rq] == 0).all() and (grads[0][rq] == 0).all()
        if lq[b] == 0:
            assert (grads[1][rk] == 0).all() and (grads[2][rk] == 0).all()


def test_schedule_gives_each_sequence_the_dense_result(two_threads):
    # Short sequences run one per thread (inline), the long one over both threads: either way each
    # sequence's output is the dense op's on its rows, to the bit; gradients within rounding.
    lq, lk = [2, 9, 1, 4] * 5 + [300], [3, 9, 5, 1] * 5 + [260]
    q, k, v, cu_q, cu_k, mq, mk = packed(lq, lk, 4, 2, 16, 16, torch.float32)
    out = mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, is_causal=True)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for b in range(len(lq)):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        qb, kb, vb = (t[r].detach().transpose(0, 1)[None].requires_grad_() for t, r in ((q, rq), (k, rk), (v, rk)))
        dense = mmkernels.cross_modal_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out[rq], dense[0].transpose(0, 1), rtol=0, atol=0)
        want = torch.autograd.grad(dense, (qb, kb, vb), g[rq].transpose(0, 1)[None])
        for name, got, w, r in zip("qkv", grads, want, (rq, rk, rk)):
            torch.testing.assert_close(got[r], w[0].transpose(0, 1), msg=lambda m: f"grad {name} of {b}: {m}")


def test_dropout_same_seed_same_result_across_calls(two_threads):
    q, k, v, cu_q, cu_k, mq, mk = packed([3, 1, 5, 2] * 4 + [300], [4, 2, 5, 1] * 4 + [280], 4, 2, 16, 16,
                                         torch.float32)
    g = torch.randn(q.shape[0], 4, 16)

    def run(seed):
        torch.manual_seed(seed)
        out = mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, dropout_p=0.3, is_causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], other[0])


def test_output_and_dropout_mask_do_not_depend_on_the_schedule():
    # One thread: 5 sequences, each run whole; two: the long one runs whole over both threads, and the
    # 4 short ones, too few to balance 2 threads, as one problem per kv head (each its heads' mask).
    q, k, v, cu_q, cu_k, mq, mk = packed([3, 1, 5, 2, 300], [4, 2, 5, 1, 280], 4, 2, 16, 16, torch.float32,
                                         requires_grad=False)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(11)
            outs.append(mmkernels.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, dropout_p=0.3))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("causal", [0, 1])
def test_gradcheck_mixed_batch(two_threads, causal, dropout_p):
    # Short sequences side by side and a longer one alone, GQA, empty sequences on either side; with
    # a fixed seed the dropout mask is a fixed function, so backward must replay the forward's.
    q, k, v, cu_q, cu_k, mq, mk = packed([1, 0, 12, 2, 3, 1], [4, 3, 11, 0, 3, 2], 4, 2, 3, 4, torch.float64)
    seed = torch.tensor(123) if dropout_p > 0 else None
    fn = lambda q, k, v: OP(q, k, v, cu_q, cu_k, mq, mk, 0.7, dropout_p, seed, causal)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


# --------------------------------------------------------------------------- nested tensors


def nested(lengths, H, D, dtype=torch.float64):
    seqs = [torch.randn(n, H, D, dtype=dtype) for n in lengths]
    x = torch.nested.nested_tensor(seqs, layout=torch.jagged, requires_grad=True)
    return x, x.transpose(1, 2)  # the leaf, and SDPA's (B, H, j, D) view


@pytest.mark.parametrize("is_causal", [False, True])
def test_jagged_nested_tensors_go_to_varlen_and_match_sdpa(is_causal):
    xq, q = nested([3, 7, 1], 4, 8)
    xk, k = nested([5, 7, 2], 2, 8)
    xv, v = nested([5, 7, 2], 2, 8)
    # The same packed values and lengths as dense per-sequence calls (SDPA's jagged path lacks GQA).
    out = mmkernels.cross_modal_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    assert out.is_nested and out.shape[:2] == (3, 4)
    vals = out.transpose(1, 2).values()
    want = torch.cat([
        reference.cross_modal_attention(a.transpose(0, 1)[None], b.transpose(0, 1)[None], c.transpose(0, 1)[None],
                                        is_causal=is_causal, enable_gqa=True)[0].transpose(0, 1)
        for a, b, c in zip(xq.unbind(), xk.unbind(), xv.unbind())
    ])
    torch.testing.assert_close(vals, want)
    g = torch.randn_like(vals)
    got_grads = torch.autograd.grad(vals, (xq, xk, xv), g)
    want_grads = torch.autograd.grad(want, (xq, xk, xv), g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.values(), b.values())
    if not is_causal:  # SDPA's own jagged path, same heads
        xk2, k2 = nested([5, 7, 2], 4, 8)
        xv2, v2 = nested([5, 7, 2], 4, 8)
        sd = F.scaled_dot_product_attention(q, k2, v2)
        ours = mmkernels.cross_modal_attention(q, k2, v2)
        torch.testing.assert_close(ours.transpose(1, 2).values(), sd.transpose(1, 2).values())


def test_nested_bad_input_names_the_argument():
    _, q = nested([3, 2], 2, 4)
    _, k = nested([3, 2], 2, 4)
    with pytest.raises(ValueError, match="argument 'k'"):
        mmkernels.cross_modal_attention(q, torch.randn(2, 2, 3, 4), k)
    with pytest.raises(ValueError, match="argument 'attn_mask'"):
        mmkernels.cross_modal_attention(q, k, k, attn_mask=torch.ones(3, 3, dtype=torch.bool))
