"""csrc/attention_call.cpp (issue 19): plain eager cross_modal_attention calls run in one C++ crossing, with
the op's gradient formula as a C++ autograd node. It must give exactly (bitwise) what the Python path
gives, forward, backward and double backward, serve the calls it is meant for, and hand everything else
back (None) so that the Python path checks and raises."""
import itertools
import sys

import pytest
import torch

import mmkernels
from mmkernels import _C, reference

cma_ops = sys.modules["mmkernels.ops.cross_modal_attention"]


def _python_path(monkeypatch):
    monkeypatch.setattr(cma_ops, "attention_call", lambda *a: None)


def _case(dtype, masks, gqa, B=2, H=4, Lq=5, Lk=9, E=16):
    torch.manual_seed(0)
    Hk = 2 if gqa else H
    q = torch.randn(B, H, Lq, E, dtype=dtype)
    k, v = torch.randn(B, Hk, Lk, E, dtype=dtype), torch.randn(B, Hk, Lk, E, dtype=dtype)
    kw = dict(enable_gqa=gqa)
    if "kpm" in masks:
        kw["key_padding_mask"] = torch.rand(B, Lk) < 0.3
    if "len" in masks:
        kw["kv_lengths"] = torch.tensor([Lk, 4], dtype=torch.int32)
    if "bool" in masks:
        kw["attn_mask"] = torch.rand(Lq, Lk) < 0.8
    if "float" in masks:
        kw["attn_mask"] = torch.randn(B, 1, Lq, Lk, dtype=dtype)
    if "causal" in masks:
        kw["is_causal"] = True
    if "scale" in masks:
        kw["scale"] = 0.3
    return q, k, v, kw


def _run(q, k, v, kw, grad):
    qs, ks, vs = (t.clone().requires_grad_(grad) for t in (q, k, v))
    out = mmkernels.cross_modal_attention(qs, ks, vs, **kw)
    if not grad:
        return out, None
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    return out, (qs.grad, ks.grad, vs.grad)


MASKS = ["", "kpm", "len", "bool", "float", "causal", "scale", "kpm+len+bool+causal"]


@pytest.mark.parametrize("dtype,masks,gqa,grad", list(itertools.product(
    (torch.float32, torch.float64, torch.bfloat16, torch.float16), MASKS, (False, True), (False, True))))
def test_route_is_the_python_path(monkeypatch, dtype, masks, gqa, grad):
    q, k, v, kw = _case(dtype, masks, gqa)
    args = (q, k, v, kw.get("key_padding_mask"), kw.get("kv_lengths"), kw.get("attn_mask"),
            kw.get("is_causal", False), kw.get("scale"), 0.0, gqa)
    assert _C.attention_call(*args) is not None
    out, grads = _run(q, k, v, kw, grad)
    if grad:
        assert "AttentionFunction" in out.grad_fn.name()
    _python_path(monkeypatch)
    ref_out, ref_grads = _run(q, k, v, kw, grad)
    assert torch.equal(out, ref_out) and out.stride() == ref_out.stride()
    if grad:
        for a, b in zip(grads, ref_grads):
            assert torch.equal(a, b)


def test_route_against_the_reference_and_sdpa():
    q, k, v, kw = _case(torch.float64, "kpm+bool", False)
    out, grads = _run(q, k, v, kw, True)
    ref_out, ref_grads = _run_reference(q, k, v, kw)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    q, k, v, kw = _case(torch.float64, "causal", False, Lq=9)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(mmkernels.cross_modal_attention(q, k, v, is_causal=True), sdpa)


def _run_reference(q, k, v, kw):
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = reference.cross_modal_attention(qs, ks, vs, **kw)
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)))
    return out, (qs.grad, ks.grad, vs.grad)


@pytest.mark.parametrize("masks", ["", "kpm+causal", "float"])
def test_double_backward_through_the_cpp_node(masks):
    q, k, v, kw = _case(torch.float64, masks, masks == "", B=1, H=2, Lq=3, Lk=4, E=4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = mmkernels.cross_modal_attention(q, k, v, **kw)
    assert "AttentionFunction" in out.grad_fn.name()
    torch.autograd.gradgradcheck(lambda q, k, v: mmkernels.cross_modal_attention(q, k, v, **kw), (q, k, v))
    # The gradient of |dL/dq|^2 with respect to k: nonzero, and the reference's.
    def penalty(fn):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        (gq,) = torch.autograd.grad(fn(qq, kk, vv, **kw).sum(), qq, create_graph=True)
        return torch.autograd.grad(gq.pow(2).sum(), (kk, vv))
    ours, ref = penalty(mmkernels.cross_modal_attention), penalty(reference.cross_modal_attention)
    assert ours[0].abs().sum() > 0
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


class _Subclass(torch.Tensor):
    pass


def test_route_hands_back_what_it_does_not_serve():
    q, k, v, _ = _case(torch.float32, "", False)
    ok = (q, k, v, None, None, None, False, None, 0.0, False)
    assert _C.attention_call(*ok) is not None

    def call(**changes):
        names = ("q", "k", "v", "key_padding_mask", "kv_lengths", "attn_mask", "is_causal", "scale", "dropout_p",
                 "enable_gqa")
        args = dict(zip(names, ok))
        args.update(changes)
        return _C.attention_call(*args.values())

    B, H, Lq, E = q.shape
    Lk = k.shape[2]
    from torch.nn.attention.bias import causal_lower_right
    handed_back = dict(
        dropout=call(dropout_p=0.1),
        subclass=call(q=q.as_subclass(_Subclass)),
        causal_bias=call(attn_mask=causal_lower_right(Lq, Lk)),
        mask_needs_grad=call(attn_mask=torch.zeros(Lq, Lk, requires_grad=True)),
        int_mask=call(attn_mask=torch.zeros(Lq, Lk, dtype=torch.int32)),
        mask_shape=call(attn_mask=torch.zeros(Lq + 1, Lk, dtype=torch.bool)),
        kpm_dtype=call(key_padding_mask=torch.zeros(B, Lk)),
        kpm_shape=call(key_padding_mask=torch.zeros(B, Lk + 1, dtype=torch.bool)),
        lengths_too_long=call(kv_lengths=torch.tensor([Lk + 1, 1])),
        lengths_negative=call(kv_lengths=torch.tensor([-1, 1], dtype=torch.int32)),
        lengths_float=call(kv_lengths=torch.tensor([1.0, 1.0])),
        gqa_without_flag=call(k=k[:, :2], v=v[:, :2]),
        heads_not_dividing=call(k=k[:, :3], v=v[:, :3], enable_gqa=True),
        head_dim=call(k=k[..., :8]),
        keys=call(v=v[:, :, :3]),
        batch=call(k=k[:1], v=v[:1]),
        dtype=call(k=k.double()),
        int_q=call(q=q.int()),
        rank=call(q=q[0]),
        not_a_tensor=call(q=q.tolist()),
        causal_not_bool=call(is_causal=1),
        scale_str=call(scale="0.5"),
        scale_beyond_double=call(scale=10 ** 400),
        nested=call(q=torch.nested.nested_tensor([q[0, :, :2].transpose(0, 1)], layout=torch.jagged)),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        handed_back["autocast"] = call()
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        handed_back["torch_function_mode"] = call()

    def under_vmap(qq):
        handed_back["vmap"] = call(q=qq)
        return qq

    torch.func.vmap(under_vmap)(q.unsqueeze(0))
    served = sorted(name for name, r in handed_back.items() if r is not None)
    assert not served, f"served what the Python path must take: {served}"


def test_errors_still_name_the_argument():
    q, k, v, _ = _case(torch.float32, "", False)
    with pytest.raises(ValueError, match="kv_lengths"):
        mmkernels.cross_modal_attention(q, k, v, kv_lengths=torch.tensor([99, 1]))
    with pytest.raises(ValueError, match="enable_gqa"):
        mmkernels.cross_modal_attention(q, k[:, :2], v[:, :2])
