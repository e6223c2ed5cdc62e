"""csrc/small_calls.cpp (issue 19): the one-call C++ route of small plain eager calls gives exactly (bitwise)
what the Python path gives, serves the calls it is meant for, and hands everything else back (None)."""
import itertools
import sys

import pytest
import torch

import mmkernels
import mmkernels.nn.cross_modal_attention as cma_module
import mmkernels.nn.fused_concat_linear as fcl_module
from mmkernels import _C, reference
from mmkernels._errors import ArgumentError
from mmkernels.nn import CrossModalAttention, FusedConcatLinear

fcl_ops = sys.modules["mmkernels.ops.fused_concat_linear"]


def _python_path(monkeypatch):
    """Switch the C++ route off: what the modules and the op did before it."""
    monkeypatch.setattr(cma_module, "attention_small", lambda *a: None)
    monkeypatch.setattr(fcl_module, "concat_linear_small", lambda *a: None)
    monkeypatch.setattr(fcl_ops, "concat_linear_small", lambda *a: None)


def _inputs(B, Lq, Lk, E, batch_first, sharing, dtype):
    shape = (lambda L: (B, L, E)) if batch_first else (lambda L: (L, B, E))
    q, k, v = torch.randn(shape(Lq), dtype=dtype), torch.randn(shape(Lk), dtype=dtype), torch.randn(shape(Lk), dtype=dtype)
    if sharing == "self":
        return q, q, q
    return (q, k, k) if sharing == "kv" else (q, k, v)


@pytest.mark.parametrize("batch_first,sharing,padding,need_weights,average,dtype", list(itertools.product(
    (True, False), ("self", "kv", "none"), (None, "one", "most"), (False, True), (True, False),
    (torch.float32, torch.bfloat16))))
def test_attention_route_is_the_python_path(monkeypatch, batch_first, sharing, padding, need_weights, average, dtype):
    monkeypatch.setattr(cma_module, "ONEDNN_MIN_MACS", 1 << 24)  # the default (the tests' session sets 0)
    torch.manual_seed(0)
    B, E, H = 2, 64, 4
    Lq, Lk = (7, 7) if sharing == "self" else (3, 17)
    m = CrossModalAttention(E, H, batch_first=batch_first, dtype=dtype).eval()
    q, k, v = _inputs(B, Lq, Lk, E, batch_first, sharing, dtype)
    kpm = None
    if padding:  # one padded key: every row projected; most: the visible rows only
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        kpm[:, (Lk - 1) if padding == "one" else 4:] = True
    args = (q, k, v)
    kw = dict(key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=average)
    with torch.inference_mode():
        assert _C.attention_small(q, k, v, kpm, need_weights, average, m.in_proj_weight, m.in_proj_bias,
                                  m.out_proj.weight, m.out_proj.bias, H, batch_first, 1 << 22, 1 << 24) is not None
        out, weights = m(*args, **kw)
        _python_path(monkeypatch)
        ref_out, ref_weights = m(*args, **kw)
    assert torch.equal(out, ref_out)
    assert (weights is None) == (not need_weights) and (weights is None or torch.equal(weights, ref_weights))


def test_attention_route_against_mha_and_nan_behaviour(monkeypatch):
    monkeypatch.setattr(cma_module, "ONEDNN_MIN_MACS", 1 << 24)
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(128, 2, batch_first=True).eval()
    m = CrossModalAttention.from_module(mha)
    q, k = torch.randn(3, 2, 128), torch.randn(3, 40, 128)
    kpm = torch.zeros(3, 40, dtype=torch.bool)
    kpm[:, 30:] = True
    with torch.inference_mode():
        out, w = m(q, k, k, key_padding_mask=kpm)
        ref, ref_w = mha(q, k, k, key_padding_mask=kpm)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
        k_nan = k.clone()
        k_nan[:, 35] = float("nan")  # padded: never read (the visible-row projection)
        assert m(q, k_nan, k_nan, key_padding_mask=kpm)[0].isfinite().all()
        q_nan = q.clone()
        q_nan[1, 0, 0] = float("nan")  # a NaN query row stays NaN
        out = m(q_nan, k, k, key_padding_mask=kpm, need_weights=False)[0]
        assert out[1, 0].isnan().all() and out[0].isfinite().all()


def test_attention_route_hands_back_what_it_does_not_serve():
    m = CrossModalAttention(64, 4, batch_first=True)
    q, k = torch.randn(2, 3, 64), torch.randn(2, 9, 64)
    route = lambda q, k, v, kpm=None, need_weights=False: _C.attention_small(  # noqa: E731
        q, k, v, kpm, need_weights, True, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias, 4,
        True, 1 << 22, 1 << 24)
    with torch.no_grad():
        assert route(q, k, k) is not None
        assert route(q, k, k, torch.zeros(2, 9)) is None  # float padding mask
        assert route(q, k[:, :, :32], k) is None  # wrong width: the Python checks name it
        assert route(q.unsqueeze(0), k, k) is None
        seen = []
        torch.func.vmap(lambda x: seen.append(route(x, k, k)) or x)(q.unsqueeze(0))  # functorch: not served
        assert seen == [None]
        with pytest.raises(ArgumentError, match="argument 'key'"):
            m(q, k[:, :, :32], k[:, :, :32])
    with torch.no_grad():
        assert route(q, k, k) is not None
        sub = torch.Tensor._make_subclass(type("Sub", (torch.Tensor,), {}), q)
        assert route(sub, k, k) is None


@pytest.mark.parametrize("widths,M,N,activation", list(itertools.product(
    ((64,), (64, 32), (5, 7, 9)), (1, 8, 32, 33), (1, 300), mmkernels.ops.ACTIVATIONS)))
def test_concat_linear_route(monkeypatch, widths, M, N, activation):
    # Up to 32 float32 rows the route is the op (its kernel: csrc/cpu/small_gemm.h) with its autograd
    # formula as one C++ node: bitwise the op's numbers, close to the reference's. Above, the reference's
    # own ATen ops: bitwise the reference.
    monkeypatch.setattr(fcl_module, "ONEDNN_MIN_MACS", 1 << 24)  # the default size rule (the session sets 0)
    monkeypatch.setattr(fcl_ops, "ONEDNN_MIN_MACS", 1 << 24)
    torch.manual_seed(2)
    linear = torch.nn.Linear(sum(widths), N)
    module = FusedConcatLinear.from_linear(linear, widths, activation=activation)
    xs = [torch.randn(M, d, requires_grad=True) for d in widths]
    leaves = [*xs, linear.weight, linear.bias]
    assert _C.concat_linear_small(xs, linear.weight, linear.bias, activation, 1 << 24, None) is not None
    out = module(*xs)
    few_rows = M <= 32
    assert ("ConcatLinearFunction" in out.grad_fn.name()) == few_rows
    if few_rows:
        expected = torch.ops.mmkernels.fused_concat_linear(xs, linear.weight, linear.bias, activation)[0]
        torch.testing.assert_close(out, reference.fused_concat_linear(xs, linear.weight, linear.bias, activation))
    else:
        expected = reference.fused_concat_linear(xs, linear.weight, linear.bias, activation)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, leaves, grad)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with torch.inference_mode():
        assert torch.equal(mmkernels.fused_concat_linear(xs, linear.weight, linear.bias, activation), expected)


@pytest.mark.parametrize("activation", mmkernels.ops.ACTIVATIONS)
def test_concat_linear_route_double_backward(activation):
    # The route's C++ node differentiates its backward through the reference's operations when grad mode
    # is on inside it (create_graph=True): second derivatives as the reference's, not zeros.
    torch.manual_seed(5)
    xs = [torch.randn(3, d, requires_grad=True) for d in (6, 5)]
    w, b = torch.randn(7, 11, requires_grad=True), torch.randn(7, requires_grad=True)

    def second(fn):
        out = fn(xs, w, b, activation)
        grads = torch.autograd.grad(out, [xs[0], w], torch.ones_like(out), create_graph=True)
        return torch.autograd.grad(grads[0].square().sum() + grads[1].square().sum(), [xs[1], w, b], allow_unused=True)

    got = second(mmkernels.fused_concat_linear)
    assert "ConcatLinearFunction" in mmkernels.fused_concat_linear(xs, w, b, activation).grad_fn.name()
    for a, e in zip(got, second(reference.fused_concat_linear)):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_concat_linear_route_hands_back_what_it_does_not_serve():
    w, b = torch.randn(16, 12), torch.randn(16)
    xs = [torch.randn(4, 5), torch.randn(4, 7)]
    route = _C.concat_linear_small
    assert route(xs, w, b, "relu", 1 << 24, None) is not None
    assert route(xs, w, b, "relu", 1 << 24, (5, 7)) is not None
    assert route(xs, w, b, "relu", 1 << 24, (7, 5)) is None  # not the module's feature sizes
    assert route(xs, w, b, "swish", 1 << 24, None) is None
    assert route(xs, w[:, :11], b, "none", 1 << 24, None) is None
    assert route([xs[0], xs[1][:3]], w, b, "none", 1 << 24, None) is None
    assert route(xs, w, b.double(), "none", 1 << 24, None) is None
    rows = [torch.randn(40, 5), torch.randn(40, 7)]
    assert route(rows, torch.randn(2, 12), None, "none", 0, None) is None  # above the size, over 32 rows
    with pytest.raises(ArgumentError, match="argument 'weight'"):
        mmkernels.fused_concat_linear(xs, w[:, :11], b)
    with pytest.raises(ArgumentError, match="feature sizes"):
        FusedConcatLinear((7, 5), 16)(*xs)
    seen = []
    torch.func.vmap(lambda x: seen.append(route([x, xs[1]], w, b, "relu", 1 << 24, None)) or x)(xs[0].unsqueeze(0))
    assert seen == [None]  # a functorch transform: the Python path


@pytest.mark.parametrize("batch_first,sharing,padding", list(itertools.product(
    (True, False), ("self", "kv", "none"), (None, "most"))))
def test_attention_route_training_step_is_the_python_path(monkeypatch, batch_first, sharing, padding):
    # A training step (no dropout, need_weights=False) records its graph through the route's ATen ops and
    # the op's registered autograd: the same gradients, bitwise, and a double backward.
    monkeypatch.setattr(cma_module, "ONEDNN_MIN_MACS", 1 << 24)
    torch.manual_seed(3)
    B, E, H = 2, 32, 2
    Lq, Lk = (5, 5) if sharing == "self" else (3, 11)
    m = CrossModalAttention(E, H, batch_first=batch_first, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in _inputs(B, Lq, Lk, E, batch_first, "none", torch.float64))
    args = (q, q, q) if sharing == "self" else (q, k, k) if sharing == "kv" else (q, k, v)
    kpm = None
    if padding:
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        kpm[:, 2:] = True
    leaves = [q, k, v, *m.parameters()]
    assert _C.attention_small(*args, kpm, False, True, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight,
                              m.out_proj.bias, H, batch_first, 1 << 22, 1 << 24) is not None

    def step():
        out = m(*args, key_padding_mask=kpm, need_weights=False)[0]
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True, create_graph=True)
        second = torch.autograd.grad(grads[0].square().sum(), m.in_proj_weight)[0]
        return out, grads, second

    out, grads, second = step()
    _python_path(monkeypatch)
    ref_out, ref_grads, ref_second = step()
    assert torch.equal(out, ref_out)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, ref_grads))
    torch.testing.assert_close(second, ref_second, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sharing,padding,average", list(itertools.product(("self", "kv"), (None, "most"),
                                                                           (True, False))))
def test_attention_route_training_step_with_weights(monkeypatch, sharing, padding, average):
    # need_weights=True in a training step: the route's weights record ATen's graph (the Python path's
    # _AveragedWeights recomputes them in backward): the same values and gradients up to rounding, those
    # of nn.MultiheadAttention, and a double backward.
    monkeypatch.setattr(cma_module, "ONEDNN_MIN_MACS", 1 << 24)
    torch.manual_seed(4)
    B, E, H = 2, 32, 2
    Lq, Lk = (5, 5) if sharing == "self" else (3, 11)
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    m = CrossModalAttention.from_module(mha)
    q, k = (t.requires_grad_() for t in _inputs(B, Lq, Lk, E, True, "none", torch.float64)[:2])
    args = (q, q, q) if sharing == "self" else (q, k, k)
    kpm = None
    if padding:
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        kpm[:, 2:] = True
    leaves = [q, k, *m.parameters()]
    assert _C.attention_small(*args, kpm, True, average, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight,
                              m.out_proj.bias, H, True, 1 << 22, 1 << 24) is not None

    def step(module):
        out, weights = module(*args, key_padding_mask=kpm, average_attn_weights=average)
        loss = out.square().sum() + (weights * torch.arange(weights.numel(), dtype=weights.dtype).view_as(weights)).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, create_graph=True)
        second = torch.autograd.grad(grads[0].square().sum(), m.in_proj_weight)[0]
        return out, weights, grads, second

    ours = step(m)
    _python_path(monkeypatch)
    for ref in (step(m), step(mha)):
        for a, b in zip(ours[:2], ref[:2]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(ours[2], ref[2]):
            assert (a is None) == (b is None) or (a is not None and not a.any()) or (b is not None and not b.any())
            if a is not None and b is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(ours[3], ref[3], rtol=1e-9, atol=1e-11)
